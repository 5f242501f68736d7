"""The lock extension inside a Room, without a server: the hooks other features
rely on (``on_locks_changed`` for presence, ``fence_for`` for forwarding), and
lease timing driven by a ManualClock shared by the room, the extension and the
lease manager -- a 30 s lease is renewed, kept and lapses at exact instants,
however loaded the machine is."""

from __future__ import annotations

from types import SimpleNamespace

import pycrdt

from clocks import ManualClock
from codec import protocol as p
from collab.auth import Identity
from collab.extensions import control_handlers
from collab.settings import Settings
from locks.extension import LockExtension
from locks.memory import MemoryLeaseManager
from persistence.sqlite import SQLiteDocumentStore
from rooms.room import Room
from tests.fakes import eventually, identity


class Sink:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        pass

    def controls(self, kind: str | None = None) -> list[dict]:
        out = [m.body for m in map(p.decode_message, self.frames) if isinstance(m, p.Control)]
        return [m for m in out if kind is None or m["type"] == kind]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[dict]] = []

    def on_locks_changed(self, room, locks) -> None:
        self.calls.append(locks)


async def until(predicate, timeout: float = 5.0) -> None:
    await eventually(predicate, timeout, interval=0.005)


TTL = 30.0


async def test_hooks_for_presence_and_forwarding(tmp_path):
    store = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await store.open()
    clock = ManualClock()
    ext = LockExtension(Settings(lock_ttl_seconds=TTL), manager=MemoryLeaseManager(clock=clock), clock=clock)
    await ext.start(SimpleNamespace(store=store))
    recorder = Recorder()
    room = Room(
        "ws-ext",
        store,
        control_handlers=control_handlers([ext]),
        guards=ext.guards(),
        listeners=[*ext.listeners(), recorder],
        clock=clock,
    )
    await room.load()
    alice_sink, bob_sink, stock_sink = Sink(), Sink(), Sink()
    alice = room.join(alice_sink, identity("alice"))
    bob = room.join(bob_sink, identity("bob"))
    room.join(stock_sink, identity("carol"))  # never says hello
    for ps in (alice, bob):
        room.receive(ps, p.Control("hello", {"type": "hello"}))

    room.receive(alice, p.Control("lock.acquire", {"type": "lock.acquire", "path": "connection", "id": 1}))
    await until(lambda: alice_sink.controls("lock.granted"))
    granted = alice_sink.controls("lock.granted")[0]
    assert recorder.calls[-1] == [
        {
            "path": "connection",
            "holder": granted["holder"],
            "user_id": "alice",
            "name": "Alice",
            "fence": granted["fence"],
            "expires_at": granted["expires_at"],
        }
    ]
    assert bob_sink.controls("lock.acquired")[0]["holder"] == granted["holder"]
    assert stock_sink.controls() == []
    assert ext.fence_for(room, alice, ["connection.host"]) == granted["fence"]
    assert ext.fence_for(room, alice, ["schedule.cron"]) is None
    assert ext.fence_for(room, bob, ["connection.host"]) is None

    # Bob's edit under Alice's lock: rejected with who holds it, compensated.
    doc = pycrdt.Doc()
    doc.get("config", type=pycrdt.Map)["connection"] = pycrdt.Map({"host": "x"})
    room.receive(bob, p.SyncUpdate(doc.get_update()))
    rejected = bob_sink.controls("rejected")[0]
    assert rejected["paths"] == ["connection.host"] and rejected["holder"] == granted["holder"]
    assert rejected["user_id"] == "alice" and rejected["path"] == "connection"
    # (The room's generic compensation removes the locked leaf; the empty parent map
    # that came with it stays -- see rooms/config.py.)
    assert "host" not in (room.doc.get("config", type=pycrdt.Map).to_py() or {}).get("connection", {})

    assert granted["expires_at"] == clock.now() + TTL

    # While Alice talks, her lease is renewed (every TTL/3) and outlives its first TTL many times over.
    for _ in range(12):
        await clock.advance(TTL / 6)
        room.receive(alice, p.Control("ping", {"type": "ping"}))
    assert ext.fence_for(room, alice, ["connection"]) == granted["fence"]
    assert bob_sink.controls("lock.expired") == [] and ext.stats["renewed"] >= 5
    # Alice goes silent: the lease lapses exactly TTL after her last message, not a moment later.
    await clock.advance(TTL - 0.01)
    assert bob_sink.controls("lock.expired") == [] and recorder.calls[-1] != []
    await clock.advance(0.02)
    expired = bob_sink.controls("lock.expired")
    assert [(m["path"], m["fence"]) for m in expired] == [("connection", granted["fence"])]
    assert recorder.calls[-1] == []
    assert ext.fence_for(room, alice, ["connection"]) is None
    await ext.stop()
    await room.drain()
    await store.close()


async def test_forced_release_stops_renewal_and_is_told_once(tmp_path):
    store = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await store.open()
    clock = ManualClock()
    ext = LockExtension(Settings(lock_ttl_seconds=TTL), manager=MemoryLeaseManager(clock=clock), clock=clock)
    await ext.start(SimpleNamespace(store=store))
    room = Room(
        "ws-force",
        store,
        control_handlers=control_handlers([ext]),
        guards=ext.guards(),
        listeners=ext.listeners(),
        clock=clock,
    )
    await room.load()
    alice_sink, admin_sink = Sink(), Sink()
    alice = room.join(alice_sink, identity("alice"))
    admin = room.join(admin_sink, Identity(user_id="root", name="Root", color="#000000", role="admin"))
    for ps in (alice, admin):
        room.receive(ps, p.Control("hello", {"type": "hello"}))
    room.receive(alice, p.Control("lock.acquire", {"type": "lock.acquire", "path": "tags"}))
    await until(lambda: alice_sink.controls("lock.granted"))
    room.receive(admin, p.Control("lock.force_release", {"type": "lock.force_release", "path": "tags", "id": 1}))
    await until(lambda: admin_sink.controls("lock.release.ok"))
    assert ext.fence_for(room, alice, ["tags"]) is None  # at once, not at the next renewal
    # Alice keeps talking (so she is alive) past several renewal periods and TTLs.
    for _ in range(8):
        room.receive(alice, p.Control("ping", {"type": "ping"}))
        await clock.advance(TTL / 2)
    assert ext.stats["renewed"] == 0  # the renewal task ended with the forced release
    ends = [m for m in alice_sink.controls() if m["type"] in ("lock.released", "lock.lost", "lock.expired")]
    assert [(m["type"], m.get("reason")) for m in ends] == [("lock.released", "forced")]
    assert ext.fence_for(room, alice, ["tags"]) is None
    await ext.stop()
    await room.drain()
    await store.close()


async def test_readiness_reports_the_lock_backend_but_never_fails_on_it(redis_factory):
    """/readyz shows the lock backend's state (a real Redis, then nothing on that port) and stays ready."""
    from locks.redis import RedisLeaseManager

    redis = redis_factory()
    manager = RedisLeaseManager(redis.url, timeout=0.5)
    await manager.start()
    ext = LockExtension(Settings(), manager=manager)
    try:
        assert await ext.check() == "ok"
        redis.stop()
        report = await ext.check()
        assert report.startswith("unavailable, not required: ")
    finally:
        await manager.close()
