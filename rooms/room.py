"""A room: one workspace's document, its awareness states and its peers.

The room knows nothing of sockets. A peer is any object with a non-blocking
``send(frame)`` and ``close(code, reason)`` (``collab.connection.Connection``
writes at once or queues), so the room never awaits a peer.

Incoming updates are applied to the pycrdt document at once. Their effect
(the document's own delta, so duplicates cost nothing) is broadcast at the
next flush: everything that arrived within one flush window is merged into a
single update, encoded once and handed to every peer, the sender included
(the stock client relies on the echo). The raw updates go to the store in one
append per flush; ``saved`` acks follow once the append is durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import pycrdt

from clocks import Clock, SystemClock
from codec import protocol as p
from persistence.base import DocumentStore
from rooms.awareness import AwarenessRecord, AwarenessTable
from rooms.config import Changes, Rejection, UpdateGuard, config_map
from rooms.document import RoomDocument, apply_checked
from rooms.guarding import ConfigGuarding
from rooms.peer import Peer, PeerState
from rooms.persist import PersistPipeline
from rooms.refusal import apply_and_revert

log = logging.getLogger("collab.room")


@dataclass(slots=True)
class RoomTuning:
    flush_interval: float = 0.0  # seconds; 0 = merge what arrives in one loop turn
    # Minimum gap between two flushes (seconds). A quiet room flushes at once;
    # a busy one at most every `flush_min_gap`, so more updates share a frame
    # (one send per peer per flush is the dominant cost under load).
    flush_min_gap: float = 0.0
    compact_every_updates: int = 500
    compact_every_bytes: int = 4 * 1024 * 1024
    max_awareness_state_bytes: int = 64 * 1024
    max_awareness_clients: int = 0  # awareness client ids one peer may own (0 = no limit)
    max_document_bytes: int = 0  # encoded size past which growing updates are refused (0 = no limit)
    tombstone_seconds: float = 60.0
    limits: dict[str, Any] = field(default_factory=dict)  # advertised in `welcome`
    server_version: str = "0"


ControlHandler = Callable[["Room", PeerState, p.Control], None]


class RoomListener(Protocol):
    """Every hook a room calls on its listeners, declared once; a listener defines any subset.

    Extensions hand listeners to the room (``Extension.listeners()``); the room
    calls each hook on every listener that has it, in order, and logs (never
    propagates) a hook's exception. ``Room.notify`` lets an extension call a
    declared hook on the others (the locks extension tells presence).
    """

    async def on_load(self, room: Room) -> None:
        """The stored document is in memory, no peer has joined yet (``room.is_new``: nothing was stored).

        A change made here is stored like any other (seeding from the backend)."""

    def filter_awareness(self, room: Room, peer: PeerState, client_id: int, state: Any) -> Any:
        """Rewrite a parsed awareness state before it is accepted, or raise AwarenessRejected."""

    def on_join(self, room: Room, peer: PeerState) -> None: ...
    def on_hello(self, room: Room, peer: PeerState) -> None: ...  # opted in to control messages
    def on_leave(self, room: Room, peer: PeerState) -> None: ...
    def on_awareness(self, room: Room, peer: PeerState, client_id: int, state: str | None) -> None: ...
    def on_config_change(self, room: Room, peer: PeerState | None, changes: Changes, config: dict) -> None:
        """Accepted configuration changes (``peer`` None: a server change), after the guards."""

    def on_config_rejected(self, room: Room, peer: PeerState | None, rejections: list, attempted: Changes) -> None:
        """What the guards refused of an update (``attempted``: everything it tried)."""

    def on_outbox_persisted(self, room: Room, records: list) -> None:
        """Records staged with ``stage_outbox`` are committed with their updates."""

    def on_locks_changed(self, room: Room, locks: list[dict[str, Any]]) -> None:
        """The workspace's locks changed (sent by the locks extension through ``Room.notify``)."""


