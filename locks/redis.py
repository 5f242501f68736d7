"""Redis lease manager: leases shared by every node of a deployment.

Data model, per workspace ``W`` (every key carries the hash tag ``{W}``, so a
Redis Cluster keeps one workspace's keys in one slot and the scripts stay
atomic there)::

    collab:lk:{W}:l:<path>   the lease: "<fence>\\n<token>\\n<holder>\\n<json>"  (SET NX PX)
    collab:lk:{W}:idx        SET of paths that may hold a lease (pruned lazily)
    collab:lk:{W}:fence      the fencing counter (INCR)
    collab:lk:{W}:q / :qd    the waiter queue: ZSET ticket -> arrival number,
                             HASH ticket -> "<deadline ms>|<path>"
    collab:lk:{W}:qseq       arrival counter of the queue
    collab:lk:{W}:ev         pub/sub channel of lock changes

Every operation is one Lua script, so each is atomic: acquire checks the
overlapping leases and the waiters queued ahead, then does INCR of the fence
and SET NX PX in one step; release is compare-token-and-delete; renew is
compare-token-and-PEXPIRE. The token is generated per lease and travels with
the ``Lease`` object -- nothing is kept per thread or per task.

Waiters are woken by pub/sub (pattern ``collab:lk:*:ev``) and, as a fallback
for messages lost while disconnected and for expiries (which publish
nothing), poll: never later than the blocking lease's remaining TTL, and at
least every ``poll_interval``. Within a node, waiters are woken first come
first served; across nodes, the queue in Redis decides.

Lua scripts touch the lease keys of other paths of the same workspace by
name (``prefix .. 'l:' .. path``): they are in the same slot as the declared
keys, which is what Redis Cluster needs to run them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from clocks import Clock, SystemClock
from locks.base import Lease, LockConflict, LockEvent, LockListener, LockNotHeld, LockUnavailable, new_token
from locks.fence import FenceKeeper
from persistence.redisconn import REDIS_ERRORS, connect, prepare
from rooms.config import overlaps

log = logging.getLogger("collab.locks")

PREFIX = "collab:lk:"
_CHANNEL = re.compile(r"^collab:lk:\{(.+)\}:ev$")

_LUA_OVERLAPS = """
local function overlaps(a, b)
  if a == b then return true end
  if #a < #b then return string.sub(b, 1, #a + 1) == a .. '.' end
  return string.sub(a, 1, #b + 1) == b .. '.'
end
"""

# KEYS: idx, fence, q, qd, lease key, qseq
# ARGV: prefix, path, token, holder, meta json, ttl ms, fence floor, ticket, queue deadline ms (0: no queueing), origin
ACQUIRE = (
    _LUA_OVERLAPS
    + r"""
local prefix, path, token, holder, meta = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl, floor, ticket, wait_ms = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9])
if redis.call('EXISTS', KEYS[2]) == 0 then return {'seed'} end
local own = redis.call('GET', KEYS[5])
if own and string.match(own, '^%d+\n[^\n]*\n([^\n]*)\n') == holder then
  redis.call('PEXPIRE', KEYS[5], ttl)
  return {'own', own, ttl}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local result = nil
for _, p in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = prefix .. 'l:' .. p
  local v = redis.call('GET', key)
  if not v then
    redis.call('SREM', KEYS[1], p)
  elseif (not result) and overlaps(p, path) and string.match(v, '^%d+\n[^\n]*\n([^\n]*)\n') ~= holder then
    result = {'held', p, v, redis.call('PTTL', key)}
  end
end
local myseq = nil
if ticket ~= '' then
  local s = redis.call('ZSCORE', KEYS[3], ticket)
  if s then myseq = tonumber(s) end
end
if not result then
  local queued = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
  for i = 1, #queued, 2 do
    local tk, seq = queued[i], tonumber(queued[i + 1])
    if myseq and seq >= myseq then break end
    local d = redis.call('HGET', KEYS[4], tk)
    local deadline, wpath = nil, nil
    if d then deadline, wpath = string.match(d, '^(%d+)|(.*)$') end
    if (not deadline) or tonumber(deadline) < now then
      redis.call('ZREM', KEYS[3], tk)
      redis.call('HDEL', KEYS[4], tk)
    elseif overlaps(wpath, path) then
      result = {'queued', wpath}
      break
    end
  end
