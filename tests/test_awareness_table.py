"""The awareness table alone: ownership, clocks, echoes, removals (no room, no sockets)."""

from __future__ import annotations

import json

from codec import protocol as p
from rooms.awareness import AwarenessTable
from rooms.peer import PeerState
from tests.fakes import FakePeer, peer_state


def peer(epoch: int, user: str) -> PeerState:
    return peer_state(user, epoch)


def entry(cid: int, clock: int, state) -> p.AwarenessEntry:
    return p.AwarenessEntry(cid, clock, None if state is None else json.dumps(state))


def test_owner_updates_and_others_echoes_change_nothing():
    table = AwarenessTable(max_state_bytes=1024)
    alice, bob = peer(1, "alice"), peer(2, "bob")
    assert table.receive(None, alice, (entry(7, 1, {"n": "A"}),)) == [entry(7, 1, {"n": "A"})]
    table.take_pending()
    # Bob's client re-sends Alice's state (as stock clients do): ignored, nothing to send.
    assert table.receive(None, bob, (entry(7, 1, {"n": "A"}),)) == []
    assert table.pending == {}
    # Alice moves on; an older clock from her is ignored.
    assert table.receive(None, alice, (entry(7, 2, {"n": "A2"}),)) != []
    assert table.receive(None, alice, (entry(7, 1, {"n": "old"}),)) == []
    assert json.loads(table.records[7].state) == {"n": "A2"}


def test_a_newer_clock_for_another_users_id_is_a_claim_and_is_refused():
    table = AwarenessTable(max_state_bytes=1024)
    alice, mallory = peer(1, "alice"), peer(2, "mallory")
    table.receive(None, alice, (entry(7, 1, {"n": "A"}),))
    assert table.receive(None, mallory, (entry(7, 9, {"n": "M"}),)) == []
    assert table.records[7].owner is alice


def test_release_turns_states_into_removals_and_old_tombstones_go():
    table = AwarenessTable(max_state_bytes=1024, tombstone_seconds=60)
    alice = peer(1, "alice")
    table.receive(None, alice, (entry(7, 3, {"n": "A"}),))
    table.take_pending()
    table.release(alice, now=100.0)
    entries, local = table.take_pending()
    assert entries == local == [p.AwarenessEntry(7, 4, None)]
    assert table.live() == []
    table.prune(now=100.0 + 61)
    assert 7 not in table.records


def test_a_removed_id_revives_only_for_a_newer_clock_or_a_later_joiner():
    table = AwarenessTable(max_state_bytes=1024)
    alice = peer(1, "alice")
    table.receive(None, alice, (entry(7, 3, {"n": "A"}),))
    table.mark_seen(table.take_pending()[0], epoch=2)
    table.release(alice, now=0.0)
    table.take_pending()
    early = peer(2, "bob")  # joined while the state was live: may only be echoing it
    assert table.receive(None, early, (entry(7, 3, {"n": "A"}),)) == []
    back = peer(3, "alice")  # Alice reconnecting later with the clock she had
    assert table.receive(None, back, (entry(7, 3, {"n": "A"}),)) != []
    assert table.records[7].owner is back and table.records[7].clock == 5


def test_relayed_states_are_published_by_their_node_not_by_us():
    table = AwarenessTable(max_state_bytes=1024)
    other_node = PeerState(peer=FakePeer("node-b"), epoch=0, remote="node-b")
    assert table.apply_remote(other_node, [entry(9, 1, {"n": "R"})], now=10.0)
    entries, local = table.take_pending()
    assert [e.client_id for e in entries] == [9] and local == []
    assert table.expire_remote(ttl=5.0, now=20.0)
    assert table.take_pending()[0] == [p.AwarenessEntry(9, 2, None)]
