"""The presence extension without a server: rooms, fake peers, in-process registry.

Rooms, extensions and registries share one ManualClock: coalescing windows,
rate limits and polls move only when a test advances it, so "one diff per
window" and "the limit refills after a quiet spell" are exact.
"""

from __future__ import annotations

import asyncio
import json
import types

import pytest

from clocks import ManualClock
from codec import protocol as p
from collab.auth import Identity, color_for
from collab.extensions import control_handlers
from collab.settings import Settings
from persistence.sqlite import SQLiteDocumentStore
from presence.extension import PresenceExtension
from presence.memory import MemoryBackend, MemoryPresenceRegistry
from rooms.room import Room
from tests.support import eventually

WS = "ds-presence"


class Sink:
    """A peer that records frames."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.closed = None

    def send(self, frame: bytes) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def controls(self, kind: str | None = None) -> list[dict]:
        out = [m.body for m in map(p.decode_message, self.frames) if isinstance(m, p.Control)]
        return [m for m in out if kind is None or m["type"] == kind]

    def awareness(self) -> dict[int, object]:
        states: dict[int, object] = {}
        for m in map(p.decode_message, self.frames):
            if isinstance(m, p.AwarenessMessage):
                for e in m.entries:
                    states[e.client_id] = None if e.state is None else json.loads(e.state)
        return states


def ident(user: str, name: str | None = None) -> Identity:
    return Identity(user_id=user, name=name or user.title(), color=color_for(user))


class Roster:
    """Applies snapshots and diffs as a client would; checks seq continuity."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def current(self) -> dict[str, dict]:
        roster: dict[str, dict] = {}
        seq = None
        for m in self.sink.controls():
            if m["type"] == "presence.snapshot":
                roster = {x["user_id"]: x for x in m["participants"]}
                seq = m["seq"]
            elif m["type"] == "presence.diff":
                assert seq is not None, "a diff before the snapshot"
                assert m["seq"] == seq + 1, "gap in presence seq"
                seq = m["seq"]
                for x in m["joins"] + m["updates"]:
                    roster[x["user_id"]] = x
                for x in m["leaves"]:
                    roster.pop(x["user_id"], None)
        return roster


@pytest.fixture
async def env(tmp_path):
    store = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await store.open()
    made: list[PresenceExtension] = []
    clock = ManualClock()  # one time line for every node of the test

    async def make(coalesce_ms: float = 0.0, rate: float = 40.0, burst: int = 80, backend=None, node="n1"):
        settings = Settings(node_id=node, presence_coalesce_ms=coalesce_ms, awareness_rate=rate, awareness_burst=burst)
        registry = MemoryPresenceRegistry(node, ttl=30, backend=backend, clock=clock)
        ext = PresenceExtension(settings, registry, clock=clock)
        await ext.start(types.SimpleNamespace(authenticator=None))
        made.append(ext)
        room = Room(WS, store, listeners=ext.listeners(), control_handlers=control_handlers([ext]), clock=clock)
        await room.load()
        return ext, room

    yield make
    for ext in made:
        await ext.stop()
    await store.close()


def join(room: Room, user: str, hello: bool = True, name: str | None = None):
    sink = Sink()
    ps = room.join(sink, ident(user, name))
    if hello:
        room.receive(ps, p.Control("hello", {"type": "hello"}))
    return sink, ps


def aware(room: Room, ps, client_id: int, clock: int, state) -> None:
    text = None if state is None else json.dumps(state)
    room.receive(ps, p.AwarenessMessage((p.AwarenessEntry(client_id, clock, text),)))


async def settle(ext: PresenceExtension) -> None:
    """Until every view's refresh task has finished."""
    await eventually(lambda: all(v.task is None and not v.dirty for v in ext.views.values()), 5, 0.005, "refresh")


async def test_snapshot_on_hello_then_diffs_for_joins_updates_and_leaves(env):
    ext, room = await env()
    a, ps_a = join(room, "alice")
    await settle(ext)
    snap = a.controls("presence.snapshot")
    assert len(snap) == 1 and [x["user_id"] for x in snap[0]["participants"]] == ["alice"]
    alice = snap[0]["participants"][0]
    assert alice["name"] == "Alice" and alice["connections"] == 1 and alice["node"] == "n1"
    assert alice["editing"] is None and alice["locks"] == []

    b, ps_b = join(room, "bob")
    await settle(ext)
    assert [x["user_id"] for x in b.controls("presence.snapshot")[0]["participants"]] == ["alice", "bob"]
    assert Roster(a).current().keys() == {"alice", "bob"}
    diff = a.controls("presence.diff")[-1]
    assert [x["user_id"] for x in diff["joins"]] == ["bob"] and diff["leaves"] == diff["updates"] == []

    aware(room, ps_b, 22, 1, {"focus": "connection.host", "cursor": 3})
    await settle(ext)
    assert Roster(a).current()["bob"]["editing"] == "connection.host"
    assert a.controls("presence.diff")[-1]["updates"][0]["editing"] == "connection.host"

    room.leave(b)
    await settle(ext)
    assert Roster(a).current().keys() == {"alice"}
    assert [x["user_id"] for x in a.controls("presence.diff")[-1]["leaves"]] == ["bob"]


