"""The reference backend's side of the contract (docs/backend-contract.md), in-process."""

from __future__ import annotations

import httpx
import pytest

from refbackend.app import create_app


@pytest.fixture
async def backend(tmp_path):
    app = create_app(tmp_path / "backend.sqlite3")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://backend") as client:
        yield client
    app.state.backend.close()


async def put(client, seq, key, first_seq=None, changes=None, fence=None, ds="ds-1"):
    body = {
        "seq": seq,
        "first_seq": first_seq or seq,
        "config": {"description": f"v{seq}"},
        "changes": changes if changes is not None else [{"path": "description", "op": "set", "new": f"v{seq}"}],
        "fence": fence,
    }
    return await client.put(f"/data-sources/{ds}", json=body, headers={"Idempotency-Key": key})


def host(value):
    return [{"path": "connection.host", "op": "set", "new": value}]


async def test_get_put_and_idempotent_replay(backend):
    assert (await backend.get("/data-sources/ds-1")).status_code == 404
    first = await put(backend, 1, "k1")
    assert first.status_code == 200 and first.json() == {"status": "applied", "applied": True, "seq": 1, "version": 1}
    again = await put(backend, 1, "k1")
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    got = (await backend.get("/data-sources/ds-1")).json()
    assert got["config"] == {"description": "v1"} and got["seq"] == 1
    # Another key for a sequence number already in effect: acknowledged, not applied again.
    stale = await put(backend, 1, "k1-bis")
    assert stale.json() == {"status": "stale", "applied": False, "seq": 1, "version": 1}
    assert len((await backend.get("/admin/data-sources/ds-1/log")).json()["applied"]) == 1


async def test_bad_requests_and_refusal_rules(backend):
    assert (await backend.put("/data-sources/ds-1", json={"seq": 1})).status_code == 400  # no Idempotency-Key
    assert (await put(backend, 0, "k0")).status_code == 400
    assert (await put(backend, 2, "k2", first_seq=3)).status_code == 400
    await backend.post("/admin/rules", json={"path": "description", "value": "no", "status": 422})
    refused = await put(backend, 1, "k1", changes=[{"path": "description", "op": "set", "new": "no"}])
    assert refused.status_code == 422 and refused.json()["error"] == "refused"
    assert (await put(backend, 1, "k1", changes=[])).status_code == 422  # the same key answers the same
    assert (await put(backend, 1, "k1b")).status_code == 200


async def test_stale_fences_are_refused_per_path(backend):
    assert (await put(backend, 1, "a", fence=5, changes=host("h"))).status_code == 200
    # Another path may carry an older fence (another lock); the same path may not.
    cron = [{"path": "schedule.cron", "op": "set", "new": "@daily"}]
    assert (await put(backend, 2, "b", fence=3, changes=cron)).status_code == 200
    stale = await put(backend, 3, "c", fence=4, changes=host("zombie"))
    assert stale.status_code == 409 and stale.json()["current"] == 5
    assert (await put(backend, 3, "d", fence=6, changes=host("n"))).status_code == 200
    assert (await backend.get("/data-sources/ds-1")).json()["seq"] == 3


async def test_versions_etags_if_match_and_the_platforms_own_patch(backend):
    """Every write moves the version on; If-None-Match costs a 304; a stale If-Match is a 412, not stored."""
    assert (await put(backend, 1, "k1")).json()["version"] == 1
    got = await backend.get("/data-sources/ds-1")
    assert got.json()["version"] == 1 and got.headers["ETag"] == '"1"'
    quiet = await backend.get("/data-sources/ds-1", headers={"If-None-Match": '"1"'})
    assert quiet.status_code == 304 and quiet.content == b""
    # The platform's own API changes it: version 2; a request computed from version 1 is refused.
    patched = await backend.patch("/data-sources/ds-1", json={"connection": {"host": "db-bulk"}})
    assert patched.json() == {
        "id": "ds-1",
        "config": {"description": "v1", "connection": {"host": "db-bulk"}},
        "version": 2,
    }
    assert (await backend.get("/data-sources/ds-1", headers={"If-None-Match": '"1"'})).status_code == 200
    body = {"seq": 2, "first_seq": 2, "config": {"description": "v2"}, "changes": []}
    stale = await backend.put("/data-sources/ds-1", json=body, headers={"Idempotency-Key": "k2", "If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.json()["version"] == 2 and stale.json()["config"]["connection"] == {"host": "db-bulk"}
    # Merged and sent again with the same key: applied (the 412 was not stored under it).
    body["config"] = {"description": "v2", "connection": {"host": "db-bulk"}}
    again = await backend.put("/data-sources/ds-1", json=body, headers={"Idempotency-Key": "k2", "If-Match": '"2"'})
    assert again.status_code == 200 and again.json()["version"] == 3 and again.headers["ETag"] == '"3"'
    assert (await backend.patch("/data-sources/ds-1", json={"x": 1}, headers={"If-Match": '"2"'})).status_code == 412
    removed = await backend.patch("/data-sources/ds-1", json={"connection": None}, headers={"If-Match": '"3"'})
    assert removed.json()["config"] == {"description": "v2"}
    # Changes of its own API wait to be announced by the change hook (none of the forwarded PUTs do).
    pending = (await backend.get("/admin/notifications")).json()["pending"]
    assert pending == [{"id": "ds-1", "version": 4}]
