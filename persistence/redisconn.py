"""One way to reach Redis, whatever the deployment: a single server, a Redis
Cluster or a primary with replicas behind Sentinel.

Every Redis user of the server (document store, relay, outbox, locks,
presence, the readiness check, the cluster-wide admin summaries) builds its
client with :func:`connect`, so one ``COLLAB_REDIS_URL`` selects the topology
for all of them, and every call has a deadline (``socket_timeout`` and
``socket_connect_timeout``): a Redis that hangs makes calls fail, it never
makes them wait forever.

URL forms:

* ``redis://[user:pass@]host:port/db`` (also ``rediss://``, ``unix://``): one server.
* ``redis+cluster://[user:pass@]host:port,host:port``: a Redis Cluster (redis-py
  ``RedisCluster``; the hosts are seeds, the client discovers the rest and
  follows slot moves and failovers).
* ``redis+sentinel://[user:pass@]host:port,host:port/mastername[/db]``: the
  primary that the Sentinels name (redis-py ``Sentinel.master_for``: after a
  failover, new connections go to the new primary).

Cluster rules the callers follow: every multi-key command or script touches
keys of one hash slot (a workspace's keys share the tag ``{<workspace>}``);
the few global keys (the outbox index, node summaries) are only used by
single-key commands.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.cluster import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

SINGLE, CLUSTER, SENTINEL = "single", "cluster", "sentinel"

# What a Redis call can raise when Redis is unreachable or failing over (the
# cluster client's RedisClusterException is not a RedisError).
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError)


class ReplicationShortfall(RedisError):
    """WAIT returned before the write reached the replicas asked for (the ack is withheld)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """What a ``COLLAB_REDIS_URL`` names."""

    mode: str
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    master: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def display(self) -> str:
        """For logs: never the password."""
        return self.url.split("@")[-1]


