"""Room unit tests: no server, no sockets.

A Room only needs peers with ``send(frame)`` and ``close(code, reason)``, so
fake peers record frames and the tests decode them with the real codec. The
store is a real SQLiteDocumentStore in a temporary directory.
"""

from __future__ import annotations

import asyncio
import json

import pycrdt
import pytest

from codec import protocol as p
from persistence.sqlite import SQLiteDocumentStore
from rooms.room import Room, RoomTuning
from tests import fakes
from tests.fakes import FakePeer, settle

WS = "ds-1"


# ------------------------------------------------------------------ helpers


class Client:
    """A pycrdt document standing in for a Yjs client; each edit yields one update."""

    def __init__(self, client_id: int | None = None) -> None:
        self.doc = pycrdt.Doc(client_id=client_id)
        self.updates: list[bytes] = []
        self.doc.observe(lambda event: self.updates.append(event.update))
        self.config = self.doc.get("config", type=pycrdt.Map)
        self.text = self.doc.get("notes", type=pycrdt.Text)

    def set(self, key: str, value) -> bytes:
        self.config[key] = value
        return self.updates[-1]


def send(room: Room, ps, message: p.Message) -> None:
    """Pass a message through the real codec, as the connection layer does."""
    room.receive(ps, p.decode_message(p.encode_message(message)))


def content(doc: pycrdt.Doc) -> tuple[dict, str]:
    return doc.get("config", type=pycrdt.Map).to_py() or {}, str(doc.get("notes", type=pycrdt.Text))


def replay(updates: list[bytes]) -> pycrdt.Doc:
    doc = pycrdt.Doc()
    for update in updates:
        doc.apply_update(update)
    return doc


def only(messages: list[p.Message], kind: type) -> list:
    return [m for m in messages if isinstance(m, kind)]


def controls(messages: list[p.Message], type_: str | None = None) -> list[dict]:
    return [m.body for m in messages if isinstance(m, p.Control) and (type_ is None or m.type == type_)]


def entry(client_id: int, clock: int, state) -> p.AwarenessEntry:
    return p.AwarenessEntry(client_id, clock, None if state is None else json.dumps(state, ensure_ascii=False))


def awareness(*entries: p.AwarenessEntry) -> p.AwarenessMessage:
    return p.AwarenessMessage(tuple(entries))


async def open_room(store, **tuning) -> Room:
    return await fakes.open_room(store, WS, **tuning)


def hello(room: Room, ps, peer: FakePeer) -> dict:
    send(room, ps, p.Control("hello", {"type": "hello", "id": "h1"}))
    (welcome,) = controls(peer.take(), "welcome")
    return welcome


@pytest.fixture
async def store(tmp_path):
    s = SQLiteDocumentStore(tmp_path / "rooms.db", synchronous="NORMAL")
    await s.open()
    yield s
    await s.close()


class GatedStore:
    """Holds appends until ``gate`` opens; counts updates committed by the inner store."""

    def __init__(self, inner: SQLiteDocumentStore) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.committed = 0
        self.appends_started = 0

    async def append(self, workspace_id: str, updates: list[bytes]) -> int:
        self.appends_started += 1
        await self.gate.wait()
        seq = await self.inner.append(workspace_id, updates)
        self.committed += len(updates)
        return seq

    def __getattr__(self, name):
        return getattr(self.inner, name)


# ---------------------------------------------------------------- joining


