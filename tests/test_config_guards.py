"""Guards and compensation on the `config` map, without a server."""

from __future__ import annotations

import asyncio

import pycrdt

from codec import protocol as p
from persistence.sqlite import SQLiteDocumentStore
from rooms.config import MISSING, Rejection, covers, diff, overlaps
from rooms.room import Room


class Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed = None

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def controls(self) -> list[dict]:
        return [m.body for m in map(p.decode_message, self.frames) if isinstance(m, p.Control)]


class FreezeHost:
    """Rejects any change under connection.host."""

    def check(self, room, peer, changes, config):
        bad = [path for path in changes if overlaps("connection.host", path)]
        return [Rejection(bad, "locked", {"holder": "alice"})] if bad else []


def test_diff_reports_leaves():
    old = {"a": 1, "c": {"d": 1, "e": 2}}
    new = {"a": 2, "b": 3, "c": {"d": 1}}
    assert diff(old, new) == {"a": (1, 2), "b": (MISSING, 3), "c.e": (2, MISSING)}
    assert covers("connection", "connection.host") and not covers("connection", "connections")


async def test_rejected_path_is_compensated_for_everyone(tmp_path):
    store = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await store.open()
    changes_seen = []

    class Audit:
        def on_config_change(self, room, peer, changes, config):
            changes_seen.append(changes)

    room = Room("ws-1", store, guards=[FreezeHost()], listeners=[Audit()])
    await room.load()
    author, other = Sink(), Sink()
    ps = room.join(author)
    room.join(other)
    room.receive(ps, p.Control("hello", {"type": "hello"}))

    # The author's doc: host and port set in one update.
    client = pycrdt.Doc()
    cfg = client.get("config", type=pycrdt.Map)
    cfg["connection"] = pycrdt.Map({"host": "a", "port": 1})
    room.receive(ps, p.SyncUpdate(client.get_update()))
    await room.drain()
    # The whole `connection` map was new, so host "a" was refused: host is absent.
    assert room.doc.get("config", type=pycrdt.Map).to_py() == {"connection": {"port": 1.0}}
    rejected = [c for c in author.controls() if c["type"] == "rejected"]
    assert rejected and rejected[0]["paths"] == ["connection.host"] and rejected[0]["holder"] == "alice"
    assert changes_seen == [{"connection.port": (MISSING, 1.0)}]

    # Both peers converge on the compensated state by applying what they received.
    for sink in (author, other):
        mirror = pycrdt.Doc()
        for m in map(p.decode_message, sink.frames):
            if isinstance(m, p.SyncUpdate):
                mirror.apply_update(m.update)
        if sink is author:
            mirror.apply_update(client.get_update())
        assert mirror.get("config", type=pycrdt.Map).to_py() == {"connection": {"port": 1.0}}

    # The compensation is durable: a fresh room from the store has it.
    await room.drain()
    fresh = Room("ws-1", store)
    await fresh.load()
    assert fresh.doc.get("config", type=pycrdt.Map).to_py() == {"connection": {"port": 1.0}}
    await store.close()
    await asyncio.sleep(0)
