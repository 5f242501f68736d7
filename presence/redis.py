"""Redis presence registry: rosters shared by every node.

Keys of one workspace share the hash tag ``{ws:<id>}`` (one cluster slot):

- ``{ws:<id>}:presence:conn:<conn id>``: one connection entry (JSON), with
  its own expiry (``PX``) that the owning node's heartbeat keeps pushing out;
- ``{ws:<id>}:presence:conns``: the set of connection ids (an index; ids whose
  entry expired are pruned when the roster is read);
- ``{ws:<id>}:presence:locks``: the workspace's lock list (JSON).

Every write publishes the writer's node id on the channel
``{ws:<id>}:presence``; the other nodes watching the workspace re-read its
roster. Expiry makes no noise, so nodes also re-read the rosters they serve
every ``ttl / POLLS_PER_TTL`` seconds: a crashed node's entries are gone from
Redis ``0.6 * ttl`` after its last heartbeat and from every roster at most
``0.2 * ttl`` later.

A node's own entries are served from memory (the node is their authority),
so its own participants stay correct while Redis is unreachable; the last
remote entries it read are kept as long as they could still be alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from clocks import Clock, SystemClock
from persistence.redisconn import connect, is_cluster, prepare, publish_after, publish_in, refresh_slots
from presence.base import ENTRY_EXPIRY_FRACTION, HEARTBEATS_PER_TTL, ConnectionEntry, WorkspacePresence

log = logging.getLogger("collab.presence")

_DELETE = object()  # a staged removal
_MISSING: Any = object()
MAX_CONNECTIONS = 16  # per node: the pub/sub reader holds one, refreshes share the rest
_READ = """
local ids = redis.call('SMEMBERS', KEYS[1])
local out = {}
for _, id in ipairs(ids) do
  local v = redis.call('GET', ARGV[1] .. id)
  if v then out[#out + 1] = v else redis.call('SREM', KEYS[1], id) end
end
local locks = redis.call('GET', KEYS[2])
if not locks then locks = '' end
return {locks, out}
"""


def _tag(workspace_id: str) -> str:
    return "{ws:" + workspace_id + "}"


def index_key(workspace_id: str) -> str:
    return f"{_tag(workspace_id)}:presence:conns"


def entry_prefix(workspace_id: str) -> str:
    return f"{_tag(workspace_id)}:presence:conn:"


def locks_key(workspace_id: str) -> str:
    return f"{_tag(workspace_id)}:presence:locks"


def channel(workspace_id: str) -> str:
    return f"{_tag(workspace_id)}:presence"


def _workspace_of(channel_name: str) -> str | None:
    if channel_name.startswith("{ws:") and channel_name.endswith("}:presence"):
        return channel_name[4 : -len("}:presence")]
    return None


class RedisPresenceRegistry:
    """A :class:`presence.base.PresenceRegistry` in Redis (``redis.asyncio``)."""

    def __init__(
        self,
        url: str,
        node_id: str,
        ttl: float = 30.0,
        client: aioredis.Redis | None = None,
        timeout: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        self.url = url
        # The heartbeat, the lock list's expiry and the remote-entry cache; Redis
        # expires entries itself, in real time (so tests give it the real clock).
        self.clock = clock or SystemClock()
        self.timeout = timeout  # seconds per Redis command before it counts as failed
        self.node_id = node_id
        self.ttl = ttl
        self.on_change: Callable[[str], None] | None = None
        self._client = client
        self._owns_client = client is None
        self._own: dict[str, dict[str, ConnectionEntry]] = {}
        self._staged: dict[str, dict[str, Any]] = {}  # workspace -> conn id -> entry or _DELETE
        self._staged_locks: dict[str, list[dict[str, Any]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}  # one writer per workspace at a time
        self._remote_cache: dict[str, tuple[float, WorkspacePresence]] = {}
        self._decoded: dict[str, dict[bytes, ConnectionEntry | None]] = {}  # watched workspaces only
        self._watched: set[str] = set()
        self._pubsub: Any = None
        self._tasks: list[asyncio.Task] = []
        self._read_script: Any = None
        self._closed = False
        self._failing = False

    @property
    def entry_expiry(self) -> float:
        return self.ttl * ENTRY_EXPIRY_FRACTION

    @property
    def redis(self) -> aioredis.Redis:
        assert self._client is not None, "registry not started"
        return self._client

    # ---------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._client is None:
            # A bounded pool that makes callers wait for a free connection: a poll
            # or a burst touching every workspace at once must not fail with
            # "Too many connections" (the default pool's limit is 100).
            self._client = connect(
                self.url, timeout=self.timeout, max_connections=MAX_CONNECTIONS, health_check_interval=10
            )
        self._read_script = self._client.register_script(_READ)
        with contextlib.suppress(Exception):  # Redis may come up later: the reader retries
            async with asyncio.timeout(self.timeout):
                await prepare(self._client)
        self._closed = False
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        # A private channel keeps the subscription (and so the reader) alive
        # while this node watches no workspace.
        with contextlib.suppress(Exception):  # Redis may be down at start: the reader retries
            await self._pubsub.subscribe(f"presence:node:{self.node_id}")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat_loop()), loop.create_task(self._reader())]

    async def close(self, remove_entries: bool = True) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        # Bounded: a task stuck in a Redis call must not hold a shutdown.
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        self._tasks = []
        # Everything of ours that may be in Redis: current entries and staged removals.
        doomed: dict[str, set[str]] = {ws: set(own) for ws, own in self._own.items()}
        for workspace_id, ops in self._staged.items():
            doomed.setdefault(workspace_id, set()).update(ops)
        if remove_entries and any(doomed.values()):
            try:
                async with asyncio.timeout(2):
                    pipe = self.redis.pipeline(transaction=False)
                    later = []
                    for workspace_id, conn_ids in doomed.items():
                        prefix = entry_prefix(workspace_id)
                        for conn_id in conn_ids:
                            pipe.delete(prefix + conn_id)
                            pipe.srem(index_key(workspace_id), conn_id)
                        later += publish_in(pipe, self.redis, channel(workspace_id), self.node_id)
                    await pipe.execute()
                    await publish_after(self.redis, later)
            except Exception as exc:
                log.warning("presence: could not remove this node's entries at shutdown (%s); they expire", exc)
        self._own.clear()
        self._staged.clear()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._pubsub.aclose()
            self._pubsub = None
        if self._owns_client and self._client is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._client.aclose()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self._client.connection_pool.disconnect()
            self._client = None

    # ------------------------------------------------------------- writes

    def put(self, entry: ConnectionEntry) -> None:
        if self._closed:
            return
        self._own.setdefault(entry.workspace_id, {})[entry.conn_id] = entry
        self._staged.setdefault(entry.workspace_id, {})[entry.conn_id] = entry

    def discard(self, workspace_id: str, conn_id: str) -> None:
        own = self._own.get(workspace_id)
        if own is None or own.pop(conn_id, None) is None:
            return
        if not own:
            del self._own[workspace_id]
        if not self._closed:
            self._staged.setdefault(workspace_id, {})[conn_id] = _DELETE

    def set_locks(self, workspace_id: str, locks: list[dict[str, Any]]) -> None:
        if not self._closed:
            self._staged_locks[workspace_id] = [dict(lock) for lock in locks]

    def _lock(self, workspace_id: str) -> asyncio.Lock:
        lock = self._locks.get(workspace_id)
        if lock is None:
            lock = self._locks[workspace_id] = asyncio.Lock()
        return lock

    async def sync(self, workspace_id: str) -> None:
        async with self._lock(workspace_id):
            ops = self._staged.pop(workspace_id, None)
            locks = self._staged_locks.pop(workspace_id, None)
            if not ops and locks is None:
                return
            ttl_ms = max(1, int(self.entry_expiry * 1000))
            index, prefix = index_key(workspace_id), entry_prefix(workspace_id)
            pipe = self.redis.pipeline(transaction=True)
            for conn_id, entry in (ops or {}).items():
                if entry is _DELETE:
                    pipe.delete(prefix + conn_id)
                    pipe.srem(index, conn_id)
                else:
                    pipe.set(prefix + conn_id, json.dumps(entry.to_json()), px=ttl_ms)
                    pipe.sadd(index, conn_id)
            if ops:
                pipe.pexpire(index, ttl_ms)
            if locks is not None:
                self._write_locks(pipe, workspace_id, locks, self.clock.now())
            later = publish_in(pipe, self.redis, channel(workspace_id), self.node_id)
            try:
                await pipe.execute()
                await publish_after(self.redis, later)
            except BaseException:  # failed or cancelled (shutdown): close() still removes what was staged
                # Put back what was not written unless something newer was staged meanwhile.
                staged = self._staged.setdefault(workspace_id, {})
                for conn_id, entry in (ops or {}).items():
                    staged.setdefault(conn_id, entry)
                if locks is not None:
                    self._staged_locks.setdefault(workspace_id, locks)
                raise

    @staticmethod
    def _write_locks(pipe: Any, workspace_id: str, locks: list[dict[str, Any]], now: float) -> None:
        key = locks_key(workspace_id)
        if not locks:
            pipe.delete(key)
            return
        expiries = [lock.get("expires_at") for lock in locks]
        if all(isinstance(x, int | float) for x in expiries):
            # Stale lock lists disappear once the last lock in them has expired.
            px = max(1000, int((max(expiries) - now) * 1000) + 1000)
            pipe.set(key, json.dumps(locks, default=str), px=px)
        else:
            pipe.set(key, json.dumps(locks, default=str))

    # -------------------------------------------------------------- reads

    async def read(self, workspace_id: str) -> WorkspacePresence:
        own = list(self._own.get(workspace_id, {}).values())
        try:
            locks_raw, raw_entries = await self._read_script(
                keys=[index_key(workspace_id), locks_key(workspace_id)], args=[entry_prefix(workspace_id)]
            )
        except Exception as exc:
            if not self._failing:
                log.warning("presence: cannot read %s from Redis (%s); serving this node's entries", workspace_id, exc)
                self._failing = True
            cached = self._remote_cache.get(workspace_id)
            if cached is not None and self.clock.monotonic() - cached[0] < self.entry_expiry:
                return WorkspacePresence(entries=cached[1].entries + own, locks=cached[1].locks)
            return WorkspacePresence(entries=own, locks=[])
        self._failing = False
        remote: list[ConnectionEntry] = []
        # Most entries are unchanged since the last read: decode only new texts.
        previous = self._decoded.get(workspace_id, {})
        decoded: dict[bytes, ConnectionEntry | None] = {}
        leftovers: list[str] = []
        own_ids = self._own.get(workspace_id, {})
        staged = self._staged.get(workspace_id, {})
        for raw in raw_entries:
            entry = previous.get(raw, _MISSING)
            if entry is _MISSING:
                try:
                    entry = ConnectionEntry.from_json(json.loads(raw))
                except (ValueError, KeyError, TypeError):
                    entry = None
            decoded[raw] = entry
            if entry is None:
                continue
            if entry.node != self.node_id:
                remote.append(entry)
            elif entry.conn_id not in own_ids and entry.conn_id not in staged:
                # Our node id, but not one of our connections: left by an earlier
                # run of this node (restarted before its entries expired).
                leftovers.append(entry.conn_id)
            # Our own entries are served from memory, which is fresher.
        if workspace_id in self._watched:
            self._decoded[workspace_id] = decoded
        if leftovers:
            await self._purge(workspace_id, leftovers)
        locks: list[dict[str, Any]] = []
        if locks_raw:
            with contextlib.suppress(ValueError):
                parsed = json.loads(locks_raw)
                if isinstance(parsed, list):
                    locks = [x for x in parsed if isinstance(x, dict)]
        if self._staged_locks.get(workspace_id) is not None:
            locks = self._staged_locks[workspace_id]
        if workspace_id in self._watched:
            self._remote_cache[workspace_id] = (self.clock.monotonic(), WorkspacePresence(remote, locks))
        return WorkspacePresence(entries=remote + own, locks=locks)

    async def _purge(self, workspace_id: str, conn_ids: list[str]) -> None:
        log.info("presence: removing %d entries of an earlier run of node %s in %s", len(conn_ids), self.node_id,
                 workspace_id)  # fmt: skip
        try:
            pipe = self.redis.pipeline(transaction=False)
            for conn_id in conn_ids:
                pipe.delete(entry_prefix(workspace_id) + conn_id)
                pipe.srem(index_key(workspace_id), conn_id)
            later = publish_in(pipe, self.redis, channel(workspace_id), self.node_id)
            await pipe.execute()
            await publish_after(self.redis, later)
        except Exception as exc:  # they expire anyway
            log.warning("presence: could not remove stale entries in %s: %s", workspace_id, exc)

    # ----------------------------------------------------------- watching

    async def watch(self, workspace_id: str) -> None:
        if workspace_id in self._watched:
            return
        self._watched.add(workspace_id)
        try:
            await self._pubsub.subscribe(channel(workspace_id))
        except Exception as exc:  # the reader resubscribes once Redis is back
            log.warning("presence: cannot subscribe to %s (%s)", workspace_id, exc)

    async def unwatch(self, workspace_id: str) -> None:
        if workspace_id not in self._watched:
            return
        self._watched.discard(workspace_id)
        self._remote_cache.pop(workspace_id, None)
        self._decoded.pop(workspace_id, None)
        with contextlib.suppress(Exception):
            await self._pubsub.unsubscribe(channel(workspace_id))

    async def _reader(self) -> None:
        backoff = 0.1
        while True:
            try:
                if not self._pubsub.subscribed:
                    await self._pubsub.subscribe(
                        f"presence:node:{self.node_id}", *(channel(ws) for ws in self._watched)
                    )
                message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence: Redis subscription failed (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                with contextlib.suppress(Exception):
                    await self._pubsub.reset()
                if is_cluster(self._client):
                    # A cluster pub/sub stays on the node it first chose: start over on a live one.
                    with contextlib.suppress(Exception):
                        await refresh_slots(self._client)
                    self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                # Notifications may have been missed: re-read everything we serve.
                for workspace_id in list(self._watched):
                    self._changed(workspace_id)
                continue
            backoff = 0.1
            if not message or message.get("type") != "message":
                continue
            name = message["channel"]
            data = message["data"]
            if isinstance(name, bytes):
                name = name.decode()
            if isinstance(data, bytes):
                data = data.decode(errors="replace")
            workspace_id = _workspace_of(name)
            if workspace_id is not None and data != self.node_id and workspace_id in self._watched:
                self._changed(workspace_id)

    def _changed(self, workspace_id: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(workspace_id)
            except Exception:
                log.exception("presence change callback failed for %s", workspace_id)

    # ---------------------------------------------------------- liveness

    async def heartbeat(self) -> None:
        ttl_ms = max(1, int(self.entry_expiry * 1000))
        for workspace_id in list(self._own):
            async with self._lock(workspace_id):
                own = self._own.get(workspace_id)
                if not own:
                    continue
                # Full values, not just PEXPIRE: entries lost with a Redis restart come back.
                pipe = self.redis.pipeline(transaction=False)
                prefix, index = entry_prefix(workspace_id), index_key(workspace_id)
                for conn_id, entry in own.items():
                    pipe.set(prefix + conn_id, json.dumps(entry.to_json()), px=ttl_ms)
                pipe.sadd(index, *own.keys())
                pipe.pexpire(index, ttl_ms)
                await pipe.execute()

    async def _heartbeat_loop(self) -> None:
        interval = self.ttl / HEARTBEATS_PER_TTL
        while True:
            await self.clock.sleep(interval)
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence heartbeat failed: %s", exc)

    async def check(self) -> None:
        if self._closed:
            raise RuntimeError("presence registry closed")
        await self.redis.ping()

    def own_entries(self, workspace_id: str) -> list[ConnectionEntry]:
        return list(self._own.get(workspace_id, {}).values())
