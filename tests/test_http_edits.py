"""Non-CRDT callers edit through the server: PATCH /api/workspaces/{id}/config and bulk jobs (issue 13).

Real server, real reference backend, real websocket clients (a stock Yjs
client in node included).
"""

from __future__ import annotations

import json

import httpx
import pycrdt
import pytest

from tests.forwarding_support import BackendProcess, history
from tests.support import eventually
from tests.test_forwarding import (
    WAIT,
    config_of,
    connect,
    delivered,
    forwarding_env,
)
from tests.test_forwarding import (
    backend_factory as backend_factory,  # fixture
)
from tests.test_js_client import NODE, norm
from tests.test_js_client import node_clients as node_clients  # fixture

MERGE = {"Content-Type": "application/merge-patch+json"}


def env(backend: BackendProcess, **extra: str) -> dict[str, str]:
    return forwarding_env(backend, **{"COLLAB_BACKEND_PULL_SECONDS": "0", **extra})


def patch(server, ws: str, body, user: str = "carol", role: str = "editor", **headers: str) -> httpx.Response:
    return httpx.patch(
        f"{server.http_url}/api/workspaces/{ws}/config?user={user}&role={role}",
        content=json.dumps(body),
        headers={**MERGE, **headers},
        timeout=10,
    )


def backend_config(backend: BackendProcess, ds: str) -> dict:
    return (backend.data_source(ds) or {}).get("config", {})


