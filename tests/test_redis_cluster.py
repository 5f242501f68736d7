"""Redis Cluster: 3 primaries + 3 replicas (redis-server --cluster-enabled yes,
redis-cli --cluster create), all started here on free loopback ports.

1. Every Lua script of the server runs on the cluster (each touches one slot),
   for workspaces spread over the three primaries.
2. Three `collab serve` nodes, 30 clients with random edits and disconnects
   converge; `kill -9` of the primary holding the workspace mid-run: its
   replica is promoted, nothing acknowledged is lost, clients converge.
"""

from __future__ import annotations

import asyncio
import random

import pycrdt
import pytest

from collab.client import CollabClient
from locks.base import LockConflict
from persistence.outbox import ACCEPTED, ChangeRecord
from persistence.redis import RedisDocumentStore, seq_of, tag
from persistence.redisconn import connect, xread
from presence.base import ConnectionEntry
from presence.redis import RedisPresenceRegistry
from tests.presence_support import close_all
from tests.redis_topologies import kill9, redis_cluster  # noqa: F401  (fixture)
from tests.support import eventually
from tests.test_scaleout import fresh_view, items, node_env, reconnect_to

pytestmark = [pytest.mark.slow, pytest.mark.redis]

WAIT = 30.0


def spread_workspaces(cluster, n: int = 6) -> list[str]:
    """Workspace names whose keys live on every primary of the cluster."""
    by_port: dict[int, list[str]] = {}
    i = 0
    while len(by_port) < 3 or min(len(v) for v in by_port.values()) < n // 3:
        ws = f"ds-slot-{i}"
        by_port.setdefault(cluster.primary_for(tag(ws)).port, []).append(ws)
        i += 1
    return [ws for names in by_port.values() for ws in names[: n // 3]]


async def test_every_script_runs_on_one_slot_of_the_cluster(redis_cluster):  # noqa: F811
    url = redis_cluster.url
    store = RedisDocumentStore(url, "n1", timeout=2.0)
    await store.open()
    from locks.redis import RedisLeaseManager

    locks = RedisLeaseManager(url, timeout=2.0)
    await locks.start()
    presence = RedisPresenceRegistry(url, "n1", ttl=5.0, timeout=2.0)
    await presence.start()
    try:
        assert store.mode == "cluster"
        for ws in spread_workspaces(redis_cluster):
            # Document store: append (with outbox + audit rows), tail, compact, leases, seeding claim.
            doc = pycrdt.Doc()
            doc.get("config", type=pycrdt.Map)["name"] = ws
            update = doc.get_update()
            rec = ChangeRecord(
                kind=ACCEPTED,
                author={"user": "u"},
                changes=[{"path": "name", "new": ws}],
                config={"name": ws},
                forward=True,
            )
            seq = await store.append(ws, [update, update], outbox=[rec])
            assert seq == 2 and rec.seq == 1
            assert [s for s, _, _ in await store.read_tail(ws, 0)] == [1, 2]
            assert ws in await store.outbox_workspaces()
            assert [r.seq for r in await store.outbox_pending(ws, 10)] == [1]
            await store.compact(ws, update, 2)
            loaded = await store.load(ws)
            assert loaded.snapshot_seq == 2 and loaded.last_seq == 2
            assert await store.forward_lease(ws, "n1", 5000) is True
            assert await store.forward_lease(ws, "n2", 5000) is False
            await store.forward_lease_release(ws, "n1")
            assert await store.forward_lease(ws, "n2", 5000) is True
            assert await store.claim_seed(ws, "n1", 5000) == "claimed"
            assert await store.claim_seed(ws, "n2", 5000) == "busy"
            await store.release_seed(ws, "n1")
            # Locks: acquire (and a queued waiter), renew, list, release, force.
            lease = await locks.acquire(ws, "connection", "h1", "alice", ttl=5)
            with pytest.raises(LockConflict):
                await locks.acquire(ws, "connection.host", "h2", "bob", ttl=5)
            waiter = asyncio.ensure_future(locks.acquire(ws, "connection", "h2", "bob", ttl=5, wait=5))
            await asyncio.sleep(0.05)
            await locks.renew(lease, 10)
            assert [x.path for x in await locks.list(ws)] == ["connection"]
            await locks.release(lease)
            second = await asyncio.wait_for(waiter, 10)
            assert second.fence > lease.fence
            assert (await locks.force_release(ws, "connection")).holder == "h2"
            assert await locks.list(ws) == []
            # Presence: write and read the roster (a script reading the entries by name).
            await presence.watch(ws)
            entry = ConnectionEntry(ws, "n1/1", "n1", "alice", "Alice", "#123456")
            presence.put(entry)
            presence.set_locks(ws, [{"path": "connection", "user_id": "alice"}])
            await presence.sync(ws)
            other = RedisPresenceRegistry(url, "n2", ttl=5.0, timeout=2.0)
            await other.start()
            try:
                roster = await other.read(ws)
                assert "n1/1" in str(roster.to_json() if hasattr(roster, "to_json") else roster)
            finally:
                await other.close()
        # The relay's reads: XREAD over streams of several slots at once.
        client = connect(url, timeout=2.0)
        names = spread_workspaces(redis_cluster)
        got = await xread(client, {tag(ws) + ":updates": "0-0" for ws in names}, count=10, block_ms=200)
        assert {k.decode() for k, _ in got} == {tag(ws) + ":updates" for ws in names}
        await client.aclose()
    finally:
        await presence.close()
        await locks.close()
        await store.close()


def cluster_env(cluster, node: str) -> dict[str, str]:
    return node_env(
        cluster,
        node,
        COLLAB_REDIS_URL=cluster.url,
        COLLAB_REDIS_RETRY_SECONDS="30",
        COLLAB_REDIS_TIMEOUT_SECONDS="1",
        COLLAB_COMPACT_EVERY_UPDATES="50",
    )


async def dealt_clients(nodes, ws: str, n: int, prefix: str) -> list[CollabClient]:
    """``n`` connected clients of ``ws``, dealt over ``nodes`` in turn (users ``<prefix><i>``)."""
    clients = []
    for i in range(n):
        c = CollabClient(nodes[i % len(nodes)].ws_url, ws, hello=True, query=f"user={prefix}{i}")
        await c.connect(timeout=WAIT)
        clients.append(c)
    return clients


async def stored_items(cluster, ws: str) -> dict:
    """The workspace's ``items`` as Redis holds them (snapshot and entries, merged: any order integrates)."""
    store = RedisDocumentStore(cluster.url, "probe", timeout=5.0)
    await store.open()
    try:
        stored = await store.load(ws)
    finally:
        await store.close()
    doc = pycrdt.Doc()
    doc.apply_update(pycrdt.merge_updates(*([stored.snapshot] if stored.snapshot else []), *stored.updates))
    return dict(doc.get("items", type=pycrdt.Map).to_py() or {})


async def rooms_view_is(node, ws: str, expected: dict) -> bool:
    return await fresh_view(node, ws) == expected


async def witness(node, ws: str, key: str, acked: set[str]) -> None:
    """One write from a client that then vanishes: if it was acknowledged, the server alone holds it."""
    c = CollabClient(node.ws_url, ws, hello=True, query="user=witness")
    try:
        await c.connect(timeout=WAIT)
        c.doc.get("items", type=pycrdt.Map)[key] = 1
        await c.wait_saved(WAIT)
        acked.add(key)
    except (ConnectionError, TimeoutError, OSError):
        pass
    finally:
        await c.abort()


async def test_thirty_clients_converge_through_a_primary_failover(server_factory, redis_cluster, tmp_path):  # noqa: F811
    nodes = [server_factory(cluster_env(redis_cluster, n), name=n) for n in ("a", "b", "c")]
    rng = random.Random(16)
    ws = "ds-cluster"
    clients = await dealt_clients(nodes, ws, 30, "u")
    acked: set[str] = set()
    witnesses: list[asyncio.Task] = []
    victim = redis_cluster.primary_for(tag(ws))
    for round_ in range(10):
        if round_ == 4:
            kill9(victim)  # its replica takes over within the cluster node timeout
        for i, c in enumerate(clients):
            if c.closed.is_set():
                continue
            for _ in range(rng.randint(1, 3)):
                c.doc.get("items", type=pycrdt.Map)[f"k{rng.randint(0, 40)}"] = round_ * 1000 + i
        witnesses.append(asyncio.ensure_future(witness(nodes[round_ % 3], ws, f"w{round_}", acked)))
        for i, c in enumerate(clients):
            roll = rng.random()
            if roll < 0.1:
                await c.flush()
                await (c.abort() if rng.random() < 0.5 else c.close())
            elif c.closed.is_set() and roll < 0.6:
                reconnect_to(c, rng.choice(nodes), ws, f"u{i}")
                try:
                    await c.connect(timeout=WAIT)
                except (ConnectionError, TimeoutError, OSError):
                    pass  # Redis still failing over: connects again below
        await asyncio.sleep(0.2)
    await asyncio.gather(*witnesses)
    redis_cluster.wait_ok(WAIT, replicas=2)
    assert victim.port not in [n.port for n in redis_cluster.primaries()]
    for i, c in enumerate(clients):
        if c.closed.is_set():
            reconnect_to(c, rng.choice(nodes), ws, f"u{i}")
            await c.connect(timeout=WAIT)

    async def saved_or_reconnected(i: int, c: CollabClient) -> None:
        # A connection closed by a room that failed while Redis failed over resends on reconnect.
        for _ in range(3):
            try:
                await c.wait_saved(WAIT)
                return
            except ConnectionError:
                reconnect_to(c, rng.choice(nodes), ws, f"u{i}")
                await c.connect(timeout=WAIT)
        await c.wait_saved(WAIT)

    await asyncio.gather(*(saved_or_reconnected(i, c) for i, c in enumerate(clients)))
    # Everything is acknowledged: what Redis holds now is the truth, and nothing acknowledged may be
    # missing from it. The rooms catch up with it as their relays come back (a few seconds after the
    # failover), then every client has it.
    expected = await stored_items(redis_cluster, ws)
    assert len(acked) >= 5, "most witnesses were acknowledged"
    lost = sorted(acked - set(expected))
    assert not lost, f"acknowledged writes lost: {lost}"
    try:
        for node in nodes:
            await eventually(lambda node=node: rooms_view_is(node, ws, expected), WAIT, 0.2, "the room catches up")
        await asyncio.gather(*(c.until(lambda c=c: items(c) == expected, WAIT, "convergence") for c in clients))
    except TimeoutError:
        views = [await fresh_view(node, ws) for node in nodes]
        odd = [
            (i, c.url, {k: (v, expected.get(k)) for k, v in items(c).items() if expected.get(k) != v})
            for i, c in enumerate(clients)
            if items(c) != expected
        ]
        import httpx

        rooms = [
            {
                k: v
                for k, v in httpx.get(f"{n.http_url}/api/admin/rooms/{ws}?user=ops&role=admin").json().items()
                if k in ("node", "durable_seq", "stats")
            }
            for n in nodes
        ]
        missing = [sorted(set(expected.items()) - set(v.items())) for v in views]
        from redis.cluster import ClusterNode as SyncNode
        from redis.cluster import RedisCluster as SyncCluster

        rc = SyncCluster(startup_nodes=[SyncNode("127.0.0.1", n.port) for n in redis_cluster.live()])
        t = tag(ws)
        doc_hash = rc.hgetall(t + ":doc")
        entries = rc.xrange(t + ":updates", "-", "+")
        d = pycrdt.Doc()
        if doc_hash.get(b"snapshot"):
            d.apply_update(doc_hash[b"snapshot"])
        trace = []
        extra = {k: v for _, _, diff in odd[:1] for k, (v, _) in diff.items()}
        extra.update({k: v for m in missing for k, v in m})
        for sid, fields in entries:
            d.apply_update(fields[b"data"])
            have = dict(d.get("items", type=pycrdt.Map).to_py() or {})
            for k, v in list(extra.items()):
                if have.get(k) == v:
                    trace.append((sid, fields[b"node"], k, v))
                    del extra[k]
        info = {k.decode(): v[:40] for k, v in doc_hash.items() if k != b"snapshot"}
        from rooms import ystructs

        redis_sv = ystructs.state_vector(d.get_state())
        # Everything needed to replay the case offline: the stored snapshot and entries, each room's state.
        dump = tmp_path / "dump"
        dump.mkdir(exist_ok=True)
        if doc_hash.get(b"snapshot"):
            (dump / "snapshot.bin").write_bytes(doc_hash[b"snapshot"])
        for sid, fields in entries:
            (dump / f"entry-{seq_of(sid):06d}-{fields[b'node'].decode()}.bin").write_bytes(fields[b"data"])
        for n in nodes:
            async with CollabClient(n.ws_url, ws, query="user=fresh") as fc:
                sv = ystructs.state_vector(fc.doc.get_state())
                (dump / f"room-{n.env['COLLAB_NODE_ID']}.bin").write_bytes(fc.doc.get_update())
            diff = {cid: (sv.get(cid), clock) for cid, clock in redis_sv.items() if sv.get(cid) != clock}
            holders = []
            for sid, fields in entries:
                for cid, start, end in ystructs.block_ranges(fields[b"data"]):
                    if cid in diff and end > (diff[cid][0] or 0):
                        holders.append((sid, fields[b"node"], cid, start, end))
            print("diagnostics: state vector gap", n.env["COLLAB_NODE_ID"], diff, "in entries", holders[:6])
        print(
            "diagnostics: stored doc",
            info,
            "entries",
            len(entries),
            entries[0][0] if entries else None,
            "found",
            trace,
            "never",
            extra,
        )
        pytest.fail(f"rooms or clients did not converge after the failover: {missing=} odd={odd[:3]} {rooms=}")
    for node in nodes:
        assert await fresh_view(node, ws) == expected
    await close_all(*clients)


async def test_writes_carry_on_while_the_workspace_slot_moves_to_another_primary(server_factory, redis_cluster):  # noqa: F811
    """Slot migration during traffic (MIGRATING/IMPORTING, keys moved a few at a time, then SETSLOT NODE).

    Scripts meet the slot half moved (ASK, TRYAGAIN) and are retried; nothing
    acknowledged is lost and every client converges.
    """
    nodes = [server_factory(cluster_env(redis_cluster, n), name=n) for n in ("a", "b")]
    ws = "ds-moving-slot"
    clients = await dealt_clients(nodes, ws, 6, "m")
    for i, c in enumerate(clients):  # the workspace's keys exist before the move starts
        c.doc.get("items", type=pycrdt.Map)[f"m{i}-start"] = i
    await asyncio.gather(*(c.wait_saved(WAIT) for c in clients))
    source = redis_cluster.primary_for(tag(ws))
    target = next(n for n in redis_cluster.primaries() if n.port != source.port)
    move = asyncio.ensure_future(asyncio.to_thread(redis_cluster.migrate_slot, tag(ws), target, 1, 0.5))
    acked: set[str] = set()
    witnesses = []
    rounds = during = 0
    while (not move.done() or rounds < during + 5) and rounds < 200:
        for i, c in enumerate(clients):
            c.doc.get("items", type=pycrdt.Map)[f"m{i}-{rounds}"] = rounds
        witnesses.append(asyncio.ensure_future(witness(nodes[rounds % 2], ws, f"w{rounds}", acked)))
        rounds += 1
        during += not move.done()
        await asyncio.sleep(0.1)  # pacing: a round every 100 ms while the slot moves
    moved = await move
    await asyncio.gather(*witnesses)
    assert moved >= 3 and during >= 10, f"{moved} keys moved while {during} rounds of writes went on"
    assert redis_cluster.primary_for(tag(ws)).port == target.port
    await asyncio.gather(*(c.wait_saved(WAIT) for c in clients))
    expected = await stored_items(redis_cluster, ws)
    assert len(acked) == rounds, f"every witness write was acknowledged: {rounds - len(acked)} were not"
    assert acked <= set(expected), f"acknowledged writes lost: {sorted(acked - set(expected))}"
    for i in range(6):
        assert {f"m{i}-{r}" for r in range(rounds)} <= set(expected)
    for node in nodes:
        await eventually(lambda node=node: rooms_view_is(node, ws, expected), WAIT, 0.2, "the room has it all")
    await asyncio.gather(*(c.until(lambda c=c: items(c) == expected, WAIT, "convergence") for c in clients))
    await close_all(*clients)
