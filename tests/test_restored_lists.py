"""One rule for lists the server writes: a plain JSON value, whether seeded or
restored by a guard, so every peer sees the same type before and after."""

from __future__ import annotations

import pycrdt
import pytest

from collab.client import CollabClient
from rooms.config import to_prelim
from tests.test_js_client import NODE, WAIT, node_clients, norm  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(NODE is None, reason="`node` is not on PATH")

TAGS = ["finance", "pii"]


def test_the_rule():
    prelim = to_prelim({"tags": ["a", {"team": "risk"}], "connection": {"hosts": ["a", "b"]}})
    assert isinstance(prelim, pycrdt.Map)
    doc = pycrdt.Doc()
    doc["config"] = prelim
    cfg = doc.get("config", type=pycrdt.Map)
    assert isinstance(cfg["connection"], pycrdt.Map)
    assert type(cfg["tags"]) is list and type(cfg["connection"]["hosts"]) is list


async def test_a_list_restored_by_a_guard_keeps_its_type_at_every_peer(server, node_clients):  # noqa: F811
    room = "ds-restored-list"
    alice = await CollabClient(server.ws_url, room, hello=True, query="user=alice").connect(timeout=WAIT)
    cfg = alice.doc.get("config", type=pycrdt.Map)
    cfg["tags"] = TAGS  # a plain value, as seeding writes it
    await alice.wait_saved(WAIT)
    bob = await node_clients(server.ws_url, room, "bob")
    observer = await node_clients(server.ws_url, room, "observer")
    first = await bob.command("dump")
    assert first["types"]["tags"] == "array", first
    assert (await alice.acquire_lock("tags"))["type"] == "lock.granted"

    await bob.command("set", map="config", key="tags", value=["mine"])  # under alice's lock: restored
    for node in (bob, observer):
        await node.until(lambda n=node: n.doc["config"].get("tags") == TAGS, WAIT, "tags restored")
    await alice.until(lambda: norm(cfg.to_py()).get("tags") == TAGS, WAIT, "tags at alice")
    late = await CollabClient(server.ws_url, room, query="user=late").connect(timeout=WAIT)
    for node in (bob, observer):
        assert (await node.command("dump"))["types"]["tags"] == "array"
    for client in (alice, late):
        assert type(client.doc.get("config", type=pycrdt.Map)["tags"]) is list
    assert norm(late.doc.get("config", type=pycrdt.Map)["tags"]) == TAGS
    for node in (bob, observer):
        node.assert_clean()
    await alice.close()
    await late.close()