async def test_join_sends_step1_and_known_awareness(store):
    room = await open_room(store)
    a = FakePeer("a")
    ps_a = room.join(a)
    assert a.take() == [p.SyncStep1(b"\x00")]  # empty document, no awareness yet

    writer = Client()
    send(room, ps_a, p.SyncUpdate(writer.set("host", "db.internal")))
    send(room, ps_a, awareness(entry(11, 3, {"user": "José"})))
    await settle(room)
    a.take()

    b = FakePeer("b")
    ps_b = room.join(b)
    step1, aware = b.take()
    assert step1 == p.SyncStep1(room.doc.get_state())
    assert p.read_var_uint(step1.state_vector, 0)[0] == 1  # one client's structs known
    assert aware == awareness(entry(11, 3, {"user": "José"}))

    # Answering b's own step 1 (an empty client) sends the whole document.
    send(room, ps_b, p.SyncStep1(pycrdt.Doc().get_state()))
    (step2,) = b.take()
    assert isinstance(step2, p.SyncStep2)
    assert content(replay([step2.update]))[0] == {"host": "db.internal"}
    assert a.frames == []  # a step 2 is only for the one who asked


async def test_query_awareness_returns_live_states_only(store):
    room = await open_room(store)
    a, b = FakePeer("a"), FakePeer("b")
    ps_a, ps_b = room.join(a), room.join(b)
    send(room, ps_a, awareness(entry(1, 1, {"n": 1}), entry(2, 1, {"n": 2})))
    send(room, ps_a, awareness(entry(2, 2, None)))
    await settle(room)
    b.take()
    send(room, ps_b, p.QueryAwareness())
    assert b.take() == [awareness(entry(1, 1, {"n": 1}))]


# ---------------------------------------------------------------- updates


async def test_update_is_applied_and_broadcast_to_everyone_including_sender(store):
    room = await open_room(store)
    a, b = FakePeer("a"), FakePeer("b")
    ps_a = room.join(a)
    room.join(b)
    a.take(), b.take()

    writer = Client()
    send(room, ps_a, p.SyncUpdate(writer.set("host", "db.internal")))
    assert content(room.doc)[0] == {"host": "db.internal"}  # applied at once
    assert a.frames == [] and b.frames == []  # broadcast waits for the flush
    await settle(room)
    for peer in (a, b):
        (update,) = peer.take()
        assert isinstance(update, p.SyncUpdate)
        assert content(replay([update.update]))[0] == {"host": "db.internal"}


async def test_updates_of_one_loop_turn_are_merged_into_one_frame_per_peer(store):
    room = await open_room(store)
    peers = [FakePeer(n) for n in "abc"]
    states = [room.join(peer) for peer in peers]
    for peer in peers:
        peer.take()
    writers = [Client(), Client()]

    # Five updates from two peers, no await in between: one loop turn.
    send(room, states[0], p.SyncUpdate(writers[0].set("a", 1)))
    send(room, states[1], p.SyncUpdate(writers[1].set("b", 2)))
    send(room, states[0], p.SyncUpdate(writers[0].set("c", 3)))
    writers[1].text.insert(0, "hello")
    send(room, states[1], p.SyncStep2(writers[1].updates[-1]))
    send(room, states[0], p.SyncUpdate(writers[0].set("a", 4)))
    assert all(peer.frames == [] for peer in peers)
    await asyncio.sleep(0)  # the flush was queued with call_soon: one turn is enough

    for peer in peers:
        (update,) = peer.take()
        assert isinstance(update, p.SyncUpdate)
        assert content(replay([update.update])) == ({"a": 4, "b": 2, "c": 3}, "hello")

    # A later turn gets its own frame.
    send(room, states[2], p.SyncUpdate(Client().set("d", 5)))
    await settle(room)
    for peer in peers:
        (update,) = peer.take()
        assert content(replay([update.update]))[0] == {"d": 5}
    assert room.stats["updates_in"] == 6


