"""Edits that cut a surrogate pair: the room's document must be what Yjs holds.

The cases come from Yjs itself (js/textsplit_cases.mjs): the updates a stock
client sends, and the state a Yjs document holds after applying them. The
room receives the updates one by one, as from a peer, and must end with the
same text and the same structure; so must a room loaded from the store.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import pycrdt
import pytest

from codec import protocol as p
from rooms import textsplit, ystructs
from tests.support import ROOT
from tests.test_room import FakePeer, open_room, send, settle, store  # noqa: F401  (fixture)


def yjs_cases() -> list[dict]:
    out = subprocess.run(
        ["node", "textsplit_cases.mjs"], cwd=ROOT / "js", capture_output=True, check=True, timeout=60
    )
    return json.loads(out.stdout)


CASES = yjs_cases()


def text_of(doc: pycrdt.Doc) -> str:
    return str(doc.get("notes", type=pycrdt.Text))


def oracle_doc(state_hex: str) -> pycrdt.Doc:
    """The Yjs state loaded into pycrdt (it holds no intact pair that a cut splits, so pycrdt reads it right)."""
    doc = pycrdt.Doc()
    doc.apply_update(bytes.fromhex(state_hex))
    return doc


def same_structure(room_doc: pycrdt.Doc, oracle: pycrdt.Doc) -> bool:
    """Neither document has anything the other lacks, and both encode alike."""
    return (
        room_doc.get_state() == oracle.get_state()
        and room_doc.get_update(oracle.get_state()) == oracle.get_update(room_doc.get_state())
        and text_of(room_doc) == text_of(oracle)
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
async def test_room_integrates_like_yjs_and_reloads_the_same(store, case):  # noqa: F811
    room = await open_room(store)
    ps = room.join(FakePeer("a"))
    for update in case["updates"]:
        send(room, ps, p.SyncUpdate(bytes.fromhex(update)))
    await settle(room)
    oracle = oracle_doc(case["state"])
    assert text_of(room.doc) == case["text"]
    assert same_structure(room.doc, oracle)
    # What a newcomer gets walks cleanly and its clocks match the state vector.
    state = room.doc.get_update()
    ends = {client: end for client, _start, end in ystructs.shape(state).ranges}
    assert ends == ystructs.state_vector(room.doc.get_state())

    reloaded = await open_room(store)  # replays the stored history
    assert text_of(reloaded.doc) == case["text"]
    assert same_structure(reloaded.doc, oracle)


async def test_three_line_reproduction_late_joiner_gets_the_b(store):  # noqa: F811
    """insert(0, 'a🙂b'); delete(2, 1): Yjs shows 'a�b', and so must a late joiner."""
    (case,) = [c for c in CASES if c["name"] == "delete the second half"]
    room = await open_room(store)
    a = FakePeer("a")
    ps = room.join(a)
    for update in case["updates"]:
        send(room, ps, p.SyncUpdate(bytes.fromhex(update)))
    await settle(room)
    late = FakePeer("late")
    ps_late = room.join(late)
    late.take()
    send(room, ps_late, p.SyncStep1(b"\x00"))
    (step2,) = late.take()
    joined = pycrdt.Doc()
    joined.apply_update(step2.update)
    assert text_of(joined) == "a\ufffdb"
    assert joined.get_update() == oracle_doc(case["state"]).get_update()


async def test_config_survives_a_document_rebuild(store):  # noqa: F811
    """Breaking a pair in held text rebuilds the document; the config map and its view carry over."""
    room = await open_room(store)
    ps = room.join(FakePeer("a"))
    author = pycrdt.Doc(client_id=7)
    updates: list[bytes] = []
    author.observe(lambda e: updates.append(e.update))
    author.get("config", type=pycrdt.Map)["host"] = "db1"
    send(room, ps, p.SyncUpdate(updates[-1]))
    (case,) = [c for c in CASES if c["name"] == "delete the second half"]
    before = room.doc
    for update in case["updates"]:
        send(room, ps, p.SyncUpdate(bytes.fromhex(update)))
    await settle(room)
    assert room.doc is not before  # rebuilt
    assert room.doc.get("config", type=pycrdt.Map).to_py() == {"host": "db1"}
    author.get("config", type=pycrdt.Map)["port"] = 5432
    send(room, ps, p.SyncUpdate(updates[-1]))
    await settle(room)
    assert room.doc.get("config", type=pycrdt.Map).to_py() == {"host": "db1", "port": 5432}


def test_plain_updates_take_the_fast_path():
    splits = textsplit.TextSplits()
    doc = pycrdt.Doc(client_id=3)
    updates: list[bytes] = []
    doc.observe(lambda e: updates.append(e.update))
    doc.get("notes", type=pycrdt.Text).insert(0, "Grüße, 日本, e\u0301")
    doc.get("config", type=pycrdt.Map)["host"] = "db1"
    for update in updates:
        assert splits.plan(update, {}) is None
    assert splits.quiet


def test_break_pairs_rewrites_only_the_named_pair():
    doc = pycrdt.Doc(client_id=5)
    updates: list[bytes] = []
    doc.observe(lambda e: updates.append(e.update))
    doc.get("notes", type=pycrdt.Text).insert(0, "🙂x🙂")
    (update,) = updates
    fixed = textsplit.break_pairs(update, {(5, 3)})
    other = pycrdt.Doc()
    other.apply_update(fixed)
    assert text_of(other) == "🙂x\ufffd\ufffd"
    assert textsplit.break_pairs(update, {(5, 1)}) == update  # not the start of a pair: untouched


async def test_relayed_update_that_cuts_a_pair_is_integrated_like_yjs(store):  # noqa: F811
    (case,) = [c for c in CASES if c["name"] == "insert between the halves by another client"]
    room = await open_room(store)
    room.join(FakePeer("a"))
    for update in case["updates"]:
        room.apply_remote(bytes.fromhex(update))
    await asyncio.wait_for(room.drain(), 10)
    assert same_structure(room.doc, oracle_doc(case["state"]))


def test_problems_flags_the_state_pycrdt_makes_of_a_cut_pair_and_passes_a_healthy_one():
    """Without the preparation, pycrdt's state has clocks that disagree with its content."""
    (case,) = [c for c in CASES if c["name"] == "insert between the halves by another client"]
    bare = pycrdt.Doc()
    for update in case["updates"]:
        bare.apply_update(bytes.fromhex(update))
    assert ystructs.problems(bare.get_update(), ystructs.state_vector(bare.get_state()))
    healthy = oracle_doc(case["state"])
    assert ystructs.problems(healthy.get_update(), ystructs.state_vector(healthy.get_state())) == []
    assert ystructs.problems(b"\x01\x05", {}) != []  # truncated


def test_a_delete_of_structs_in_the_same_update_is_not_taken_for_an_early_one():
    """A step 2 carries new structs and deletes of them; a rebuild must not apply those deletes ahead of the update.

    (Applied ahead, they were missing from the update's broadcast delta, and a peer kept a deleted character.)
    """
    author = pycrdt.Doc(client_id=9)
    ups: list[bytes] = []
    author.observe(lambda e: ups.append(e.update))
    text = author.get("notes", type=pycrdt.Text)
    text.insert(0, "a🙂")  # clocks 0-2: the document holds a pair from here on
    first = ups[-1]
    text.insert(3, "cd")  # clocks 3-4, new in the step 2
    del text[3:4]  # deletes c: a struct of the same update
    step2 = author.get_update(pycrdt.Doc().get_state())
    splits = textsplit.TextSplits()
    splits.plan(first, lambda: {})
    splits.plan(step2, lambda: {9: 3})
    assert splits.early_deletes == set()
    splits.plan(textsplit.delete_set_update({(9, 7, 1)}), lambda: {9: 5})
    assert splits.early_deletes == {(9, 7, 1)}  # a delete of what has not arrived yet is early
