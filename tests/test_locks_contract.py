"""One contract for every LeaseManager: the in-process one and the Redis one.

Every test in the first part runs against both implementations (real
redis-server processes on free ports, started by the test). The last part
covers what only a shared backend has: several nodes, and Redis faults.

Time: the in-process manager runs on a ManualClock, so "the lease lapses at
its TTL" is checked at exact instants (just before: held; just after: gone)
and a 5 s wait costs nothing. Redis keeps TTLs itself, in real time, so the
Redis manager runs on the real clock: there ``timeline.elapse`` really waits,
TTLs are a few tenths of a second, and what only an exact instant could show
is checked on the manual clock alone (``timeline.manual``).
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from clocks import Clock, ManualClock, SystemClock
from locks.base import Lease, LockConflict, LockEvent, LockNotHeld, LockUnavailable
from locks.fence import FenceKeeper, MemoryMetaStore
from locks.memory import MemoryLeaseManager
from locks.redis import PREFIX, RedisLeaseManager
from tests.fakes import eventually

WS = "ds-contract"


class Timeline:
    """How a contract test lets time pass and waits for a waiter to queue, for either manager."""

    def __init__(self, kind: str, clock: Clock, state: dict) -> None:
        self.kind = kind
        self.clock = clock
        self.manual = isinstance(clock, ManualClock)
        self._state = state
        self._queued = 0

    def now(self) -> float:
        return self.clock.now()

    async def elapse(self, seconds: float) -> None:
        """Let ``seconds`` pass: advance the manual clock (exact, instant), or really wait (Redis TTLs)."""
        if self.manual:
            await self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)  # real time is what Redis expires by: not a synchronisation

    async def queued(self, waiting: asyncio.Task, count: int = 1) -> None:
        """Return once ``count`` more waiters wait (bounded): the ones just started are in the queue."""
        if self.manual:
            # Each waiting acquire sleeps on the clock until its wait ends.
            await self.clock.sleepers(self.clock.pending + count)
        else:
            # Each queued waiter draws the next arrival number from the workspace's queue
            # counter (a fresh Redis per test: it counts this test's waiters).
            self._queued += count
            client = aioredis.from_url(self._state["redis"].url)
            try:
                key = f"{PREFIX}{{{WS}}}:qseq"
                await eventually(
                    _arrivals_reach(client, key, self._queued, waiting), 10, interval=0.005, what="the waiter queued"
                )
            finally:
                await client.aclose()
        assert not waiting.done()


def _arrivals_reach(client, key: str, count: int, waiting: asyncio.Task):
    """An async predicate for eventually(): the queue counter reached ``count``."""

    async def check() -> bool:
        assert not waiting.done(), waiting  # it must be waiting, not answered already
        return int(await client.get(key) or 0) >= count

    return check


@pytest.fixture(params=["memory", "redis"])
async def make_manager(request, redis_factory):
    """``make(fences=None)`` builds a started manager of the parametrized kind."""
    created = []
    state: dict = {}
    clock: Clock = ManualClock() if request.param == "memory" else SystemClock()

    async def make(fences: FenceKeeper | None = None):
        fences = fences or FenceKeeper(MemoryMetaStore())
        if request.param == "memory":
            manager = MemoryLeaseManager(fences, clock=clock)
        else:
            if "redis" not in state:
                state["redis"] = redis_factory()
            manager = RedisLeaseManager(state["redis"].url, fences, timeout=0.5, poll_interval=0.2, clock=clock)
        await manager.start()
        created.append(manager)
        return manager

    make.kind = request.param
    make.state = state
    make.timeline = Timeline(request.param, clock, state)
    yield make
    for manager in created:
        await manager.close()


@pytest.fixture
async def manager(make_manager):
    return await make_manager()


@pytest.fixture
def timeline(make_manager) -> Timeline:
    return make_manager.timeline


async def acquire(m, path, holder, ttl=5.0, wait=0.0, ws=WS):
    return await m.acquire(ws, path, holder, f"user-{holder}", ttl, wait, name=f"Name {holder}")


# --------------------------------------------------------------- contract


async def test_grant_carries_fence_and_overlaps_conflict(manager, timeline):
    a = await acquire(manager, "connection", "h1")
    assert isinstance(a, Lease) and a.fence >= 1 and a.holder == "h1" and a.user_id == "user-h1"
    assert a.name == "Name h1" and a.token and a.expires_at == pytest.approx(timeline.now() + 5, abs=0.5)
    # Descendant and ancestor paths of another holder conflict; siblings do not.
    for path in ("connection.credentials", "connection"):
        with pytest.raises(LockConflict) as info:
            await acquire(manager, path, "h2")
        assert info.value.lease.path == "connection" and info.value.lease.user_id == "user-h1"
        assert info.value.lease.token == "" and info.value.expires_at == pytest.approx(a.expires_at, abs=0.5)
    b = await acquire(manager, "schedule.cron", "h2")
    c = await acquire(manager, "connectionstring", "h2")  # not under `connection`
    assert a.fence < b.fence < c.fence
    # In normal operation fences do not jump (one durable reservation covers a block).
    assert (b.fence, c.fence) == (a.fence + 1, a.fence + 2)
    assert manager.fences.writes == 1
    # Fences are per workspace.
    other = await acquire(manager, "connection", "h2", ws="ds-other")
    assert other.fence >= 1


async def test_same_holder_reacquire_and_nested_paths(manager):
    a = await acquire(manager, "connection.credentials", "h1", ttl=2)
    again = await acquire(manager, "connection.credentials", "h1", ttl=10)
    assert again.token == a.token and again.fence == a.fence and again.expires_at > a.expires_at + 5
    # One holder's overlapping paths do not conflict with each other.
    outer = await acquire(manager, "connection", "h1")
    assert outer.fence > a.fence
    assert {lease.path for lease in await manager.list(WS)} == {"connection", "connection.credentials"}


async def test_release_needs_the_lease_token(manager):
    a = await acquire(manager, "schedule.cron", "h1")
    forged = Lease(WS, "schedule.cron", "h1", "user-h1", a.fence, a.expires_at, "not-the-token")
    with pytest.raises(LockNotHeld) as info:
        await manager.release(forged)
    assert info.value.reason == "taken"
    await manager.release(a)
    with pytest.raises(LockNotHeld) as info:
        await manager.release(a)
    assert info.value.reason == "gone"
    assert await manager.list(WS) == []


async def test_renew_extends_and_reports_loss(manager, timeline):
    a = await acquire(manager, "connection", "h1", ttl=0.3)
    renewed = await manager.renew(a, 5.0)
    assert renewed.expires_at == pytest.approx(timeline.now() + 5, abs=0.5) and renewed.token == a.token
    await timeline.elapse(0.4)  # past the original TTL, not the renewed one
    assert [lease.path for lease in await manager.list(WS)] == ["connection"]
    short = await manager.renew(renewed, 0.15)
    await timeline.elapse(0.3)
    with pytest.raises(LockNotHeld) as info:
        await manager.renew(short)
    assert info.value.reason == "gone"
    b = await acquire(manager, "connection", "h2")
    with pytest.raises(LockNotHeld) as info:
        await manager.renew(short)
    assert info.value.reason == "taken"
    await manager.release(b)


async def test_tokens_are_per_lease_not_per_task(manager, timeline):
    """redis-py's Lock keeps its token in a thread-local shared by every task of
    a loop: task A's late release deletes task B's lock. Ours must not."""
    events = []
    a_holds, b_holds = asyncio.Event(), asyncio.Event()

    async def task_a():
        lease = await acquire(manager, "connection", "conn-1", ttl=0.2)
        a_holds.set()
        await b_holds.wait()  # A's lease lapsed while it "worked"; B took the path meanwhile
        try:
            await manager.release(lease)
            events.append("a released")
        except LockNotHeld as exc:
            events.append(f"a {exc.reason}")

    async def task_b():
        # Same holder id (one connection) and same path, after A's lapsed: a different lease.
        await a_holds.wait()
        await timeline.elapse(0.25)
        lease = await acquire(manager, "connection", "conn-1", ttl=5.0)
        events.append("b acquired")
        b_holds.set()
        return lease

    _, b = await asyncio.wait_for(asyncio.gather(task_a(), task_b()), 10)
    assert events == ["b acquired", "a taken"]
    held = await manager.list(WS)
    assert [(lease.path, lease.fence) for lease in held] == [("connection", b.fence)]
    await manager.release(b)


async def test_expired_lease_lets_others_in(manager, timeline):
    await acquire(manager, "connection", "h1", ttl=0.2)
    with pytest.raises(LockConflict):
        await acquire(manager, "connection", "h2")
    if timeline.manual:  # held to the last instant of its TTL
        await timeline.elapse(0.199)
        with pytest.raises(LockConflict):
            await acquire(manager, "connection", "h2")
    await timeline.elapse(0.3)
    assert await manager.list(WS) == []
    b = await acquire(manager, "connection", "h2")
    assert b.holder == "h2"


async def test_waiter_is_granted_on_release_and_on_expiry(manager, timeline):
    a = await acquire(manager, "connection", "h1")
    waiter = asyncio.create_task(acquire(manager, "connection.host", "h2", wait=5.0))
    await timeline.queued(waiter)
    woken = getattr(manager, "stats", {}).get("woken", 0)
    await manager.release(a)
    # Woken by the release: on the manual clock no time passes at all; with Redis, by the
    # release event and not by a poll.
    b = await asyncio.wait_for(waiter, 5)
    assert b.holder == "h2" and b.fence > a.fence
    if not timeline.manual:
        assert manager.stats["woken"] > woken
    # On expiry: the waiter gets it at the TTL, not at the end of its wait.
    await manager.release(b)
    c = await acquire(manager, "connection", "h1", ttl=0.3)
    waiter = asyncio.create_task(acquire(manager, "connection", "h2", wait=3.0))
    await timeline.queued(waiter)
    if timeline.manual:
        await timeline.elapse(0.299)
        assert not waiter.done()
        await timeline.elapse(0.002)
        assert waiter.done()  # at the instant the lease lapsed
    d = await asyncio.wait_for(waiter, 5)  # a grant, not a conflict: it came before the 3 s wait ended
    assert d.fence > c.fence and d.holder == "h2"


async def test_wait_times_out_with_the_holder(manager, timeline):
    a = await acquire(manager, "connection", "h1")
    waiter = asyncio.create_task(acquire(manager, "connection", "h2", wait=0.3))
    await timeline.queued(waiter)
    if timeline.manual:
        await timeline.elapse(0.299)
        assert not waiter.done()  # it waits its whole wait...
        await timeline.elapse(0.002)
        assert waiter.done()  # ...and not a moment longer
    with pytest.raises(LockConflict) as info:
        await asyncio.wait_for(waiter, 5)
    assert info.value.lease.holder == "h1" and info.value.lease.fence == a.fence
    # A timed-out waiter left the queue: the next request is not blocked by it.
    await manager.release(a)
    assert (await acquire(manager, "connection", "h3")).holder == "h3"


async def test_waiters_are_served_first_come_first_served(manager, timeline):
    a = await acquire(manager, "connection", "h0")
    order: list[str] = []

    async def wait_for_it(holder: str, path: str):
        lease = await acquire(manager, path, holder, wait=5.0)
        order.append(holder)
        await asyncio.sleep(0)  # "works" for a loop turn, letting the others run
        await manager.release(lease)

    tasks = []
    for i, path in enumerate(["connection", "connection.host", "connection", "connection.port"]):
        tasks.append(asyncio.create_task(wait_for_it(f"w{i}", path)))
        await timeline.queued(tasks[-1])  # arrival order is the order of creation
    # Someone arriving later without waiting does not jump the queue, even on a free sibling path.
    with pytest.raises(LockConflict):
        await acquire(manager, "connection.user", "late")
    await manager.release(a)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["w0", "w1", "w2", "w3"]


async def test_cancelled_waiter_leaves_the_queue(manager, timeline):
    a = await acquire(manager, "connection", "h1")
    first = asyncio.create_task(acquire(manager, "connection", "h2", wait=5.0))
    await timeline.queued(first)
    second = asyncio.create_task(acquire(manager, "connection", "h3", wait=5.0))
    await timeline.queued(second)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await manager.release(a)
    c = await asyncio.wait_for(second, 2)
    assert c.holder == "h3"
    assert [lease.holder for lease in await manager.list(WS)] == ["h3"]


async def test_one_holder_at_every_instant(manager):
    """20 contenders, 50 rounds each: a shared counter of current holders never exceeds 1."""
    holding = 0
    violations = 0
    grants: list[int] = []

    async def contender(i: int) -> None:
        nonlocal holding, violations
        for _ in range(50):
            lease = await acquire(manager, "connection", f"c{i}", ttl=5.0, wait=20.0)
            holding += 1
            if holding != 1:
                violations += 1
            grants.append(lease.fence)
            await asyncio.sleep(0)
            holding -= 1
            await manager.release(lease)

    await asyncio.wait_for(asyncio.gather(*(contender(i) for i in range(20))), 60)
    assert violations == 0
    assert len(grants) == 1000
    assert grants == sorted(grants) and len(set(grants)) == 1000  # fences increase with every grant


async def test_list_and_force_release(manager):
    events: list[LockEvent] = []
    manager.subscribe(events.append)
    a = await acquire(manager, "connection", "h1")
    await acquire(manager, "schedule.cron", "h2")
    listed = {lease.path: lease for lease in await manager.list(WS)}
    assert set(listed) == {"connection", "schedule.cron"}
    assert listed["connection"].fence == a.fence and listed["connection"].token == ""
    assert listed["connection"].expires_at == pytest.approx(a.expires_at, abs=0.5)
    forced = await manager.force_release(WS, "connection")
    assert forced is not None and forced.holder == "h1"
    assert await manager.force_release(WS, "connection") is None
    with pytest.raises(LockNotHeld):
        await manager.renew(a)
    assert [lease.path for lease in await manager.list(WS)] == ["schedule.cron"]
    kinds = [(e.kind, e.path) for e in events]
    assert ("acquired", "connection") in kinds and ("forced", "connection") in kinds


async def test_fences_keep_increasing_after_the_backend_loses_its_data(make_manager):
    meta = MemoryMetaStore()
    m1 = await make_manager(FenceKeeper(meta, block=10))
    before = []
    for i in range(25):  # crosses two reservation blocks
        lease = await acquire(m1, "connection", f"h{i}")
        before.append(lease.fence)
        await m1.release(lease)
    assert before == sorted(before)
    if make_manager.kind == "redis":
        client = aioredis.from_url(make_manager.state["redis"].url)
        await client.flushall()
        await client.aclose()
    # A fresh process: new manager, new keeper over the same durable store.
    m2 = await make_manager(FenceKeeper(meta, block=10))
    after = [(await acquire(m2, "connection", "again")).fence]
    assert after[0] > max(before)


# ---------------------------------------------------- shared backend only


@pytest.fixture
async def redis_nodes(redis_factory):
    server = redis_factory()
    meta = MemoryMetaStore()
    nodes = [RedisLeaseManager(server.url, FenceKeeper(meta), timeout=0.3, poll_interval=0.2) for _ in range(2)]
    for node in nodes:
        await node.start()
    yield server, nodes
    for node in nodes:
        await node.close()


async def test_two_nodes_exclude_each_other_and_wake_waiters(redis_nodes):
    server, (a, b) = redis_nodes
    await eventually(lambda: a.pubsub_connected and b.pubsub_connected, 5, what="both nodes subscribed")
    b.poll_interval = 60.0  # no polling fallback within this test: only pub/sub can wake b's waiter
    events: list[LockEvent] = []
    b.subscribe(events.append)
    held = await acquire(a, "connection", "node-a", ttl=60.0)  # nor an expiry
    with pytest.raises(LockConflict):
        await acquire(b, "connection.host", "node-b")
    waiter = asyncio.create_task(acquire(b, "connection", "node-b", wait=30.0))
    client = aioredis.from_url(server.url)
    try:
        await eventually(_arrivals_reach(client, f"{PREFIX}{{{WS}}}:qseq", 1, waiter), 10, what="b's waiter queued")
    finally:
        await client.aclose()
    await a.release(held)
    lease = await asyncio.wait_for(waiter, 10)  # long before any poll or expiry could have woken it
    assert b.stats["woken"] >= 1 and b.stats["polled"] == 0
    assert lease.fence > held.fence
    assert ("released", "connection") in [(e.kind, e.path) for e in events]


async def test_redis_down_fails_fast_and_recovers(redis_nodes):
    server, (a, _) = redis_nodes
    lease = await acquire(a, "connection", "h1")
    # Fails fast: within the manager's command timeout (0.3 s here; the bound is generous), never hangs.
    server.pause()
    try:
        with pytest.raises(LockUnavailable):
            await asyncio.wait_for(acquire(a, "schedule.cron", "h2"), 2.0)
    finally:
        server.resume()
    await a.release(lease)
    server.kill()
    with pytest.raises(LockUnavailable):
        await asyncio.wait_for(acquire(a, "schedule.cron", "h2"), 2.0)
    with pytest.raises(LockUnavailable):
        await asyncio.wait_for(a.list(WS), 2.0)
    server.start()
    assert (await acquire(a, "schedule.cron", "h2")).holder == "h2"


async def test_redis_restart_without_data_loses_leases_not_fence_order(redis_nodes):
    server, (a, b) = redis_nodes
    fences = []
    for i in range(5):
        lease = await acquire(a, "connection", f"h{i}")
        fences.append(lease.fence)
        await a.release(lease)
    held = await acquire(b, "schedule.cron", "holder")
    fences.append(held.fence)
    server.kill()
    server.wipe()
    server.start()
    with pytest.raises(LockNotHeld) as info:
        await b.renew(held)
    assert info.value.reason == "gone"
    for node in (a, b):
        lease = await acquire(node, "connection", "after")
        assert lease.fence > max(fences)
        fences.append(lease.fence)
        await node.release(lease)


async def test_fence_ceiling_is_durable_in_the_sqlite_store(tmp_path):
    from persistence.sqlite import SQLiteDocumentStore

    store = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await store.open()
    assert await store.get_meta("ws", "k") is None
    await store.put_meta("ws", "k", b"1")
    await store.put_meta("ws", "k", b"2")
    keeper = FenceKeeper(store, block=100)
    await keeper.cover("ws", 5)
    assert keeper.writes == 1 and await keeper.durable_ceiling("ws") == 105
    await keeper.cover("ws", 90)  # inside the reserved block: no write
    assert keeper.writes == 1
    await store.close()
    reopened = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await reopened.open()
    assert await reopened.get_meta("ws", "k") == b"2"
    assert await FenceKeeper(reopened).durable_ceiling("ws") == 105
    assert await reopened.get_meta("other", "k") is None
    await reopened.close()