async def test_saved_ack_only_for_hello_peers_and_only_after_the_store_has_it(store):
    gated = GatedStore(store)
    room = Room(WS, gated, RoomTuning())
    await room.load()
    seen_at_ack: list[int] = []

    def on_send(peer, message):
        if isinstance(message, p.Control) and message.type == "saved":
            seen_at_ack.append(gated.committed)

    a, b = FakePeer("a", on_send), FakePeer("b", on_send)
    ps_a, ps_b = room.join(a), room.join(b)
    welcome = hello(room, ps_a, a)
    assert welcome["workspace"] == WS and welcome["id"] == "h1" and welcome["saved_seq"] == 0
    a.take(), b.take()

    writer_a, writer_b = Client(), Client()
    for i in range(3):
        send(room, ps_a, p.SyncUpdate(writer_a.set(f"a{i}", i)))
    send(room, ps_b, p.SyncUpdate(writer_b.set("b", "x")))
    await asyncio.sleep(0)
    assert len(only(a.messages(), p.SyncUpdate)) == 1  # the broadcast does not wait for the store
    for _ in range(5):
        await asyncio.sleep(0)
    assert gated.appends_started == 1  # one append for the whole flush
    assert controls(a.messages(), "saved") == []  # not durable yet: no ack

    gated.gate.set()
    await settle(room)
    (saved,) = controls(a.take(), "saved")
    assert saved["updates"] == 3 and saved["seq"] == 4 == room.durable_seq
    assert seen_at_ack == [4]  # sent only once the store had committed all four updates
    assert controls(b.take()) == []  # b never said hello: no control messages at all

    # The store really has them: a fresh room on the same store sees every edit.
    reloaded = await open_room(store)
    assert content(reloaded.doc)[0] == {"a0": 0, "a1": 1, "a2": 2, "b": "x"}

    # The count is cumulative per peer.
    send(room, ps_a, p.SyncUpdate(writer_a.set("a3", 3)))
    await settle(room)
    (saved,) = controls(a.take(), "saved")
    assert saved["updates"] == 4 and saved["seq"] == 5


async def test_invalid_crdt_update_is_refused_and_leaves_the_doc_unchanged(store):
    room = await open_room(store)
    a, b = FakePeer("a"), FakePeer("b")
    ps_a = room.join(a)
    room.join(b)
    writer = Client()
    send(room, ps_a, p.SyncUpdate(writer.set("host", "db.internal")))
    await settle(room)
    a.take(), b.take()
    before_state, before_content = room.doc.get_state(), content(room.doc)

    writer.text.insert(0, "some text that makes a long update")
    writer.set("port", 5432)
    full = writer.doc.get_update()
    bad = None
    for cut in range(2, len(full)):  # a truncated real update that passes the codec's guard
        try:
            p.check_update_plausible(full[:cut])
            pycrdt.Doc().apply_update(full[:cut])
        except (p.ProtocolError, ValueError) as exc:
            if isinstance(exc, ValueError):
                bad = full[:cut]
                break
    assert bad is not None

    with pytest.raises(p.ProtocolError) as info:
        room.receive(ps_a, p.SyncUpdate(bad))
    assert info.value.code == p.CLOSE_INVALID_PAYLOAD
    assert room.doc.get_state() == before_state
    assert content(room.doc) == before_content
    await settle(room)
    assert a.frames == [] and b.frames == []  # nothing broadcast
    stored = await store.load(WS)
    assert stored.last_seq == 1  # nothing stored


# -------------------------------------------------------------- awareness


async def test_awareness_is_applied_by_clock(store):
    room = await open_room(store)
    a, b = FakePeer("a"), FakePeer("b")
    ps_a, ps_b = room.join(a), room.join(b)
    a.take(), b.take()

    send(room, ps_a, awareness(entry(1, 1, {"v": 1})))
    await settle(room)
    assert a.take() == b.take() == [awareness(entry(1, 1, {"v": 1}))]

    # Equal clock with a state, or an older clock: ignored.
    send(room, ps_a, awareness(entry(1, 1, {"v": "same clock"}), entry(1, 0, {"v": "older"})))
    await settle(room)
    assert a.frames == [] and b.frames == []
    assert room.awareness[1].state == json.dumps({"v": 1})

    send(room, ps_a, awareness(entry(1, 2, {"v": 2})))
    await settle(room)
    assert b.take() == [awareness(entry(1, 2, {"v": 2}))]

    # Equal clock with null: the owner removes its state.
    send(room, ps_a, awareness(entry(1, 2, None)))
    await settle(room)
    assert b.take() == [awareness(entry(1, 2, None))]
    assert room.awareness[1].state is None
    send(room, ps_a, awareness(entry(1, 3, {"v": 3})))
    await settle(room)
    assert b.take() == [awareness(entry(1, 3, {"v": 3}))]
    a.take()

    # b re-sends (or forges) a's entry: a is alive, so b cannot change it.
    send(room, ps_b, awareness(entry(1, 99, {"v": "forged"})))
    send(room, ps_b, awareness(entry(1, 100, None)))
    await settle(room)
    assert a.frames == [] and b.frames == []
    assert room.awareness[1].state == json.dumps({"v": 3})
    assert room.awareness[1].owner is ps_a


