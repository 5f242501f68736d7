"""The relay's live channel: two relays (two "nodes") in one process over a real redis-server.

Rooms are real (`rooms.room.Room` on `RedisDocumentStore`), peers are the
recording fakes; only the app around the relay is a stand-in (the relay asks
it which rooms are still open).
"""

from __future__ import annotations

from types import SimpleNamespace

import pycrdt
import pytest
import redis as redis_lib

from codec import protocol as p
from persistence.redis import RedisDocumentStore
from rooms.room import Room
from scaleout.relay import Relay, decode_live, encode_live
from tests.fakes import FakePeer
from tests.support import eventually

WAIT = 10.0


class Node:
    def __init__(self, url: str, name: str, live: bool = True, wire: bool = True) -> None:
        self.store = RedisDocumentStore(url, name, timeout=2.0)
        self.relay = Relay(self.store, name, block_ms=200, timeout=2.0, live=live, wire=wire)
        self.app = SimpleNamespace(rooms=SimpleNamespace(rooms={}, loading=set()))

    async def start(self) -> Node:
        await self.store.open()
        await self.relay.start(self.app)  # type: ignore[arg-type]
        return self

    async def open(self, ws: str) -> tuple[Room, FakePeer]:
        room = Room(ws, self.store)
        await room.load()
        self.app.rooms.rooms[ws] = room
        self.relay.attach(room)
        peer = FakePeer(f"{self.store.node_id}-peer")
        room.join(peer)
        return room, peer

    async def stop(self) -> None:
        await self.relay.stop()
        await self.store.close()


def edit(room: Room, peer_state, client: pycrdt.Doc, key: str, value: int) -> None:
    updates: list[bytes] = []
    sub = client.observe(lambda e: updates.append(e.update))
    client.get("items", type=pycrdt.Map)[key] = value
    client.unobserve(sub)
    room.receive(peer_state, p.SyncUpdate(updates[0]))


def items(room: Room) -> dict:
    return room.doc.get("items", type=pycrdt.Map).to_py() or {}


def test_live_messages_round_trip():
    updates = [b"\x01\x02", b"", bytes(range(256)) * 3]
    node, decoded = decode_live(encode_live("node-é", updates))
    assert node == "node-é".encode() and decoded == updates


@pytest.mark.parametrize("wire", [False, True], ids=["redis-py", "wire"])
async def test_updates_go_live_and_the_stream_only_confirms_them(redis_server, wire):
    a = await Node(redis_server.url, "a", wire=wire).start()
    b = await Node(redis_server.url, "b", wire=wire).start()
    try:
        ws = "ds-live"
        room_a, _ = await a.open(ws)
        room_b, peer_b = await b.open(ws)
        await eventually(lambda: b.relay.live_connected, WAIT, what="b subscribed")
        r = redis_lib.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
        channel = f"collab:ws:{{{ws}}}:live"
        # Redis has the subscription (a message published before it is lost: the stream brings it).
        await eventually(lambda: r.pubsub_numsub(channel)[0][1] == 2, WAIT, what="both subscriptions in effect")
        r.close()
        writer = FakePeer("writer")
        ps = room_a.join(writer)
        client = pycrdt.Doc()
        for i in range(20):
            edit(room_a, ps, client, f"k{i}", i)
            await room_a.drain()
        await eventually(lambda: len(items(room_b)) == 20, WAIT, what="b has every update")
        # Each came live first; the stream then only moved b's sequence on (no second apply).
        await eventually(lambda: room_b.durable_seq == room_a.durable_seq, WAIT, what="b's seq follows the stream")
        stats = b.relay.stats
        # Each update applied once: live (its stream entry then skipped), or by the stream when that was
        # faster (its live message then dropped); live must win most of the time.
        await eventually(lambda: stats["live_late"] == stats["relayed_updates"], WAIT, what="late live messages")
        assert stats["live_updates"] + stats["relayed_updates"] == 20
        assert stats["live_skipped"] == stats["live_updates"] >= 1
        follow = b.relay.follows[ws]
        assert not follow.seen and not follow.streamed  # nothing left waiting for its twin
        # b's peer got every value (relayed updates are broadcast like local ones).
        got = pycrdt.Doc()
        for m in peer_b.messages():
            if isinstance(m, p.SyncUpdate | p.SyncStep2):
                got.apply_update(m.update)
        assert got.get("items", type=pycrdt.Map).to_py() == items(room_a)
        # a never applies its own live messages.
        assert a.relay.stats["live_updates"] == 0
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("wire", [False, True], ids=["redis-py", "wire"])
async def test_lost_live_messages_come_through_the_stream(redis_server, wire):
    """The live path is best effort: a node that publishes nothing, and a subscriber cut off, lose nothing."""
    a = await Node(redis_server.url, "a", live=False).start()  # never publishes
    b = await Node(redis_server.url, "b", wire=wire).start()
    r = redis_lib.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    try:
        ws = "ds-stream"
        room_a, _ = await a.open(ws)
        room_b, _ = await b.open(ws)
        ps = room_a.join(FakePeer("writer"))
        client = pycrdt.Doc()
        for i in range(10):
            edit(room_a, ps, client, f"k{i}", i)
            await room_a.drain()
            if i == 4:
                r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # b's subscription drops mid-run
        await eventually(lambda: len(items(room_b)) == 10, WAIT, what="b has every update")
        assert b.relay.stats["relayed_updates"] == 10 and b.relay.stats["live_updates"] == 0
        # b's live reader reconnects by itself.
        await eventually(lambda: r.pubsub_numsub(f"collab:ws:{{{ws}}}:live")[0][1] == 1, WAIT, what="resubscribed")
    finally:
        r.close()
        await a.stop()
        await b.stop()


async def test_closed_rooms_are_unsubscribed(redis_server):
    b = await Node(redis_server.url, "b").start()
    r = redis_lib.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    try:
        ws = "ds-leave"
        channel = f"collab:ws:{{{ws}}}:live"
        await b.open(ws)
        await eventually(lambda: r.pubsub_numsub(channel)[0][1] == 1, WAIT, what="subscribed")
        del b.app.rooms.rooms[ws]  # evicted
        b.relay._wake.set()
        await eventually(lambda: r.pubsub_numsub(channel)[0][1] == 0, WAIT, what="unsubscribed")
    finally:
        r.close()
        await b.stop()
