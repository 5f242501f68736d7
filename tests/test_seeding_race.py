"""Two nodes opening a never-seen workspace at the same moment read the backend once.

Real Redis (started here), two real server nodes, the reference backend made
slow so that both nodes are inside the seeding step together.
"""

from __future__ import annotations

import asyncio

import pycrdt
import pytest

from collab.client import CollabClient
from tests.forwarding_support import FAST_FORWARDING, BackendProcess, history
from tests.test_js_client import norm
from tests.test_scaleout import node_env

WAIT = 20.0
SEED = {"name": "Orders", "type": "postgresql", "tags": ["finance", "pii"], "connection": {"host": "db", "port": 5432}}


@pytest.fixture
def slow_backend(tmp_path):
    proc = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log").start()
    proc.post("/admin/delay", {"ms": 1000})  # every GET and PUT answers after a second
    yield proc
    proc.stop()


async def test_two_nodes_seed_a_new_workspace_exactly_once(server_factory, redis_factory, slow_backend):
    redis = redis_factory()
    ws = "ds-seed-race"
    slow_backend.set_data_source(ws, SEED, seq=3)
    env = {**FAST_FORWARDING, "COLLAB_BACKEND_URL": slow_backend.url}
    a = server_factory(node_env(redis, "a", **env), name="a")
    b = server_factory(node_env(redis, "b", **env), name="b")

    async def connect(node, user: str) -> CollabClient:
        return await CollabClient(node.ws_url, ws, hello=True, query=f"user={user}").connect(timeout=WAIT)

    ca, cb = await asyncio.gather(connect(a, "ann"), connect(b, "ben"))
    # Both start from the seeded document (the node that did not seed waited for it).
    for client in (ca, cb):
        assert norm(client.doc.get("config", type=pycrdt.Map).to_py()) == SEED
    gets = [r for r in slow_backend.log_of(ws)["requests"] if r["method"] == "GET"]
    assert len(gets) == 1, gets
    seeded = [e for e in history(a, ws) if e["kind"] == "seeded"]
    assert len(seeded) == 1 and seeded[0]["reason"] == "found"
    # Both nodes write on top of the one seed; the list is not doubled anywhere.
    ca.doc.get("config", type=pycrdt.Map)["name"] = "Orders (a)"
    await ca.wait_saved(WAIT)
    await cb.until(lambda: cb.doc.get("config", type=pycrdt.Map).get("name") == "Orders (a)", WAIT, "a's edit at b")
    assert norm(cb.doc.get("config", type=pycrdt.Map).to_py())["tags"] == ["finance", "pii"]
    await ca.close()
    await cb.close()
