"""Relay between nodes over Redis Streams (scale-out).

Each node reads, for every room it has open, the workspace's update stream
(``{ws:X}:updates``, written by RedisDocumentStore.append: it is also the
document's durable tail) and its awareness stream (``{ws:X}:awareness``),
with one blocking XREAD over all of them from a single reader task. Entries
carry the origin node; a node skips its own. Others' updates are applied to
the room as remote changes: broadcast to local peers, never stored again,
never acked, no guards (those ran where the update was accepted).

Updates are numbered (stream id ``0-<seq>``) with no gaps, and chained: each
entry names the one before it. A reader that sees a gap (the stream was trimmed
under it) reloads the room from the store; one that sees a broken chain (a
failover lost the newest entries and new appends took their numbers, so the
reader had read past them) writes the room's state back and reloads.
After Redis was unreachable the reader reconnects with backoff, continues
from its last sequence number, and if Redis holds *less* than the room (Redis
lost acknowledged writes: no AOF, or ``appendfsync everysec``), the room
writes its whole state back.

The stream is the truth, but reading it costs the hop the append's whole
round trip (a Lua script, the AOF fsync, then the reader's wake-up). So the
node that accepted updates also **publishes** them (``PUBLISH`` on
``{ws:X}:live``, best effort) as soon as its room flushes, before they are
durable -- exactly when its own peers get them. Other nodes apply a live
message at once and remember its updates' bytes; when the same update comes
through the stream, it only advances the sequence number (no second apply).
A lost or late live message changes nothing: the stream delivers it.

Awareness is ephemeral: each node publishes its local clients' changes and,
every third of ``relay_awareness_ttl_seconds``, a heartbeat of their live
states. A relayed state not refreshed within the TTL (its node died) is
removed on every other node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from codec import protocol as p
from collab.extensions import Extension
from persistence.base import StoreError
from persistence.redis import RedisDocumentStore, awareness_key, seq_of, tag, updates_key
from persistence.redisconn import REDIS_ERRORS, connect, is_cluster, prepare, reset, xread
from scaleout.livewire import LiveWire, WireError
from scaleout.livewire import target as wire_target

if TYPE_CHECKING:
    from collab.extensions import Host
    from rooms.room import Room

log = logging.getLogger("collab.relay")

AWARENESS_MAXLEN = 10_000
LIVE_MAX_BYTES = 256 * 1024  # bigger updates (a state written back whole) come through the stream only
LIVE_SEEN_MAX = 4096  # live updates remembered per room until the stream brings them
LIVE_DRAIN_MAX = 256  # live messages taken in one go (their deltas leave in one flush per room)
# While live messages keep up (every stream entry read was applied already), the
# stream reader waits this long between reads, so each read returns a batch.
STREAM_PACE_SECONDS = 0.02
# Reconnect backoff cap: a failover is over in a second or two, and rooms lag until the relay is back.
RECONNECT_MAX_SECONDS = 2.0


def live_channel(workspace: str) -> str:
    """The channel a workspace's fresh updates are published on (same hash tag as its keys)."""
    return tag(workspace) + ":live"


def encode_live(node_id: str, updates: list[bytes]) -> bytes:
    """A live message: the origin node, then the raw updates, each as varBytes."""
    return p.write_var_bytes(node_id.encode()) + b"".join(p.write_var_bytes(u) for u in updates)


def decode_live(data: bytes) -> tuple[bytes, list[bytes]]:
    node, pos = p.read_var_bytes(data, 0)
    updates = []
    while pos < len(data):
        update, pos = p.read_var_bytes(data, pos)
        updates.append(update)
    return node, updates


@dataclass(slots=True)
class _Follow:
    room: Room
    seq: int
    aw_id: str
    # Updates applied from live messages, until the stream brings them (then only the seq advances).
    seen: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    # Updates the stream brought first, until their late live message comes (then it is dropped).
    streamed: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    tip: bytes | None = None  # chain token of the entry at ``seq``: a failover may renumber history


