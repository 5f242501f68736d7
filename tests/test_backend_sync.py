"""Two-way sync with the data-source backend (issue 13), against a real server and a real reference backend.

Changes made at the backend (its own PATCH API, as the platform's bulk
updates and automation would) reach the document and are never overwritten
blindly by a forward; refused changes are reverted in every client.
"""

from __future__ import annotations

import pycrdt
import pytest

from tests.forwarding_support import BackendProcess, history
from tests.support import eventually
from tests.test_forwarding import (
    WAIT,
    config_of,
    connect,
    controls,
    delivered,
    forwarding_env,
)
from tests.test_forwarding import (
    backend_factory as backend_factory,  # fixture
)
from tests.test_js_client import NODE, norm
from tests.test_js_client import node_clients as node_clients  # fixture

TOKEN = "backend-secret"


def sync_env(backend: BackendProcess, **extra: str) -> dict[str, str]:
    """Forwarding to ``backend``, the change hook's token, no interval pulls unless asked for."""
    return forwarding_env(backend, **{"COLLAB_BACKEND_TOKEN": TOKEN, "COLLAB_BACKEND_PULL_SECONDS": "0", **extra})


def hook_to(backend: BackendProcess, server) -> None:
    """The backend's change hook calls this server."""
    backend.post("/admin/notify", {"url": server.http_url, "token": TOKEN}, method="PUT")


def backend_config(backend: BackendProcess, ds: str) -> dict:
    return (backend.data_source(ds) or {}).get("config", {})


async def test_direct_backend_change_while_two_clients_edit_is_never_lost(server_factory, backend_factory):
    """The issue's scenario: a bulk-style change at the backend while two clients edit other fields."""
    backend = backend_factory()
    server = server_factory(env=sync_env(backend))
    hook_to(backend, server)
    room = "ds-demo"
    alice = await connect(server, room, "alice")
    bob = await connect(server, room, "bob")
    cfg = alice.doc.get("config", type=pycrdt.Map)
    with alice.doc.transaction():
        cfg["type"] = "postgresql"
        cfg["connection"] = pycrdt.Map({"host": "db1", "port": 5432})
    await alice.wait_saved()
    await delivered(server, room)
    assert backend_config(backend, room)["connection"]["host"] == "db1"
    granted = await alice.acquire_lock("connection")  # alice edits the connection under a lock
    assert granted["type"] == "lock.granted"

    # Directly at the backend (its own API): host and a description.
    answer = backend.post(
        f"/data-sources/{room}", {"connection": {"host": "db-bulk"}, "description": "bulk"}, method="PATCH"
    )
    # Meanwhile both clients edit other fields.
    cfg["connection"]["port"] = 5433
    bob.doc.get("config", type=pycrdt.Map)["name"] = "Orders"
    await alice.flush()
    await bob.flush()
    for client in (alice, bob):
        await client.until(
            lambda c=client: config_of(c).get("description") == "bulk", WAIT, "the backend's change in the doc"
        )
    await delivered(server, room)

    expected = {
        "type": "postgresql",
        "connection": {"host": "db-bulk", "port": 5433},
        "description": "bulk",
        "name": "Orders",
    }
    await eventually(lambda: backend_config(backend, room) == expected, WAIT, what="backend has both sides")
    await alice.until(lambda: config_of(alice) == expected, WAIT, "alice converged")
    await bob.until(lambda: config_of(bob) == expected, WAIT, "bob converged")

    # The audit trail shows the backend's change, with its version, as one change.
    audit = history(server, room)
    by_backend = [e for e in audit if e["kind"] == "accepted" and e["author"]["id"] == "backend"]
    assert len(by_backend) == 1
    assert by_backend[0]["paths"] == ["connection.host", "description"]
    assert by_backend[0]["author"]["version"] == str(answer["version"])
    assert by_backend[0]["details"]["reason"] == "push"
    # It was never sent back, and no forwarded request put db1 back or dropped the description.
    # (A PUT built before the backend's change reached the room may be sent, with
    # the version it was built on in If-Match: the backend refuses it with 412.)
    for request in backend.log_of(room)["requests"]:
        if request["method"] == "PUT" and request["seq"] > 1 and request["status"] < 300:
            assert request["config"]["connection"]["host"] == "db-bulk", request
            assert request["config"].get("description") == "bulk", request
    assert any(m["type"] == "backend.changed" for m in bob.control)
    # The backend is the system of record: it won over alice's lock, and she was told.
    [overridden] = controls(alice, "lock.overridden")
    assert overridden["path"] == "connection" and overridden["paths"] == ["connection.host"]
    assert overridden["by"] == "backend" and overridden["version"] == str(answer["version"])
    assert not controls(bob, "lock.overridden")
    await alice.close()
    await bob.close()