@pytest.mark.skipif(NODE is None, reason="needs node (stock Yjs client)")
async def test_patch_config_rules(server_factory, backend_factory, node_clients):  # noqa: F811
    backend = backend_factory()
    server = server_factory(env=env(backend))
    ws = "ds-patch"
    alice = await connect(server, ws, "alice")
    node = await node_clients(server.ws_url, ws, "node")

    # Valid: applied as one server change, reaches the stock client and the backend.
    ok = patch(server, ws, {"name": "Orders", "connection": {"host": "db1", "port": 5432}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["seq"] == 1 and ok.headers["ETag"] == '"1"'
    assert ok.json()["paths"] == ["connection.host", "connection.port", "name"]
    expected = {"name": "Orders", "connection": {"host": "db1", "port": 5432}}
    await node.until(lambda: norm(node.doc["config"]) == expected, WAIT, "stock client has it")
    await alice.until(lambda: config_of(alice) == expected, WAIT, "python client has it")
    await eventually(lambda: backend_config(backend, ws) == expected, WAIT, what="backend has it")
    entry = [e for e in history(server, ws) if e["kind"] == "accepted"][-1]
    assert entry["author"] == {"id": "carol", "name": "carol", "role": "editor", "via": "http"}

    # Merge patch semantics: null removes a member.
    assert patch(server, ws, {"name": None}).json()["config"] == {"connection": {"host": "db1", "port": 5432}}

    # Invalid: 422 in the shape of `rejected`, nothing stored.
    before = len(history(server, ws))
    bad = patch(server, ws, {"connection": {"port": 99999}})
    assert bad.status_code == 422
    body = bad.json()
    assert body["paths"] == ["connection.port"] and body["reason"] == "invalid"
    assert [(e["path"], e["type"]) for e in body["errors"]] == [("connection.port", "less_than_equal")]
    assert len(history(server, ws)) == before
    current = httpx.get(f"{server.http_url}/api/workspaces/{ws}/config", timeout=5)
    assert current.json()["config"]["connection"]["port"] == 5432 and current.headers["ETag"] == '"2"'

    # Under someone else's lock: 409 naming the holder; with the lock's token it goes through.
    granted = await alice.acquire_lock("connection")
    assert granted["type"] == "lock.granted"
    locked = patch(server, ws, {"connection": {"host": "db2"}})
    assert locked.status_code == 409
    assert locked.json()["user_id"] == "alice" and locked.json()["path"] == "connection"
    assert locked.json()["holder"] == granted["holder"]
    with_token = patch(server, ws, {"connection": {"host": "db2"}}, **{"X-Lock-Token": granted["token"]})
    assert with_token.status_code == 200, with_token.text
    fenced = [e for e in history(server, ws) if e["kind"] == "accepted"][-1]
    assert fenced["fence"] == granted["fence"]
    await alice.release_lock("connection")

    # Stale If-Match: 412 with the current seq; the current one applies.
    seq = with_token.json()["seq"]
    stale = patch(server, ws, {"description": "x"}, **{"If-Match": f'"{seq - 1}"'})
    assert stale.status_code == 412 and stale.json()["seq"] == seq
    fresh = patch(server, ws, {"description": "x"}, **{"If-Match": f'"{seq}"'})
    assert fresh.status_code == 200 and fresh.json()["seq"] == seq + 1

    # A viewer may not.
    assert patch(server, ws, {"description": "y"}, user="vic", role="viewer").status_code == 403
    await delivered(server, ws)
    assert backend_config(backend, ws)["connection"]["host"] == "db2"
    assert backend_config(backend, ws)["description"] == "x"
    await alice.close()
    assert await node.close() == 0
    node.assert_clean()


async def test_patch_a_workspace_that_is_not_open(server_factory, backend_factory):
    backend = backend_factory()
    backend.set_data_source("ds-closed", {"name": "Closed"})
    server = server_factory(env=env(backend, COLLAB_ROOM_IDLE_SECONDS="0.2"))
    answer = patch(server, "ds-closed", {"description": "via HTTP"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["config"] == {"name": "Closed", "description": "via HTTP"}
    await eventually(lambda: "evicted room ds-closed" in server.log(), WAIT, what="evicted after the grace")
    await eventually(
        lambda: backend_config(backend, "ds-closed") == {"name": "Closed", "description": "via HTTP"},
        WAIT,
        what="forwarded",
    )
    client = await connect(server, "ds-closed", "dave")
    assert config_of(client) == {"name": "Closed", "description": "via HTTP"}
    await client.close()


# ------------------------------------------------------------------ bulk


def bulk(server, body: dict, user: str = "ops") -> str:
    response = httpx.post(f"{server.http_url}/api/bulk?user={user}", json=body, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()["job"]


def job_state(server, job: str) -> dict:
    return httpx.get(f"{server.http_url}/api/bulk/{job}", timeout=10).json()


def events(server, job: str) -> list[dict]:
    """The job's SSE stream, read to its end."""
    out = []
    with httpx.stream("GET", f"{server.http_url}/api/bulk/{job}/events", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
                if out[-1]["type"] == "end":
                    break
    return out


WORKSPACES = [f"ds-bulk-{i:02d}" for i in range(50)]
CRON = {"schedule": {"cron": "0 3 * * *"}}


async def _lock_one(server, ws: str):
    alice = await connect(server, ws, "alice")
    alice.doc.get("config", type=pycrdt.Map)["name"] = "locked one"
    await alice.wait_saved()
    granted = await alice.acquire_lock("schedule")
    assert granted["type"] == "lock.granted"
    return alice


async def test_bulk_over_50_workspaces_with_one_refusing_item(server_factory, backend_factory):
    backend = backend_factory()
    server = server_factory(env=env(backend))
    alice = await _lock_one(server, "ds-bulk-07")
    job = bulk(server, {"workspaces": WORKSPACES, "patch": CRON, "batch_size": 10, "parallelism": 4})
    stream = events(server, job)
    final = job_state(server, job)
    assert final["state"] == "completed_with_failures"
    assert final["counts"] == {"applied": 49, "refused": 1}
    assert 1 <= final["max_in_flight"] <= 4  # parallelism
    items = {i["workspace"]: i for i in final["items"]}
    assert items["ds-bulk-07"]["state"] == "refused" and items["ds-bulk-07"]["reason"] == "locked"
    assert items["ds-bulk-07"]["error"]["user_id"] == "alice"
    # The stream reported every workspace's outcome, then the end.
    outcomes = {e["workspace"]: e["state"] for e in stream if e["type"] == "item" and e["state"] != "pending"}
    assert len(outcomes) == 50 and stream[-1] == {"type": "end", "state": "completed_with_failures"}
    for ws in ("ds-bulk-00", "ds-bulk-49"):
        await delivered(server, ws)
        assert backend_config(backend, ws) == CRON
        [entry] = [e for e in history(server, ws) if e["kind"] == "accepted"]
        assert entry["details"]["bulk_job"] == job and entry["author"]["via"] == "bulk"
    assert config_of(alice) == {"name": "locked one"}
    await alice.close()


async def test_bulk_with_rollback_on_failure(server_factory, backend_factory):
    backend = backend_factory()
    server = server_factory(env=env(backend))
    alice = await _lock_one(server, "ds-bulk-07")
    job = bulk(
        server,
        {"workspaces": WORKSPACES, "patch": CRON, "batch_size": 10, "parallelism": 4, "rollback_on_failure": True},
    )
    events(server, job)
    final = job_state(server, job)
    assert final["state"] == "rolled_back"
    # The first batch held the refusing item: its 9 others were undone, the 40 later never started.
    assert final["counts"] == {"rolled_back": 9, "refused": 1, "skipped": 40}
    for ws in WORKSPACES[:10]:
        if ws == "ds-bulk-07":
            continue
        audit = [e for e in history(server, ws) if e["kind"] == "accepted"]
        assert [e["details"].get("compensation", False) for e in audit] == [False, True], final["items"][
            :3
        ]  # not rewritten
        assert audit[1]["changes"] == [{"path": "schedule.cron", "old": "0 3 * * *"}]
        client = await connect(server, ws, "dave")
        assert config_of(client) == {}
        await client.close()
    assert history(server, "ds-bulk-30") == [] or all(e["kind"] == "seeded" for e in history(server, "ds-bulk-30"))
    await alice.close()


async def test_bulk_job_survives_kill_9(server_factory, backend_factory):
    backend = backend_factory()
    backend.post("/admin/delay", {"ms": 60})  # each new workspace waits for its seed: the job takes a while
    server = server_factory(env=env(backend))
    job = bulk(server, {"workspaces": WORKSPACES, "patch": CRON, "batch_size": 5, "parallelism": 2})

    def some_applied():
        counts = job_state(server, job)["counts"]
        return counts.get("applied", 0) >= 10

    await eventually(some_applied, WAIT, what="part of the job applied")
    server.kill()
    backend.post("/admin/delay", {"ms": 0})
    server.restart()

    def done():
        state = job_state(server, job)
        return state if state["state"] in ("completed", "completed_with_failures") else None

    final = await eventually(done, 60, interval=0.2, what="the job finished after the restart")
    assert final["counts"] == {"applied": 50}
    assert final["resumed"] == 1  # picked up again at start
    for ws in WORKSPACES:  # every item once
        entries = [e for e in history(server, ws) if e["kind"] == "accepted"]
        assert [e["details"]["bulk_job"] for e in entries] == [job], (ws, entries)