async def test_peers_without_hello_get_no_control_messages_but_are_participants(env):
    ext, room = await env()
    a, _ = join(room, "alice")
    quiet, _ = join(room, "stock", hello=False)
    await settle(ext)
    assert quiet.controls() == []
    assert Roster(a).current().keys() == {"alice", "stock"}


async def test_two_tabs_are_one_participant(env):
    ext, room = await env()
    watcher, _ = join(room, "watcher")
    tab1, ps1 = join(room, "alice")
    tab2, ps2 = join(room, "alice")
    aware(room, ps2, 2, 1, {"focus": "schedule.cron"})
    await settle(ext)
    alice = Roster(watcher).current()["alice"]
    assert alice["connections"] == 2 and alice["editing"] == "schedule.cron"
    room.leave(tab2)
    await settle(ext)
    alice = Roster(watcher).current()["alice"]
    assert alice["connections"] == 1 and alice["editing"] is None
    room.leave(tab1)
    await settle(ext)
    assert "alice" not in Roster(watcher).current()


async def test_a_burst_of_awareness_changes_becomes_one_diff(env):
    ext, room = await env(coalesce_ms=200)
    clock = ext.clock
    a, _ = join(room, "alice")
    b, ps_b = join(room, "bob")
    await settle(ext)
    await clock.advance(1.0)  # a quiet spell: the next change opens a new window
    before = len(a.controls("presence.diff"))
    for i in range(50):
        aware(room, ps_b, 22, i + 1, {"focus": f"field{i}"})
        await asyncio.sleep(0)  # separate loop turns, as frames from a socket would be
    await clock.settle()
    # The leading edge went out at once; everything after it waits for the window's end.
    diffs = a.controls("presence.diff")[before:]
    assert len(diffs) == 1 and Roster(a).current()["bob"]["editing"] == "field0"
    await clock.advance(0.199)
    assert len(a.controls("presence.diff")) == before + 1
    await clock.advance(0.001)
    await settle(ext)
    diffs = a.controls("presence.diff")[before:]
    assert len(diffs) == 2  # then everything else, merged into one
    assert Roster(a).current()["bob"]["editing"] == "field49"


async def test_a_renewed_identical_state_is_not_activity(env):
    ext, room = await env()
    a, _ = join(room, "alice")
    b, ps_b = join(room, "bob")
    aware(room, ps_b, 22, 1, {"focus": "x"})
    await settle(ext)
    count = len(a.controls())
    for clock in range(2, 6):
        aware(room, ps_b, 22, clock, {"focus": "x"})  # the stock client's 15 s renewal
    await settle(ext)
    assert a.controls("presence.diff")[count:] == []


async def test_locks_changed_hook_fills_participants_locks(env):
    ext, room = await env()
    a, _ = join(room, "alice")
    join(room, "bob")
    await settle(ext)
    room.notify(
        "on_locks_changed",
        [
            {"path": "connection.host", "user_id": "bob", "holder": "n1/2", "fence": 1, "expires_at": None},
            {"path": "connection.port", "user_id": "bob", "holder": "n1/2", "fence": 2, "expires_at": 9e12},
            {"path": "schedule.cron", "user_id": "alice", "holder": "n1/1", "fence": 3, "expires_at": 1.0},  # expired
        ],
    )
    await settle(ext)
    roster = Roster(a).current()
    assert roster["bob"]["locks"] == ["connection.host", "connection.port"]
    assert roster["alice"]["locks"] == []
    room.notify("on_locks_changed", [])
    await settle(ext)
    assert Roster(a).current()["bob"]["locks"] == []


