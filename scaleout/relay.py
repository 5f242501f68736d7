"""Relay between nodes over Redis Streams (scale-out).

Each node reads, for every room it has open, the workspace's update stream
(``{ws:X}:updates``, written by RedisDocumentStore.append: it is also the
document's durable tail) and its awareness stream (``{ws:X}:awareness``),
with one blocking XREAD over all of them from a single reader task. Entries
carry the origin node; a node skips its own. Others' updates are applied to
the room as remote changes: broadcast to local peers, never stored again,
never acked, no guards (those ran where the update was accepted).

Updates are numbered (stream id ``0-<seq>``) with no gaps. A reader that sees
a gap (the stream was trimmed under it) reloads the room from the store.
After Redis was unreachable the reader reconnects with backoff, continues
from its last sequence number, and if Redis holds *less* than the room (Redis
lost acknowledged writes: no AOF, or ``appendfsync everysec``), the room
writes its whole state back.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from codec import protocol as p
from collab.extensions import Extension
from persistence.base import StoreError
from persistence.redis import RedisDocumentStore, awareness_key, seq_of, updates_key

if TYPE_CHECKING:
    from collab.extensions import Host
    from rooms.room import Room

log = logging.getLogger("collab.relay")

AWARENESS_MAXLEN = 10_000


@dataclass(slots=True)
class _Follow:
    room: Room
    seq: int
    aw_id: str


class Relay:
    def __init__(
        self,
        store: RedisDocumentStore,
        node_id: str,
        block_ms: int = 1000,
        awareness_ttl: float = 30.0,
        timeout: float = 2.0,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.block_ms = block_ms
        self.awareness_ttl = awareness_ttl
        self.timeout = timeout
        self.follows: dict[str, _Follow] = {}
        self._by_key: dict[bytes, tuple[str, str]] = {}
        self.healthy = True
        self.error: str | None = None
        self.app: Host | None = None
        self.reader: aioredis.Redis | None = None
        self._wake = asyncio.Event()
        self._aw_pending: dict[str, list[p.AwarenessEntry]] = {}
        self._aw_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.stats = {"relayed_updates": 0, "relayed_awareness": 0, "resyncs": 0, "reconnects": 0}

    # ------------------------------------------------------------ lifecycle

    async def start(self, app: Host) -> None:
        self.app = app
        self.reader = aioredis.Redis.from_url(
            self.store.url,
            socket_timeout=self.block_ms / 1000.0 + self.timeout,
            socket_connect_timeout=self.timeout,
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_loop(), name="relay reader"),
            loop.create_task(self._publish_loop(), name="relay publisher"),
            loop.create_task(self._sweep_loop(), name="relay sweeper"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.reader is not None:
            await self.reader.aclose()

    # -------------------------------------------------------------- rooms

    def attach(self, room: Room) -> None:
        room.attach_relay(self)
        since = int(time.time() * 1000 - self.awareness_ttl * 1000)
        ws = room.workspace_id
        self.follows[ws] = _Follow(room, room.loaded_seq, f"{max(0, since)}-0")
        self._by_key[updates_key(ws).encode()] = (ws, "u")
        self._by_key[awareness_key(ws).encode()] = (ws, "a")
        self._wake.set()

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
                    except (RedisError, StoreError, OSError) as exc:
                        self.error = f"{type(exc).__name__}: {exc}"
                        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                        delay = min(delay * 2, 5.0)
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
                response = await self.reader.xread(streams, count=1000, block=self.block_ms)
                if not self.healthy:
                    await self._recovered()
            except (RedisError, StoreError, OSError) as exc:
                if self.healthy:
                    log.error("Redis unreachable from the relay (%s); reconnecting with backoff", exc)
                self.healthy, self.error = False, f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1
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
                        await self._updates(follow, entries)
                    else:
                        self._awareness(follow, entries)
                except (RedisError, StoreError) as exc:
                    log.warning("relay of %s interrupted: %s", ws, exc)
                except Exception:
                    log.exception("relay of %s failed", ws)

    async def _updates(self, follow: _Follow, entries: list) -> None:
        room = follow.room
        for stream_id, fields in entries:
            seq = seq_of(stream_id)
            if seq <= follow.seq:
                continue
            if seq > follow.seq + 1:
                ws = room.workspace_id
                log.warning("relay of %s missed %d..%d (trimmed): reloading", ws, follow.seq + 1, seq - 1)
                await self.resync(follow)
                return
            follow.seq = seq
            if fields[b"node"].decode() == self.node_id:
                continue
            room.apply_remote(fields[b"data"], seq)
            self.stats["relayed_updates"] += 1

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

    async def resync(self, follow: _Follow) -> None:
        """Reload a room's document from the store (after a gap, or Redis lost data)."""
        room = follow.room
        stored = await self.store.load(room.workspace_id)
        self.stats["resyncs"] += 1
        if stored.last_seq < follow.seq or stored.last_seq < room.durable_seq:
            log.error(
                "Redis holds %s only up to %d, this node had %d: writing the room's state back",
                room.workspace_id,
                stored.last_seq,
                max(follow.seq, room.durable_seq),
            )
            room.durable_seq = stored.last_seq
            room.restore_to_store()
        if stored.snapshot is not None:
            room.apply_remote(stored.snapshot)
        for update in stored.updates:
            room.apply_remote(update)
        follow.seq = stored.last_seq
        room.durable_seq = max(room.durable_seq, stored.last_seq)

    async def _recovered(self) -> None:
        """Redis answers again: check every followed room against what it holds."""
        log.warning("Redis reachable again: relay resumes, checking %d rooms", len(self.follows))
        self.healthy, self.error = True, None
        self.stats["reconnects"] += 1
        for follow in list(self.follows.values()):
            last = await self.store.last_seq(follow.room.workspace_id)
            if last < follow.seq:
                await self.resync(follow)

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
            except RedisError as exc:
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
