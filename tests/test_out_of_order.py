"""Relayed and stored updates that arrive before what they build on (rooms/document.py ``integrate``).

Redis hands a node other nodes' updates in stored order, and that order is
not always causal (appends retried through a failover, a room's appends over
several connections). Yjs waits for the missing pieces; pycrdt 0.14 often
never integrates such an update. Three pycrdt clients edit a map with partial
syncs in between; their updates are handed to a room in a shuffled order,
live (``apply_remote``) and at load, and the room must end with exactly what
applying them in causal order gives.
"""

from __future__ import annotations

import random

import pycrdt
import pytest

from codec import protocol as p
from persistence.sqlite import SQLiteDocumentStore
from rooms import ystructs
from rooms.room import Room
from tests.fakes import FakePeer

SEEDS = range(40)


def session(rng: random.Random) -> list[bytes]:
    """Every update of three clients that set keys and sync with each other now and then, in causal order."""
    docs = [pycrdt.Doc() for _ in range(3)]
    updates: list[bytes] = []
    for doc in docs:
        doc.observe(lambda event: updates.append(event.update))
    for step in range(30):
        i = rng.randrange(3)
        items = docs[i].get("items", type=pycrdt.Map)
        if rng.random() < 0.15 and len(items):
            del items[rng.choice(list(items.keys()))]
        else:
            items[f"k{rng.randrange(8)}"] = step
        for j in range(3):
            if j != i and rng.random() < 0.5:
                docs[j].apply_update(docs[i].get_update(docs[j].get_state()))
    return updates


def view(doc: pycrdt.Doc) -> tuple[dict, dict]:
    return ystructs.state_vector(doc.get_state()), doc.get("items", type=pycrdt.Map).to_py() or {}


def causal(updates: list[bytes]) -> tuple[dict, dict]:
    doc = pycrdt.Doc()
    for update in updates:
        doc.apply_update(update)
    return view(doc)


@pytest.fixture
async def store(tmp_path):
    s = SQLiteDocumentStore(tmp_path / "db.sqlite3")
    await s.open()
    yield s
    await s.close()


async def test_relayed_updates_in_any_order_end_as_in_causal_order(store):
    behind_without = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        updates = session(rng)
        want = causal(updates)
        shuffled = list(updates)
        rng.shuffle(shuffled)
        room = Room(f"ds-order-{seed}", store)
        await room.load()
        peer = FakePeer()
        room.join(peer)
        for update in shuffled:
            room.apply_remote(update)
        await room.drain()
        assert view(room.doc) == want, f"seed {seed}"
        assert room.held_updates == 0
        # What its peer was sent adds up to the same document.
        got = pycrdt.Doc()
        for message in peer.messages():
            if isinstance(message, p.SyncUpdate | p.SyncStep2):
                got.apply_update(message.update)
        assert view(got) == want, f"seed {seed}: what the peer got"
        plain = pycrdt.Doc()
        for update in shuffled:
            plain.apply_update(update)
        behind_without += view(plain) != want
    # The case this guards against occurs in these sessions (pycrdt alone ends behind).
    assert behind_without > 0


async def test_a_load_of_a_history_stored_out_of_order_ends_as_in_causal_order(store):
    for seed in SEEDS:
        rng = random.Random(1000 + seed)
        updates = session(rng)
        want = causal(updates)
        shuffled = list(updates)
        rng.shuffle(shuffled)
        room = Room(f"ds-stored-{seed}", store)
        room.document.load(shuffled)
        assert view(room.doc) == want, f"seed {seed}"
        assert room.document.held == []