def tip_of(fields: dict | None) -> bytes | None:
    """A stream entry's chain token (``at``, written by the append script)."""
    if fields is None:
        return None
    return fields.get(b"at")


class Relay:
    def __init__(
        self,
        store: RedisDocumentStore,
        node_id: str,
        block_ms: int = 1000,
        awareness_ttl: float = 30.0,
        timeout: float = 2.0,
        cluster_poll_ms: float = 10.0,
        live: bool = True,
        wire: bool = True,
    ) -> None:
        self.store = store
        self.cluster_poll_ms = cluster_poll_ms
        self.node_id = node_id
        self.live = live
        self._node_bytes = node_id.encode()
        self.block_ms = block_ms
        self.awareness_ttl = awareness_ttl
        self.timeout = timeout
        self.follows: dict[str, _Follow] = {}
        self._by_key: dict[bytes, tuple[str, str]] = {}
        self.healthy = True
        self.error: str | None = None
        self.app: Host | None = None
        self.reader: Any = None
        self.publisher: Any = None  # its own connection: no pool wait, no health-check PING
        self._wake = asyncio.Event()
        self._aw_pending: dict[str, list[p.AwarenessEntry]] = {}
        self._aw_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._live_pending: dict[str, list[bytes]] = {}
        self._live_waiters: list[asyncio.Future] = []  # appends waiting for the pending publish
        self._live_wake = asyncio.Event()
        self._by_channel: dict[bytes, str] = {}
        self._channels_dirty = False  # the wire subscriber's channels changed (attach, prune)
        self._channels_waiter: asyncio.Future | None = None  # a plain future: no task of its own
        self._live_connected = False
        # One server: the live channel speaks RESP itself (scaleout/livewire.py); Cluster/Sentinel: redis-py.
        self._wire = live and wire and wire_target(store.url) is not None
        self._wire_pub: LiveWire | None = None
        self.stats = {
            "relayed_updates": 0,
            "relayed_awareness": 0,
            "resyncs": 0,
            "history_changes": 0,  # a failover renumbered entries this node had read (chain broken)
            "reconnects": 0,
            "live_updates": 0,  # applied from live messages
            "live_skipped": 0,  # stream entries already applied live
            "live_late": 0,  # live updates the stream had brought first
        }

    # ------------------------------------------------------------ lifecycle

    async def start(self, app: Host) -> None:
        self.app = app
        # Its own client: a blocking XREAD holds its connection for block_ms. No
        # transparent retries: a failover must reach _recovered(), which checks that
        # Redis still holds the history this node relayed.
        self.reader = connect(
            self.store.url,
            timeout=self.timeout,
            socket_timeout=self.block_ms / 1000.0 + self.timeout,
            max_connections=4,
            retry=Retry(NoBackoff(), 0),
        )
        if self.live and not self._wire:
            self.publisher = connect(self.store.url, timeout=self.timeout, max_connections=2)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_loop(), name="relay reader"),
            loop.create_task(self._publish_loop(), name="relay publisher"),
            loop.create_task(self._sweep_loop(), name="relay sweeper"),
        ]
        if self._wire:
            self._tasks += [
                loop.create_task(self._wire_publisher(), name="relay live publisher"),
                loop.create_task(self._wire_subscriber(), name="relay live reader"),
            ]
        elif self.live:
            self._tasks += [
                loop.create_task(self._live_publish_loop(), name="relay live publisher"),
                loop.create_task(self._live_read_loop(), name="relay live reader"),
            ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.reader is not None:
            await self.reader.aclose()
        if self.publisher is not None:
            await self.publisher.aclose()
        if self._wire_pub is not None:
            self._wire_pub.close()

    @property
    def live_connected(self) -> bool:
        """Whether the live reader is subscribed (the stream reader paces itself meanwhile)."""
        return self._live_connected

    # -------------------------------------------------------------- rooms

    def attach(self, room: Room) -> None:
        room.attach_relay(self)
        since = int(time.time() * 1000 - self.awareness_ttl * 1000)
        ws = room.workspace_id
        self.follows[ws] = _Follow(room, room.loaded_seq, f"{max(0, since)}-0", tip=room.loaded_tip)
        self._by_key[updates_key(ws).encode()] = (ws, "u")
        self._by_key[awareness_key(ws).encode()] = (ws, "a")
        self._by_channel[live_channel(ws).encode()] = ws
        self._note_channels()
        self._wake.set()

    def _note_channels(self) -> None:
        """The set of live channels changed: the wire subscriber (re)subscribes."""
        self._channels_dirty = True
        waiter = self._channels_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _prune(self) -> None:
        if self.app is None:
            return
        manager = self.app.rooms
        for ws, follow in list(self.follows.items()):
            current = manager.rooms.get(ws)
            if follow.room.failed or (current is not follow.room and ws not in manager.loading):
                del self.follows[ws]
                self._by_key.pop(updates_key(ws).encode(), None)
                self._by_key.pop(awareness_key(ws).encode(), None)
                self._by_channel.pop(live_channel(ws).encode(), None)
                self._note_channels()

    # ------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        delay = 0.1
        while True:
            self._prune()
            if not self.follows:
                if not self.healthy:
                    try:
                        assert self.reader is not None
                        await self.reader.ping()
                        await self._recovered()
                    except (*REDIS_ERRORS, StoreError) as exc:
                        self.error = f"{type(exc).__name__}: {exc}"
                        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                        delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                        continue
                self._wake.clear()
                try:
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            streams: dict[str, str] = {}
            for ws, follow in self.follows.items():
                streams[updates_key(ws)] = f"0-{follow.seq}"
                streams[awareness_key(ws)] = follow.aw_id
            self._wake.clear()
            try:
                assert self.reader is not None
                response = await xread(
                    self.reader, streams, count=1000, block_ms=self.block_ms, poll_ms=self.cluster_poll_ms
                )
                if not self.healthy:
                    await self._recovered()
            except Exception as exc:  # Redis's errors, and what its cluster client lets through in a failover
                if not isinstance(exc, (*REDIS_ERRORS, StoreError)):
                    log.warning("relay read failed: %s: %s", type(exc).__name__, exc)
                if self.healthy:
                    log.error("Redis unreachable from the relay (%s); reconnecting with backoff", exc)
                self.healthy, self.error = False, f"{type(exc).__name__}: {exc}"
                await reset(self.reader)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                continue
            delay = 0.1
            caught_up = self.live and self._live_connected and bool(response)
            for key, entries in response or []:
                target = self._by_key.get(key if isinstance(key, bytes) else key.encode())
                if target is None:
                    continue
                ws, kind = target
                follow = self.follows.get(ws)
                if follow is None:
                    continue
                try:
                    if kind == "u":
                        if await self._updates(follow, entries):
                            caught_up = False
                    else:
                        self._awareness(follow, entries)
                        caught_up = False
                except (*REDIS_ERRORS, StoreError) as exc:
                    log.warning("relay of %s interrupted: %s", ws, exc)
                except Exception:
                    log.exception("relay of %s failed", ws)
            if caught_up:
                # Live messages delivered all of it: the stream only confirms, so read it in batches.
                await asyncio.sleep(STREAM_PACE_SECONDS)

    async def _updates(self, follow: _Follow, entries: list) -> int:
        """Apply stream entries in order; returns how many were news here (not applied live already)."""
        room = follow.room
        news: list[bytes] = []
        for stream_id, fields in entries:
            seq = seq_of(stream_id)
            if seq <= follow.seq:
                continue
            if seq > follow.seq + 1:
                ws = room.workspace_id
                log.warning("relay of %s missed %d..%d (trimmed): reloading", ws, follow.seq + 1, seq - 1)
                self._apply(room, news, follow.seq)
                await self.resync(follow)
                return len(news) + 1
            prev = fields.get(b"prev")
            if follow.tip is not None and prev is not None and prev != follow.tip:
                # The entry this node read at follow.seq is not the one Redis now holds there:
                # a failover lost the newest entries and new appends took their numbers. What
                # this room holds of the lost ones goes back to the store; the rest is reread.
                ws = room.workspace_id
                log.error("Redis history of %s changed at or before %d (failover): reloading it", ws, follow.seq)
                self._apply(room, news, follow.seq)
                self.stats["history_changes"] += 1
                await self.resync(follow, restore=True)
                return len(news) + 1
            follow.seq = seq
            follow.tip = tip_of(fields)
            if fields[b"node"] == self._node_bytes:
                continue
            data = fields[b"data"]
            seen = follow.seen
            if seen and data in seen:
                del seen[data]  # applied from its live message already
                self.stats["live_skipped"] += 1
                continue
            news.append(data)
            if self._live_connected:
                follow.streamed[data] = None
                if len(follow.streamed) > LIVE_SEEN_MAX:
                    follow.streamed.popitem(last=False)
        self._apply(room, news, follow.seq)
        self.stats["relayed_updates"] += len(news)
        return len(news)

    @staticmethod
    def _apply(room: Room, updates: list[bytes], seq: int | None = None) -> None:
        """Apply relayed updates one by one; their deltas leave in the room's next flush, merged.

        Not merged before applying: a merged update's intermediate values of a
        key are collected at once, so peers would never see them, while the
        room's own flush merge keeps every update's content.
        """
        for update in updates:
            room.apply_remote(update)
        if seq is not None and seq > room.durable_seq:
            room.durable_seq = seq

    def _awareness(self, follow: _Follow, entries: list) -> None:
        cutoff = time.time() * 1000 - self.awareness_ttl * 1000
        for stream_id, fields in entries:
            text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
            follow.aw_id = text
            node = fields[b"node"].decode()
            if node == self.node_id or int(text.split("-", 1)[0]) < cutoff:
                continue
            try:
                parsed = [p.AwarenessEntry(int(c), int(k), s) for c, k, s in json.loads(fields[b"data"])]
            except (ValueError, TypeError):
                continue
            follow.room.apply_remote_awareness(node, parsed)
            self.stats["relayed_awareness"] += 1

    async def resync(self, follow: _Follow, restore: bool = False) -> None:
        """Reload a room's document from the store (after a gap, or Redis lost data).

        ``restore``: Redis's history changed under this node (a failover), so the
        room's state is written back whole, whatever the numbers say.
        """
        room = follow.room
        stored = await self.store.load(room.workspace_id)
        self.stats["resyncs"] += 1
        regressed = stored.last_seq < follow.seq or stored.last_seq < room.durable_seq
        if regressed:
            log.error(
                "Redis holds %s only up to %d, this node had %d: writing the room's state back",
                room.workspace_id,
                stored.last_seq,
                max(follow.seq, room.durable_seq),
            )
            room.durable_seq = stored.last_seq
        if restore or regressed:
            room.restore_to_store()
        if stored.snapshot is not None:
            room.apply_remote(stored.snapshot)
        for update in stored.updates:
            room.apply_remote(update)
        follow.seq = stored.last_seq
        follow.tip = stored.tip
        room.durable_seq = max(room.durable_seq, stored.last_seq)

    async def _recovered(self) -> None:
        """Redis answers again: check every followed room against what it holds."""
        log.warning("Redis reachable again: relay resumes, checking %d rooms", len(self.follows))
        self.healthy, self.error = True, None
        self.stats["reconnects"] += 1
        for follow in list(self.follows.values()):
            ws = follow.room.workspace_id
            last = await self.store.last_seq(ws)
            if last < follow.seq:
                await self.resync(follow)
                continue
            if follow.tip is not None and tip_of(await self.store.entry_at(ws, follow.seq)) != follow.tip:
                # A failover promoted a replica that missed our last entries, and new ones took
                # their numbers: write back what Redis lost.
                log.error("Redis history of %s changed at %d (failover): reloading it", ws, follow.seq)
                await self.resync(follow, restore=True)
                continue
            # Read the document again in any case: what this node relayed while Redis
            # failed over may have been lost and written again under other numbers.
            await self.resync(follow)

    # ----------------------------------------------------------------- live

    def publish_updates(self, room: Room, updates: list[bytes]) -> asyncio.Future | None:
        """A room flushed updates it accepted (about to be appended): tell the other nodes now.

        Returns a future done once Redis answered the publish (or it failed):
        the room's append waits for it, briefly. Redis sends what a command
        produced only after the fsync of everything it wrote in the same turn,
        so a publish read together with the append would reach the other
        nodes one fsync later.
        """
        if not self.live:
            return None
        small = [u for u in updates if len(u) <= LIVE_MAX_BYTES]
        if not small:
            return None
        if self._wire:
            return self._wire_publish(room.workspace_id, small)
        self._live_pending.setdefault(room.workspace_id, []).extend(small)
        self._live_wake.set()
        done = asyncio.get_running_loop().create_future()
        self._live_waiters.append(done)
        return done

    async def _live_publish_loop(self) -> None:
        """One pipeline of PUBLISH per wake-up: what several flushes produced meanwhile goes together."""
        last_error = 0.0
        while True:
            await self._live_wake.wait()
            self._live_wake.clear()
            pending, self._live_pending = self._live_pending, {}
            waiters, self._live_waiters = self._live_waiters, []
            try:
                if not pending or self.publisher is None:
                    continue
                if len(pending) == 1 or is_cluster(self.publisher):  # a cluster pipeline refuses PUBLISH
                    for ws, updates in pending.items():
                        await self.publisher.publish(live_channel(ws), encode_live(self.node_id, updates))
                else:
                    pipe = self.publisher.pipeline(transaction=False)
                    for ws, updates in pending.items():
                        pipe.publish(live_channel(ws), encode_live(self.node_id, updates))
                    await pipe.execute()
            except REDIS_ERRORS as exc:  # best effort: the stream brings them
                if time.monotonic() - last_error > 5:
                    last_error = time.monotonic()
                    log.warning("live relay not published (Redis: %s); the stream delivers", exc)
            finally:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    async def _live_read_loop(self) -> None:
        """Subscribe to the live channels of the open rooms; apply what other nodes publish."""
        delay = 0.1
        while True:
            pubsub = None
            try:
                assert self.reader is not None
                await prepare(self.reader)  # a cluster client needs its slot map before subscribing
                pubsub = self.reader.pubsub()
                subscribed: set[bytes] = set()
                while True:
                    wanted = set(self._by_channel)
                    if wanted - subscribed:
                        await pubsub.subscribe(*(wanted - subscribed))
                    if subscribed - wanted:
                        await pubsub.unsubscribe(*(subscribed - wanted))
                    subscribed = wanted
                    if not subscribed:
                        await asyncio.sleep(0.2)
                        continue
                    self._live_connected = True
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    delay = 0.1
                    batch: dict[str, list[bytes]] = {}
                    taken = 0
                    while message is not None and taken < LIVE_DRAIN_MAX:
                        if message.get("type") == "message":
                            self._live(message["channel"], message["data"], batch)
                        taken += 1
                        # What already arrived is applied with it, before the room's next flush.
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0)
                    for ws, updates in batch.items():
                        follow = self.follows.get(ws)
                        if follow is not None:
                            self._apply(follow.room, updates)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                self._live_connected = False
                log.info("live relay interrupted (%s); the stream delivers meanwhile", exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
            except Exception:
                self._live_connected = False
                log.exception("live relay failed; restarting it")
                await asyncio.sleep(1.0)
            finally:
                if pubsub is not None:
                    try:
                        await pubsub.aclose()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass

    def _wire_publish(self, ws: str, updates: list[bytes]) -> asyncio.Future | None:
        """Into the socket now, before the room's local sends, unless a publish is still unanswered.

        Then Redis is behind: what comes meanwhile waits and goes, one message
        per room, on the same connection (order kept) when the answer comes,
        so a busy node sends fewer, bigger messages instead of queueing many.
        """
        wire = self._wire_pub
        if wire is None or not wire.connected:
            return None  # best effort: the stream delivers
        done = asyncio.get_running_loop().create_future()
        if wire.waiting or self._live_pending:  # behind, or others queued first: keep the order
            self._live_pending.setdefault(ws, []).extend(updates)
            self._live_waiters.append(done)
            return done
        self._wire_send(wire, {ws: updates}, [done])
        return done

    def _wire_send(self, wire: LiveWire, pending: dict[str, list[bytes]], waiters: list[asyncio.Future]) -> None:
        replies = [wire.publish(live_channel(ws), encode_live(self.node_id, ups)) for ws, ups in pending.items()]

        def answered(_reply: asyncio.Future) -> None:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            if self._live_pending and not wire.waiting:
                more, self._live_pending = self._live_pending, {}
                queued, self._live_waiters = self._live_waiters, []
                if wire.connected:
                    self._wire_send(wire, more, queued)
                else:  # lost with the connection: the stream delivers them
                    for waiter in queued:
                        if not waiter.done():
                            waiter.set_result(None)

        replies[-1].add_done_callback(answered)

    async def _wire_publisher(self) -> None:
        """Keep the live publisher's connection open (one server)."""
        delay = 0.1
        while True:
            try:
                self._wire_pub = await LiveWire.open(self.store.url, self.timeout)
                delay = 0.1
                await self._wire_pub.closed
            except (OSError, TimeoutError, WireError) as exc:
                log.info("live relay publisher cannot connect (%s); the stream delivers meanwhile", exc)
            self._wire_pub = None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _wire_subscriber(self) -> None:
        """Subscribe to the open rooms' live channels (one server); messages are applied as they are read."""
        delay = 0.1
        while True:
            wire = None
            try:
                wire = await LiveWire.open(self.store.url, self.timeout, self._on_wire_message)
                delay = 0.1
                asked: set[bytes] = set()
                loop = asyncio.get_running_loop()
                while not wire.closed.done():
                    self._channels_dirty = False
                    wanted = set(self._by_channel)
                    wire.subscribe(*(wanted - asked))
                    wire.unsubscribe(*(asked - wanted))
                    asked = wanted
                    # Connected once Redis confirmed every channel asked for (until then the stream paces itself).
                    while not wire.closed.done() and not self._channels_dirty:
                        self._live_connected = wanted <= wire.subscribed
                        waiter = self._channels_waiter = loop.create_future()
                        try:
                            await asyncio.wait([waiter, wire.closed], timeout=1.0 if self._live_connected else 0.05)
                        finally:
                            self._channels_waiter = None
                            waiter.cancel()
            except (OSError, TimeoutError, WireError) as exc:
                log.info("live relay interrupted (%s); the stream delivers meanwhile", exc)
            finally:
                self._live_connected = False
                if wire is not None:
                    wire.close()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    def _on_wire_message(self, channel: bytes, data: bytes) -> None:
        batch: dict[str, list[bytes]] = {}
        self._live(channel, data, batch)
        for ws, updates in batch.items():
            follow = self.follows.get(ws)
            if follow is not None:
                try:
                    self._apply(follow.room, updates)
                except Exception:  # one room's problem must not cut the connection of all
                    log.exception("live update of %s not applied; the stream delivers it", ws)

    def _live(self, channel: bytes, data: bytes, batch: dict[str, list[bytes]]) -> None:
        ws = self._by_channel.get(channel)
        follow = self.follows.get(ws) if ws is not None else None
        if follow is None:
            return
        try:
            node, updates = decode_live(data)
        except (p.ProtocolError, ValueError, IndexError):
            log.warning("malformed live message on %r ignored", channel)
            return
        if node == self._node_bytes:
            return
        seen, streamed = follow.seen, follow.streamed
        fresh = []
        for update in updates:
            if streamed and update in streamed:
                del streamed[update]  # the stream was faster this time
                self.stats["live_late"] += 1
                continue
            seen[update] = None
            if len(seen) > LIVE_SEEN_MAX:
                seen.popitem(last=False)
            fresh.append(update)
        if fresh:
            batch.setdefault(follow.room.workspace_id, []).extend(fresh)
            self.stats["live_updates"] += len(fresh)

    # ------------------------------------------------------------ awareness

    def publish_awareness(self, room: Room, entries: list[p.AwarenessEntry]) -> None:
        self._aw_pending.setdefault(room.workspace_id, []).extend(entries)
        self._aw_wake.set()

    async def _publish_loop(self) -> None:
        last_error = 0.0
        while True:
            await self._aw_wake.wait()
            self._aw_wake.clear()
            pending, self._aw_pending = self._aw_pending, {}
            if not pending or self.store.client is None:
                continue
            try:
                pipe = self.store.client.pipeline(transaction=False)
                for ws, entries in pending.items():
                    latest = {e.client_id: e for e in entries}
                    data = json.dumps([[e.client_id, e.clock, e.state] for e in latest.values()])
                    key = awareness_key(ws)
                    pipe.xadd(key, {"node": self.node_id, "data": data}, maxlen=AWARENESS_MAXLEN, approximate=True)
                    pipe.pexpire(key, int(max(self.awareness_ttl, 60) * 10_000))
                await pipe.execute()
            except REDIS_ERRORS as exc:
                if time.monotonic() - last_error > 5:
                    last_error = time.monotonic()
                    log.warning("awareness not relayed (Redis: %s)", exc)

    async def _sweep_loop(self) -> None:
        beat = max(0.5, self.awareness_ttl / 3)
        next_beat = time.monotonic() + beat
        while True:
            await asyncio.sleep(min(1.0, beat))
            for follow in list(self.follows.values()):
                follow.room.expire_remote_awareness(self.awareness_ttl)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + beat
                for follow in list(self.follows.values()):
                    room = follow.room
                    live = [
                        p.AwarenessEntry(cid, rec.clock, rec.state)
                        for cid, rec in room.awareness.items()
                        if rec.state is not None and rec.owner is not None and rec.owner.remote is None
                    ]
                    if live:
                        self.publish_awareness(room, live)


class RelayExtension(Extension):
    """Plugs the relay into the app when the store is Redis."""

    name = "relay"

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.relay: Relay | None = None
        self._hooks = _Hooks(self)

    def listeners(self) -> list:
        return [self._hooks]

    async def start(self, app: Host) -> None:
        if not isinstance(app.store, RedisDocumentStore):
            log.warning("relay disabled: the document store is not Redis")
            return
        s = self.settings
        self.relay = Relay(
            app.store,
            s.node_id,
            block_ms=int(s.relay_block_ms),
            awareness_ttl=s.relay_awareness_ttl_seconds,
            timeout=s.redis_timeout_seconds,
            cluster_poll_ms=s.redis_cluster_poll_ms,
            live=s.relay_live,
            wire=s.relay_live_wire,
        )
        await self.relay.start(app)
        log.info("scale-out relay on %s as node %s", app.store.path, s.node_id)

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()

    async def check(self) -> None:
        if self.relay is not None and not self.relay.healthy:
            raise RuntimeError(f"Redis unreachable: {self.relay.error}")


class _Hooks:
    def __init__(self, ext: RelayExtension) -> None:
        self.ext = ext

    async def on_load(self, room: Room) -> None:
        if self.ext.relay is not None:
            self.ext.relay.attach(room)
