"""A Redis that hangs: SIGSTOP of the redis-server for 10 s during writes, then SIGCONT.

Two `collab serve` nodes share one redis-server (started here, AOF on). Node A
retries unacknowledged appends for the default 30 s; node B for 3 s. While
Redis is stopped:

* both nodes answer /healthz; /readyz says 503 and names Redis;
* writes on A are broadcast to A's other clients but not acknowledged;
* B gives up on its write after its 3 s and reports it (the room closes the
  connection, 1011 "storage failure"); the client resends it on reconnect;
* a lock whose renewals cannot reach Redis is reported gone (`lock.lost`,
  reason `unavailable`, or `lock.expired`) once its lease has expired -- never
  assumed alive past it.

After SIGCONT: A's writes are acknowledged and relayed to B, nothing
acknowledged is lost, B's client reconnects and its write is saved, and once
every client left, the nodes run no more asyncio tasks than before.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pycrdt
import pytest

from collab.client import CollabClient
from tests.presence_support import close_all
from tests.support import eventually
from tests.test_scaleout import fresh_view, items, node_env, reconnect_to

pytestmark = [pytest.mark.slow, pytest.mark.redis]

WAIT = 30.0
STALL = 10.0


def stats(node) -> dict:
    return httpx.get(f"{node.http_url}/admin/stats?user=ops&role=admin", timeout=5).json()


def readiness(node) -> tuple[int, dict]:
    r = httpx.get(f"{node.http_url}/readyz", timeout=10)
    return r.status_code, r.json()


async def idle_tasks(node) -> int:
    """Tasks of a node with no connection and no room open."""
    await eventually(lambda: stats(node)["rooms"] == 0 and stats(node)["connections"] == 0, WAIT, 0.1, "idle node")
    return stats(node)["tasks"]


async def test_a_stalled_redis_withholds_acks_keeps_local_sync_and_catches_up(server_factory, redis_factory):
    redis = redis_factory(appendonly=True)
    a = server_factory(node_env(redis, "a"), name="a")
    b = server_factory(node_env(redis, "b", COLLAB_REDIS_RETRY_SECONDS="3"), name="b")
    ws, short_ws = "ds-hang", "ds-hang-short"
    for node in (a, b):  # open and leave a room once: lazily started tasks exist from here on
        async with CollabClient(node.ws_url, "ds-warm", hello=True, query="user=warm") as warm:
            warm.doc.get("items", type=pycrdt.Map)["x"] = 1
            await warm.wait_saved(WAIT)
    baseline = {node.port: await idle_tasks(node) for node in (a, b)}
    names = {node.port: stats(node)["task_names"] for node in (a, b)}

    a1 = await CollabClient(a.ws_url, ws, hello=True, query="user=ann").connect(timeout=WAIT)
    a2 = await CollabClient(a.ws_url, ws, hello=True, query="user=al").connect(timeout=WAIT)
    b1 = await CollabClient(b.ws_url, ws, hello=True, query="user=ben").connect(timeout=WAIT)
    s1 = await CollabClient(b.ws_url, short_ws, hello=True, query="user=sam").connect(timeout=WAIT)
    a1.doc.get("items", type=pycrdt.Map)["before"] = 1
    await a1.wait_saved(WAIT)
    await b1.until(lambda: items(b1).get("before") == 1, WAIT, "relay before the stall")
    a2.keepalive(0.3)  # the holder shows it is alive: only Redis can make it lose the lock
    granted = await a2.acquire_lock("name", ttl=3)
    assert granted["type"] == "lock.granted", granted

    redis.pause()  # SIGSTOP
    stopped = time.monotonic()
    try:
        for i in range(5):
            a1.doc.get("items", type=pycrdt.Map)[f"during{i}"] = i
        await a1.flush()
        s1.doc.get("items", type=pycrdt.Map)["short"] = 1
        await s1.flush()
        # Local peers stay in sync; nothing is acknowledged.
        await a2.until(lambda: all(f"during{i}" in items(a2) for i in range(5)), 5, "local sync during the stall")
        assert a1.updates_saved < a1.updates_sent
        for node in (a, b):
            assert httpx.get(f"{node.http_url}/healthz", timeout=2).status_code == 200
        code, body = await eventually(lambda: (r := readiness(a))[0] == 503 and r, 8, 0.2, "/readyz 503")
        assert "redis" in body["checks"] and body["checks"]["redis"].startswith("error"), body
        # B reports its write after its retry time and closes the connection (the client keeps the edit).
        await s1.wait_closed(8)
        assert s1.close_code == 1011, (s1.close_code, s1.close_reason)
        # The lease could not be renewed: reported lost, at or after its expiry, while Redis is still stopped.
        # (`lock.lost` from the failed renewal, or `lock.expired` from the expiry timer, whichever runs first.)
        gone = ("lock.lost", "lock.expired")
        await a2.until(lambda: any(m.get("type") in gone for m in a2.control), 8, "lock lost")
        lost = next(m for m in a2.control if m.get("type") in gone)
        assert lost.get("path") == "name", lost
        assert time.time() >= granted["expires_at"] - 0.1, (lost, granted)
        assert a1.updates_saved < a1.updates_sent and not a1.closed.is_set()
        assert time.monotonic() - stopped < STALL
        await asyncio.sleep(max(0.0, STALL - (time.monotonic() - stopped)))  # the stall itself lasts 10 s
    finally:
        redis.resume()  # SIGCONT

    await a1.wait_saved(WAIT)  # retried, then acknowledged
    want = {"before": 1, **{f"during{i}": i for i in range(5)}}
    await b1.until(lambda: all(items(b1).get(k) == v for k, v in want.items()), WAIT, "relay after the stall")
    await eventually(lambda: all(readiness(n)[0] == 200 for n in (a, b)), WAIT, 0.2, "ready again")
    reconnect_to(s1, b, short_ws, "sam")
    await s1.connect(timeout=WAIT)
    await s1.wait_saved(WAIT)
    await close_all(a1, a2, b1, s1)
    for node in (a, b):
        view = await fresh_view(node, ws)
        assert all(view.get(k) == v for k, v in want.items()), view
    assert (await fresh_view(a, short_ws)).get("short") == 1
    # No task left behind by the retries, the failed room or the lost lock.
    for node in (a, b):
        try:
            await eventually(
                lambda node=node: stats(node)["rooms"] == 0 and stats(node)["tasks"] <= baseline[node.port],
                WAIT,
                0.2,
                f"tasks back to {baseline[node.port]}",
            )
        except TimeoutError:
            now = stats(node)["task_names"]
            extra = [n for n in now if n not in names[node.port] or now.count(n) > names[node.port].count(n)]
            raise AssertionError(f"tasks left: {sorted(set(extra))} (before: {names[node.port]})") from None
