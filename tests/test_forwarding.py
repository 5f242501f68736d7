"""Validation, outbox, forwarding and audit against a real server and a real reference backend.

Every test runs ``python -m collab serve`` and ``python -m refbackend`` as
processes on free loopback ports and talks HTTP/websocket to them. Delivery
timings are shortened (tests.forwarding_support.FAST_FORWARDING).

The backend-outage test holds the backend down for
``COLLAB_TEST_OUTAGE_SECONDS`` (default 10 s, to keep the suite fast; the
issue's 60 s outage is run by the benchmark, see docs/benchmarks.md, and by
``COLLAB_TEST_OUTAGE_SECONDS=60 pytest tests/test_forwarding.py``).
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pycrdt
import pytest

from codec import protocol as p
from collab.client import CollabClient
from tests.forwarding_support import (
    FAST_FORWARDING,
    BackendProcess,
    api,
    applied_ranges_cover,
    forward_status,
    history,
)
from tests.support import eventually
from tests.test_js_client import NODE, norm
from tests.test_js_client import node_clients as node_clients  # fixture

OUTAGE_SECONDS = float(os.environ.get("COLLAB_TEST_OUTAGE_SECONDS", "10"))
WAIT = 20.0


def forwarding_env(backend: BackendProcess | None, **extra: str) -> dict[str, str]:
    env = dict(FAST_FORWARDING)
    if backend is not None:
        env["COLLAB_BACKEND_URL"] = backend.url
    env.update(extra)
    return env


def config_of(client: CollabClient) -> dict:
    return norm(client.doc.get("config", type=pycrdt.Map).to_py() or {})


async def connect(server, room: str, user: str, hello: bool = True) -> CollabClient:
    return await CollabClient(server.ws_url, room, hello=hello, query=f"user={user}").connect(timeout=WAIT)


def controls(client: CollabClient, kind: str) -> list[dict]:
    return [m for m in client.control if m["type"] == kind]


async def delivered(server, workspace: str, timeout: float = WAIT) -> dict:
    """Wait until every recorded change of ``workspace`` left the outbox; return the status."""

    def done():
        status = forward_status(server, workspace)
        return status if status["pending"] == 0 and status["recorded_seq"] > 0 else None

    return await eventually(done, timeout, interval=0.05, what=f"outbox of {workspace} drained")


@pytest.fixture
def backend_factory(tmp_path):
    """Start reference backends (``python -m refbackend``); all are stopped after the test."""
    started: list[BackendProcess] = []

    def make(name: str = "backend", port: int = 0) -> BackendProcess:
        backend = BackendProcess(tmp_path / f"{name}.sqlite3", tmp_path / f"{name}.log", port=port)
        backend.start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.stop()


# ------------------------------------------------------------------ tests


async def test_backend_outage_while_three_clients_make_500_edits(server_factory, backend_factory):
    """Issue test 1: the backend is down while 500 edits happen; afterwards it has everything, once, in order."""
    backend = backend_factory()
    server = server_factory(env=forwarding_env(backend))
    room = "ds-outage"
    a, b, c = [await connect(server, room, user) for user in ("alice", "bob", "carol")]
    base = a.doc.get("config", type=pycrdt.Map)
    with a.doc.transaction():
        base["type"] = "postgresql"
        base["connection"] = pycrdt.Map({"host": "db.internal", "port": 5432})
        base["schedule"] = pycrdt.Map({"cron": "0 * * * *", "timezone": "UTC"})
    await a.wait_saved()
    await a.until(lambda: controls(a, "forwarded"), WAIT, "first change forwarded")
    await b.until(lambda: "schedule" in config_of(b), WAIT, "baseline at bob")
    await c.until(lambda: "schedule" in config_of(c), WAIT, "baseline at carol")

    backend.stop()
    down_at = time.monotonic()
    # 500 edits from three clients: alice the description, bob the port, carol the cron minute.
    edits = 0
    for i in range(167):
        for client in (a, b, c):
            if edits == 500:
                break
            cfg = client.doc.get("config", type=pycrdt.Map)
            if client is a:
                cfg["description"] = f"edit {i} by alice"
            elif client is b:
                cfg["connection"]["port"] = 1000 + i
            else:
                cfg["schedule"]["cron"] = f"{(i + 1) % 60} * * * *"
            await client.flush()
            edits += 1
        if i % 20 == 0:
            await asyncio.sleep(0.01)  # let the three streams interleave on the server
    for client in (a, b, c):
        await client.wait_saved(WAIT)
    assert not any(controls(client, "rejected") for client in (a, b, c))

    # While it is down: everything is recorded, nothing is lost, the lane retries.
    status = forward_status(server, room)
    assert status["pending"] >= 1
    assert status["recorded_seq"] == 501  # 1 baseline change + 500 edits, one outbox row each
    await eventually(lambda: forward_status(server, room)["lane"]["retrying"], WAIT, what="lane retrying")
    remaining = OUTAGE_SECONDS - (time.monotonic() - down_at)
    if remaining > 0:
        await asyncio.sleep(remaining)  # the outage itself lasts this long
    assert forward_status(server, room)["pending"] >= 1

    backend.restart()
    status = await delivered(server, room, timeout=30)
    assert status["delivered_seq"] == status["recorded_seq"] == 501
    assert status["dead_letters"] == 0

    final = config_of(a)
    assert final == config_of(b) == config_of(c)
    assert final["description"] == "edit 166 by alice"
    assert final["connection"]["port"] == 1000 + 166 and final["schedule"]["cron"] == "46 * * * *"
    assert backend.data_source(room)["config"] == final
    assert backend.data_source(room)["seq"] == 501

    log = backend.log_of(room)
    applied_ranges_cover(log["applied"], 501)  # every change arrived, none twice in effect, in order
    assert len(log["applied"]) <= 8  # the backlog went out coalesced (at most 200 changes a request)
    puts = [r for r in log["requests"] if r["method"] == "PUT"]
    assert all(r["outcome"] in ("applied", "replayed", "stale") for r in puts)
    audit = [e for e in history(server, room) if e["kind"] == "accepted"]
    assert [e["seq"] for e in audit] == list(range(1, 502))
    assert all(e["forward_status"] == "delivered" for e in audit)
    assert {e["author"]["id"] for e in audit} == {"alice", "bob", "carol"}
    for client in (a, b, c):
        await client.close()


async def test_kill_9_in_the_middle_of_forwarding(server_factory, backend_factory):
    """Issue test 2: kill -9 while a request is in flight; after restart the rest is delivered, none twice."""
    backend = backend_factory()
    # The request carrying change 13 is applied by the backend, but its answer is held back:
    # the server is killed while it waits for it, not knowing the change is in effect.
    backend.post("/admin/hold", {"from_seq": 13})
    env = forwarding_env(backend, COLLAB_FORWARD_BATCH_MAX="4", COLLAB_FORWARD_DEBOUNCE_MS="10")
    server = server_factory(env=env)
    room = "ds-kill"
    client = await connect(server, room, "alice")
    cfg = client.doc.get("config", type=pycrdt.Map)
    for i in range(120):
        cfg["description"] = f"v{i}"
        await client.flush()
    await client.wait_saved(WAIT)
    assert forward_status(server, room)["recorded_seq"] == 120

    def held():
        applied = backend.log_of(room)["applied"]
        return applied and applied[-1]["seq"] >= 13

    await eventually(held, WAIT, what="the request carrying change 13 applied")
    held_key = backend.log_of(room)["applied"][-1]["key"]
    assert forward_status(server, room)["pending"] > 100  # in the middle of it
    server.kill()
    await client.wait_closed(WAIT)
    backend.post("/admin/release", {})

    server.restart()  # nobody reconnects: the server resumes delivery by itself
    status = await delivered(server, room, timeout=30)
    assert status["delivered_seq"] == 120
    assert backend.data_source(room)["config"] == {"description": "v119"}
    log = backend.log_of(room)
    applied_ranges_cover(log["applied"], 120)  # none twice in effect, none missing, in order
    # The request in flight at the kill went again with the same Idempotency-Key and was replayed.
    replayed = [r for r in log["requests"] if r["outcome"] == "replayed"]
    assert [r["key"] for r in replayed] == [held_key]
    assert (replayed[0]["first_seq"], replayed[0]["seq"]) == (13, 16)


@pytest.mark.skipif(NODE is None, reason="needs node (stock Yjs client)")
async def test_invalid_edit_from_the_stock_js_client_is_undone_and_never_forwarded(
    server_factory,
    backend_factory,
    node_clients,  # noqa: F811
):
    """Issue test 3."""
    backend = backend_factory()
    server = server_factory(env=forwarding_env(backend))
    room = "ds-js-invalid"
    py = await connect(server, room, "watcher")
    node = await node_clients(server.ws_url, room, "node")

    await node.command("set", key="name", value="Orders")
    await eventually(
        lambda: (backend.data_source(room) or {}).get("config", {}).get("name") == "Orders",
        WAIT,
        what="name at backend",
    )

    # A data-source type outside the known set, then a port out of range inside a new section.
    await node.command("set", key="type", value="excel")
    await node.command("set", key="connection", value={"host": "db.internal", "port": 99999})
    expected = {"name": "Orders"}
    await node.until(lambda: norm(node.doc["config"]) == expected, WAIT, "node restored")
    await py.until(lambda: config_of(py) == expected, WAIT, "python peer restored")
    assert norm((await node.dump())["config"]) == expected

    # A valid edit after it flows as usual; the backend never saw the invalid values.
    await node.command("set", key="description", value="after")
    await eventually(
        lambda: (backend.data_source(room) or {}).get("config") == {"name": "Orders", "description": "after"},
        WAIT,
        what="valid edit at backend",
    )
    await delivered(server, room)
    for request in backend.log_of(room)["requests"]:
        config = request["config"] or {}
        assert config.get("type") != "excel" and "connection" not in config, request

    audit = history(server, room)
    rejected = [e for e in audit if e["kind"] == "rejected"]
    assert [e["paths"] for e in rejected] == [["type"], ["connection.host", "connection.port"]]
    assert all(e["reason"] == "invalid" for e in rejected)
    errors = rejected[1]["details"]["rejections"][0]["errors"]
    assert [(e["path"], e["type"]) for e in errors] == [("connection.port", "less_than_equal")]
    assert rejected[0]["changes"] == [{"path": "type", "new": "excel"}]
    assert [e["paths"] for e in audit if e["kind"] == "accepted"] == [["name"], ["description"]]
    await py.close()
    assert await node.close() == 0
    node.assert_clean()


async def test_backend_422_is_reported_not_retried_and_later_changes_flow(server_factory, backend_factory):
    """Issue test 4."""
    backend = backend_factory()
    backend.post("/admin/rules", {"path": "description", "value": "REFUSE-ME", "status": 422})
    # The old behaviour (the document keeps the refused value); the revert is tested in test_backend_sync.py.
    server = server_factory(env=forwarding_env(backend, COLLAB_REVERT_REFUSED="false"))
    room = "ds-422"
    alice = await connect(server, room, "alice")
    bob = await connect(server, room, "bob")
    cfg = alice.doc.get("config", type=pycrdt.Map)

    cfg["description"] = "REFUSE-ME"
    await alice.wait_saved()
    for client in (alice, bob):
        await client.until(lambda c=client: controls(c, "forward.failed"), WAIT, "forward.failed")
    failed = controls(bob, "forward.failed")[0]
    assert failed["status"] == 422 and failed["seq"] == 1 and failed["paths"] == ["description"]
    assert failed["error"]["error"] == "refused" and failed["retrying"] is False

    cfg["description"] = "acceptable"
    await alice.wait_saved()
    await alice.until(lambda: any(m["seq"] == 2 for m in controls(alice, "forwarded")), WAIT, "forwarded 2")
    assert backend.data_source(room)["config"] == {"description": "acceptable"}

    log = backend.log_of(room)
    refused = [r for r in log["requests"] if r["seq"] == 1]
    assert len(refused) == 1 and refused[0]["status"] == 422  # not retried
    assert [(r["first_seq"], r["seq"], r["gap"]) for r in log["applied"]] == [(2, 2, True)]
    audit = history(server, room)
    accepted = {e["seq"]: e for e in audit if e["kind"] == "accepted"}
    assert accepted[1]["forward_status"] == "refused" and accepted[2]["forward_status"] == "delivered"
    report = next(e for e in audit if e["kind"] == "backend_refused")
    assert report["seq"] == 1 and report["details"]["status"] == 422
    assert forward_status(server, room)["pending"] == 0
    await bob.send_raw(p.encode_control({"type": "forward.status", "id": 7}))
    await bob.until(lambda: controls(bob, "forward.status"), WAIT, "forward.status answer")
    answer = controls(bob, "forward.status")[0]
    assert answer["id"] == 7 and answer["recorded_seq"] == 2 and answer["delivered_seq"] == 2
    assert answer["pending"] == 0 and answer["forwarding"] is True
    await alice.close()
    await bob.close()


async def test_seeding_happens_once(server_factory, backend_factory):
    """Issue test 5: loaded, evicted, loaded again (and restarted): one GET, no duplicated content."""
    backend = backend_factory()
    seed = {
        "name": "Warehouse",
        "type": "postgresql",
        "connection": {"host": "wh.internal", "port": 5432, "database": "wh"},
        "tags": ["finance", "pii"],
    }
    backend.set_data_source("ds-seed", seed, seq=7)
    server = server_factory(env=forwarding_env(backend, COLLAB_ROOM_IDLE_SECONDS="0.1"))

    first = await connect(server, "ds-seed", "alice")
    assert config_of(first) == seed  # seeded before the first sync answer
    await first.close()
    await eventually(lambda: server.log().count("evicted room ds-seed") >= 1, WAIT, what="eviction")

    # The backend changes meanwhile (a direct change, as its own API would make): the workspace is
    # not seeded again (nothing duplicated); the change flows in as one server change by `backend`.
    changed = {**seed, "name": "changed behind our back"}
    backend.set_data_source("ds-seed", changed, seq=7)
    again = await connect(server, "ds-seed", "bob")
    await again.until(lambda: config_of(again) == changed, WAIT, "the backend's change merged on open")
    merged = [e for e in history(server, "ds-seed") if e["kind"] == "accepted"]
    assert [(e["author"]["id"], e["paths"], e["seq"]) for e in merged] == [("backend", ["name"], 8)]
    # Our change numbers continue after the backend's sequence at seeding time; 8 was the
    # backend's own change, which is not sent back.
    again.doc.get("config", type=pycrdt.Map)["description"] = "edited"
    await again.wait_saved()
    await again.until(lambda: controls(again, "forwarded"), WAIT, "forwarded")
    assert controls(again, "forwarded")[0]["seq"] == 9
    assert backend.data_source("ds-seed")["config"] == {**changed, "description": "edited"}
    await again.close()

    # A workspace the backend does not know is marked as seeded too: a 404 does not seed it again.
    unknown = await connect(server, "ds-unknown", "carol")
    assert config_of(unknown) == {}
    await unknown.close()
    await eventually(lambda: server.log().count("evicted room ds-unknown") >= 1, WAIT, what="eviction")
    server.kill()
    server.restart()
    for ws in ("ds-seed", "ds-unknown"):
        client = await connect(server, ws, "dave")
        await client.close()

    def gets(ws: str) -> list[int]:
        return [r["status"] for r in backend.log_of(ws)["requests"] if r["method"] == "GET"]

    # Seeded once; opened again: the backend's change (200); the test's own read (200); after the
    # restart nothing new (304).
    await eventually(lambda: gets("ds-seed") == [200, 200, 200, 304], WAIT, what="conditional GET on open")
    assert gets("ds-unknown") == [404]  # an empty document is not asked again
    seeded = [e for e in history(server, "ds-seed") if e["kind"] == "seeded"]
    assert len(seeded) == 1 and seeded[0]["reason"] == "found"
    assert seeded[0]["paths"] == ["connection.database", "connection.host", "connection.port", "name", "tags", "type"]
    assert [e["reason"] for e in history(server, "ds-unknown") if e["kind"] == "seeded"] == ["not_found"]


async def test_no_backend_records_then_delivers_when_one_is_configured(server_factory, backend_factory, tmp_path):
    data = tmp_path / "shared-data"
    server = server_factory(env=forwarding_env(None), data_dir=data, name="no-backend")
    assert "forwarding is OFF" in server.log()
    client = await connect(server, "ds-later", "alice")
    client.doc.get("config", type=pycrdt.Map)["name"] = "Later"
    await client.wait_saved()
    await client.close()
    status = forward_status(server, "ds-later")
    assert status["forwarding"] is False and status["pending"] == 1 and status["recorded_seq"] == 1
    assert [e["forward_status"] for e in history(server, "ds-later") if e["kind"] == "accepted"] == ["pending"]
    server.stop()

    backend = backend_factory()
    server = server_factory(env=forwarding_env(backend), data_dir=data, name="with-backend")
    await delivered(server, "ds-later")
    assert backend.data_source("ds-later") == {
        "id": "ds-later",
        "config": {"name": "Later"},
        "seq": 1,
        "version": 1,
        "updated_at": backend.data_source("ds-later")["updated_at"],
    }


async def test_dead_letter_after_the_configured_time_then_retry(server_factory, backend_factory, tmp_path):
    from tests.support import free_port

    port = free_port()  # nothing listens there yet
    down = BackendProcess(tmp_path / "late.sqlite3", tmp_path / "late.log", port=port)
    env = forwarding_env(down, COLLAB_FORWARD_DEAD_LETTER_SECONDS="1", COLLAB_SEED_TIMEOUT_SECONDS="0.3")
    server = server_factory(env=env)
    # A new workspace cannot be seeded while the backend is unreachable: the room does not open.
    with pytest.raises(ConnectionError):
        await connect(server, "ds-dead", "alice")
    down.start()
    client = await connect(server, "ds-dead", "alice")
    down.stop()
    client.doc.get("config", type=pycrdt.Map)["name"] = "Dead"
    await client.wait_saved()
    await client.until(lambda: controls(client, "forward.dead"), WAIT, "forward.dead")
    letters = api(server, "/api/workspaces/ds-dead/dead-letters")["dead_letters"]
    assert len(letters) == 1 and letters[0]["seq"] == 1 and letters[0]["paths"] == ["name"]
    assert letters[0]["attempts"] >= 1 and letters[0]["last_error"]
    assert forward_status(server, "ds-dead")["dead_letters"] == 1

    down.restart()
    retry = f"/api/workspaces/ds-dead/dead-letters/{letters[0]['key']}/retry"
    with pytest.raises(httpx.HTTPStatusError) as refused:
        api(server, retry + "?user=eve&role=viewer", method="POST")
    assert refused.value.response.status_code == 403
    api(server, retry, method="POST")
    await delivered(server, "ds-dead")
    assert down.data_source("ds-dead")["config"] == {"name": "Dead"}
    assert api(server, "/api/workspaces/ds-dead/dead-letters")["dead_letters"] == []
    kinds = [e["kind"] for e in history(server, "ds-dead")]
    assert kinds == ["seeded", "accepted", "dead_lettered"]
    assert history(server, "ds-dead")[1]["forward_status"] == "delivered"
    await client.close()
    down.stop()


async def test_lock_fence_travels_with_the_change_and_stale_fences_are_refused(server_factory, backend_factory):
    backend = backend_factory()
    server = server_factory(env=forwarding_env(backend))
    room = "ds-fence"
    alice = await connect(server, room, "alice")
    granted = await alice.acquire_lock("connection")
    assert granted["type"] == "lock.granted", granted
    cfg = alice.doc.get("config", type=pycrdt.Map)
    cfg["connection"] = pycrdt.Map({"host": "db1", "port": 5432})
    await alice.wait_saved()
    await alice.until(lambda: controls(alice, "forwarded"), WAIT, "locked change forwarded")
    cfg["description"] = "not under the lock"
    await alice.wait_saved()
    await alice.until(lambda: len(controls(alice, "forwarded")) == 2, WAIT, "unlocked change forwarded")
    applied = backend.log_of(room)["applied"]
    assert [(e["seq"], e["fence"]) for e in applied] == [(1, granted["fence"]), (2, None)]
    accepted = [e for e in history(server, room) if e["kind"] == "accepted"]
    assert [e["fence"] for e in accepted] == [granted["fence"], None]

    # A request from a zombie holder with an older fence on that path is refused by the backend (409).
    stale = {
        "seq": 3,
        "first_seq": 3,
        "config": {},
        "changes": [{"path": "connection.host", "op": "set", "new": "zombie"}],
        "fence": granted["fence"] - 1,
    }
    response = httpx.put(f"{backend.url}/data-sources/{room}", json=stale, headers={"Idempotency-Key": "z"}, timeout=5)
    assert response.status_code == 409 and response.json()["error"] == "stale_fence"
    await alice.close()
