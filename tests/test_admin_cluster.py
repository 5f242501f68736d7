"""The admin API across nodes: two `collab serve` nodes share one redis-server
(started here); each answers for the whole deployment and says which node
holds which room, participant and lock. A node killed with -9 leaves the
answers once its summary's TTL ran out.
"""

from __future__ import annotations

import httpx

from collab.client import CollabClient
from tests.presence_support import close_all
from tests.support import eventually
from tests.test_scaleout import node_env

WAIT = 20.0
ADMIN = "user=ops&role=admin"


def get(node, path: str) -> dict:
    return httpx.get(f"{node.http_url}{path}?{ADMIN}", timeout=5).json()


def cluster_rooms(node) -> dict[str, dict[str, list[str]]]:
    """workspace -> node -> users, as ``node`` reports it for the whole deployment."""
    cluster = get(node, "/api/admin/rooms")["cluster"]
    return {r["workspace"]: {n["node"]: n["users"] for n in r["nodes"]} for r in cluster["rooms"]}


async def test_every_node_answers_for_all_nodes_and_says_who_holds_what(server_factory, redis_factory):
    redis = redis_factory()
    a, b = (server_factory(node_env(redis, n, COLLAB_NODE_SUMMARY_SECONDS="0.3"), name=n) for n in ("a", "b"))
    ann = await CollabClient(a.ws_url, "ds-adm-1", hello=True, query="user=ann").connect(timeout=WAIT)
    ben = await CollabClient(b.ws_url, "ds-adm-1", hello=True, query="user=ben").connect(timeout=WAIT)
    cat = await CollabClient(b.ws_url, "ds-adm-2", hello=True, query="user=cat").connect(timeout=WAIT)
    ann.keepalive(0.5)
    granted = await ann.acquire_lock("name", ttl=10)
    assert granted["type"] == "lock.granted", granted
    want = {"ds-adm-1": {"a": ["ann"], "b": ["ben"]}, "ds-adm-2": {"b": ["cat"]}}
    for node in (a, b):
        await eventually(lambda node=node: cluster_rooms(node) == want, WAIT, 0.1, "cluster-wide room list")
        assert get(node, "/api/admin/rooms")["node"] == node.env["COLLAB_NODE_ID"]

    def room_nodes(node) -> dict:
        body = get(node, "/api/admin/rooms/ds-adm-1")
        return {n["node"]: (n["users"], [lock["path"] for lock in n["locks"]]) for n in body["nodes"]}

    # Asked on b, about a room that a holds a lock in: a's lock, with its node.
    await eventually(
        lambda: room_nodes(b) == {"a": (["ann"], ["name"]), "b": (["ben"], [])}, WAIT, 0.1, "room nodes"
    )
    body = get(b, "/api/admin/rooms/ds-adm-1")
    assert [(lock["path"], lock["node"], lock["user_id"]) for lock in body["locks"]] == [("name", "a", "ann")]
    where = {p["user_id"]: p["node"] for p in body["participants"]}
    assert where == {"ann": "a", "ben": "b"}

    b.kill()  # no goodbye: its summary expires
    await eventually(
        lambda: cluster_rooms(a) == {"ds-adm-1": {"a": ["ann"]}}, WAIT, 0.1, "the dead node leaves the answers"
    )
    await close_all(ann, ben, cat)