end
if result then
  if ticket ~= '' and wait_ms > 0 then
    if not myseq then
      myseq = redis.call('INCR', KEYS[6])
      redis.call('ZADD', KEYS[3], myseq, ticket)
      redis.call('HSET', KEYS[4], ticket, string.format('%d', now + wait_ms) .. '|' .. path)
    end
    table.insert(result, myseq)
  end
  return result
end
local cur = tonumber(redis.call('GET', KEYS[2]))
if cur < floor then redis.call('SET', KEYS[2], string.format('%d', floor)) end
local fence = redis.call('INCR', KEYS[2])
local v = string.format('%d', fence) .. '\n' .. token .. '\n' .. holder .. '\n' .. meta
if not redis.call('SET', KEYS[5], v, 'NX', 'PX', ttl) then
  local other = redis.call('GET', KEYS[5])
  return {'held', path, other, redis.call('PTTL', KEYS[5])}
end
redis.call('SADD', KEYS[1], path)
if ticket ~= '' then
  redis.call('ZREM', KEYS[3], ticket)
  redis.call('HDEL', KEYS[4], ticket)
end
redis.call('PUBLISH', prefix .. 'ev', 'acquired\n' .. path .. '\n' .. holder .. '\n' .. fence .. '\n' .. ARGV[10])
return {'ok', v, ttl}
"""
)

# KEYS: lease key ; ARGV: token, ttl ms
RENEW = r"""
local v = redis.call('GET', KEYS[1])
if not v then return {0} end
if string.match(v, '^%d+\n([^\n]*)\n') ~= ARGV[1] then return {-1} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, v}
"""

# KEYS: lease key, idx ; ARGV: token, path, channel, origin, kind
RELEASE = r"""
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local fence, tok, holder = string.match(v, '^(%d+)\n([^\n]*)\n([^\n]*)\n')
if tok ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[5] .. '\n' .. ARGV[2] .. '\n' .. holder .. '\n' .. fence .. '\n' .. ARGV[4])
return 1
"""

# KEYS: lease key, idx ; ARGV: path, channel, origin
FORCE = r"""
local v = redis.call('GET', KEYS[1])
if not v then return false end
local fence, tok, holder = string.match(v, '^(%d+)\n([^\n]*)\n([^\n]*)\n')
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'forced\n' .. ARGV[1] .. '\n' .. holder .. '\n' .. fence .. '\n' .. ARGV[3])
return v
"""

# KEYS: idx ; ARGV: prefix
LIST = r"""
local out = {}
for _, p in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. 'l:' .. p
  local v = redis.call('GET', key)
  if v then
    table.insert(out, p)
    table.insert(out, v)
    table.insert(out, redis.call('PTTL', key))
  else
    redis.call('SREM', KEYS[1], p)
  end
