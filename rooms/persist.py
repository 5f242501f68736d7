"""A room's persist pipeline: appends in arrival order, `saved` acks once durable, compaction.

Each flush hands over what it collected (updates to store, per-peer ack
counts, outbox records staged in the same transaction); one append per
flush, and each append's acks wait for the previous append, so acks leave
in the order the updates arrived. A store that batches appends itself
(``BatchingStore``: SQLite joins every room's appends of one loop turn into
one commit) is handed each append without a task: a queue of appends in
flight is settled from the head as their futures complete. Past a threshold the document's state
replaces the stored tail (compaction), in a task of its own so acks never
wait for it. A store error fails the room (its owner closes the peers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from persistence.base import BatchingStore, DocumentStore, StoreError

AFTER_MAX_SECONDS = 0.05  # how long an append waits for what it was told to wait for (submit's ``after``)

if TYPE_CHECKING:
    from rooms.peer import PeerState

log = logging.getLogger("collab.room")


def _declares_nowait(store: Any) -> bool:
    return callable(getattr(type(store), "append_nowait", None))


class _InFlight:
    """One submitted append: what its acks and records wait for."""

    __slots__ = ("future", "updates", "acks", "staged", "started")

    def __init__(self, future: asyncio.Future | None, updates: list[bytes], acks: dict, staged: list, started: float):
        self.future = future  # None: nothing to store, only acks to send in order
        self.updates = updates
        self.acks = acks
        self.staged = staged
        self.started = started


class PersistPipeline:
    def __init__(
        self,
        workspace_id: str,
        store: DocumentStore,
        snapshot: Callable[[], bytes],
        on_persisted: Callable[[list[Any]], None],
        on_failed: Callable[[str], None],
        compact_every_updates: int,
        compact_every_bytes: int,
    ) -> None:
        self.workspace_id = workspace_id
        self.store = store
        self._snapshot = snapshot  # the document's full state, for compaction
        self._on_persisted = on_persisted  # outbox records committed
        self._on_failed = on_failed
        self.compact_every_updates = compact_every_updates
        self.compact_every_bytes = compact_every_bytes
        self.metrics: Any = None  # collab.metrics.Counters, set by the room's owner
        # What the next flush appends.
        self.updates: list[bytes] = []
        self.acks: dict[PeerState, int] = {}
        self.staged: list[Any] = []  # outbox/audit records for the next append
        # What is durable.
        self.durable_seq = 0
        self.snapshot_seq = 0
        self.tail_updates = 0
        self.tail_bytes = 0
        self.failed: str | None = None
        self._tail: asyncio.Task | None = None  # the last append (acks chain on it)
        # A batching store takes appends without a task; they settle in order from here.
        # (Asked of the class: a wrapper that forwards unknown attributes to a
        # batching store but wraps ``append`` itself must keep its ``append``.)
        self._nowait = store.append_nowait if isinstance(store, BatchingStore) and _declares_nowait(store) else None
        self._inflight: deque[_InFlight] = deque()
        self._compacting = False
        self._compact_task: asyncio.Task | None = None

    def loaded(self, last_seq: int, snapshot_seq: int, tail: list[bytes]) -> None:
        self.durable_seq = last_seq
        self.snapshot_seq = snapshot_seq
        self.tail_updates = len(tail)
        self.tail_bytes = sum(len(u) for u in tail)
        self.updates.clear()

    @property
    def pending(self) -> bool:
        return bool(self.updates or self.acks or self.staged)

    def submit(self, after: Awaitable[Any] | None = None) -> None:
        """Start appending what was collected (one append; its acks after the previous one's).

        ``after``: wait for it (at most AFTER_MAX_SECONDS) before appending. The
        relay passes its live publish: Redis sends a reply only after the
        fsync of whatever it wrote in the same turn, so a publish read together
        with an append would reach the other nodes one fsync late.
        """
        if not self.pending:
            return
        updates, acks, staged = self.updates, self.acks, self.staged
        self.updates, self.acks, self.staged = [], {}, []
        if self._nowait is None:
            self._tail = asyncio.get_running_loop().create_task(
                self._append(updates, acks, staged, self._tail, after)
            )
            return
        future = None
        if updates or staged:
            try:
                future = self._nowait(self.workspace_id, updates, staged or None)
            except StoreError as exc:
                self._store_failed(exc)
                return
        entry = _InFlight(future, updates, acks, staged, time.perf_counter())
        if future is None and not self._inflight:
            self._settled(entry)  # nothing before it: its acks leave now
            return
        self._inflight.append(entry)
        if future is not None:
            future.add_done_callback(self._settle)

    def _settle(self, _future: Any = None) -> None:
        """Settle the appends at the head of the queue whose commits are done, in order."""
        inflight = self._inflight
        while inflight:
            entry = inflight[0]
            if entry.future is not None and not entry.future.done():
                return
            inflight.popleft()
            try:
                self._settled(entry)
            except Exception:  # a listener's bug must not stall the appends behind it
                log.exception("settling an append of %s failed", self.workspace_id)

    def _settled(self, entry: _InFlight) -> None:
        seq = None
        if entry.future is not None:
            if entry.future.cancelled():
                self._fail("storage failure: append cancelled")
                return
            error = entry.future.exception()
            if error is not None:
                self._store_failed(error)
                return
            seq = entry.future.result()
            if self.metrics is not None:
                self.metrics.store_append.observe(time.perf_counter() - entry.started)
        self._appended(seq, entry.updates, entry.acks, entry.staged)

    def _store_failed(self, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.store_errors += 1
        self._fail(f"storage failure: {exc}")

    async def drain(self) -> None:
        """Wait until every submitted append (and a running compaction) is done."""
        while self._inflight:
            waiting = [e.future for e in self._inflight if e.future is not None and not e.future.done()]
            if waiting:
                await asyncio.wait(waiting)
            await asyncio.sleep(0)  # the done callbacks settle them
        tail = self._tail
        if tail is not None:
            await asyncio.wait([tail])
        compaction = self._compact_task
        if compaction is not None and not compaction.done():
            await asyncio.wait([compaction])

    async def _append(
        self, updates: list[bytes], acks: dict[PeerState, int], staged: list, previous, after=None
    ) -> None:
        if after is not None:
            with contextlib.suppress(Exception):  # late or failed: the append goes anyway
                await asyncio.wait_for(asyncio.shield(after), AFTER_MAX_SECONDS)
        started = time.perf_counter()
        metrics = self.metrics
        try:
            if staged:
                seq = await self.store.append(self.workspace_id, updates, outbox=staged)
            else:
                seq = await self.store.append(self.workspace_id, updates) if updates else None
        except StoreError as exc:
            if metrics is not None:
                metrics.store_errors += 1
            self._fail(f"storage failure: {exc}")
            return
        if metrics is not None and (updates or staged):
            metrics.store_append.observe(time.perf_counter() - started)
        if previous is not None:
            await asyncio.wait([previous])  # acks leave in the order updates arrived
        self._appended(seq, updates, acks, staged)

    def _appended(self, seq: int | None, updates: list[bytes], acks: dict[PeerState, int], staged: list) -> None:
        """An append is durable and every earlier one too: records out, acks, maybe compaction."""
        if self.failed:
            return
        if seq is not None:
            self.durable_seq = max(self.durable_seq, seq)
            self.tail_updates += len(updates)
            self.tail_bytes += sum(len(u) for u in updates)
        if staged:
            self._on_persisted(staged)
        for ps, count in acks.items():
            if ps.alive and count > ps.updates_acked:
                ps.updates_acked = count
                ps.control({"type": "saved", "updates": count, "seq": self.durable_seq})
        if (
            self.tail_updates >= self.compact_every_updates or self.tail_bytes >= self.compact_every_bytes
        ) and not self._compacting:
            # In its own task: the next append (and its acks) need not wait.
            self._compacting = True
            self._compact_task = asyncio.get_running_loop().create_task(self._compact())

    async def _compact(self) -> None:
        self._compacting = True
        try:
            upto = self.durable_seq
            # The in-memory document holds every durable update (and maybe a
            # few newer ones, which is harmless: updates are idempotent).
            # pycrdt leaves structs still waiting for a missing dependency out
            # of get_update(), but the room never holds any: an update that
            # would leave some is refused before it is applied, and relayed
            # updates come in stream order after everything they depend on.
            await self.store.compact(self.workspace_id, self._snapshot(), upto)
            self.snapshot_seq = upto
            self.tail_updates = 0
            self.tail_bytes = 0
        except StoreError as exc:
            log.warning("compaction of %s failed: %s", self.workspace_id, exc)
        finally:
            self._compacting = False

    def _fail(self, reason: str) -> None:
        if self.failed:
            return
        self.failed = reason
        log.error("room %s failed: %s", self.workspace_id, reason)
        self._on_failed(reason)
