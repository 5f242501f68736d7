"""Redis document store: the durable store of a scale-out deployment.

Every key of a workspace starts with ``collab:ws:{<id>}``: the hash tag
``{<id>}`` is the one the lock and presence keys of the workspace carry too,
so a Redis Cluster keeps all of them in one slot, and each multi-key write
is one atomic script. Below, ``{ws:X}`` stands for ``collab:ws:{X}``:

* ``{ws:X}:doc``      hash: ``snapshot``, ``snapshot_seq``, ``last_seq``
* ``{ws:X}:updates``  stream: one entry per raw update, id ``0-<seq>``, fields
  ``node`` (origin) and ``data``. It is the durable tail of the document *and*
  the relay between nodes (scaleout/relay.py reads it). Compaction writes the
  snapshot and trims the stream (keeping a margin for lagging readers).
* ``{ws:X}:awareness`` stream (capped): relayed awareness, never durable.
* ``{ws:X}:meta``     hash: per-workspace metadata (lock fences).
* ``{ws:X}:fwd``      hash: forward state (``last_seq``, ``delivered_seq``,
  ``seeded_at``, ``seed_status``, ``audit_id``).
* ``{ws:X}:outbox``   hash: outbox rows (``<seq>`` immutable JSON, ``<seq>:batch``,
  ``:fa``, ``:att``, ``:err``; ``b:<batch>`` the seqs of a claimed batch);
  ``{ws:X}:outbox:pending`` / ``:dead`` sorted sets of seqs.
* ``{ws:X}:audit``    hash: audit entries (``<id>`` JSON, ``<id>:seq``,
  ``<id>:fs`` forward status, ``<id>:fa`` forwarded at);
  ``{ws:X}:audit:byseq`` change seq -> audit id.
* ``{ws:X}:fwd:lease`` the forwarding lease (one forwarder per workspace).

Updates and their outbox/audit records are written by one Lua script (the
same guarantee as the SQLite transaction). ``collab:outbox:workspaces`` (a set
outside any workspace slot) indexes workspaces with pending rows; it is
written in the same round trip, right after the script.

* ``{ws:X}:ap:<id>``   the result of one append, kept for the retry window:
  an append retried after a lost reply returns it instead of appending twice.

Durability is Redis's: with ``appendonly yes`` + ``appendfsync always`` an
acknowledged write survives a crash of Redis; with replicas, an append is
acknowledged once ``WAIT`` saw it on ``COLLAB_REDIS_ACK_REPLICAS`` of them, so a
failover loses nothing acknowledged. A Redis that does not answer (down,
stalled, failing over) makes an append retry for ``COLLAB_REDIS_RETRY_SECONDS``
before it fails; see docs/operations.md. Clients come from
persistence/redisconn.py (single server, Cluster or Sentinel).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from typing import Any

import pycrdt
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)

from persistence.base import StoredDocument, StoreError
from persistence.outbox import (
    ACCEPTED,
    DEAD,
    DELIVERED,
    DISCARDED,
    PENDING,
    SEEDED,
    ChangeRecord,
    OutboxRow,
    group_dead_letters,
)
from persistence.redisconn import REDIS_ERRORS, ReplicaAcks, ReplicationShortfall, connect, parse_url, run_script

log = logging.getLogger("collab.store.redis")

OUTBOX_INDEX = "collab:outbox:workspaces"
TRIM_MARGIN = 200  # entries kept below a snapshot, so relay readers a little behind miss nothing

_APPEND = """
-- KEYS[8]: this append's id (a retry after a timeout must not append twice:
-- the first try may have run while its reply was lost).
local done = redis.call('GET', KEYS[8])
if done then return cjson.decode(done) end
local node = ARGV[1]
local n = tonumber(ARGV[2])
-- A workspace is seeded once: a second seeding record (a node whose seed claim
-- lapsed) fails the whole append, before anything is written.
local check = 4 + n
for r = 1, tonumber(ARGV[3 + n]) do
  if ARGV[check + 1] == '1' and redis.call('HEXISTS', KEYS[3], 'seeded_at') == 1 then
    return redis.error_reply('ALREADY_SEEDED the workspace was seeded by another node')
  end
  check = check + 9