end
return out
"""

# KEYS: q, qd ; ARGV: ticket, channel, path, origin
DEQUEUE = r"""
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('PUBLISH', ARGV[2], 'dequeued\n' .. ARGV[3] .. '\n\n0\n' .. ARGV[4])
end
return 1
"""

# KEYS: fence ; ARGV: floor
SEED = r"""
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if cur < floor then
  redis.call('SET', KEYS[1], string.format('%d', floor))
  return floor
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], '0') end
return cur
"""


@dataclass(eq=False, slots=True)
class _LocalWaiter:
    path: str
    seq: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)


class _Keys:
    __slots__ = ("prefix", "idx", "fence", "q", "qd", "qseq", "channel")

    def __init__(self, workspace: str) -> None:
        self.prefix = f"{PREFIX}{{{workspace}}}:"
        self.idx = self.prefix + "idx"
        self.fence = self.prefix + "fence"
        self.q = self.prefix + "q"
        self.qd = self.prefix + "qd"
        self.qseq = self.prefix + "qseq"
        self.channel = self.prefix + "ev"

    def lease(self, path: str) -> str:
        return f"{self.prefix}l:{path}"


def _parse(workspace: str, path: str, value: bytes, pttl_ms: int, ttl: float = 0.0, *, now: float) -> Lease:
    fence, token, holder, meta = value.decode().split("\n", 3)
    info = json.loads(meta) if meta else {}
    return Lease(
        workspace=workspace,
        path=path,
        holder=holder,
        user_id=info.get("user_id", ""),
        fence=int(fence),
        expires_at=now + max(0, int(pttl_ms)) / 1000.0,
        token=token,
        name=info.get("name", ""),
        ttl=ttl,
    )


class RedisLeaseManager:
    name = "redis"

    def __init__(
        self,
        url: str,
        fences: FenceKeeper | None = None,
        *,
        timeout: float = 0.5,
        poll_interval: float = 0.5,
        max_connections: int = 64,
        clock: Clock | None = None,
    ) -> None:
        self.url = url
        # Wall time for the expiry a lease reports (Redis keeps the TTL itself, in real time:
        # this manager is given the real clock outside tests of bookkeeping alone).
        self.clock = clock or SystemClock()
        self.fences = fences or FenceKeeper()
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.max_connections = max_connections
        self.origin = uuid.uuid4().hex[:12]  # this manager's id in published events
        self.redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._listeners: list[LockListener] = []
        self._waiters: dict[str, list[_LocalWaiter]] = {}
        self._keys: dict[str, _Keys] = {}
        self._listener_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self.pubsub_connected = False
        self._closed = False
        self.stats = {"acquire_calls": 0, "woken": 0, "polled": 0, "grants": 0, "conflicts": 0}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Set up the client; never fails (Redis may come up later)."""
        # A blocking pool: more concurrent requests than connections wait for
        # one (bounded by the timeout) instead of failing.
        self.redis = connect(
            self.url,
            timeout=self.timeout,
            retry=Retry(NoBackoff(), 1),  # one reconnect for a stale pooled connection, then fail
            max_connections=self.max_connections,
        )
        for name, source in (
            ("acquire", ACQUIRE),
            ("renew", RENEW),
            ("release", RELEASE),
            ("force", FORCE),
            ("list", LIST),
            ("dequeue", DEQUEUE),
            ("seed", SEED),
        ):
            self._scripts[name] = self.redis.register_script(source)
        self._listener_task = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in [self._listener_task, *self._background] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def check(self) -> None:
        await self._run(self.redis.ping())

    def subscribe(self, listener: LockListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------ operations

    async def acquire(
        self,
        workspace: str,
        path: str,
        holder: str,
        user_id: str,
        ttl: float,
        wait: float = 0.0,
        *,
        name: str = "",
        token: str | None = None,
    ) -> Lease:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        keys = self._keys_for(workspace)
        token = token or new_token()
        ticket = new_token()[:16] if wait > 0 else ""
        meta = json.dumps({"user_id": user_id, "name": name}, separators=(",", ":"))
        ttl_ms = max(1, int(ttl * 1000))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        waiter: _LocalWaiter | None = None
        if wait > 0:
            # Registered before the first attempt, so a release during it is not missed.
            waiter = _LocalWaiter(path)
            self._add_waiter(workspace, waiter)
        queued = False
        try:
            while True:
                if waiter is not None:
                    waiter.event.clear()
                remaining = deadline - loop.time()
                queue_ms = int(remaining * 1000) + 1000 if wait > 0 and remaining > 0 else 0
                self.stats["acquire_calls"] += 1
                result = await self._run(
                    self._scripts["acquire"](
                        keys=[keys.idx, keys.fence, keys.q, keys.qd, keys.lease(path), keys.qseq],
                        args=[
                            keys.prefix,
                            path,
                            token,
                            holder,
                            meta,
                            ttl_ms,
                            self.fences.highest_granted(workspace),
                            ticket,
                            queue_ms,
                            self.origin,
                        ],
                    )
                )
                kind = result[0]
                if kind == b"seed":
                    await self._seed(workspace, keys)
                    continue
                if kind == b"own":
                    return _parse(workspace, path, result[1], int(result[2]), ttl, now=self.clock.now())
                if kind == b"ok":
                    lease = _parse(workspace, path, result[1], int(result[2]), ttl, now=self.clock.now())
                    queued = False  # the grant took the ticket off the queue
                    self.stats["grants"] += 1
                    await self._cover(lease, keys)
                    self._emit(LockEvent(workspace, "acquired", path, holder, lease.fence))
                    return lease
                if kind == b"held":
                    blocker = _parse(workspace, result[1].decode(), result[2], int(result[3]), now=self.clock.now())
                    conflict = LockConflict(path, blocker)
                    seq = int(result[4]) if len(result) > 4 else 0
                    sleep_cap = max(0.0, blocker.expires_at - self.clock.now()) + 0.005
                else:
                    conflict = LockConflict(path, None, result[1].decode())
                    seq = int(result[2]) if len(result) > 2 else 0
                    sleep_cap = self.poll_interval
                remaining = deadline - loop.time()
                if wait <= 0 or remaining <= 0:
                    self.stats["conflicts"] += 1
                    raise conflict
                if seq:
                    queued = True
                    if waiter.seq != seq:
                        waiter.seq = seq
                        self._sort_waiters(workspace)
                try:
                    await asyncio.wait_for(waiter.event.wait(), min(remaining, self.poll_interval, sleep_cap))
                    self.stats["woken"] += 1
                except TimeoutError:
                    self.stats["polled"] += 1
        except LockConflict:
            if queued:  # nothing was granted; leave the queue before answering
                await self._cleanup(workspace, keys, path, holder, "", ticket)
            raise
        except BaseException:
            # Cancelled or failed mid-call: it may have been granted without our
            # knowing. Undo by token (and leave the queue).
            self._spawn(self._cleanup(workspace, keys, path, holder, token, ticket))
            raise
        finally:
            if waiter is not None:
                self._remove_waiter(workspace, waiter)

    async def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        ttl = lease.ttl if ttl is None else ttl
        keys = self._keys_for(lease.workspace)
        result = await self._run(
            self._scripts["renew"](keys=[keys.lease(lease.path)], args=[lease.token, max(1, int(ttl * 1000))])
        )
        status = int(result[0])
        if status == 0:
            raise LockNotHeld(f"lease on {lease.path!r} is gone", "gone")
        if status < 0:
            raise LockNotHeld(f"{lease.path!r} is held under another lease now", "taken")
        return lease.with_expiry(self.clock.now() + ttl, ttl)

    async def release(self, lease: Lease) -> None:
        keys = self._keys_for(lease.workspace)
        status = await self._run(
            self._scripts["release"](
                keys=[keys.lease(lease.path), keys.idx],
                args=[lease.token, lease.path, keys.channel, self.origin, "released"],
            )
        )
        if status == 0:
            raise LockNotHeld(f"lease on {lease.path!r} is gone", "gone")
        if status < 0:
            raise LockNotHeld(f"{lease.path!r} is held under another lease now", "taken")
        self._on_event(LockEvent(lease.workspace, "released", lease.path, lease.holder, lease.fence))

    async def list(self, workspace: str) -> list[Lease]:
        keys = self._keys_for(workspace)
        flat = await self._run(self._scripts["list"](keys=[keys.idx], args=[keys.prefix]))
        leases = []
        for i in range(0, len(flat), 3):
            lease = _parse(workspace, flat[i].decode(), flat[i + 1], int(flat[i + 2]), now=self.clock.now())
            leases.append(replace(lease, token=""))
        return leases

    async def force_release(self, workspace: str, path: str) -> Lease | None:
        keys = self._keys_for(workspace)
        value = await self._run(
            self._scripts["force"](keys=[keys.lease(path), keys.idx], args=[path, keys.channel, self.origin])
        )
        if not value:
            return None
        lease = _parse(workspace, path, value, 0, now=self.clock.now())
        self._on_event(LockEvent(workspace, "forced", path, lease.holder, lease.fence))
        return replace(lease, token="")

    # ------------------------------------------------------------ internals

    def _keys_for(self, workspace: str) -> _Keys:
        keys = self._keys.get(workspace)
        if keys is None:
            if len(self._keys) > 10_000:
                self._keys.clear()
            keys = self._keys[workspace] = _Keys(workspace)
        return keys

    async def _run(self, awaitable) -> Any:
        if self.redis is None:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise LockUnavailable("lock backend is not started")
        try:
            async with asyncio.timeout(self.timeout * 2 + 0.1):
                return await awaitable
        except TimeoutError:
            raise LockUnavailable("Redis did not answer in time") from None
        except REDIS_ERRORS as exc:
            raise LockUnavailable(f"Redis unavailable: {type(exc).__name__}: {exc}") from None

    async def _seed(self, workspace: str, keys: _Keys) -> None:
        """The fence counter is missing (new workspace, or Redis lost its data)."""
        try:
            floor = await self.fences.durable_ceiling(workspace)
        except Exception as exc:
            raise LockUnavailable(f"cannot read the fence high-water mark: {exc}") from exc
        await self._run(self._scripts["seed"](keys=[keys.fence], args=[floor]))
        log.info("fence counter of %s seeded at %d", workspace, floor)

    async def _cover(self, lease: Lease, keys: _Keys) -> None:
        try:
            await self.fences.cover(lease.workspace, lease.fence)
        except BaseException as exc:
            self._spawn(self._cleanup(lease.workspace, keys, lease.path, lease.holder, lease.token, ""))
            if isinstance(exc, Exception):
                raise LockUnavailable(f"cannot record the fence high-water mark: {exc}") from exc
            raise

    async def _cleanup(self, workspace: str, keys: _Keys, path: str, holder: str, token: str, ticket: str) -> None:
        try:
            if ticket:
                await self._run(
                    self._scripts["dequeue"](keys=[keys.q, keys.qd], args=[ticket, keys.channel, path, self.origin])
                )
                self._wake(workspace, path)
            if token:
                status = await self._run(
                    self._scripts["release"](
                        keys=[keys.lease(path), keys.idx], args=[token, path, keys.channel, self.origin, "released"]
                    )
                )
                if status == 1:
                    self._on_event(LockEvent(workspace, "released", path, holder, 0))
        except LockUnavailable:
            pass  # whatever was granted lapses with its TTL; the queue entry with its deadline

    def _spawn(self, coro) -> None:
        if self._closed:
            coro.close()
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- local waiters (woken first come, first served)

    def _add_waiter(self, workspace: str, waiter: _LocalWaiter) -> None:
        self._waiters.setdefault(workspace, []).append(waiter)
        self._sort_waiters(workspace)

    def _sort_waiters(self, workspace: str) -> None:
        waiters = self._waiters.get(workspace)
        if waiters:
            waiters.sort(key=lambda w: w.seq or float("inf"))

    def _remove_waiter(self, workspace: str, waiter: _LocalWaiter) -> None:
        waiters = self._waiters.get(workspace)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[workspace]

    def _wake(self, workspace: str, path: str | None) -> None:
        """Wake the local waiters that may now proceed: those overlapping ``path``
        with no earlier local waiter on an overlapping path."""
        waiters = self._waiters.get(workspace)
        if not waiters:
            return
        earlier: list[str] = []
        for waiter in waiters:
            if not any(overlaps(waiter.path, other) for other in earlier):
                if path is None or overlaps(waiter.path, path):
                    waiter.event.set()
            earlier.append(waiter.path)

    # -- events

    def _on_event(self, event: LockEvent) -> None:
        if event.kind in ("released", "forced", "expired", "lost", "dequeued"):
            self._wake(event.workspace, event.path or None)
        elif event.kind == "reset":
            for workspace in list(self._waiters):
                self._wake(workspace, None)
        if event.kind != "dequeued":
            self._emit(event)

    def _emit(self, event: LockEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("lock listener failed")

    async def _listen(self) -> None:
        """Pub/sub of lock changes from every node; reconnects by itself."""
        backoff = 0.05
        while not self._closed:
            pubsub = None
            try:
                async with asyncio.timeout(self.timeout * 2):
                    await prepare(self.redis)  # a cluster client needs its slot map before subscribing
                pubsub = self.redis.pubsub()
                await pubsub.psubscribe(f"{PREFIX}*:ev")
                self.pubsub_connected = True
                backoff = 0.05
                # Anything published while we were away is lost: re-read.
                self._on_event(LockEvent("", "reset"))
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "pmessage":
                        self._handle_message(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.pubsub_connected:
                    log.warning("lock pub/sub disconnected: %s", exc)
                self.pubsub_connected = False
            finally:
                try:
                    if pubsub is not None:
                        await asyncio.wait_for(pubsub.aclose(), 1.0)
                except BaseException:  # noqa: BLE001 - best effort on a broken connection
                    pass
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    def _handle_message(self, channel: bytes, data: bytes) -> None:
        match = _CHANNEL.match(channel.decode(errors="replace"))
        if match is None:
            return
        try:
            kind, path, holder, fence, origin = data.decode().split("\n", 4)
        except ValueError:
            return
        if origin == self.origin:
            return  # handled when we made the change
        self._on_event(LockEvent(match.group(1), kind, path, holder, int(fence or 0)))