class RoomRelay(Protocol):
    """What a room asks of the scale-out relay (``scaleout/relay.py``) once attached with ``Room.attach_relay``.

    Updates are durable in the shared store's log, which the relay reads; the
    room also hands over each flush's accepted updates, so the other nodes get
    them without waiting for that log (``publish_updates``). Awareness is not
    stored, so the room hands over what its own peers sent; the relay brings
    other nodes' in through ``apply_remote`` / ``apply_remote_awareness``.
    """

    def publish_updates(self, room: Room, updates: list[bytes]) -> Awaitable[Any] | None:
        """These updates (accepted here, about to be appended) may go to the other nodes now.

        Returns what the append waits for first (at most briefly): the publish
        having reached Redis, so that it does not wait for the append's fsync.
        """

    def publish_awareness(self, room: Room, entries: list[p.AwarenessEntry]) -> None:
        """Send these awareness entries (from this node's peers) to the other nodes."""


LISTENER_HOOKS = frozenset(name for name in vars(RoomListener) if name.startswith(("on_", "filter_")))


class Room:
    def __init__(
        self,
        workspace_id: str,
        store: DocumentStore,
        tuning: RoomTuning | None = None,
        control_handlers: Mapping[str, ControlHandler] | None = None,
        guards: list[UpdateGuard] | None = None,
        listeners: list[Any] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.workspace_id = workspace_id
        self.store = store
        self.clock = clock or SystemClock()  # peers' last_seen: lock holders' liveness (locks/extension.py)
        self.tuning = tuning or RoomTuning()
        self.control_handlers = dict(control_handlers or {})
        self.guards = list(guards or [])
        self.listeners = list(listeners or [])
        # Plain view of the `config` map, kept only when someone looks at it.
        self.guarding = ConfigGuarding(
            self.guards, bool(self.guards) or any(hasattr(x, "on_config_change") for x in self.listeners)
        )
        self._applying_client_update = False
        self._applying_remote = False
        self.relay: RoomRelay | None = None  # set by attach_relay when several nodes share Redis
        self.loaded_seq = 0  # the store's last sequence number when this room was loaded
        self.loaded_tip: bytes | None = None  # and the store's chain token of that entry (Redis)
        self._remote_peers: dict[str, PeerState] = {}
        self._refusing = False  # inside _refuse_update: doc events are not news
        self.document = RoomDocument(workspace_id, self._on_doc_update)
        self._client_delta: bytes | None = None  # what the client update being applied integrated
        self.peers: dict[Peer, PeerState] = {}
        self.awareness_table = AwarenessTable(
            self.tuning.max_awareness_state_bytes,
            self.tuning.max_awareness_clients,
            self.tuning.tombstone_seconds,
            [x.filter_awareness for x in self.listeners if hasattr(x, "filter_awareness")],
        )
        self.awareness: dict[int, AwarenessRecord] = self.awareness_table.records  # client id -> record
        self._epoch = 0
        # Pending work for the next flush.
        self._outgoing: list[bytes] = []
        self._flush_handle: asyncio.Handle | asyncio.TimerHandle | None = None
        self.persist = PersistPipeline(
            workspace_id,
            store,
            snapshot=lambda: self.doc.get_update(),
            on_persisted=lambda records: self._emit("on_outbox_persisted", records),
            on_failed=self._fail,
            compact_every_updates=self.tuning.compact_every_updates,
            compact_every_bytes=self.tuning.compact_every_bytes,
        )
        self._last_flush = 0.0
        self.loaded = False
        self.is_new = False
        self.last_active = time.monotonic()
        self.stats = {"updates_in": 0, "frames_out": 0, "flushes": 0}
        # Server-wide counters (collab.metrics.Counters), set by the app; None in bare rooms.
        self._metrics: Any = None
        self._first_pending_at: float | None = None  # perf_counter() of the oldest update not yet flushed

    # ------------------------------------------------------------- loading

    async def load(self) -> None:
        """Bring the stored document into memory; peers join only after this."""
        stored = await self.store.load(self.workspace_id)
        self.document.load(stored.updates if stored.snapshot is None else [stored.snapshot, *stored.updates])
        self._outgoing.clear()
        if self.guarding.tracking:
            self.guarding.start(self.doc)
            # From here on the view is kept up to date from the document's
            # own events: only the paths a transaction touched are re-read.
            self.document.observe_config(self.guarding.on_events)
        self.persist.loaded(stored.last_seq, stored.snapshot_seq, stored.updates)
        self.loaded_seq = stored.last_seq
        self.loaded_tip = stored.tip
        self.is_new = stored.is_new
        self.loaded = True
        for listener in self.listeners:
            hook = getattr(listener, "on_load", None)
            if hook is not None:
                await hook(self)

    # --------------------------------------------------------- membership

    def join(self, peer: Peer, identity: Any = None) -> PeerState:
        """Register a peer and send it our step 1 and the known awareness."""
        assert self.loaded, "join before load"
        self._epoch += 1
        ps = PeerState(peer=peer, epoch=self._epoch, identity=identity, last_seen=self.clock.monotonic())
        self.peers[peer] = ps
        self.last_active = time.monotonic()
        # Our step 1 makes the client send what we lack (its offline edits).
        peer.send(p.encode_sync_step1(self.doc.get_state()))
        live = self.awareness_table.live()
        if live:
            peer.send(p.encode_awareness(live))
            self.awareness_table.mark_seen(live, self._epoch)
        self._emit("on_join", ps)
        return ps

    def leave(self, peer: Peer) -> None:
        ps = self.peers.pop(peer, None)
        if ps is None:
            return
        ps.alive = False
        self.persist.acks.pop(ps, None)
        self.last_active = time.monotonic()
        self.awareness_table.release(ps, time.monotonic())
        if self.awareness_table.pending:
            self._schedule_flush(immediate=True)
        self._emit("on_leave", ps)

    @property
    def is_idle(self) -> bool:
        return not self.peers

    # ----------------------------------------------------------- messages

    def receive(self, ps: PeerState, message: p.Message) -> None:
        """Handle one decoded message. Raises ProtocolError to drop the peer."""
        ps.last_seen = self.clock.monotonic()
        if isinstance(message, p.SyncUpdate | p.SyncStep2):
            self._receive_update(ps, message.update)
        elif isinstance(message, p.SyncStep1):
            try:
                update = self.doc.get_update(message.state_vector)
            except ValueError:
                raise p.ProtocolError("invalid state vector") from None
            ps.peer.send(p.encode_sync_step2(update))
        elif isinstance(message, p.AwarenessMessage):
            self._receive_awareness(ps, message.entries)
        elif isinstance(message, p.QueryAwareness):
            live = self.awareness_table.live()
            ps.peer.send(p.encode_awareness(live))
            self.awareness_table.mark_seen(live, ps.epoch)
        elif isinstance(message, p.Control):
            self._receive_control(ps, message)

    def _receive_update(self, ps: PeerState, update: bytes) -> None:
        ps.updates_received += 1
        self.stats["updates_in"] += 1
        metrics = self.metrics
        if metrics is not None:
            metrics.updates_in += 1
            if self._first_pending_at is None:
                self._first_pending_at = time.perf_counter()
        refusal = None
        if update != p.EMPTY_UPDATE:
            if ps.read_only:
                refusal = "read-only"
            elif self.document.too_large(update, self.tuning.max_document_bytes):
                refusal = "document_too_large"
        if refusal is not None:
            if metrics is not None:
                metrics.updates_refused += 1
            self._refuse_update(ps, update, refusal)
        elif update != p.EMPTY_UPDATE:
            if self.relay is not None:
                update = self.document.cut_at_state(update)
            ranges = self.document.check(update)
            update = self.document.prepare_text(update)
            self.document.grew(len(update))
            self._applying_client_update = True
            self._client_delta = None
            try:
                apply_checked(self.doc, update)
            except BaseException:
                self.document.stale()
                if self._client_delta is not None:
                    # pycrdt failed halfway and kept what it had integrated (peers
                    # get it in the broadcast): store it too, or a restart loses it.
                    self.persist.updates.append(self._client_delta)
                    self._schedule_flush()
                raise
            finally:
                self._applying_client_update = False
            self.document.advanced(ranges)  # it integrated completely (checked above)
            # The raw update is stored (not only its integrated delta), so
            # structs still waiting for missing dependencies survive a restart.
            self.persist.updates.append(update)
            if self.guarding.tracking:
                self._check_config(ps)
        self.persist.acks[ps] = ps.updates_received
        self.last_active = time.monotonic()
        self._schedule_flush()

    def _on_doc_update(self, event: pycrdt.TransactionEvent) -> None:
        if self._refusing:
            return  # _refuse_update sends the net effect itself
        update = event.update
        if self._applying_remote:
            # Stored by the node that accepted it: only broadcast here.
            self._outgoing.append(update)
            return
        if self._applying_client_update:
            self._client_delta = update
        else:
            self.document.stale()  # a server change: the cached state vector is stale
        self._outgoing.append(update)
        if not self._applying_client_update and self.loaded:
            # A change made by the server itself (compensation, seeding):
            # it is stored like a client's update.
            self.persist.updates.append(update)
            self._schedule_flush()

    # ------------------------------------------------------------ refusal

    def _refuse_update(self, ps: PeerState, update: bytes, reason: str) -> None:
        """Apply and revert an update (``rooms/refusal.py``), so that its author converges back."""
        if ps.read_only:
            # A viewer's update must integrate completely, deletions included:
            # anything left pending would be completed later by someone else's
            # update and slip in unchecked.
            try:
                self.document.check(update, deletes=True)
            except p.ProtocolError:
                self._tell_refused(ps, [], reason)
                return
        else:
            self.document.check(update)
        self._refusing = True  # _on_doc_update stays quiet: the net effect is sent below
        try:
            reverted = apply_and_revert(self.document, update)
        finally:
            self._refusing = False
        self._outgoing.append(reverted.net)
        self.persist.updates.append(reverted.net)
        self.document.grew(len(reverted.net))  # tombstones and re-inserted content
        if self.guarding.tracking:
            self.guarding.resync(self.doc)
        self._tell_refused(ps, reverted.paths, reason)
        self._schedule_flush()
        if reverted.error is not None:
            raise reverted.error

    def state_problems(self) -> list[str]:
        """Why the state this room hands out would not load in Yjs (empty: it would)."""
        return self.document.problems()

    def _tell_refused(self, ps: PeerState, paths: list[str], reason: str) -> None:
        if paths:  # for the audit trail: which paths and why, not the refused values
            self._emit("on_config_rejected", ps, [Rejection(paths, reason)], {})
        body: dict[str, Any] = {"type": "rejected", "paths": paths, "reason": reason}
        if reason == "document_too_large":
            body["limit"] = self.tuning.max_document_bytes
        ps.control(body)

    # ------------------------------------------------------- configuration

    @property
    def config_view(self) -> dict[str, Any]:
        """The configuration as plain values (kept only while a guard or listener tracks it)."""
        return self.guarding.view

    def _check_config(self, ps: PeerState | None) -> None:
        """Run the guards over what an update changed; tell the author what they refused."""
        verdict = self.guarding.check(self, ps, self.doc)
        if verdict.rejections:
            self._emit("on_config_rejected", ps, verdict.rejections, verdict.attempted)
            if ps is not None:
                for rejection in verdict.rejections:
                    ps.control(
                        {"type": "rejected", "paths": rejection.paths, "reason": rejection.reason, **rejection.details}
                    )
        if verdict.changes:
            self._emit("on_config_change", ps, verdict.changes, self.guarding.view)

    def change_config(self, fn: Callable[[pycrdt.Map], None], author: PeerState | None = None) -> None:
        """Make a server-side change to the configuration map (stored and broadcast)."""
        with self.doc.transaction(origin="server"):
            fn(config_map(self.doc))
        if self.guarding.tracking:
            changes = self.guarding.changed(self.doc)
            if changes:
                self._emit("on_config_change", author, changes, self.guarding.view)

    def stage_outbox(self, record: Any) -> None:
        """Write ``record`` with the updates of the current flush, in the same transaction."""
        self.persist.staged.append(record)
        self._schedule_flush()

    def notify(self, hook: str, *args: Any) -> None:
        """Call ``hook(room, *args)`` on every listener that has it (an extension telling the others)."""
        self._emit(hook, *args)

    def _emit(self, hook: str, *args: Any) -> None:
        if hook not in LISTENER_HOOKS:
            raise ValueError(f"{hook!r} is not a room listener hook (declare it on RoomListener)")
        for listener in self.listeners:
            method = getattr(listener, hook, None)
            if method is not None:
                try:
                    method(self, *args)
                except Exception:
                    log.exception("%s hook failed in %s", hook, self.workspace_id)

    def _receive_awareness(self, ps: PeerState, entries: tuple[p.AwarenessEntry, ...]) -> None:
        accepted = self.awareness_table.receive(self, ps, entries)
        if accepted:
            self._schedule_flush()
            if self.listeners:
                for entry in accepted:
                    self._emit("on_awareness", ps, entry.client_id, entry.state)

    def _receive_control(self, ps: PeerState, message: p.Control) -> None:
        if message.type == "hello":
            ps.wants_control = True
            ps.control(
                {
                    "type": "welcome",
                    "server": "datasource-collab",
                    "version": self.tuning.server_version,
                    "protocol": p.PROTOCOL_VERSION,
                    "workspace": self.workspace_id,
                    "limits": self.tuning.limits,
                    "saved_seq": self.durable_seq,
                    **({"id": message.body["id"]} if "id" in message.body else {}),
                }
            )
            self._emit("on_hello", ps)
            return
        if not ps.wants_control:
            raise p.ProtocolError("send 'hello' before other control messages", p.CLOSE_POLICY)
        handler = self.control_handlers.get(message.type)
        if handler is not None:
            handler(self, ps, message)
        elif message.type == "ping":
            ps.control({"type": "pong", **_ref(message)})
        else:
            ps.control(
                {
                    "type": "error",
                    "code": "unknown_type",
                    "message": f"unknown control message type {message.type!r}",
                    **_ref(message),
                }
            )

    # ------------------------------------------------------ scale-out relay

    def attach_relay(self, relay: RoomRelay) -> None:
        """Several nodes serve this workspace: updates are cut at the stored state, awareness goes to ``relay``."""
        self.relay = relay

    def apply_remote(self, update: bytes, seq: int | None = None) -> None:
        """An update another node accepted and stored: apply and broadcast, nothing else.

        No guards (they ran on the node that accepted it), no store append,
        no acks, no config listeners (that node recorded and forwards it).
        """
        self.document.integrate(update, self._apply_remote_now)
        if seq is not None:
            self.durable_seq = max(self.durable_seq, seq)
        if self._outgoing:
            self._schedule_flush()

    def _apply_remote_now(self, update: bytes) -> None:
        """Apply a relayed update now (``RoomDocument.integrate`` decided it is ready; it keeps the state vector)."""
        self._applying_remote = True
        try:
            update = self.document.prepare_text(update)
            with self.doc.transaction(origin="remote"):
                self.doc.apply_update(update)
        except (ValueError, RuntimeError, p.ProtocolError) as exc:
            log.error("relayed update for %s does not apply: %s", self.workspace_id, exc)
            self.document.stale()
        finally:
            self._applying_remote = False
        self.document.grew(len(update))
        if self.guarding.tracking and self.loaded:
            self.guarding.changed(self.doc)  # keep the view current (re-reads only what it touched)

    def restore_to_store(self) -> None:
        """Store the whole document again (the store lost writes this room holds)."""
        self.persist.updates.append(self.doc.get_update())
        self._schedule_flush()

    def _remote_peer(self, node: str) -> PeerState:
        ps = self._remote_peers.get(node)
        if ps is None:
            ps = PeerState(peer=_RemotePeer(node), epoch=0, remote=node)
            self._remote_peers[node] = ps
        return ps

    def apply_remote_awareness(self, node: str, entries: list[p.AwarenessEntry]) -> None:
        """Awareness relayed from another node (states of its clients); newer clocks win."""
        if self.awareness_table.apply_remote(self._remote_peer(node), entries, time.monotonic()):
            self._schedule_flush()

    def expire_remote_awareness(self, ttl: float) -> None:
        """Drop relayed states not refreshed within ``ttl`` seconds (their node died)."""
        self.awareness_table.expire_remote(ttl, time.monotonic())
        if self.awareness_table.pending:
            self._schedule_flush(immediate=True)

    # -------------------------------------------------------------- flush

    def _schedule_flush(self, immediate: bool = False) -> None:
        if self._flush_handle is not None:
            return
        loop = asyncio.get_running_loop()
        interval = self.tuning.flush_interval
        if interval > 0 and not immediate:
            self._flush_handle = loop.call_later(interval, self.flush)
            return
        gap = self.tuning.flush_min_gap
        if gap > 0 and not immediate:
            wait = self._last_flush + gap - time.monotonic()
            if wait > 0:
                self._flush_handle = loop.call_later(wait, self.flush)
                return
        self._flush_handle = loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send merged updates and awareness to every peer; start persisting."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._last_flush = time.monotonic()
        self.stats["flushes"] += 1
        published = None
        if self.relay is not None and self.persist.updates:
            # Other nodes: now (before the local sends wake their writers), not once durable.
            published = self.relay.publish_updates(self, list(self.persist.updates))
        frames = []
        if self._outgoing:
            outgoing = self._outgoing
            self._outgoing = []
            merged = outgoing[0] if len(outgoing) == 1 else pycrdt.merge_updates(*outgoing)
            frames.append(p.encode_sync_update(merged))
        if self.awareness_table.pending:
            entries, local = self.awareness_table.take_pending()
            frames.append(p.encode_awareness(entries))
            if self.relay is not None and local:
                self.relay.publish_awareness(self, local)
            self.awareness_table.mark_seen(entries, self._epoch)
        if frames:
            for peer in list(self.peers):
                for frame in frames:
                    peer.send(frame)
            self.stats["frames_out"] += len(frames) * len(self.peers)
        metrics = self.metrics
        if metrics is not None:
            metrics.flushes += 1
            if frames:
                metrics.frames_queued += len(frames) * len(self.peers)
            if self._first_pending_at is not None:
                # Fan-out latency: the oldest update of this flush, from its arrival
                # until it sits in every peer's queue (observed once per flush).
                metrics.fanout.observe(time.perf_counter() - self._first_pending_at)
                self._first_pending_at = None
        self.persist.submit(after=published)

    def _fail(self, reason: str) -> None:
        """The store lost our writes: drop everyone so they resend on reconnect."""
        for ps in list(self.peers.values()):
            ps.control({"type": "error", "code": "storage_failure", "message": reason})
            ps.peer.close(p.CLOSE_INTERNAL_ERROR, "storage failure")

    async def drain(self) -> None:
        """Flush and wait until everything received is durable."""
        if self._flush_handle is not None or self._outgoing or self.persist.pending:
            self.flush()
        await self.persist.drain()

    # --------------------------------------------------- persisted state

    @property
    def metrics(self) -> Any:
        """Server-wide counters (collab.metrics.Counters), set by the app; None in bare rooms."""
        return self._metrics

    @metrics.setter
    def metrics(self, counters: Any) -> None:
        self._metrics = counters
        self.persist.metrics = counters
        self.document.metrics = counters

    @property
    def doc(self) -> pycrdt.Doc:
        """The room's CRDT document (rebuilt when an edit cuts a surrogate pair: don't keep it)."""
        return self.document.doc

    @property
    def size_bytes(self) -> int:
        """Encoded size of the document (an upper bound between measurements)."""
        return self.document.size_bytes

    @property
    def held_updates(self) -> int:
        """Relayed or stored updates waiting for something they build on (normally 0; see RoomDocument.integrate)."""
        return len(self.document.held)

    @property
    def durable_seq(self) -> int:
        """The store's sequence number of the last update known durable."""
        return self.persist.durable_seq

    @durable_seq.setter
    def durable_seq(self, seq: int) -> None:
        self.persist.durable_seq = seq

    @property
    def failed(self) -> str | None:
        """Why the store lost this room's writes (None while all is well)."""
        return self.persist.failed

    @property
    def pending_store_updates(self) -> int:
        """Updates waiting for the next append."""
        return len(self.persist.updates)

    # ------------------------------------------------------------ helpers

class _RemotePeer:
    """Stands for another node's clients in awareness ownership; sends nothing."""

    def __init__(self, node: str) -> None:
        self.node = node

    def send(self, frame: bytes) -> None:
        pass

    def close(self, code: int, reason: str) -> None:
        pass


def _ref(message: p.Control) -> dict[str, Any]:
    """Echo a request's ``id`` so clients can match answers."""
    return {"id": message.body["id"]} if "id" in message.body else {}
