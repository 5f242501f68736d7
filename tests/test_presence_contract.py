"""One contract for every PresenceRegistry: in-process and Redis.

Each test runs twice. "Nodes" are registries sharing one store: one
MemoryBackend, or one redis-server started for the test.

Time: the in-process registries share a ManualClock, so expiry and heartbeats
are checked at exact instants with the real 30 s TTL. Redis expires entries
itself, in real time: there the registries run on the real clock, TTLs are a
second or two, ``nodes.elapse`` really waits, and the expiry our code asks of
Redis is read back (PTTL) instead of timed.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from clocks import ManualClock, SystemClock
from presence.base import ENTRY_EXPIRY_FRACTION, HEARTBEATS_PER_TTL, ConnectionEntry, WorkspacePresence, build_roster
from presence.memory import MemoryBackend, MemoryPresenceRegistry
from tests.support import eventually

WS = "ds-contract"


class Nodes:
    """Makes registries (nodes) that share one store; closes them all."""

    def __init__(self, kind: str, redis_url: str | None) -> None:
        self.kind = kind
        self.redis_url = redis_url
        self.backend = MemoryBackend()
        self.started: list = []
        self.clock = ManualClock() if kind == "memory" else SystemClock()
        self.manual = kind == "memory"

    async def elapse(self, seconds: float) -> None:
        """Let time pass: the manual clock at once, or real time (what Redis expires by)."""
        if self.manual:
            await self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    async def node(self, node_id: str, ttl: float = 30.0):
        if self.kind == "memory":
            registry = MemoryPresenceRegistry(node_id, ttl=ttl, backend=self.backend, clock=self.clock)
        else:
            from presence.redis import RedisPresenceRegistry

            registry = RedisPresenceRegistry(self.redis_url, node_id, ttl=ttl, clock=self.clock)
        changes: list[str] = []
        registry.on_change = changes.append
        registry.changes = changes  # type: ignore[attr-defined]
        await registry.start()
        self.started.append(registry)
        return registry

    async def wipe(self) -> None:
        """The shared store loses everything (a Redis restart without persistence)."""
        if self.kind == "memory":
            self.backend.entries.clear()
            self.backend.locks.clear()
        else:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(self.redis_url)
            await client.flushall()
            await client.aclose()

    async def close(self) -> None:
        for registry in self.started:
            await registry.close()


@pytest.fixture(params=["memory", "redis"])
async def nodes(request):
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    made = Nodes(request.param, url)
    yield made
    await made.close()


def entry(node: str, conn: str, user: str, ws: str = WS, **kw) -> ConnectionEntry:
    now = time.time()
    fields = {"joined_at": now, "last_active": now, **kw}
    return ConnectionEntry(
        workspace_id=ws, conn_id=f"{node}/{conn}", node=node, user_id=user, name=user.title(), color="#123456",
        **fields,
    )  # fmt: skip


def conn_ids(state: WorkspacePresence) -> set[str]:
    return {e.conn_id for e in state.entries}


async def test_entries_are_shared_between_nodes(nodes):
    a, b = await nodes.node("a"), await nodes.node("b")
    e1 = entry("a", "1", "alice", focus="connection.host")
    a.put(e1)
    await a.sync(WS)
    b.put(entry("b", "1", "bob"))
    await b.sync(WS)
    for registry in (a, b):
        state = await registry.read(WS)
        assert conn_ids(state) == {"a/1", "b/1"}
        assert next(e for e in state.entries if e.conn_id == "a/1") == e1  # every field round-trips
    assert (await a.read("ds-other")).entries == []  # workspaces are separate

    a.discard(WS, "a/1")
    await a.sync(WS)
    assert conn_ids(await b.read(WS)) == {"b/1"}
    assert conn_ids(await a.read(WS)) == {"b/1"}


async def test_two_connections_of_one_user_are_one_participant(nodes):
    a, b = await nodes.node("a"), await nodes.node("b")
    t0 = time.time()
    a.put(entry("a", "1", "alice", joined_at=t0 - 10, last_active=t0 - 5, focus="connection.host"))
    b.put(entry("b", "7", "alice", joined_at=t0 - 3, last_active=t0 - 1))
    await a.sync(WS)
    await b.sync(WS)
    roster = build_roster(await a.read(WS))
    assert list(roster) == ["alice"]
    alice = roster["alice"]
    assert alice.connections == 2
    assert alice.joined_at == pytest.approx(t0 - 10)
    assert alice.last_active == pytest.approx(t0 - 1)
    assert alice.node == "b" and alice.nodes == ("a", "b")
    assert alice.editing == "connection.host"  # the tab that has a focus
    b.discard(WS, "b/7")
    await b.sync(WS)
    assert build_roster(await b.read(WS))["alice"].connections == 1


async def test_locks_are_shared_and_expired_ones_ignored(nodes):
    a, b = await nodes.node("a"), await nodes.node("b")
    a.put(entry("a", "1", "alice"))
    now = time.time()
    locks = [
        {"path": "connection.host", "user_id": "alice", "holder": "a/1", "fence": 3, "expires_at": now + 60},
        {"path": "schedule.cron", "user_id": "alice", "holder": "a/1", "fence": 4, "expires_at": now - 1},
    ]
    a.set_locks(WS, locks)
    await a.sync(WS)
    state = await b.read(WS)
    assert [lock["path"] for lock in state.locks] == ["connection.host", "schedule.cron"]
    assert build_roster(state)["alice"].locks == ("connection.host",)  # the expired lock is not shown
    a.set_locks(WS, [])
    await a.sync(WS)
    assert (await b.read(WS)).locks == []


async def test_other_nodes_are_notified_of_changes(nodes):
    a, b = await nodes.node("a"), await nodes.node("b")
    await b.watch(WS)
    await a.watch(WS)
    a.put(entry("a", "1", "alice"))
    await a.sync(WS)
    await eventually(lambda: WS in b.changes, 5, what="b notified of a's join")
    assert a.changes == []  # a node is not told about its own changes
    await b.unwatch(WS)
    b.changes.clear()
    a.discard(WS, "a/1")
    await a.sync(WS)
    c = await nodes.node("c")  # a round trip through the store after the change
    await c.read(WS)
    await eventually(lambda: (a.changes, b.changes) == ([], []), 1, what="no notification after unwatch")


async def test_entries_of_a_crashed_node_expire_within_the_ttl(nodes):
    ttl = 30.0 if nodes.manual else 1.0
    a, b = await nodes.node("a", ttl=ttl), await nodes.node("b", ttl=ttl)
    a.put(entry("a", "1", "alice"))
    b.put(entry("b", "1", "bob"))
    await a.sync(WS)
    await b.sync(WS)
    await a.close(remove_entries=False)  # stops heartbeating, leaves its entries behind: a crash
    assert conn_ids(await b.read(WS)) == {"a/1", "b/1"}
    # Well inside the TTL: entries expire ENTRY_EXPIRY_FRACTION * ttl after their last refresh.
    expiry = ENTRY_EXPIRY_FRACTION * ttl
    if nodes.manual:
        await nodes.elapse(expiry - 0.01)
        assert conn_ids(await b.read(WS)) == {"a/1", "b/1"}  # b's own heartbeat kept b/1
        await nodes.elapse(0.02)
        assert conn_ids(await b.read(WS)) == {"b/1"}
    else:
        import redis.asyncio as aioredis

        from presence.redis import entry_prefix

        client = aioredis.Redis.from_url(nodes.redis_url)
        try:
            assert 0 < await client.pttl(entry_prefix(WS) + "a/1") <= expiry * 1000  # what we asked of Redis
        finally:
            await client.aclose()

        async def gone() -> bool:
            return conn_ids(await b.read(WS)) == {"b/1"}

        await eventually(gone, 5 * ttl, what="the crashed node's entry expired in Redis")


async def test_heartbeats_keep_a_live_node_listed_and_restore_a_wiped_store(nodes):
    # A heartbeat every ttl / 5; entries expire 0.6 * ttl after the last one.
    ttl = 30.0 if nodes.manual else 2.0
    a, b = await nodes.node("a", ttl=ttl), await nodes.node("b", ttl=ttl)
    a.put(entry("a", "1", "alice"))
    await a.sync(WS)
    # Well past the entry expiry, the live node's entry is still there.
    for _ in range(8):
        await nodes.elapse(2 * ENTRY_EXPIRY_FRACTION * ttl / 8)
        assert conn_ids(await b.read(WS)) == {"a/1"}
    await nodes.wipe()
    assert conn_ids(await b.read(WS)) == set()
    if nodes.manual:
        await nodes.elapse(ttl / HEARTBEATS_PER_TTL)  # the next heartbeat, at the latest
        assert conn_ids(await b.read(WS)) == {"a/1"}

    async def restored() -> bool:
        return conn_ids(await b.read(WS)) == {"a/1"}

    await eventually(restored, 5 * ttl, what="entry restored by heartbeat")


async def test_clean_close_removes_the_nodes_entries_at_once(nodes):
    a, b = await nodes.node("a"), await nodes.node("b")
    await b.watch(WS)
    a.put(entry("a", "1", "alice"))
    a.put(entry("a", "2", "carol"))
    await a.sync(WS)
    await a.close()
    assert conn_ids(await b.read(WS)) == set()
    await eventually(lambda: WS in b.changes, 5, what="b notified of a's shutdown")


async def test_writes_after_close_are_ignored(nodes):
    a, b = await nodes.node("a"), await nodes.node("b")
    await a.close()
    a.put(entry("a", "1", "ghost"))
    await b.sync(WS)
    assert conn_ids(await b.read(WS)) == set()


async def test_redis_outage_keeps_this_nodes_own_participants(redis_server):
    from presence.redis import RedisPresenceRegistry

    a = RedisPresenceRegistry(redis_server.url, "a", ttl=30, timeout=0.3)
    b = RedisPresenceRegistry(redis_server.url, "b", ttl=30, timeout=0.3)
    await a.start()
    await b.start()
    try:
        a.put(entry("a", "1", "alice"))
        await a.sync(WS)
        await b.watch(WS)
        b.put(entry("b", "1", "bob"))
        await b.sync(WS)
        assert conn_ids(await b.read(WS)) == {"a/1", "b/1"}
        redis_server.pause()
        try:
            b.put(entry("b", "2", "carol"))
            with pytest.raises(Exception):  # noqa: B017 - whichever error redis-py raises on a timeout
                await b.sync(WS)
            # Still served: b's own entries from memory, a's from the last good read.
            assert conn_ids(await b.read(WS)) == {"a/1", "b/1", "b/2"}
        finally:
            redis_server.resume()

        async def recovered() -> bool:
            return conn_ids(await b.read(WS)) == {"a/1", "b/1", "b/2"}

        await eventually(recovered, 5, what="recovery")
        await b.sync(WS)  # the failed write was kept and goes out now
        assert conn_ids(await a.read(WS)) == {"a/1", "b/1", "b/2"}
    finally:
        await a.close()
        await b.close()


async def test_a_restarted_node_clears_what_its_previous_run_left(nodes):
    a1, b = await nodes.node("a"), await nodes.node("b")
    a1.put(entry("a", "old-1", "alice"))
    await a1.sync(WS)
    await a1.close(remove_entries=False)  # crashed...
    a2 = await nodes.node("a")  # ...and back under the same node id, before the entry expired
    a2.put(entry("a", "new-1", "carol"))
    await a2.sync(WS)
    assert conn_ids(await a2.read(WS)) == {"a/new-1"}
    assert conn_ids(await b.read(WS)) == {"a/new-1"}  # gone for everyone, not only for a2