async def test_leave_removal_stale_echo_and_reconnect(store):
    room = await open_room(store)
    a = FakePeer("a")
    ps_a = room.join(a)
    state = {"user": {"name": "Ana"}}
    send(room, ps_a, awareness(entry(7, 5, state)))
    await settle(room)
    b = FakePeer("b")
    ps_b = room.join(b)
    assert only(b.take(), p.AwarenessMessage) == [awareness(entry(7, 5, state))]

    room.leave(a)
    await settle(room)
    assert b.frames == [p.encode_awareness([p.AwarenessEntry(7, 6, None)])]  # clock + 1, JSON "null"
    assert b"null" in b.frames[0]
    b.take()
    assert only(a.messages(), p.AwarenessMessage) == [awareness(entry(7, 5, state))]  # its own echo, no removal

    # b (a stock client) re-sends what it saw of a: must not bring it back.
    send(room, ps_b, awareness(entry(7, 5, state)))
    send(room, ps_b, awareness(entry(7, 6, state)))
    await settle(room)
    assert b.frames == []
    assert room.awareness[7].state is None

    # a's client reconnects on a new connection, with the clock it had.
    c = FakePeer("c")
    ps_c = room.join(c)
    assert only(c.take(), p.AwarenessMessage) == []  # the removed state is not offered
    send(room, ps_c, awareness(entry(7, 5, state)))
    await settle(room)
    for peer in (b, c):
        (msg,) = peer.take()
        (relayed,) = msg.entries
        assert relayed.client_id == 7 and relayed.state == json.dumps(state)
        assert relayed.clock > 6  # beats the tombstone every client holds
    assert room.awareness[7].owner is ps_c

    # Now owned by c: b's echo of the old state changes nothing; c leaving removes it again.
    send(room, ps_b, awareness(entry(7, 5, {"user": "echo"})))
    room.leave(c)
    await settle(room)
    (msg,) = b.take()
    assert msg.entries[0].state is None and msg.entries[0].clock == relayed.clock + 1


async def test_oversized_awareness_state_is_dropped_with_an_error(store):
    room = await open_room(store, max_awareness_state_bytes=64)
    a, b, c = FakePeer("a"), FakePeer("b"), FakePeer("c")
    ps_a, ps_b = room.join(a), room.join(b)
    room.join(c)
    hello(room, ps_a, a)
    a.take(), b.take(), c.take()

    big_ascii = json.dumps({"x": "a" * 100})
    big_utf8 = json.dumps({"x": "€" * 20}, ensure_ascii=False)  # 29 characters, 69 bytes
    assert len(big_utf8) <= 64 < len(big_utf8.encode())
    fits = json.dumps({"x": "é" * 20}, ensure_ascii=False)  # 49 bytes
    send(
        room,
        ps_a,
        p.AwarenessMessage(
            (p.AwarenessEntry(1, 1, big_ascii), p.AwarenessEntry(2, 1, big_utf8), p.AwarenessEntry(3, 1, fits))
        ),
    )
    errors = controls(a.messages(), "error")
    assert [e["code"] for e in errors] == ["awareness_too_large", "awareness_too_large"]
    assert "64" in errors[0]["message"]
    await settle(room)
    assert 1 not in room.awareness and 2 not in room.awareness
    for peer in (b, c):
        assert peer.take() == [p.AwarenessMessage((p.AwarenessEntry(3, 1, fits),))]

    # Without hello there is nobody to tell: dropped silently.
    send(room, ps_b, awareness(p.AwarenessEntry(4, 1, big_ascii)))
    await settle(room)
    assert b.frames == [] and c.frames == []
    assert 4 not in room.awareness