async def test_forward_racing_a_backend_change_on_the_same_path_gets_412_and_the_backend_wins(
    server_factory, backend_factory
):
    """No hook, no pulls: the forward carries a stale If-Match, the backend answers 412 for real."""
    backend = backend_factory()
    server = server_factory(env=sync_env(backend))
    room = "ds-race"
    alice = await connect(server, room, "alice")
    cfg = alice.doc.get("config", type=pycrdt.Map)
    cfg["connection"] = pycrdt.Map({"host": "db1", "port": 5432})
    await alice.wait_saved()
    await delivered(server, room)

    backend.post(f"/data-sources/{room}", {"connection": {"host": "db-bulk"}, "owner": "ops"}, method="PATCH")
    cfg["connection"]["host"] = "db-session"  # the same path, computed from the old version
    cfg["description"] = "session"  # another path: re-sent after the merge
    await alice.wait_saved()
    expected = {"connection": {"host": "db-bulk", "port": 5432}, "owner": "ops", "description": "session"}
    await alice.until(lambda: config_of(alice) == expected, WAIT, "the backend's version in the doc")
    await eventually(lambda: backend_config(backend, room) == expected, WAIT, what="backend state")
    await delivered(server, room)

    puts = [r for r in backend.log_of(room)["requests"] if r["method"] == "PUT"]
    assert [r["status"] for r in puts] == [200, 412, 200]
    assert puts[1]["outcome"] == "version_mismatch"
    assert puts[2]["config"] == expected  # re-sent from the new version: nothing overwritten blindly
    assert any(m["type"] == "backend.changed" and m["reason"] == "conflict" for m in alice.control)
    merged = [e for e in history(server, room) if e["kind"] == "accepted" and e["author"]["id"] == "backend"]
    assert [e["paths"] for e in merged] == [["connection.host", "owner"]]
    await alice.close()


@pytest.mark.skipif(NODE is None, reason="needs node (stock Yjs client)")
async def test_refused_change_is_reverted_in_every_client(server_factory, backend_factory, node_clients):  # noqa: F811
    backend = backend_factory()
    backend.post("/admin/rules", {"path": "description", "value": "REFUSE-ME", "status": 422})
    server = server_factory(env=sync_env(backend))
    room = "ds-revert"
    py = await connect(server, room, "watcher")
    node = await node_clients(server.ws_url, room, "node")
    await node.command("set", key="description", value="fine")
    await eventually(lambda: backend_config(backend, room) == {"description": "fine"}, WAIT, what="first change")

    await node.command("set", key="description", value="REFUSE-ME")
    await py.until(lambda: controls(py, "forward.failed"), WAIT, "forward.failed")
    await py.until(lambda: config_of(py) == {"description": "fine"}, WAIT, "python client reverted")
    await node.until(lambda: norm(node.doc["config"]) == {"description": "fine"}, WAIT, "node client reverted")
    assert norm((await node.dump())["config"]) == {"description": "fine"}
    reverted = controls(py, "forward.reverted")
    assert reverted and reverted[0]["paths"] == ["description"] and reverted[0]["status"] == 422
    await delivered(server, room)
    assert backend_config(backend, room) == {"description": "fine"}
    audit = history(server, room)
    kinds = [(e["kind"], (e["author"] or {}).get("id")) for e in audit]
    assert ("backend_refused", None) in kinds
    revert = [e for e in audit if e["kind"] == "accepted" and e["author"]["id"] == "backend"]
    assert len(revert) == 1 and revert[0]["details"]["reason"] == "revert"
    assert revert[0]["changes"] == [{"path": "description", "old": "REFUSE-ME", "new": "fine"}]
    await py.close()
    assert await node.close() == 0
    node.assert_clean()


async def test_change_hook_while_the_backend_flaps(server_factory, backend_factory):
    """Changes made through the backend's API reach the document though the backend restarts meanwhile."""
    backend = backend_factory()
    server = server_factory(env=sync_env(backend))
    hook_to(backend, server)
    room = "ds-flap"
    alice = await connect(server, room, "alice")
    cfg = alice.doc.get("config", type=pycrdt.Map)
    for i in range(4):
        backend.post(f"/data-sources/{room}", {"tags": [f"t{i}"], f"k{i}": i}, method="PATCH")
        cfg[f"session{i}"] = i  # the session edits too, forwarded while the backend comes and goes
        await alice.flush()
        backend.kill()  # notifications not yet sent stay in its database
        backend.restart()
    await eventually(lambda: config_of(alice).get("k3") == 3, WAIT, what="every backend change in the doc")
    await delivered(server, room)
    expected = {"tags": ["t3"], **{f"k{i}": i for i in range(4)}, **{f"session{i}": i for i in range(4)}}
    await alice.until(lambda: config_of(alice) == expected, WAIT, "alice has both sides")
    await eventually(lambda: backend_config(backend, room) == expected, WAIT, what="backend has both sides")
    assert backend.get("/admin/notifications")["pending"] == []
    await alice.close()