end
local last = redis.call('HINCRBY', KEYS[1], 'last_seq', n)
local first = last - n + 1
-- A chain: each entry names the entry before it ('prev') and itself ('at'). A
-- failover can lose the newest entries and hand their numbers to new ones; a
-- reader that sees a 'prev' other than the 'at' it read last knows the history
-- under it changed (scaleout/relay.py).
local tip = redis.call('HGET', KEYS[1], 'tip') or ''
local token = ARGV[#ARGV - 1]
for i = 1, n do
  local at = token .. '.' .. i
  redis.call('XADD', KEYS[2], '0-' .. (first + i - 1), 'node', node, 'data', ARGV[2 + i], 'prev', tip, 'at', at)
  tip = at
end
if n > 0 then redis.call('HSET', KEYS[1], 'tip', tip) end
local pos = 3 + n
local nrec = tonumber(ARGV[pos])
pos = pos + 1
local out = {last}
for r = 1, nrec do
  local forward = ARGV[pos]
  local seeded = ARGV[pos + 1]
  local seed_seq = tonumber(ARGV[pos + 2])
  local seed_at = ARGV[pos + 3]
  local seed_status = ARGV[pos + 4]
  local audit_json = ARGV[pos + 5]
  local outbox_json = ARGV[pos + 6]
  local kind = ARGV[pos + 7]
  local ref_seq = ARGV[pos + 8]
  pos = pos + 9
  local seq = 0
  if seeded == '1' then
    local cur = tonumber(redis.call('HGET', KEYS[3], 'last_seq') or '0')
    if seed_seq > cur then redis.call('HSET', KEYS[3], 'last_seq', seed_seq) end
    local d = tonumber(redis.call('HGET', KEYS[3], 'delivered_seq') or '0')
    if seed_seq > d then redis.call('HSET', KEYS[3], 'delivered_seq', seed_seq) end
    redis.call('HSET', KEYS[3], 'seeded_at', seed_at, 'seed_status', seed_status)
  end
  if forward == '1' then
    seq = redis.call('HINCRBY', KEYS[3], 'last_seq', 1)
    redis.call('HSET', KEYS[4], tostring(seq), outbox_json)
    redis.call('ZADD', KEYS[5], seq, tostring(seq))
  end
  local id = redis.call('HINCRBY', KEYS[3], 'audit_id', 1)
  redis.call('HSET', KEYS[6], tostring(id), audit_json)
  if seq > 0 then
    redis.call('HSET', KEYS[6], id .. ':seq', seq, id .. ':fs', 'pending')
    redis.call('HSET', KEYS[7], tostring(seq), id)
  else
    if ref_seq ~= '' then redis.call('HSET', KEYS[6], id .. ':seq', ref_seq) end
    if kind == 'accepted' then redis.call('HSET', KEYS[6], id .. ':fs', 'not_forwarded') end
  end
  out[#out + 1] = seq
  out[#out + 1] = id
end
redis.call('SET', KEYS[8], cjson.encode(out), 'PX', ARGV[#ARGV])
return out
"""

_COMPACT = """
-- ARGV[4]: the snapshot_seq the merged snapshot was built on (another compaction since: skip).
-- Never past last_seq: a node whose history is ahead of Redis (a failover lost
-- unacknowledged entries, and others may take their numbers) must not declare
-- entries it never saw covered.
local cur = tonumber(redis.call('HGET', KEYS[1], 'snapshot_seq') or '0')
local upto = tonumber(ARGV[2])
if upto <= cur or cur ~= tonumber(ARGV[4]) then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
if upto > last then return 0 end
redis.call('HSET', KEYS[1], 'snapshot', ARGV[1], 'snapshot_seq', upto)
local keep = upto - tonumber(ARGV[3])
if keep > 0 then redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. (keep + 1)) end
return 1
"""

# Take or renew a lease (KEYS[1]) for owner ARGV[1], ARGV[2] ms; also used by events/publisher.py.
LEASE_SCRIPT = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# The seeding claim: one node at a time reads the backend for a new workspace;
# 'seeded' once the seed landed (checked in the same step: no gap between the
# check and the claim for another node to pass through).
_CLAIM_SEED = """
if redis.call('HEXISTS', KEYS[1], 'seeded_at') == 1 then return 'seeded' end
local cur = redis.call('GET', KEYS[2])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 'claimed'
end
return 'busy'
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Renew a lease only if it is still the caller's: a holder that lost it (it
# froze past the TTL) must not take it back just because it is free again.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# A metadata write fenced by the forwarding lease: done only by its holder,
# in the same step as the check (a node that woke up after losing the lease
# cannot overwrite what the new holder wrote).
_PUT_META_LEASED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# Compare and set one metadata field: ARGV[2] '1' expects it absent, else equal to ARGV[3].
_PUT_META_IF = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if cur then return 0 end
elseif cur ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return 1
"""


def _retryable(exc: BaseException) -> bool:
    """Worth another try: Redis did not answer, is loading, failing over or short of replicas."""
    if isinstance(exc, ReplicationShortfall | ReadOnlyError | BusyLoadingError | ClusterDownError | TryAgainError):
        return True
    if isinstance(exc, MovedError | AskError):
        return True
    if isinstance(exc, ResponseError):
        text = str(exc)
        return text.startswith(("MASTERDOWN", "NOREPLICAS", "LOADING", "READONLY", "CLUSTERDOWN"))
    return True


def tag(workspace: str) -> str:
    """Key prefix of a workspace: ``collab:ws:{W}`` (the hash tag ``{W}`` is the one locks and presence use)."""
    return "collab:ws:{" + workspace + "}"


def updates_key(workspace: str) -> str:
    return tag(workspace) + ":updates"


def awareness_key(workspace: str) -> str:
    return tag(workspace) + ":awareness"


def seq_of(stream_id: bytes | str) -> int:
    text = stream_id.decode() if isinstance(stream_id, bytes) else stream_id
    return int(text.split("-", 1)[1])


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)



def _audit_entry(audit_id: Any, raw: Any, seq: Any, forward_status: Any, forwarded_at: Any) -> dict[str, Any]:
    """One audit-trail entry as the history API and the event log read it."""
    body = json.loads(raw)
    return {
        "id": audit_id,
        "at": body["at"],
        "kind": body["kind"],
        "seq": int(seq) if seq else None,
        "author": body.get("author"),
        "paths": body.get("paths") or [],
        "changes": body.get("changes") or [],
        "fence": body.get("fence"),
        "reason": body.get("reason"),
        "details": body.get("details"),
        "forward_status": _s(forward_status),
        "forwarded_at": float(forwarded_at) if forwarded_at else None,
    }

def _s(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _f(value: bytes | None) -> float | None:
    return None if value is None else float(value)


class RedisDocumentStore:
    """DocumentStore + OutboxStore in Redis (see the module docstring)."""

    def __init__(
        self,
        url: str,
        node_id: str,
        timeout: float = 2.0,
        trim_margin: int = TRIM_MARGIN,
        *,
        ack_replicas: int | None = None,
        ack_timeout_ms: int = 500,
        retry_seconds: float = 30.0,
    ) -> None:
        self.url = url
        self.node_id = node_id
        self.timeout = timeout
        self.trim_margin = trim_margin
        self.retry_seconds = retry_seconds
        self.acks = ReplicaAcks(ack_replicas, ack_timeout_ms)
        self.client: Any = None
        self.mode = parse_url(url).mode
        self.path = f"redis {url.split('@')[-1]}"  # for logs (never the password)
        self.stats = {"append_retries": 0, "replica_shortfalls": 0, "append_failures": 0}

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self.client is not None:
            return
        self.client = connect(
            self.url,
            timeout=self.timeout,
            max_connections=64,
            # A connection idle for a second is pinged (and replaced) before use, so the
            # first append after Redis restarted does not fail on a stale socket.
            health_check_interval=1,
        )
        self._append = self.client.register_script(_APPEND)
        self._compact = self.client.register_script(_COMPACT)
        self._lease = self.client.register_script(LEASE_SCRIPT)
        self._release = self.client.register_script(_RELEASE)
        self._renew = self.client.register_script(_RENEW)
        self._put_meta_leased = self.client.register_script(_PUT_META_LEASED)
        self._put_meta_if = self.client.register_script(_PUT_META_IF)
        self._claim_seed = self.client.register_script(_CLAIM_SEED)
        # Not fatal: a node may start while Redis is down (readiness says so).
        try:
            await self.client.ping()
        except REDIS_ERRORS as exc:
            log.warning("Redis at %s not reachable yet: %s", self.path, exc)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def _r(self) -> Any:
        if self.client is None:
            raise StoreError("store is closed")
        return self.client

    async def _run(self, coro_fn, *args):
        try:
            return await coro_fn(*args)
        except Exception as exc:  # Redis's errors, and what the cluster client lets through during a failover
            raise StoreError(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc

    async def _retrying(self, fn, what: str):
        """Run ``fn`` until it succeeds, for up to ``retry_seconds`` while Redis is
        unreachable, stalled, failing over or short of replicas; then StoreError.

        Only for idempotent work (appends carry their id)."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        logged = False
        while True:
            try:
                return await fn()
            except Exception as exc:
                # Beyond Redis's own errors, the cluster client can let others through
                # (e.g. a connection closed under a command during a failover): an
                # append carries its id, so trying again is safe, and the room must
                # get an answer (an ack or StoreError), never a dead task.
                if not isinstance(exc, REDIS_ERRORS):
                    log.warning("%s: unexpected %s from the Redis client: %s", what, type(exc).__name__, exc)
                if isinstance(exc, ReplicationShortfall):
                    self.stats["replica_shortfalls"] += 1
                    self.acks.forget()  # the primary may have lost its replicas (or be a new one)
                if not _retryable(exc) or time.monotonic() + delay >= deadline:
                    self.stats["append_failures"] += 1
                    raise StoreError(f"Redis unavailable: {type(exc).__name__}: {exc}") from exc
                if not logged:
                    log.warning(
                        "%s not acknowledged yet (%s: %s); retrying for up to %gs",
                        what,
                        type(exc).__name__,
                        exc,
                        self.retry_seconds,
                    )
                    logged = True
                self.stats["append_retries"] += 1
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 1.0)

    # ----------------------------------------------------------- documents

    async def load(self, workspace_id: str) -> StoredDocument:
        t = tag(workspace_id)

        async def run() -> StoredDocument:
            pipe = self._r().pipeline(transaction=True)
            pipe.hmget(t + ":doc", "snapshot", "snapshot_seq", "last_seq", "tip")
            pipe.xrange(t + ":updates", "-", "+")
            (snapshot, snapshot_seq, last_seq, tip), entries = await pipe.execute()
            snapshot_seq = int(snapshot_seq or 0)
            updates = []
            top = int(last_seq or 0)
            for stream_id, fields in entries:
                seq = seq_of(stream_id)
                if seq >= top:  # the chain token of the newest entry read (a pipeline is not atomic on a cluster)
                    tip = fields.get(b"at", tip)
                top = max(top, seq)
                if seq > snapshot_seq:
                    updates.append(fields[b"data"])
            return StoredDocument(
                snapshot=snapshot, snapshot_seq=snapshot_seq, updates=updates, last_seq=top, tip=tip or None
            )

        return await self._run(run)

    async def read_tail(self, workspace_id: str, after_seq: int) -> list[tuple[int, str, bytes]]:
        """Stream entries after ``after_seq``: (seq, origin node, update)."""

        async def run():
            entries = await self._r().xrange(updates_key(workspace_id), f"0-{after_seq + 1}", "+")
            return [(seq_of(i), f[b"node"].decode(), f[b"data"]) for i, f in entries]

        return await self._run(run)

    async def entry_at(self, workspace_id: str, seq: int) -> dict | None:
        """The fields of update stream entry ``seq`` (None if it is gone)."""

        async def run():
            entries = await self._r().xrange(updates_key(workspace_id), f"0-{seq}", f"0-{seq}", count=1)
            return entries[0][1] if entries else None

        return await self._run(run)

    async def last_seq(self, workspace_id: str) -> int:
        async def run():
            return int(await self._r().hget(tag(workspace_id) + ":doc", "last_seq") or 0)

        return await self._run(run)

    async def append(self, workspace_id: str, updates: list[bytes], outbox: list[ChangeRecord] | None = None) -> int:
        t = tag(workspace_id)
        records = list(outbox or [])
        args: list[Any] = [self.node_id, len(updates), *updates, len(records)]
        for rec in records:
            audit = {
                "at": rec.at,
                "kind": rec.kind,
                "author": rec.author,
                "paths": rec.paths,
                "changes": rec.changes,
                "fence": rec.fence,
                "reason": rec.reason,
                "details": rec.details,
            }
            row = {
                "key": rec.key,
                "created_at": rec.at,
                "author": rec.author,
                "changes": rec.changes,
                "config": rec.config or {},
                "fence": rec.fence,
            }
            ref = rec.seq if rec.kind not in (ACCEPTED, SEEDED) and rec.seq is not None else ""
            args += [
                "1" if rec.forward else "0",
                "1" if rec.kind == SEEDED else "0",
                rec.seed_seq or 0,
                rec.at,
                rec.reason or "",
                _dumps(audit),
                _dumps(row) if rec.forward else "",
                rec.kind,
                ref,
            ]
        keys = [t + k for k in (":doc", ":updates", ":fwd", ":outbox", ":outbox:pending", ":audit", ":audit:byseq")]
        append_id = uuid.uuid4().hex
        keys.append(f"{t}:ap:{append_id}")
        args.append(append_id[:12])  # the chain token of this append's entries
        args.append(int((self.retry_seconds * 2 + 60) * 1000))
        forward = any(r.forward for r in records)

        async def run():
            client = self._r()
            replicas = await self.acks.wanted(client, keys[0])
            then = [("SADD", OUTBOX_INDEX, workspace_id)] if forward else []
            return await run_script(client, self._append, keys, args, replicas, self.acks.timeout_ms, then)

        result = await self._retrying(run, what=f"append to {workspace_id}")
        for i, rec in enumerate(records):
            seq, audit_id = int(result[1 + 2 * i]), int(result[2 + 2 * i])
            rec.seq, rec.audit_id = (seq if rec.forward else None), audit_id
        return int(result[0])

    async def compact(self, workspace_id: str, snapshot: bytes, upto_seq: int) -> None:
        """Write a snapshot covering the stream up to ``upto_seq``.

        The new snapshot merges the stored snapshot, the stored entries up to
        ``upto_seq`` and the room's state: after a failover, Redis's entries
        up to ``upto_seq`` may not be the ones this room saw (a promoted
        replica missed some, new appends took their numbers), and a snapshot
        of the room alone would then drop them.
        """
        t = tag(workspace_id)

        async def run():
            pipe = self._r().pipeline(transaction=True)
            pipe.hmget(t + ":doc", "snapshot", "snapshot_seq", "last_seq")
            pipe.xrange(t + ":updates", "-", f"0-{upto_seq}")
            (stored, stored_seq, last), entries = await pipe.execute()
            stored_seq, last = int(stored_seq or 0), int(last or 0)
            if upto_seq <= stored_seq or upto_seq > last:
                return
            parts = [stored] if stored else []
            parts += [fields[b"data"] for sid, fields in entries if seq_of(sid) > stored_seq]
            parts.append(snapshot)
            merged = pycrdt.merge_updates(*parts) if len(parts) > 1 else snapshot
            await self._compact(
                keys=[t + ":doc", t + ":updates"], args=[merged, upto_seq, self.trim_margin, stored_seq]
            )

        await self._run(run)

    async def check(self) -> None:
        await self._run(lambda: self._r().ping())

    async def get_meta(self, workspace_id: str, key: str) -> bytes | None:
        return await self._run(lambda: self._r().hget(tag(workspace_id) + ":meta", key))

    async def put_meta(self, workspace_id: str, key: str, value: bytes) -> None:
        await self._run(lambda: self._r().hset(tag(workspace_id) + ":meta", key, bytes(value)))

    # ----------------------------------------------------- forwarding lease

    async def forward_lease(self, workspace_id: str, owner: str, ttl_ms: int) -> bool:
        """Take or renew the lease that makes ``owner`` the one forwarder of a workspace."""
        key = tag(workspace_id) + ":fwd:lease"
        return bool(await self._run(lambda: self._lease(keys=[key], args=[owner, int(ttl_ms)])))

    async def forward_lease_renew(self, workspace_id: str, owner: str, ttl_ms: int) -> bool:
        """Extend the lease only if ``owner`` still holds it (never take it back once lost)."""
        key = tag(workspace_id) + ":fwd:lease"
        return bool(await self._run(lambda: self._renew(keys=[key], args=[owner, int(ttl_ms)])))

    async def put_meta_leased(self, workspace_id: str, key: str, value: bytes, owner: str) -> bool:
        """``put_meta`` if ``owner`` holds the forwarding lease, checked in the same step."""
        keys = [tag(workspace_id) + ":fwd:lease", tag(workspace_id) + ":meta"]
        return bool(await self._run(lambda: self._put_meta_leased(keys=keys, args=[owner, key, bytes(value)])))

    async def put_meta_if(self, workspace_id: str, key: str, expected: bytes | None, value: bytes) -> bool:
        """``put_meta`` if the field still holds ``expected`` (None: absent); False if it moved on."""
        keys = [tag(workspace_id) + ":meta"]
        args = [key, "1" if expected is None else "0", bytes(expected or b""), bytes(value)]
        return bool(await self._run(lambda: self._put_meta_if(keys=keys, args=args)))

    async def forward_lease_release(self, workspace_id: str, owner: str) -> None:
        key = tag(workspace_id) + ":fwd:lease"
        await self._run(lambda: self._release(keys=[key], args=[owner]))

    # -------------------------------------------------------------- outbox

    async def _rows(self, workspace: str, seqs: list[int]) -> list[OutboxRow]:
        if not seqs:
            return []
        fields = []
        for s in seqs:
            fields += [str(s), f"{s}:batch", f"{s}:fa", f"{s}:att", f"{s}:err", f"{s}:state"]
        values = await self._r().hmget(tag(workspace) + ":outbox", fields)
        rows = []
        for i, s in enumerate(seqs):
            raw, batch, fa, att, err, state = values[6 * i : 6 * i + 6]
            if raw is None:
                continue
            body = json.loads(raw)
            rows.append(
                OutboxRow(
                    workspace=workspace,
                    seq=s,
                    key=body["key"],
                    created_at=body["created_at"],
                    author=body.get("author"),
                    changes=body.get("changes") or [],
                    config=body.get("config") or {},
                    fence=body.get("fence"),
                    state=_s(state) or "pending",
                    batch=_s(batch),
                    first_attempt_at=_f(fa),
                    attempts=int(att or 0),
                    last_error=_s(err),
                )
            )
        return rows

    async def _batch_seqs(self, workspace: str, batch: str) -> list[int]:
        raw = await self._r().hget(tag(workspace) + ":outbox", f"b:{batch}")
        return json.loads(raw) if raw else []

    async def outbox_workspaces(self) -> list[str]:
        async def run():
            names = [m.decode() for m in await self._r().smembers(OUTBOX_INDEX)]
            out = []
            for name in names:
                if await self._r().zcard(tag(name) + ":outbox:pending"):
                    out.append(name)
                elif not await self._r().zcard(tag(name) + ":outbox:dead"):
                    await self._r().srem(OUTBOX_INDEX, name)
            return out

        return await self._run(run)

    async def dead_letter_workspaces(self) -> list[str]:
        """Workspaces holding dead letters (the operator console lists them all)."""

        async def run():
            names = sorted(m.decode() for m in await self._r().smembers(OUTBOX_INDEX))
            pipe = self._r().pipeline(transaction=False)
            for name in names:
                pipe.zcard(tag(name) + ":outbox:dead")
            counts = await pipe.execute() if names else []
            return [name for name, count in zip(names, counts) if count]

        return await self._run(run)

    async def outbox_totals(self) -> dict[str, Any]:
        """Rows pending and dead across workspaces, and the oldest pending one (for /metrics and alerts).

        One pass over the workspaces that have outbox rows (the index drops the
        others), pipelined.
        """

        async def run():
            names = [m.decode() for m in await self._r().smembers(OUTBOX_INDEX)]
            totals: dict[str, Any] = {"pending": 0, "dead": 0, "oldest_pending_at": None}
            if not names:
                return totals
            pipe = self._r().pipeline(transaction=False)
            for name in names:
                pipe.zcard(tag(name) + ":outbox:pending")
                pipe.zcard(tag(name) + ":outbox:dead")
                pipe.zrange(tag(name) + ":outbox:pending", 0, 0)
            replies = await pipe.execute()
            for i, name in enumerate(names):
                pending, dead, first = replies[3 * i : 3 * i + 3]
                totals["pending"] += pending
                totals["dead"] += dead
                if first:
                    rows = await self._rows(name, [int(first[0])])
                    oldest = totals["oldest_pending_at"]
                    if rows and (oldest is None or rows[0].created_at < oldest):
                        totals["oldest_pending_at"] = rows[0].created_at
            return totals

        return await self._run(run)

    async def outbox_pending(self, workspace: str, limit: int) -> list[OutboxRow]:
        async def run():
            key = tag(workspace) + ":outbox:pending"
            seqs = [int(m) for m in await self._r().zrange(key, 0, limit - 1)]
            rows = await self._rows(workspace, seqs)
            if rows and rows[0].batch is not None and rows[-1].batch == rows[0].batch:
                claimed = set(await self._batch_seqs(workspace, rows[0].batch))
                every = [int(m) for m in await self._r().zrange(key, 0, -1)]
                rows = await self._rows(workspace, [s for s in every if s in claimed])
            return rows

        return await self._run(run)

    async def outbox_claim(self, workspace: str, seqs: list[int], batch: str, at: float) -> None:
        async def run():
            rows = await self._rows(workspace, seqs)
            mine = [r.seq for r in rows if r.batch in (None, batch)]
            pipe = self._r().pipeline(transaction=True)
            key = tag(workspace) + ":outbox"
            for r in rows:
                if r.seq in mine:
                    pipe.hset(key, f"{r.seq}:batch", batch)
                    if r.first_attempt_at is None:
                        pipe.hset(key, f"{r.seq}:fa", at)
            pipe.hset(key, f"b:{batch}", json.dumps(sorted(set(mine) | set(await self._batch_seqs(workspace, batch)))))
            await pipe.execute()

        await self._run(run)

    async def outbox_failed_attempt(self, workspace: str, batch: str, error: str) -> None:
        async def run():
            pipe = self._r().pipeline(transaction=True)
            key = tag(workspace) + ":outbox"
            for s in await self._batch_seqs(workspace, batch):
                pipe.hincrby(key, f"{s}:att", 1)
                pipe.hset(key, f"{s}:err", error[:1000])
            await pipe.execute()

        await self._run(run)

    async def _write_audit(self, workspace: str, rec: ChangeRecord) -> None:
        t = tag(workspace)
        audit_id = await self._r().hincrby(t + ":fwd", "audit_id", 1)
        audit = {
            "at": rec.at,
            "kind": rec.kind,
            "author": rec.author,
            "paths": rec.paths,
            "changes": rec.changes,
            "fence": rec.fence,
            "reason": rec.reason,
            "details": rec.details,
        }
        mapping = {str(audit_id): _dumps(audit)}
        if rec.seq is not None:
            mapping[f"{audit_id}:seq"] = str(rec.seq)
        await self._r().hset(t + ":audit", mapping=mapping)
        rec.audit_id = audit_id

    async def _set_status(self, workspace: str, seqs: list[int], status: str, at: float | None) -> None:
        if not seqs:
            return
        t = tag(workspace)
        ids = await self._r().hmget(t + ":audit:byseq", [str(s) for s in seqs])
        mapping = {}
        for audit_id in ids:
            if audit_id is None:
                continue
            mapping[f"{audit_id.decode()}:fs"] = status
            mapping[f"{audit_id.decode()}:fa"] = "" if at is None else str(at)
        if mapping:
            await self._r().hset(t + ":audit", mapping=mapping)

    def _drop_rows(self, pipe, workspace: str, seqs: list[int], batch: str | None) -> None:
        t = tag(workspace)
        fields = []
        for s in seqs:
            fields += [str(s), f"{s}:batch", f"{s}:fa", f"{s}:att", f"{s}:err", f"{s}:state"]
        if batch is not None:
            fields.append(f"b:{batch}")
        if fields:
            pipe.hdel(t + ":outbox", *fields)
        if seqs:
            pipe.zrem(t + ":outbox:pending", *[str(s) for s in seqs])
            pipe.zrem(t + ":outbox:dead", *[str(s) for s in seqs])

    async def outbox_finish(
        self, workspace: str, batch: str, status: str, at: float, audit: ChangeRecord | None = None
    ) -> list[int]:
        async def run():
            t = tag(workspace)
            seqs = await self._batch_seqs(workspace, batch)
            pipe = self._r().pipeline(transaction=True)
            self._drop_rows(pipe, workspace, seqs, batch)
            await pipe.execute()
            await self._set_status(workspace, seqs, status, at)
            if seqs and status == DELIVERED:
                cur = int(await self._r().hget(t + ":fwd", "delivered_seq") or 0)
                if max(seqs) > cur:
                    await self._r().hset(t + ":fwd", "delivered_seq", max(seqs))
            if audit is not None:
                audit.seq = max(seqs) if seqs else audit.seq
                await self._write_audit(workspace, audit)
            return seqs

        return await self._run(run)

    async def outbox_dead(self, workspace: str, batch: str, at: float, audit: ChangeRecord) -> list[int]:
        async def run():
            t = tag(workspace)
            seqs = await self._batch_seqs(workspace, batch)
            pipe = self._r().pipeline(transaction=True)
            for s in seqs:
                pipe.hset(t + ":outbox", f"{s}:state", "dead")
                pipe.zrem(t + ":outbox:pending", str(s))
                pipe.zadd(t + ":outbox:dead", {str(s): s})
            await pipe.execute()
            await self._set_status(workspace, seqs, DEAD, None)
            audit.seq = max(seqs) if seqs else audit.seq
            await self._write_audit(workspace, audit)
            return seqs

        return await self._run(run)

    async def dead_letters(self, workspace: str) -> list[dict[str, Any]]:
        async def run():
            seqs = [int(m) for m in await self._r().zrange(tag(workspace) + ":outbox:dead", 0, -1)]
            return group_dead_letters(await self._rows(workspace, seqs))

        return await self._run(run)

    async def dead_letter_retry(self, workspace: str, batch: str) -> int:
        async def run():
            t = tag(workspace)
            dead = {int(m) for m in await self._r().zrange(t + ":outbox:dead", 0, -1)}
            seqs = [s for s in await self._batch_seqs(workspace, batch) if s in dead]
            if not seqs:
                return 0
            pipe = self._r().pipeline(transaction=True)
            for s in seqs:
                pipe.hdel(t + ":outbox", f"{s}:state", f"{s}:fa")
                pipe.hset(t + ":outbox", f"{s}:att", 0)
                pipe.zrem(t + ":outbox:dead", str(s))
                pipe.zadd(t + ":outbox:pending", {str(s): s})
            pipe.sadd(OUTBOX_INDEX, workspace)
            await pipe.execute()
            await self._set_status(workspace, seqs, PENDING, None)
            return len(seqs)

        return await self._run(run)

    async def dead_letter_discard(self, workspace: str, batch: str, at: float) -> int:
        async def run():
            t = tag(workspace)
            dead = {int(m) for m in await self._r().zrange(t + ":outbox:dead", 0, -1)}
            seqs = [s for s in await self._batch_seqs(workspace, batch) if s in dead]
            pipe = self._r().pipeline(transaction=True)
            self._drop_rows(pipe, workspace, seqs, batch)
            await pipe.execute()
            await self._set_status(workspace, seqs, DISCARDED, at)
            return len(seqs)

        return await self._run(run)

    async def forward_status(self, workspace: str) -> dict[str, Any]:
        async def run():
            t = tag(workspace)
            last, delivered, seeded_at, seed_status = await self._r().hmget(
                t + ":fwd", "last_seq", "delivered_seq", "seeded_at", "seed_status"
            )
            pending = await self._r().zcard(t + ":outbox:pending")
            dead = await self._r().zcard(t + ":outbox:dead")
            oldest = None
            first = await self._r().zrange(t + ":outbox:pending", 0, 0)
            if first:
                rows = await self._rows(workspace, [int(first[0])])
                oldest = rows[0].created_at if rows else None
            return {
                "workspace": workspace,
                "recorded_seq": int(last or 0),
                "delivered_seq": int(delivered or 0),
                "pending": pending,
                "dead_letters": dead,
                "oldest_pending_at": oldest,
                "seeded_at": _f(seeded_at),
                "seed_status": _s(seed_status) or None,
            }

        return await self._run(run)

    async def history(self, workspace: str, before: int | None, limit: int) -> list[dict[str, Any]]:
        async def run():
            t = tag(workspace)
            top = int(await self._r().hget(t + ":fwd", "audit_id") or 0)
            start = min(top, (before - 1) if before is not None else top)
            ids = list(range(start, max(0, start - limit), -1))
            if not ids:
                return []
            fields = []
            for i in ids:
                fields += [str(i), f"{i}:seq", f"{i}:fs", f"{i}:fa"]
            values = await self._r().hmget(t + ":audit", fields)
            out = []
            for n, i in enumerate(ids):
                raw, seq, fs, fa = values[4 * n : 4 * n + 4]
                if raw is None:
                    continue
                out.append(_audit_entry(i, raw, seq, fs, fa))
            return out

        return await self._run(run)

    async def claim_seed(self, workspace: str, owner: str, ttl_ms: int) -> str:
        t = tag(workspace)
        result = await self._run(lambda: self._claim_seed(keys=[t + ":fwd", t + ":seed:claim"], args=[owner, ttl_ms]))
        return _s(result)

    async def release_seed(self, workspace: str, owner: str) -> None:
        await self._run(lambda: self._release(keys=[tag(workspace) + ":seed:claim"], args=[owner]))

    async def seed_status(self, workspace: str) -> dict[str, Any] | None:
        async def run():
            seeded_at, status = await self._r().hmget(tag(workspace) + ":fwd", "seeded_at", "seed_status")
            if seeded_at is None:
                return None
            return {"seeded_at": float(seeded_at), "status": _s(status) or None}

        return await self._run(run)

    # ----------------------------------------------------------- change log

    async def changes_since(self, workspace: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        """ChangeLog: audit entries after ``after_id``, oldest first (see RedisChangeLog)."""
        if getattr(self, "_changelog", None) is None:
            self._changelog = RedisChangeLog(self)
        return await self._changelog.changes_since(workspace, after_id, limit)

    async def forward_progress(self, workspace: str) -> dict[str, Any]:
        """What the forwarder got to: ``delivered_seq``, ``pending`` rows, and the first pending row (or None)."""
        status = await self.forward_status(workspace)
        rows = await self.outbox_pending(workspace, 1) if status["pending"] else []
        return {
            "delivered_seq": status["delivered_seq"],
            "pending": status["pending"],
            "head": rows[0] if rows else None,
        }

    async def change_heads(self) -> dict[str, int]:
        """ChangeLog: the newest audit id of every workspace."""
        if getattr(self, "_changelog", None) is None:
            self._changelog = RedisChangeLog(self)
        return await self._changelog.change_heads()


# ------------------------------------------------------------- change log

AUDIT_HOLE_GRACE = 5.0  # seconds an audit id given out but not yet written is waited for


class RedisChangeLog:
    """ChangeLog (persistence/outbox.py) over a RedisDocumentStore's audit hashes.

    Audit ids are per-workspace counters with no gaps, but a forwarding audit
    entry takes its id before it writes its body (two commands): a reader
    that finds an id missing below the newest one waits for it, up to
    ``AUDIT_HOLE_GRACE`` seconds (a writer that died in between leaves a
    hole for good), so it never moves past an entry about to appear.
    """

    def __init__(self, store: RedisDocumentStore, grace: float = AUDIT_HOLE_GRACE) -> None:
        self.store = store
        self.grace = grace
        self._holes: dict[tuple[str, int], float] = {}

    async def changes_since(self, workspace: str, after_id: int, limit: int) -> list[dict[str, Any]]:
        import time

        store = self.store

        async def run():
            t = tag(workspace)
            top = int(await store._r().hget(t + ":fwd", "audit_id") or 0)
            ids = list(range(after_id + 1, min(top, after_id + limit) + 1))
            if not ids:
                return []
            fields = []
            for i in ids:
                fields += [str(i), f"{i}:seq", f"{i}:fs", f"{i}:fa"]
            values = await store._r().hmget(t + ":audit", fields)
            out = []
            now = time.monotonic()
            for n, i in enumerate(ids):
                raw, seq, fs, fa = values[4 * n : 4 * n + 4]
                if raw is None:
                    first = self._holes.setdefault((workspace, i), now)
                    if now - first < self.grace:
                        break  # being written: stop before it, read it next time
                    continue
                self._holes.pop((workspace, i), None)
                out.append(_audit_entry(i, raw, seq, fs, fa))
            return out

        return await store._run(run)

    async def change_heads(self) -> dict[str, int]:
        store = self.store

        async def run():
            names = []
            async for key in store._r().scan_iter(match="collab:ws:{*}:fwd", count=1000):
                text = key.decode()
                names.append(text[len("collab:ws:{") : -len("}:fwd")])
            if not names:
                return {}
            pipe = store._r().pipeline(transaction=False)
            for name in names:
                pipe.hget(tag(name) + ":fwd", "audit_id")
            heads = await pipe.execute()
            return {name: int(head) for name, head in zip(names, heads) if head}

        return await store._run(run)