async def test_user_field_is_stamped_from_the_identity(env):
    ext, room = await env()
    watcher, _ = join(room, "watcher")
    mallory, ps_m = join(room, "mallory", name="Mallory")
    aware(room, ps_m, 66, 1, {"user": {"name": "Alice", "color": "#000", "colorLight": "#eee"}, "focus": "a"})
    await settle(ext)
    room.flush()
    state = watcher.awareness()[66]
    # id and role are stamped, and the name the authenticator vouches for; the
    # colour is only derived from the id, so the client's own stays.
    expected = {"id": "mallory", "name": "Mallory", "color": "#000", "role": "editor", "colorLight": "#eee"}
    assert state["user"] == expected
    assert "color" not in join(room, "x")[1].identity.vouched and color_for("mallory") != "#000"
    # Claiming another user is refused with an error, and nothing is relayed.
    aware(room, ps_m, 66, 2, {"user": {"id": "alice", "name": "Alice"}, "focus": "b"})
    room.flush()
    errors = mallory.controls("error")
    assert errors[-1]["code"] == "awareness_user_mismatch" and "alice" in errors[-1]["message"]
    assert watcher.awareness()[66]["focus"] == "a"


async def test_malformed_states_are_refused_with_an_error(env):
    ext, room = await env()
    a, ps_a = join(room, "alice")
    for bad in ([1, 2], "text", {"focus": 7}, {"focus": "x" * 300}):
        aware(room, ps_a, 11, 1, bad)
    codes = [e["code"] for e in a.controls("error")]
    assert codes == ["awareness_malformed"] * 4
    assert 11 not in room.awareness
    assert not a.closed


async def test_claiming_another_connections_client_id_is_refused(env):
    ext, room = await env()
    a, ps_a = join(room, "alice")
    m, ps_m = join(room, "mallory")
    aware(room, ps_a, 1001, 5, {"focus": "mine"})
    aware(room, ps_m, 1001, 5, {"focus": "mine"})  # an echo (same clock): silently ignored
    assert m.controls("error") == []
    aware(room, ps_m, 1001, 6, {"focus": "stolen"})  # a newer clock: a claim
    aware(room, ps_m, 1001, 7, None)
    assert [e["code"] for e in m.controls("error")] == ["awareness_client_id_taken"] * 2
    assert room.awareness[1001].owner is ps_a and json.loads(room.awareness[1001].state)["focus"] == "mine"


async def test_awareness_flood_is_rate_limited_with_one_error(env):
    ext, room = await env(rate=10, burst=5)
    watcher, _ = join(room, "watcher")
    f, ps_f = join(room, "flooder")
    await settle(ext)
    for clock in range(1, 201):
        aware(room, ps_f, 5, clock, {"focus": f"f{clock}"})
    errors = f.controls("error")
    assert [e["code"] for e in errors] == ["awareness_rate_limited"]
    assert room.awareness[5].clock == 5  # the first `burst` states were accepted
    await settle(ext)
    assert Roster(watcher).current()["flooder"]["editing"] == "f5"
    assert not f.closed
    # 10 per second refill: 0.1 s later exactly one more state gets through, silently.
    await ext.clock.advance(0.1)
    aware(room, ps_f, 5, 201, {"focus": "f201"})
    aware(room, ps_f, 5, 202, {"focus": "f202"})
    assert room.awareness[5].clock == 201 and len(f.controls("error")) == 1
    # Quiet long enough to refill the burst: the next flood is reported again.
    await ext.clock.advance(0.5)
    for clock in range(203, 210):
        aware(room, ps_f, 5, clock, {"focus": f"f{clock}"})
    assert room.awareness[5].clock == 207
    assert [e["code"] for e in f.controls("error")] == ["awareness_rate_limited"] * 2


async def test_changes_from_another_node_reach_this_nodes_peers(env):
    backend = MemoryBackend()
    ext1, room1 = await env(backend=backend, node="n1")
    ext2, room2 = await env(backend=backend, node="n2")
    a, _ = join(room1, "alice")
    await settle(ext1)
    b, ps_b = join(room2, "bob")
    await settle(ext2)
    await settle(ext1)
    assert Roster(a).current().keys() == {"alice", "bob"}
    assert Roster(a).current()["bob"]["node"] == "n2"
    assert Roster(b).current().keys() == {"alice", "bob"}
    room2.leave(b)
    await settle(ext2)
    await settle(ext1)
    assert Roster(a).current().keys() == {"alice"}


async def test_presence_get_answers_with_a_snapshot(env):
    ext, room = await env()
    a, ps_a = join(room, "alice")
    await settle(ext)
    room.receive(ps_a, p.Control("presence.get", {"type": "presence.get", "id": 9}))
    answer = a.controls("presence.snapshot")[-1]
    assert answer["id"] == 9 and [x["user_id"] for x in answer["participants"]] == ["alice"]