async def test_pull_mode_with_etags(server_factory, backend_factory):
    """A backend that cannot call back: open workspaces ask on an interval; a quiet backend costs 304s."""
    backend = backend_factory()
    backend.set_data_source("ds-pull", {"name": "Pulled"})
    server = server_factory(env=sync_env(backend, COLLAB_BACKEND_PULL_SECONDS="0.1"))
    alice = await connect(server, "ds-pull", "alice")
    assert config_of(alice) == {"name": "Pulled"}

    def gets() -> list[dict]:
        return [r for r in backend.log_of("ds-pull")["requests"] if r["method"] == "GET"]

    await eventually(lambda: len(gets()) >= 6, WAIT, what="a few pulls")
    quiet = gets()
    assert quiet[0]["status"] == 200  # seeding
    assert {r["status"] for r in quiet[1:]} == {304}  # nothing changed: empty answers only
    backend.post("/data-sources/ds-pull", {"description": "pulled in"}, method="PATCH")
    await alice.until(lambda: config_of(alice).get("description") == "pulled in", WAIT, "pulled change")
    assert [e["details"]["reason"] for e in history(server, "ds-pull") if e["kind"] == "accepted"] == ["pull"]
    await alice.close()


async def test_only_the_backend_may_call_the_change_hook(server_factory, backend_factory):
    """COLLAB_BACKEND_TOKEN or a service-role JWT (or, as for every service route, a server admin)."""
    import httpx

    from tests.security_support import jwt_env, make_token

    backend = backend_factory()
    server = server_factory(env={**sync_env(backend), **jwt_env()})
    url = f"{server.http_url}/api/workspaces/ds-auth/backend-changes"
    body = {"config": {"name": "From the backend"}, "version": 1}

    def post(token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(url, json=body, headers=headers, timeout=10).status_code

    assert post(None) == 401
    assert post("wrong") == 401
    assert post(make_token("eddie", {"*": "editor"})) == 403  # a user is not the backend
    assert post(make_token("platform", {"*": "viewer"}, role="service", service="metrics")) == 403  # another one's
    assert post(make_token("platform", {"*": "viewer"}, role="service")) == 200
    body["version"] = 2
    body["config"]["description"] = "second"
    assert post(TOKEN) == 200
    audit = [e for e in history(server, "ds-auth", token=make_token()) if e["kind"] == "accepted"]
    assert [e["paths"] for e in audit] == [["name"], ["description"]]
    assert {e["author"]["id"] for e in audit} == {"backend"}


async def test_a_pull_that_sees_a_forward_in_flight_does_not_take_it_for_a_backend_change(
    server_factory, backend_factory
):
    """The backend applied a forwarded change but its answer has not come back yet; a pull
    in that window reads a newer version holding the session's own change. That is an echo,
    not a backend change: the document keeps the session's newer edit (it used to be set
    back to the in-flight value, and the user's later edit looked lost until the next one)."""
    backend = backend_factory()
    server = server_factory(env=sync_env(backend, COLLAB_BACKEND_PULL_SECONDS="0.1"))
    alice = await connect(server, "ds-echo", "alice")
    config = alice.doc.get("config", type=pycrdt.Map)
    config["description"] = "v1"
    await delivered(server, "ds-echo")
    first = backend.log_of("ds-echo")["applied"][-1]["seq"]
    backend.post("/admin/hold", {"from_seq": first + 1, "count": 1})
    config["description"] = "v2"
    await eventually(lambda: backend.get("/admin/stats")["held"] == 1, WAIT, what="v2 applied, held")
    config["description"] = "v3"
    await alice.wait_saved(WAIT)

    def gets() -> int:
        return sum(1 for r in backend.log_of("ds-echo")["requests"] if r["method"] == "GET")

    seen = gets()
    # Pulls now read the backend's version holding v2, whose answer the forwarder still waits for.
    await eventually(lambda: gets() >= seen + 3, WAIT, what="pulls during the held answer")
    assert config_of(alice)["description"] == "v3"
    backend.post("/admin/release", {})
    await delivered(server, "ds-echo")
    assert backend_config(backend, "ds-echo")["description"] == "v3"
    assert config_of(alice)["description"] == "v3"
    kinds = [(e["author"] or {}).get("id") for e in history(server, "ds-echo") if e["kind"] == "accepted"]
    assert "backend" not in kinds, kinds
    await alice.close()