def parse_url(url: str) -> RedisTarget:
    """Read a ``COLLAB_REDIS_URL``; raises ``ValueError`` with what is wrong."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in ("redis+cluster", "redis+sentinel"):
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"COLLAB_REDIS_URL: unknown scheme {scheme!r} (redis, rediss, unix, redis+cluster, redis+sentinel)"
            )
        return RedisTarget(SINGLE, url)
    parts = urlsplit(url)
    netloc = parts.netloc
    username = password = None
    if "@" in netloc:
        cred, netloc = netloc.rsplit("@", 1)
        user, _, pw = cred.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    hosts = []
    for item in netloc.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"COLLAB_REDIS_URL: {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    path = [seg for seg in parts.path.split("/") if seg]
    if scheme == "redis+cluster":
        if path and path != ["0"]:
            raise ValueError("COLLAB_REDIS_URL: a Redis Cluster has only database 0")
        return RedisTarget(CLUSTER, url, tuple(hosts), username=username, password=password)
    if not path:
        raise ValueError("COLLAB_REDIS_URL: redis+sentinel://host:port,.../<master name>[/db] needs the master name")
    db = int(path[1]) if len(path) > 1 else 0
    return RedisTarget(SENTINEL, url, tuple(hosts), master=path[0], db=db, username=username, password=password)


def mode_of(url: str) -> str:
    return parse_url(url).mode


def connect(
    url: str,
    *,
    timeout: float,
    socket_timeout: float | None = None,
    max_connections: int = 64,
    health_check_interval: float = 0,
    retry: Any = None,
) -> Any:
    """A redis-py asyncio client for ``url`` (``Redis`` or ``RedisCluster``).

    ``timeout`` bounds connecting and waiting for a pooled connection;
    ``socket_timeout`` (default: ``timeout``) bounds every reply, so a relay
    reader that blocks on XREAD passes its block time plus ``timeout``.
    """
    target = parse_url(url)
    reply = timeout if socket_timeout is None else socket_timeout
    common: dict[str, Any] = {"socket_timeout": reply, "socket_connect_timeout": timeout}
    if retry is not None:
        common["retry"] = retry
    if target.mode == SINGLE:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            health_check_interval=health_check_interval,
            **common,
        )
        return aioredis.Redis(connection_pool=pool)
    auth = {"username": target.username, "password": target.password}
    if target.mode == CLUSTER:
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in target.hosts],
            max_connections=max_connections,
            health_check_interval=health_check_interval,
            **auth,
            **common,
        )
    sentinel = Sentinel(
        list(target.hosts),
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout},
        **common,
    )
    return sentinel.master_for(
        target.master,
        db=target.db,
        max_connections=max_connections,
        health_check_interval=health_check_interval,
        **auth,
        **common,
    )


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


async def refresh_slots(client: Any) -> None:
    """A cluster client reloads its slot map (after a failover or a slot move),
    leaving the connections other tasks are using alone; no-op otherwise."""
    if is_cluster(client):
        try:
            await client.nodes_manager.initialize()
        except REDIS_ERRORS:
            pass


async def reset(client: Any) -> None:
    """After a failed call on a client that one task owns (the relay reader): a
    cluster client drops its connections and reloads its slot map on the next
    call. Never on a shared client: other tasks' connections would be closed
    under them."""
    if is_cluster(client):
        try:
            await client.aclose()
        except REDIS_ERRORS:
            pass


async def prepare(client: Any) -> None:
    """Load a cluster client's slot map (pub/sub needs it before its first subscribe); no-op otherwise.

    Raises RedisError when the cluster does not answer; callers that may
    start before Redis call it again later."""
    if is_cluster(client):
        await client.initialize()


def publish_in(pipe: Any, client: Any, channel: str, message: str) -> list[tuple[str, str]]:
    """Queue a PUBLISH in ``pipe``; a cluster pipeline refuses PUBLISH, so there
    it is returned for :func:`publish_after` instead."""
    if is_cluster(client):
        return [(channel, message)]
    pipe.publish(channel, message)
    return []


async def publish_after(client: Any, pending: list[tuple[str, str]]) -> None:
    for channel, message in pending:
        await client.publish(channel, message)


# ------------------------------------------------------------------ streams


async def xread(
    client: Any,
    streams: dict[str, str],
    *,
    count: int,
    block_ms: int,
    poll_ms: float = 10.0,
) -> list:
    """XREAD over many streams, on any topology.

    One server or Sentinel: one blocking XREAD. Cluster: XREAD may not cross
    slots, so the streams are grouped by slot and read in one pipelined round
    (one batch per cluster node), polled every ``poll_ms`` until something
    arrives or ``block_ms`` passed: a constant number of connections, at the
    cost of up to ``poll_ms`` of relay latency.
    """
    if not is_cluster(client):
        return await client.xread(streams, count=count, block=block_ms) or []
    groups: dict[int, dict[str, str]] = {}
    for key, since in streams.items():
        groups.setdefault(key_slot(key.encode()), {})[key] = since
    deadline = time.monotonic() + block_ms / 1000.0
    while True:
        pipe = client.pipeline(transaction=False)
        for group in groups.values():
            pipe.xread(group, count=count)
        out = []
        for reply in await pipe.execute():
            if reply:
                out.extend(reply.items() if isinstance(reply, dict) else reply)
        remaining = deadline - time.monotonic()
        if out or remaining <= 0:
            return out
        await asyncio.sleep(min(poll_ms / 1000.0, remaining))


# -------------------------------------------------- scripts + replica acks


class ReplicaAcks:
    """How many replicas must hold a write before it is acknowledged (``WAIT``).

    ``replicas=None`` decides per primary: 1 when it reports connected
    replicas, 0 otherwise (re-checked every ``recheck`` seconds, so a primary
    that lost its replicas, or a new primary after a failover, is seen).
    """

    def __init__(self, replicas: int | None, timeout_ms: int, recheck: float = 5.0) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.recheck = recheck
        self._auto: dict[str, tuple[float, int]] = {}

    async def wanted(self, client: Any, key: str) -> int:
        if self.replicas is not None:
            return self.replicas
        name, kwargs = "", {}
        if is_cluster(client):
            node = client.get_node_from_key(key)
            name, kwargs = node.name, {"target_nodes": node}
        cached = self._auto.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.recheck:
            return cached[1]
        info = await client.info("replication", **kwargs)
        if isinstance(info, dict) and name and name in info and isinstance(info[name], dict):
            info = info[name]
        n = 1 if int(info.get("connected_slaves", 0) or 0) > 0 else 0
        self._auto[name] = (time.monotonic(), n)
        return n

    def forget(self) -> None:
        self._auto.clear()


async def run_script(
    client: Any,
    script: Any,
    keys: Sequence[Any],
    args: Sequence[Any],
    replicas: int,
    wait_ms: int,
    then: Sequence[tuple[Any, ...]] = (),
) -> Any:
    """Run a registered script, then (``replicas > 0``) ``WAIT`` on the same connection.

    WAIT counts the writes of its own connection, so both commands go down
    one connection (a pipeline; in a cluster, a connection of the slot's
    primary). Fewer replicas than asked within ``wait_ms`` raises
    :class:`ReplicationShortfall`: the write is on the primary but not
    acknowledged. ``then``: commands to send after it (in the same round trip
    except on a cluster, where they may belong to other slots).
    """
    for attempt in (0, 1):
        if is_cluster(client):
            if replicas > 0:
                result, acked = await _cluster_script_wait(client, script, keys, args, replicas, wait_ms)
            else:
                result, acked = await script(keys=list(keys), args=list(args)), 0
            if not isinstance(result, Exception):
                for command in then:
                    await client.execute_command(*command)
        else:
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            if replicas > 0:
                pipe.execute_command("WAIT", replicas, wait_ms)
            for command in then:
                pipe.execute_command(*command)
            replies = await pipe.execute(raise_on_error=False)
            result, acked = replies[0], (replies[1] if replicas > 0 else 0)
        if isinstance(result, NoScriptError) and attempt == 0:
            script.sha = await client.script_load(script.script)
            continue
        if isinstance(result, Exception):
            raise result
        if isinstance(acked, Exception):
            raise acked
        if int(acked) < replicas:
            raise ReplicationShortfall(f"write reached {acked} of {replicas} replicas within {wait_ms} ms")
        return result
    raise AssertionError("unreachable")


async def _cluster_script_wait(client: Any, script: Any, keys, args, replicas: int, wait_ms: int) -> tuple[Any, Any]:
    await client.initialize()  # no-op once the slot map is loaded
    node = client.get_node_from_key(keys[0])
    conn = node.acquire_connection()
    replies: list[Any] = []
    try:
        await conn.send_packed_command(
            conn.pack_commands([("EVALSHA", script.sha, len(keys), *keys, *args), ("WAIT", replicas, wait_ms)])
        )
        for _ in range(2):
            try:
                replies.append(await conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
    except BaseException:
        await conn.disconnect()
        node.release(conn)
        await refresh_slots(client)  # a failover or a slot move: the next try goes to the new owner
        raise
    node.release(conn)
    if any(isinstance(r, (MovedError, AskError, ClusterDownError, TryAgainError)) for r in replies):
        await refresh_slots(client)
    return replies[0], replies[1]
