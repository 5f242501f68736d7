"""Configuration locks end to end: real server processes, real clients, real
redis-server processes (on free ports), holders frozen with SIGSTOP or killed
with SIGKILL in their own processes, and the stock JavaScript client.

Short TTLs (1-1.5 s) keep this file fast; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import time

import httpx
import msgpack
import pycrdt
import pytest

from codec import protocol as p
from collab.client import CollabClient
from tests.support import ROOT, eventually
from tests.test_js_client import NODE, node_clients, norm  # noqa: F401  (fixture)

WAIT = 10.0
TTL = 1.0


def lock_env(redis=None, ttl: float = TTL, **extra: str) -> dict[str, str]:
    env = {"COLLAB_LOCK_TTL_SECONDS": str(ttl), "COLLAB_LOCK_MIN_TTL_SECONDS": "0.2", **extra}
    if redis is not None:
        env["COLLAB_REDIS_URL"] = redis.url
    return env


@pytest.fixture(params=["memory", "redis"])
def backend(request, redis_factory):
    """(name, redis process or None) for each lock backend."""
    return request.param, (redis_factory() if request.param == "redis" else None)


async def connect(server, room: str, user: str, role: str = "editor", hello: bool = True) -> CollabClient:
    return await CollabClient(
        server.ws_url, room, hello=hello, query=f"user={user}&name={user.title()}&role={role}"
    ).connect(timeout=WAIT)


def config_of(client: CollabClient) -> dict:
    return client.doc.get("config", type=pycrdt.Map).to_py() or {}


def messages(client: CollabClient, kind: str) -> list[dict]:
    return [m for m in client.control if m["type"] == kind]


async def queued_at(server, count: int = 1) -> None:
    """Until ``server`` has ``count`` lock requests waiting (its stats; bounded): a waiter is in line."""

    async def pending() -> bool:
        async with httpx.AsyncClient(timeout=5) as http:
            stats = (await http.get(f"{server.http_url}/admin/locks/stats?user=root&role=admin")).json()
        return stats["pending"] >= count

    await eventually(pending, WAIT, what=f"{count} lock request(s) waiting")


class HolderProcess:
    """``python -m tests.lock_holder`` in a child process we own (ended by PID)."""

    def __init__(self, url: str, room: str, user: str, keepalive: float) -> None:
        self.args = [url, room, user, str(keepalive)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> HolderProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.lock_holder",
            *self.args,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert await self.read() == {"ready": True}
        return self

    async def read(self, timeout: float = WAIT) -> dict:
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            stderr = await asyncio.wait_for(self.proc.stderr.read(), timeout)
            raise AssertionError(f"holder process exited:\n{stderr.decode(errors='replace')[-3000:]}")
        return json.loads(line)

    async def command(self, **cmd) -> dict:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()
        return await self.read(cmd.get("timeout", WAIT) + 2)

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    async def cleanup(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), WAIT)


@pytest.fixture
async def holders():
    started: list[HolderProcess] = []

    async def spawn(url: str, room: str, user: str, keepalive: float) -> HolderProcess:
        holder = HolderProcess(url, room, user, keepalive)
        started.append(holder)
        return await holder.start()

    yield spawn
    for holder in started:
        await holder.cleanup()


# ------------------------------------------------------------ protocol basics


async def test_acquire_conflict_release_and_broadcasts(server_factory):
    server = server_factory(lock_env(ttl=5))
    room = "ds-lock-basics"
    alice = await connect(server, room, "alice")
    bob = await connect(server, room, "bob")
    plain = await connect(server, room, "carol", hello=False)  # a stock-style client: no control messages

    granted = await alice.acquire_lock("connection")
    assert granted["type"] == "lock.granted" and granted["path"] == "connection"
    assert granted["user_id"] == "alice" and granted["name"] == "Alice" and granted["fence"] >= 1
    assert granted["ttl"] == 5 and granted["expires_at"] == pytest.approx(time.time() + 5, abs=1)
    await bob.until(lambda: messages(bob, "lock.acquired"), WAIT, "lock.acquired at bob")
    assert messages(bob, "lock.acquired")[0]["holder"] == granted["holder"]

    conflict = await bob.acquire_lock("connection.credentials")
    assert conflict["type"] == "lock.conflict" and conflict["reason"] == "held"
    assert conflict["held_path"] == "connection" and conflict["user_id"] == "alice" and conflict["name"] == "Alice"
    assert conflict["expires_at"] == granted["expires_at"]
    assert (await bob.acquire_lock("schedule.cron"))["type"] == "lock.granted"

    state = await bob.request({"type": "lock.list"})
    assert state["type"] == "lock.state" and state["you"] != granted["holder"]
    assert sorted(lock["path"] for lock in state["locks"]) == ["connection", "schedule.cron"]

    # A waiting request is withdrawn by a release of the same path.
    await bob.send_raw(p.encode_control({"type": "lock.acquire", "path": "connection", "wait": 30, "id": "w"}))
    withdrawn = await bob.release_lock("connection")
    assert withdrawn["type"] == "lock.release.ok" and withdrawn["cancelled"] is True
    await bob.until(lambda: any(m.get("id") == "w" for m in bob.control), WAIT, "answer to the withdrawn request")
    assert next(m for m in bob.control if m.get("id") == "w")["code"] == "cancelled"

    # Same path again from the holder: the same lease, not a new fence.
    assert (await alice.acquire_lock("connection"))["fence"] == granted["fence"]
    released = await alice.release_lock("connection")
    assert released == {
        "type": "lock.release.ok",
        "id": released["id"],
        "path": "connection",
        "fence": granted["fence"],
    }
    await bob.until(lambda: messages(bob, "lock.released"), WAIT, "lock.released at bob")
    assert messages(bob, "lock.released")[0]["reason"] == "release"
    again = await bob.acquire_lock("connection.credentials")
    assert again["type"] == "lock.granted" and again["fence"] > granted["fence"]
    assert plain.control == []
    # Operators' counters: admins only.
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(f"{server.http_url}/admin/locks/stats?user=eve")).status_code == 403
        stats = (await http.get(f"{server.http_url}/admin/locks/stats?user=root&role=admin")).json()
    assert stats["backend"] == "memory" and stats["events"]["granted"] >= 3 and stats["held"] >= 1
    for client in (alice, bob, plain):
        await client.close()


async def test_edits_under_someone_elses_lock_are_compensated(server_factory):
    server = server_factory(lock_env(ttl=5))
    room = "ds-lock-guard"
    alice = await connect(server, room, "alice")
    bob = await connect(server, room, "bob")
    cfg = alice.doc.get("config", type=pycrdt.Map)
    cfg["connection"] = pycrdt.Map({"host": "db1", "port": 5432})
    await alice.wait_saved()
    bob_cfg = bob.doc.get("config", type=pycrdt.Map)
    await bob.until(lambda: config_of(bob).get("connection", {}).get("host") == "db1", WAIT, "initial config")
    granted = await alice.acquire_lock("connection")

    # Bob changes a locked and an unlocked path in one update.
    with bob.doc.transaction():
        bob_cfg["connection"]["host"] = "evil"
        bob_cfg["description"] = "mine"
    await bob.until(lambda: messages(bob, "rejected"), WAIT, "rejected")
    rejected = messages(bob, "rejected")[0]
    assert rejected["paths"] == ["connection.host"] and rejected["reason"] == "locked"
    assert rejected["path"] == "connection" and rejected["holder"] == granted["holder"]
    assert rejected["user_id"] == "alice" and rejected["fence"] == granted["fence"]
    expected = {"connection": {"host": "db1", "port": 5432}, "description": "mine"}
    for client in (alice, bob):
        await client.until(lambda c=client: norm(config_of(c)) == expected, WAIT, "converged config")
    # The holder's own edits stand.
    cfg["connection"]["host"] = "db2"
    await bob.until(lambda: config_of(bob)["connection"]["host"] == "db2", WAIT, "holder's edit")
    assert messages(alice, "rejected") == []
    await alice.close()
    await bob.close()


async def test_bad_input_gets_clear_errors_and_disturbs_nothing(server_factory):
    server = server_factory(lock_env(ttl=5, COLLAB_LOCK_MAX_TTL_SECONDS="60"))
    room = "ds-lock-bad"
    alice = await connect(server, room, "alice")
    bob = await connect(server, room, "bob")

    async def error(body: dict) -> str:
        reply = await alice.request(body)
        assert reply["type"] == "lock.error", reply
        assert reply["message"]
        return reply["code"]

    assert await error({"type": "lock.acquire", "path": "foo"}) == "unknown_path"
    assert await error({"type": "lock.acquire", "path": "connection..host"}) == "unknown_path"
    assert await error({"type": "lock.acquire", "path": "connectionx"}) == "unknown_path"
    assert await error({"type": "lock.acquire"}) == "bad_request"
    assert await error({"type": "lock.acquire", "path": 42}) == "bad_request"
    assert await error({"type": "lock.acquire", "path": "x" * 1000}) == "bad_request"
    assert await error({"type": "lock.acquire", "path": "connection", "ttl": "long"}) == "bad_request"
    assert await error({"type": "lock.acquire", "path": "connection", "ttl": -1}) == "bad_request"
    assert await error({"type": "lock.acquire", "path": "connection", "ttl": math.inf}) == "bad_request"
    assert await error({"type": "lock.acquire", "path": "connection", "wait": -1}) == "bad_request"
    assert await error({"type": "lock.release", "path": "connection"}) == "not_held"
    assert await error({"type": "lock.force_release", "path": "connection"}) == "forbidden"
    # Absurd TTLs are capped (and tiny ones raised).
    capped = await alice.acquire_lock("connection", ttl=1e12)
    assert capped["type"] == "lock.granted" and capped["ttl"] == 60
    assert capped["expires_at"] < time.time() + 61
    assert (await alice.acquire_lock("schedule", ttl=0.001))["ttl"] == 0.2
    # Releasing someone else's lock.
    reply = await bob.release_lock("connection")
    assert reply["type"] == "lock.error" and reply["code"] == "not_held"
    assert [lock["path"] for lock in (await bob.request({"type": "lock.list"}))["locks"]].count("connection") == 1
    viewer = await connect(server, room, "vera", role="viewer")
    assert (await viewer.acquire_lock("tags"))["code"] == "forbidden"

    # A flood of requests: every one answered, the connection and the room unharmed.
    frames = [p.encode_control({"type": "lock.acquire", "path": f"scan_rules.r{i}", "id": f"f{i}"}) for i in range(400)]
    for frame in frames:
        await alice.send_raw(frame)
    bob.doc.get("config", type=pycrdt.Map)["notes"] = "during the flood"
    await alice.until(
        lambda: len({m.get("id") for m in alice.control if str(m.get("id", "")).startswith("f")}) == 400,
        WAIT,
        "an answer to every flooded request",
    )
    answers = [m for m in alice.control if str(m.get("id", "")).startswith("f")]
    kinds = {m["type"] if m["type"] != "lock.error" else m["code"] for m in answers}
    assert "lock.granted" in kinds and kinds <= {"lock.granted", "too_many", "busy", "rate_limited"}, kinds
    assert sum(m["type"] == "lock.granted" for m in answers) <= 32
    await alice.until(lambda: config_of(alice).get("notes") == "during the flood", WAIT, "edits during the flood")
    assert not alice.closed.is_set() and not bob.closed.is_set()
    # Admin force-release.
    admin = await connect(server, room, "root", role="admin")
    forced = await admin.request({"type": "lock.force_release", "path": "connection"})
    assert forced["type"] == "lock.release.ok" and forced["forced"] is True
    await alice.until(
        lambda: any(
            m["path"] == "connection" and m.get("reason") == "forced" for m in messages(alice, "lock.released")
        ),
        WAIT,
        "forced release broadcast",
    )
    assert (await bob.acquire_lock("connection"))["type"] == "lock.granted"
    for client in (alice, bob, viewer, admin):
        await client.close()


async def test_control_message_bytes_are_msgpack():
    """The wire form of a request, for docs/protocol.md."""
    frame = p.encode_control({"type": "lock.acquire", "path": "connection", "id": 1})
    assert frame[0] == 0x64
    assert msgpack.unpackb(frame[1:]) == {"type": "lock.acquire", "path": "connection", "id": 1}


# ------------------------------------------------------------------ issue tests


async def test_1_twenty_clients_race_for_one_lock(server_factory, backend):
    name, redis = backend
    server = server_factory(lock_env(redis, ttl=10))
    room = "ds-lock-race"
    clients = [await connect(server, room, f"u{i}") for i in range(20)]
    observer = await connect(server, room, "observer")
    holding = 0
    violations = 0
    fences: list[int] = []

    async def contender(client: CollabClient) -> None:
        nonlocal holding, violations
        for _ in range(50):
            reply = await client.acquire_lock("connection", wait=30, timeout=40)
            assert reply["type"] == "lock.granted", reply
            holding += 1
            if holding != 1:
                violations += 1
            fences.append(reply["fence"])
            await asyncio.sleep(0)
            holding -= 1
            assert (await client.release_lock("connection"))["type"] == "lock.release.ok"

    await asyncio.wait_for(asyncio.gather(*(contender(c) for c in clients)), 60)
    assert violations == 0
    assert len(fences) == 1000 and fences == sorted(fences) and len(set(fences)) == 1000

    # What every peer was told tells the same story: acquired, released, acquired...
    def story() -> list[dict]:
        return [m for m in observer.control if m["type"] in ("lock.acquired", "lock.released")]

    await observer.until(lambda: len(story()) == 2000, WAIT, "every broadcast at the observer")
    held_by = None
    for message in story():
        if message["type"] == "lock.acquired":
            assert held_by is None, "two holders at once"
            held_by = message["holder"]
        else:
            assert message["holder"] == held_by
            held_by = None
    for client in (*clients, observer):
        await client.close()


async def test_2_frozen_holder_loses_the_lease_and_its_late_edits(server_factory, backend, holders):
    name, redis = backend
    server = server_factory(lock_env(redis, ttl=TTL))
    room = "ds-lock-frozen"
    waiter = await connect(server, room, "waiter")
    waiter.keepalive(TTL / 4)  # holders must show they are alive once per TTL
    cfg = waiter.doc.get("config", type=pycrdt.Map)
    cfg["connection"] = pycrdt.Map({"host": "db1", "port": 5432})
    await waiter.wait_saved()

    holder = await holders(server.ws_url, room, "holder", TTL / 4)
    granted = await holder.command(cmd="acquire", path="connection")
    assert granted["type"] == "lock.granted"
    # The waiter's own lease is longer: it must outlast the rest of the story with room to spare
    # (with the 1 s TTL, one renewal delayed by a loaded machine could end it before the last check).
    waiting = asyncio.create_task(waiter.acquire_lock("connection", wait=10, ttl=5 * TTL))
    await queued_at(server)
    await asyncio.sleep(TTL * 1.5)  # real time passes (not a synchronisation): the keepalives keep the lease
    assert not waiting.done()

    # Frozen, the holder's lease lapses TTL after its last message (exact instants: on a ManualClock in
    # tests/test_lock_extension.py); here, the waiter is granted within TTL plus a margin.
    holder.signal(signal.SIGSTOP)
    reply = await asyncio.wait_for(waiting, TTL + 1.0)
    assert reply["type"] == "lock.granted" and reply["fence"] > granted["fence"]
    # lock.expired is broadcast by the node that noticed the lapse; it may reach us just after the grant.
    expired = await eventually(
        lambda: [m for m in messages(waiter, "lock.expired") if m["holder"] == granted["holder"]],
        WAIT,
        what="lock.expired for the frozen holder",
    )
    assert expired and expired[0]["fence"] == granted["fence"]
    cfg["connection"]["host"] = "db2"
    await waiter.wait_saved()

    # The old holder wakes up and edits the path it thinks it holds.
    holder.signal(signal.SIGCONT)
    # (After the backlog: an edit concurrent with "db2" could lose to it in the CRDT
    # order and change nothing -- nothing to reject then.)
    await holder.command(cmd="wait_config", path=["connection", "host"], value="db2", timeout=WAIT)
    await holder.command(cmd="set", path=["connection"], key="host", value="stale")
    rejected = await holder.command(cmd="wait_rejected", timeout=WAIT)
    assert rejected["paths"] == ["connection.host"] and rejected["holder"] == reply["holder"]
    assert rejected["fence"] == reply["fence"]
    converged = await holder.command(cmd="wait_config", path=["connection", "host"], value="db2", timeout=WAIT)
    assert converged["config"]["connection"]["host"] == "db2"
    told = (await holder.command(cmd="control"))["control"]
    assert any(m["type"] == "lock.expired" and m["holder"] == granted["holder"] for m in told)
    # Round trips, not sleeps: the server answers the holder after everything it sent before,
    # and answers the waiter after everything it broadcast to it before.
    assert (await holder.command(cmd="acquire", path="connection"))["type"] == "lock.conflict"
    await waiter.request({"type": "lock.list"})
    assert config_of(waiter)["connection"]["host"] == "db2"
    fresh = await connect(server, room, "fresh", hello=False)
    assert config_of(fresh)["connection"]["host"] == "db2"
    await fresh.close()
    await waiter.close()


async def test_3_fences_stay_above_everything_granted_before_a_redis_kill_9(server_factory, redis_factory):
    redis = redis_factory()
    # Documents stay in SQLite (COLLAB_STORE=sqlite): this is about locks while Redis is gone;
    # with the Redis document store, edits during an outage are not acked and peers are closed
    # (tests/test_scaleout.py).
    server = server_factory(lock_env(redis, ttl=1.5, COLLAB_STORE="sqlite"))
    room = "ds-lock-redis-kill"
    alice = await connect(server, room, "alice")
    bob = await connect(server, room, "bob")
    alice.keepalive(0.3)
    before = []
    for _ in range(5):
        reply = await alice.acquire_lock("connection")
        before.append(reply["fence"])
        await alice.release_lock("connection")
    held = await alice.acquire_lock("schedule.cron")
    before.append(held["fence"])

    redis.kill()
    # Redis unreachable: lock requests fail fast (bounded) with a clear error...
    reply = await asyncio.wait_for(bob.acquire_lock("connection"), 1.5)
    assert reply["type"] == "lock.error" and reply["code"] == "unavailable", reply
    # ...and edits to unlocked paths keep syncing; the lock still known is still enforced.
    bob_cfg = bob.doc.get("config", type=pycrdt.Map)
    bob_cfg["description"] = "while redis is down"
    await alice.until(lambda: config_of(alice).get("description") == "while redis is down", WAIT, "edit during outage")
    bob_cfg["schedule"] = pycrdt.Map({"cron": "* * * * *"})
    await bob.until(lambda: messages(bob, "rejected"), WAIT, "rejection during outage")

    redis.wipe()
    redis.start()  # same port, empty
    # The holder is told its lease is gone -- nothing is re-acquired silently.
    await alice.until(
        lambda: any(
            m["path"] == "schedule.cron" and m["holder"] == held["holder"] for m in messages(alice, "lock.lost")
        ),
        WAIT,
        "lock.lost after Redis lost its data",
    )
    after = []
    for client in (bob, alice):
        reply = await client.acquire_lock("connection")
        assert reply["type"] == "lock.granted", reply
        after.append(reply["fence"])
        await client.release_lock("connection")
    assert min(after) > max(before), (before, after)
    await alice.close()
    await bob.close()


async def test_4_dropped_holder_frees_the_lock_within_ttl_and_wakes_the_waiter(server_factory, backend, holders):
    name, redis = backend
    node_a = server_factory(lock_env(redis, ttl=TTL), name="node-a")
    # With Redis the waiter sits on another node: it is woken through pub/sub.
    node_b = server_factory(lock_env(redis, ttl=TTL), name="node-b") if redis else node_a
    room = "ds-lock-drop"
    holder = await holders(node_a.ws_url, room, "holder", TTL / 4)
    granted = await holder.command(cmd="acquire", path="connection")
    assert granted["type"] == "lock.granted"
    observer = await connect(node_b, room, "observer")
    # The lock is known and enforced on the observer's node (with Redis: another node).
    state = await observer.request({"type": "lock.list"})
    assert [(lock["path"], lock["holder"]) for lock in state["locks"]] == [("connection", granted["holder"])]
    observer.doc.get("config", type=pycrdt.Map)["connection"] = pycrdt.Map({"host": "elsewhere"})
    await observer.until(lambda: messages(observer, "rejected"), WAIT, "rejected on the other node")
    assert messages(observer, "rejected")[0]["holder"] == granted["holder"]
    waiter = await connect(node_b, room, "waiter")
    waiting = asyncio.create_task(waiter.acquire_lock("connection", wait=10))
    await queued_at(node_b)
    assert not waiting.done()

    holder.signal(signal.SIGKILL)
    reply = await asyncio.wait_for(waiting, TTL + 1.0)
    assert reply["type"] == "lock.granted" and reply["fence"] > granted["fence"]

    def freed() -> list[dict]:
        return [
            m
            for m in observer.control
            if m["type"] in ("lock.released", "lock.expired") and m["holder"] == granted["holder"]
        ]

    await observer.until(lambda: freed(), 1.5, "release broadcast")
    # The socket closed: released at once, not lapsed after the TTL ("lock.expired").
    assert [m["type"] for m in freed()] == ["lock.released"]
    await observer.close()
    await waiter.close()


async def test_clean_shutdown_of_a_node_releases_its_holders_locks(server_factory, redis_factory):
    redis = redis_factory()
    node_a = server_factory(lock_env(redis, ttl=5), name="node-a")
    node_b = server_factory(lock_env(redis, ttl=5), name="node-b")
    room = "ds-lock-shutdown"
    holder = await connect(node_a, room, "holder")
    assert (await holder.acquire_lock("connection"))["type"] == "lock.granted"
    waiter = await connect(node_b, room, "waiter")
    waiting = asyncio.create_task(waiter.acquire_lock("connection", wait=10))
    await queued_at(node_b)
    stopping = asyncio.get_running_loop().run_in_executor(None, node_a.stop)
    reply = await asyncio.wait_for(waiting, 3)  # well before the 5 s TTL
    assert reply["type"] == "lock.granted"
    await stopping
    await holder.close()
    await waiter.close()


@pytest.mark.skipif(NODE is None, reason="`node` is not on PATH")
async def test_5_stock_js_client_edit_of_a_locked_path_is_undone_for_everyone(server_factory, node_clients):  # noqa: F811
    server = server_factory(lock_env(ttl=5))
    room = "ds-lock-js"
    alice = await connect(server, room, "alice")
    alice.keepalive(1)
    cfg = alice.doc.get("config", type=pycrdt.Map)
    cfg["connection"] = pycrdt.Map({"host": "db1", "port": 5432})
    await alice.wait_saved()
    node = await node_clients(server.ws_url, room, "node")
    await node.until(lambda: node.doc["config"].get("connection", {}).get("host") == "db1", WAIT, "config at node")
    assert (await alice.acquire_lock("connection"))["type"] == "lock.granted"

    # A nested edit under the lock and an unlocked edit, in one transaction.
    await node.command(
        "transact",
        ops=[
            {"cmd": "set", "path": ["connection"], "key": "host", "value": "evil"},
            {"cmd": "set", "key": "description", "value": "from-node"},
        ],
    )
    expected = {"connection": {"host": "db1", "port": 5432}, "description": "from-node"}
    await node.until(lambda: norm(node.doc["config"]) == expected, WAIT, "node's own edit undone")
    await alice.until(lambda: norm(config_of(alice)) == expected, WAIT, "alice converged")
    # Replacing the whole locked map with a plain JSON value is undone as well.
    await node.command("set", key="connection", value={"host": "evil2"})
    await node.until(lambda: norm(node.doc["config"]) == expected, WAIT, "replacement undone at node")
    await alice.until(lambda: norm(config_of(alice)) == expected, WAIT, "alice converged again")
    assert [m["paths"] for m in alice.control if m["type"] == "rejected"] == []
    fresh = await connect(server, room, "fresh", hello=False)
    assert norm(config_of(fresh)) == expected
    dumped = await node.dump()
    assert norm(dumped["config"]) == expected
    assert await node.close() == 0
    node.assert_clean()  # the stock client never saw a control frame
    await fresh.close()
    await alice.close()
