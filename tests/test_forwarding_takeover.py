"""Forwarding lease takeover mid-delivery (issue 16).

Two `collab serve` nodes share one redis-server and the reference backend
(all started here). The node holding a workspace's forwarding lease is
frozen (SIGSTOP) while its request is in flight: the backend applied it but
holds the answer back. The lease runs out, the other node takes it and
delivers the same batch (same Idempotency-Key: replayed, not applied again)
and the later changes. When the frozen node wakes (SIGCONT) and finally gets
its answer, it must do nothing with it: no row finished, no known backend
state overwritten (which would make the next forward a 412 and merge the
session's own changes back as the backend's).
"""

from __future__ import annotations

import json

import httpx
import pycrdt
import pytest
import redis as redis_lib

from collab.client import CollabClient
from tests.forwarding_support import FAST_FORWARDING, BackendProcess, applied_ranges_cover, forward_status
from tests.support import eventually

WAIT = 30.0
LEASE_MS = 1500  # short, so the takeover happens within the test's budget


@pytest.fixture
def backend(tmp_path):
    proc = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log").start()
    yield proc
    proc.stop()


def node_env(redis, backend, node: str) -> dict[str, str]:
    return {
        **FAST_FORWARDING,
        "COLLAB_BACKEND_URL": backend.url,
        "COLLAB_BACKEND_TIMEOUT_SECONDS": "60",  # the frozen node's request must still be waiting when it wakes
        "COLLAB_BACKEND_PULL_SECONDS": "0",
        "COLLAB_FORWARD_LEASE_MS": str(LEASE_MS),
        "COLLAB_FORWARD_DEBOUNCE_MS": "10",
        "COLLAB_REDIS_URL": redis.url,
        "COLLAB_NODE_ID": node,
        "COLLAB_REDIS_TIMEOUT_SECONDS": "1",
        "COLLAB_RELAY_BLOCK_MS": "500",
        "COLLAB_LOG_LEVEL": "info",
    }


def known_state(r: redis_lib.Redis, ws: str) -> dict:
    raw = r.hget("collab:ws:{" + ws + "}:meta", "backend_state")
    assert raw is not None, "no known backend state stored"
    return json.loads(raw)


async def edit(client: CollabClient, values: list[str]) -> None:
    config = client.doc.get("config", type=pycrdt.Map)
    for value in values:
        config["description"] = value
        await client.wait_saved(WAIT)


async def test_a_node_frozen_mid_request_is_replaced_and_its_late_answer_is_harmless(
    server_factory, redis_factory, backend
):
    redis = redis_factory(appendonly=True)
    a = server_factory(node_env(redis, backend, "a"), name="a")
    b = server_factory(node_env(redis, backend, "b"), name="b")
    r = redis_lib.Redis(host="127.0.0.1", port=redis.port, socket_timeout=5)
    ws = "ds-takeover"
    lease_key = "collab:ws:{" + ws + "}:fwd:lease"

    ca = await CollabClient(a.ws_url, ws, hello=True, query="user=ann").connect(timeout=WAIT)
    await edit(ca, ["a0", "a1"])
    # Node b has the room open already (so it does not read the backend on opening it mid-test).
    cb = await CollabClient(b.ws_url, ws, hello=True, query="user=ben").connect(timeout=WAIT)

    def drained(node, upto: int):
        status = forward_status(node, ws)
        ok = status["pending"] == 0 and status["delivered_seq"] >= upto
        return status if ok else None

    await eventually(lambda: drained(a, 2), WAIT, 0.05, "the first changes delivered")
    # The next request is applied by the backend but its answer is held (once: a retry gets through).
    backend.post("/admin/hold", {"from_seq": 3, "count": 1})
    await edit(ca, ["a2", "a3"])
    await eventually(lambda: backend.get("/admin/stats")["held"] == 1, WAIT, 0.02, "a request held")
    held = backend.log_of(ws)["applied"][-1]
    assert held["seq"] >= 3
    owner = r.get(lease_key)
    assert owner is not None and owner.startswith(b"a/"), owner  # node a holds the lease, waiting
    a.pause()  # SIGSTOP: frozen with its request in flight
    try:
        # Node b takes the lease once it expires and delivers the claimed batch with the same key,
        # then changes made on b afterwards.
        await edit(cb, ["b0", "b1", "b2"])
        recorded = forward_status(b, ws)["recorded_seq"]
        assert recorded > held["seq"]
        await eventually(lambda: drained(b, recorded), WAIT, 0.05, "node b delivered everything")
        assert not (r.get(lease_key) or b"").startswith(b"a/")
        log = backend.log_of(ws)
        replayed = [q for q in log["requests"] if q["outcome"] == "replayed"]
        assert [q["key"] for q in replayed] == [held["key"]]  # the held batch went again, not applied again
        before_wake = known_state(r, ws)
        current = backend.data_source(ws)
        assert before_wake["version"] in (current["version"], str(current["version"]))
        backend.post("/admin/release", {})  # the held answer goes out, to a frozen node
    finally:
        a.resume()  # SIGCONT

    # Node a wakes up, reads its (late) answer, and must drop it.
    def woke():
        noticed = "lost while a request was in flight" in a.log_path.read_text(errors="replace")
        return noticed or known_state(r, ws) != before_wake

    await eventually(woke, WAIT, 0.05, "node a handles its late answer")
    assert known_state(r, ws) == before_wake  # not overwritten by the late answer

    # Forwarding goes on without a version conflict: the known state was never rolled back.
    await edit(cb, ["b3"])
    final = forward_status(b, ws)["recorded_seq"]
    await eventually(lambda: drained(b, final), WAIT, 0.05, "the change after the wake-up delivered")
    await eventually(lambda: drained(a, final), WAIT, 0.05, "node a reports the same outbox")
    log = backend.log_of(ws)
    applied_ranges_cover(log["applied"], final)  # every change applied exactly once, in order
    assert not [q for q in log["requests"] if q["outcome"] == "version_mismatch"]
    assert backend.data_source(ws)["config"] == {"description": "b3"}
    await ca.close()
    await cb.close()
    # Both nodes still answer.
    for node in (a, b):
        assert httpx.get(f"{node.http_url}/healthz", timeout=5).status_code == 200
