"""Scale-out: three `collab serve` processes sharing one redis-server (all started here).

Every server runs with COLLAB_REDIS_URL, so documents, outbox, locks,
presence and the relay all live in Redis. Redis runs with AOF
(appendfsync always), as docs/operations.md recommends.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pycrdt
import pytest

from collab.client import CollabClient
from tests.forwarding_support import (
    FAST_FORWARDING,
    BackendProcess,
    applied_ranges_cover,
    forward_status,
    history,
)
from tests.presence_support import close_all, person, until_users
from tests.support import eventually

WAIT = 20.0
PRESENCE_TTL = 3.0
LOCK_TTL = 3.0


def node_env(redis, node: str, **extra: str) -> dict[str, str]:
    env = {
        "COLLAB_REDIS_URL": redis.url,
        "COLLAB_NODE_ID": node,
        "COLLAB_PRESENCE_TTL_SECONDS": str(PRESENCE_TTL),
        "COLLAB_LOCK_TTL_SECONDS": str(LOCK_TTL),
        "COLLAB_LOCK_MIN_TTL_SECONDS": "0.5",
        "COLLAB_RELAY_AWARENESS_TTL_SECONDS": "5",
        "COLLAB_REDIS_TIMEOUT_SECONDS": "1",
        "COLLAB_RELAY_BLOCK_MS": "500",
        "COLLAB_ROOM_IDLE_SECONDS": "1",
        "COLLAB_LOG_LEVEL": "info",
    }
    env.update(extra)
    return env


def three_nodes(server_factory, redis, **extra: str):
    return [server_factory(node_env(redis, n, **extra), name=n) for n in ("a", "b", "c")]


def redis_client(redis):
    import redis as redis_lib

    return redis_lib.Redis(host="127.0.0.1", port=redis.port, socket_timeout=5)


def items(client: CollabClient) -> dict:
    return dict(client.doc.get("items", type=pycrdt.Map).to_py() or {})


def reconnect_to(client: CollabClient, node, workspace: str, user: str) -> None:
    client.url = f"{node.ws_url}/{workspace}?user={user}"
    client.updates_sent = client.updates_saved = 0


async def fresh_view(node, workspace: str) -> dict:
    async with CollabClient(node.ws_url, workspace, query="user=fresh") as fresh:
        return items(fresh)


async def test_1_thirty_clients_on_three_nodes_converge(server_factory, redis_factory):
    redis = redis_factory(appendonly=True)
    # Compaction every 25 updates: snapshots are written and streams trimmed while nodes relay.
    nodes = three_nodes(server_factory, redis, COLLAB_COMPACT_EVERY_UPDATES="25")
    rng = random.Random(6)
    ws = "ds-scale-converge"
    clients = []
    for i in range(30):
        c = CollabClient(nodes[i % 3].ws_url, ws, hello=True, query=f"user=u{i}")
        await c.connect(timeout=WAIT)
        clients.append(c)
    for round_ in range(8):
        for i, c in enumerate(clients):
            if c.closed.is_set():
                continue
            for _ in range(rng.randint(1, 3)):
                key = f"k{rng.randint(0, 40)}"
                c.doc.get("items", type=pycrdt.Map)[key] = round_ * 1000 + i
        # Random disconnects (some abrupt) and reconnects to a random node.
        for i, c in enumerate(clients):
            roll = rng.random()
            if roll < 0.1:
                await c.flush()
                await (c.abort() if rng.random() < 0.5 else c.close())
            elif c.closed.is_set() and roll < 0.6:
                reconnect_to(c, rng.choice(nodes), ws, f"u{i}")
                await c.connect(timeout=WAIT)
        await asyncio.sleep(0)
    for i, c in enumerate(clients):
        if c.closed.is_set():
            reconnect_to(c, rng.choice(nodes), ws, f"u{i}")
            await c.connect(timeout=WAIT)
    await asyncio.gather(*(c.wait_saved(WAIT) for c in clients))
    for node in nodes:
        expected = await fresh_view(node, ws)
        assert len(expected) > 10
    await asyncio.gather(*(c.until(lambda c=c: items(c) == expected, WAIT, "convergence") for c in clients))
    for node in nodes:
        assert await fresh_view(node, ws) == expected
    r = redis_client(redis)
    appended = int(r.hget("collab:ws:{" + ws + "}:doc", "last_seq"))
    assert r.hget("collab:ws:{" + ws + "}:doc", "snapshot") is not None
    assert r.xlen("collab:ws:{" + ws + "}:updates") < appended  # trimmed once compacted
    r.close()
    await close_all(*clients)


async def test_2_a_killed_node_loses_nothing_acked_and_leaves_no_ghosts(server_factory, redis_factory):
    redis = redis_factory(appendonly=True)
    a, b, c = three_nodes(server_factory, redis)
    ws = "ds-scale-kill"
    watcher = await person(b.ws_url, ws, "watcher")
    victims = [await person(a.ws_url, ws, f"v{i}") for i in range(3)]
    holder = victims[0]
    granted = await holder.acquire_lock("name", ttl=LOCK_TTL)
    assert granted["type"] == "lock.granted", granted
    for i, v in enumerate(victims):
        v.doc.get("items", type=pycrdt.Map)[f"v{i}"] = i
    await asyncio.gather(*(v.wait_saved(WAIT) for v in victims))
    await until_users(watcher, {"watcher", "v0", "v1", "v2"}, WAIT)
    # Awareness (cursors) of node a's clients reaches node b through the relay.
    for v in victims:
        await v.set_awareness({"cursor": v.client_id})
    ids = {v.client_id for v in victims}
    await watcher.until(lambda: ids <= set(watcher.peer_states()), WAIT, "relayed awareness")
    # Unacknowledged edits too: they must survive through the client's own copy.
    victims[1].doc.get("items", type=pycrdt.Map)["late"] = "x"
    a.kill()
    killed = time.monotonic()
    took = await until_users(watcher, {"watcher"}, PRESENCE_TTL + 5, "killed node's participants gone")
    assert took <= PRESENCE_TTL + 3
    # Their relayed awareness states go too, within the relay's awareness TTL (5 s here).
    await watcher.until(lambda: not ids & set(watcher.peer_states()), 5 + 3, "relayed awareness expired")
    # The lock lapses within its TTL: another node's client gets it.
    taker = await person(c.ws_url, ws, "taker")
    reply = await taker.acquire_lock("name", wait=LOCK_TTL + 2)
    assert reply["type"] == "lock.granted", reply
    assert time.monotonic() - killed <= LOCK_TTL + 8  # (includes the presence wait above; loaded CI machines are slow)
    # Its clients reconnect elsewhere and lose nothing.
    for i, v in enumerate(victims):
        await v.wait_closed(WAIT)
        reconnect_to(v, b if i % 2 else c, ws, f"v{i}")
        await v.connect(timeout=WAIT)
    await asyncio.gather(*(v.wait_saved(WAIT) for v in victims))
    want = {"v0": 0, "v1": 1, "v2": 2, "late": "x"}
    for client in [watcher, taker, *victims]:
        await client.until(lambda client=client: items(client) == want, WAIT, "everything after the kill")
    assert await fresh_view(b, ws) == want
    await close_all(watcher, taker, *victims)


async def test_3_redis_restart_with_aof_loses_nothing_acked(server_factory, redis_factory):
    redis = redis_factory(appendonly=True)
    # Appends Redis does not take are retried this long (unacked) before the room reports them.
    a, b, c = three_nodes(server_factory, redis, COLLAB_REDIS_RETRY_SECONDS="2")
    ws = "ds-scale-redis"
    ca = await CollabClient(a.ws_url, ws, hello=True, query="user=ann").connect(timeout=WAIT)
    cb = await CollabClient(b.ws_url, ws, hello=True, query="user=ben").connect(timeout=WAIT)
    ca.doc.get("items", type=pycrdt.Map)["before"] = 1
    await ca.wait_saved(WAIT)
    await cb.until(lambda: items(cb).get("before") == 1, WAIT, "relay before the restart")
    redis.kill()

    def not_ready(node):
        r = httpx.get(f"{node.http_url}/readyz", timeout=5)
        return r.status_code == 503 and "error" in r.text

    await eventually(lambda: not_ready(a), WAIT, 0.1, "/readyz reports Redis down")
    assert httpx.get(f"{a.http_url}/healthz", timeout=5).status_code == 200
    # An edit while Redis is down is never acked; the client keeps it.
    cb.doc.get("items", type=pycrdt.Map)["during"] = 2
    await cb.until(lambda: cb.closed.is_set() or cb.updates_saved >= cb.updates_sent, WAIT, "refusal")
    assert cb.updates_saved < cb.updates_sent or cb.closed.is_set()
    redis.start()
    last: dict = {}

    def all_ready() -> bool:
        for n in (a, b, c):
            r = httpx.get(f"{n.http_url}/readyz", timeout=5)
            last[n.port] = r.text
            if r.status_code != 200:
                return False
        return True

    try:
        await eventually(all_ready, WAIT, 0.2, "nodes ready again")
    except TimeoutError:
        raise AssertionError(f"not ready: {last}") from None
    for client, node, user in ((ca, a, "ann"), (cb, b, "ben")):
        if client.closed.is_set():
            reconnect_to(client, node, ws, user)
            for _ in range(50):  # the node may still be reconnecting (bounded)
                try:
                    await client.connect(timeout=WAIT)
                    break
                except Exception:
                    await asyncio.sleep(0.2)
    cb.doc.get("items", type=pycrdt.Map)["after"] = 3
    await asyncio.gather(ca.wait_saved(WAIT), cb.wait_saved(WAIT))
    want = {"before": 1, "during": 2, "after": 3}
    for client in (ca, cb):
        await client.until(lambda client=client: items(client) == want, WAIT, "resync after the restart")
    assert await fresh_view(c, ws) == want
    await close_all(ca, cb)


async def test_3b_redis_restarted_empty_gets_the_open_rooms_back(server_factory, redis_factory):
    """Redis lost everything (no AOF, or wiped): nodes that hold the room write it back."""
    redis = redis_factory(appendonly=True)
    a, b, c = three_nodes(server_factory, redis)
    ws = "ds-scale-wiped"
    ca = await CollabClient(a.ws_url, ws, hello=True, query="user=ann").connect(timeout=WAIT)
    cb = await CollabClient(b.ws_url, ws, hello=True, query="user=ben").connect(timeout=WAIT)
    ca.doc.get("items", type=pycrdt.Map)["kept"] = 1
    await ca.wait_saved(WAIT)
    await cb.until(lambda: items(cb).get("kept") == 1, WAIT, "relay")
    redis.kill()
    redis.wipe()
    redis.start()

    async def restored() -> bool:
        try:
            return await fresh_view(c, ws) == {"kept": 1}
        except Exception:
            return False

    deadline = time.monotonic() + WAIT
    while not await restored():
        assert time.monotonic() < deadline, "the open rooms' state was not written back"
        await asyncio.sleep(0.2)
    cb.doc.get("items", type=pycrdt.Map)["after"] = 2
    await cb.wait_saved(WAIT)
    await ca.until(lambda: items(ca) == {"kept": 1, "after": 2}, WAIT, "relay after the wipe")
    await close_all(ca, cb)


@pytest.fixture
def backend(tmp_path):
    proc = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log").start()
    yield proc
    proc.stop()


async def test_4_a_workspace_moving_from_node_a_to_b_forwards_exactly_once(server_factory, redis_factory, backend):
    redis = redis_factory(appendonly=True)
    env = {**FAST_FORWARDING, "COLLAB_BACKEND_URL": backend.url}
    a, b, _c = three_nodes(server_factory, redis, **env)
    ws = "ds-scale-forward"
    ca = await CollabClient(a.ws_url, ws, hello=True, query="user=ann").connect(timeout=WAIT)
    config = ca.doc.get("config", type=pycrdt.Map)
    for i in range(5):
        config["description"] = f"from a {i}"
        await ca.wait_saved(WAIT)
    await ca.close()
    cb = await CollabClient(b.ws_url, ws, hello=True, query="user=ben").connect(timeout=WAIT)
    config = cb.doc.get("config", type=pycrdt.Map)
    assert config.get("description") == "from a 4"
    for i in range(5):
        config["description"] = f"from b {i}"
        await cb.wait_saved(WAIT)

    def drained(node):
        status = forward_status(node, ws)
        done = status["pending"] == 0 and status["recorded_seq"] >= 10
        return status if done and status["delivered_seq"] >= status["recorded_seq"] else None

    status = await eventually(lambda: drained(b), WAIT, 0.1, "outbox drained")
    # One shared outbox: node a reports the same progress (once its view caught up).
    await eventually(lambda: forward_status(a, ws) == status, WAIT, 0.1, "node a reports the same outbox")
    log = backend.log_of(ws)
    applied_ranges_cover(log["applied"], status["recorded_seq"])
    assert backend.data_source(ws)["config"]["description"] == "from b 4"
    # One audit trail too: node b reports the changes accepted on node a.
    entries = history(b, ws)
    accepted = [e for e in entries if e["kind"] == "accepted"]
    assert len(accepted) == 10 and all(e["forward_status"] == "delivered" for e in accepted)
    assert [e["author"]["id"] for e in accepted] == ["ann"] * 5 + ["ben"] * 5
    await cb.close()


async def test_a_reconnecting_clients_step2_overlapping_relayed_updates_is_accepted(tmp_path):
    """Its earlier updates reached this node through the relay between our step 1 and its step 2."""
    from codec import protocol as p
    from persistence.sqlite import SQLiteDocumentStore
    from rooms.room import Room
    from tests.test_room import FakePeer

    store = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await store.open()
    try:
        room = Room("ds-cut", store)
        await room.load()
        published: list[bytes] = []

        class Relay:  # scale-out mode: what the room hands the relay is recorded
            def publish_updates(self, _room, updates: list[bytes]) -> None:
                published.extend(updates)

            def publish_awareness(self, _room, _entries) -> None:
                pass

        room.attach_relay(Relay())
        peer = FakePeer("reconnected")
        ps = room.join(peer)
        client = pycrdt.Doc()
        updates: list[bytes] = []
        client.observe(lambda e: updates.append(e.update))
        m = client.get("items", type=pycrdt.Map)
        m["a"] = 1
        m["b"] = 2
        room.apply_remote(updates[0], 1)  # accepted by the node the client left
        room.receive(ps, p.SyncStep2(client.get_update()))  # its answer to our (older) step 1
        await room.drain()
        assert room.doc.get("items", type=pycrdt.Map).to_py() == {"a": 1.0, "b": 2.0}
        assert not peer.closed
        # What this node accepted (not what was relayed to it) goes live to the other nodes.
        assert len(published) == 1 and published[0] != updates[0]
    finally:
        await store.close()