@pytest.mark.parametrize("bad", ["{", "NaN", '{"x": Infinity}', "[" * 5000 + "]" * 5000])
async def test_awareness_state_that_clients_cannot_parse_drops_the_peer(store, bad):
    room = await open_room(store)
    a, b = FakePeer("a"), FakePeer("b")
    ps_a = room.join(a)
    room.join(b)
    b.take()
    with pytest.raises(p.ProtocolError) as info:
        send(room, ps_a, awareness(p.AwarenessEntry(9, 1, bad)))
    assert info.value.code == p.CLOSE_INVALID_PAYLOAD
    await settle(room)
    assert 9 not in room.awareness and b.frames == []


# ---------------------------------------------------------------- control


async def test_control_before_hello_is_a_policy_violation(store):
    room = await open_room(store)
    a = FakePeer("a")
    ps_a = room.join(a)
    a.take()
    with pytest.raises(p.ProtocolError) as info:
        send(room, ps_a, p.Control("ping", {"type": "ping", "id": 1}))
    assert info.value.code == p.CLOSE_POLICY == 1008
    assert a.frames == []


async def test_ping_pong_and_unknown_types(store):
    room = await open_room(store, server_version="9.9", limits={"max_message_bytes": 1024})
    a = FakePeer("a")
    ps_a = room.join(a)
    a.take()
    send(room, ps_a, p.Control("hello", {"type": "hello"}))
    (welcome,) = a.take()
    assert welcome.type == "welcome" and "id" not in welcome.body
    assert welcome.body["protocol"] == p.PROTOCOL_VERSION and welcome.body["version"] == "9.9"
    assert welcome.body["limits"] == {"max_message_bytes": 1024}

    send(room, ps_a, p.Control("ping", {"type": "ping", "id": "req-7"}))
    assert controls(a.take()) == [{"type": "pong", "id": "req-7"}]
    send(room, ps_a, p.Control("ping", {"type": "ping"}))
    assert controls(a.take()) == [{"type": "pong"}]

    send(room, ps_a, p.Control("frobnicate", {"type": "frobnicate", "id": 42}))
    (error,) = controls(a.take())
    assert error["type"] == "error" and error["code"] == "unknown_type" and error["id"] == 42
    assert "frobnicate" in error["message"]


# ------------------------------------------------------------- compaction


async def test_compaction_writes_a_snapshot_with_the_same_content(store):
    room = await open_room(store, compact_every_updates=5)
    a = FakePeer("a")
    ps_a = room.join(a)
    writer = Client()
    for i in range(20):
        if i % 3 == 0:
            writer.text.insert(len(str(writer.text)), f"line {i}\n")
            update = writer.updates[-1]
        elif i in (7, 14):
            del writer.config[f"k{i - 6}"]  # k1, k8
            update = writer.updates[-1]
        else:
            update = writer.set(f"k{i}", {"n": i, "name": f"José {i}"})
        send(room, ps_a, p.SyncUpdate(update))
        await settle(room)

    stored = await store.load(WS)
    assert stored.snapshot is not None
    assert stored.last_seq == 20
    assert stored.snapshot_seq >= 15 and len(stored.updates) == 20 - stored.snapshot_seq < 5
    fresh = await open_room(store)
    assert content(fresh.doc) == content(room.doc) == content(writer.doc)
    assert fresh.durable_seq == 20
    assert "k1" not in content(fresh.doc)[0] and "k8" not in content(fresh.doc)[0]


async def test_updates_waiting_for_a_missing_dependency_are_refused(store):
    """pycrdt would hold such structs "pending" yet show them in the document and in
    get_update() (so late joiners got them) but not in update events (so live peers
    did not): the room refuses the update (1007) and keeps the document clean. The
    client resolves it by reconnecting: its step 2 carries the missing part too."""
    room = await open_room(store, compact_every_updates=5)
    a = FakePeer("a")
    ps_a = room.join(a)
    offline = Client()
    offline.text.insert(0, "hello")  # updates[0]: never reaches the room
    offline.text.insert(5, " world")
    offline.config["k"] = "v"
    del offline.text[0:6]
    for update in (offline.updates[1], offline.updates[2]):  # each waits for `first`
        with pytest.raises(p.ProtocolError, match="depends on data"):
            send(room, ps_a, p.SyncUpdate(update))
    assert content(room.doc) == ({}, "")
    other = Client()
    for i in range(6):
        send(room, ps_a, p.SyncUpdate(other.set(f"o{i}", i)))
    await settle(room)
    # Reconnected, the client's step 2 holds everything, `first` included.
    send(room, ps_a, p.SyncStep2(offline.doc.get_update(room.doc.get_state())))
    await settle(room)
    fresh = await open_room(store)
    assert content(fresh.doc)[1] == content(offline.doc)[1] == "world"
    assert content(fresh.doc)[0] == {"k": "v", **{f"o{i}": i for i in range(6)}}


async def test_every_hook_the_room_calls_is_declared_once(store):
    """A hook name that is not on RoomListener is a programming error, not a silent no-op."""
    from rooms.room import LISTENER_HOOKS

    declared = {"on_load", "filter_awareness", "on_config_change", "on_locks_changed", "on_outbox_persisted"}
    assert declared <= LISTENER_HOOKS
    room = await open_room(store)
    with pytest.raises(ValueError, match="not a room listener hook"):
        room.notify("on_lock_changed", [])  # a typo


async def test_the_append_waits_for_the_relays_publish_briefly(store):
    """Scale-out: Redis answers a publish only after the fsync of what it wrote in the same turn, so the
    room lets the relay's live publish reach Redis before its append is sent (never longer than
    AFTER_MAX_SECONDS: a publish that does not answer delays durability by that much at most)."""
    from rooms.persist import AFTER_MAX_SECONDS

    gated = GatedStore(store)
    gated.gate.set()
    room = Room(WS, gated, RoomTuning())
    await room.load()
    loop = asyncio.get_running_loop()

    class Relay:
        def __init__(self) -> None:
            self.published: list[asyncio.Future] = []

        def publish_updates(self, _room, _updates):
            self.published.append(loop.create_future())
            return self.published[-1]

        def publish_awareness(self, _room, _entries) -> None:
            pass

    relay = Relay()
    room.attach_relay(relay)
    a = FakePeer("a")
    ps = room.join(a)
    writer = Client()
    send(room, ps, p.SyncUpdate(writer.set("k", 1)))
    await asyncio.sleep(0)
    assert len(relay.published) == 1 and len(only(a.messages(), p.SyncUpdate)) == 1  # peers do not wait
    for _ in range(5):
        await asyncio.sleep(0)
    assert gated.appends_started == 0  # the publish has not answered
    relay.published[0].set_result(None)
    await settle(room)
    assert gated.appends_started == 1 and room.durable_seq == 1
    # A publish that never answers holds the append back for AFTER_MAX_SECONDS only.
    send(room, ps, p.SyncUpdate(writer.set("k", 2)))
    started = loop.time()
    await settle(room)
    assert gated.appends_started == 2 and room.durable_seq == 2
    assert loop.time() - started >= AFTER_MAX_SECONDS * 0.9
