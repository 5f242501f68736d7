"""A room's awareness table: who owns each awareness client id, its latest state, and what to send next.

Stock clients re-send every state they know, other peers' included, so the
table applies entries by clock (a newer clock wins; an equal clock only to
remove) and lets only a client id's owner change it: a peer that merely
echoes someone else's state changes nothing, and the echo loop stops here.
States relayed from other nodes are owned by a stand-in peer per node.
Pure bookkeeping: no sockets, no event loop; the room flushes ``pending``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from codec import protocol as p

if TYPE_CHECKING:
    from rooms.peer import PeerState


@dataclass(slots=True)
class AwarenessRecord:
    clock: int
    state: str | None
    owner: PeerState | None
    seen_epoch: int = 0  # last room epoch at which this live state was sent out
    removed_at: float = 0.0
    relayed_at: float = 0.0  # time.monotonic() of the last relayed refresh (remote owners only)


class AwarenessRejected(Exception):
    """Raised by an awareness filter: the entry is dropped, the sender told why.

    ``code`` is the ``error`` message's code; ``notify=False`` drops the entry
    silently (e.g. a flood the sender was already told about).
    """

    def __init__(self, message: str, code: str = "awareness_rejected", notify: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.notify = notify


# filter(room, peer, client_id, parsed state) -> state to keep (or raises AwarenessRejected)
AwarenessFilter = Callable[[Any, "PeerState", int, Any], Any]


class AwarenessTable:
    def __init__(
        self,
        max_state_bytes: int,
        max_clients: int = 0,
        tombstone_seconds: float = 60.0,
        filters: list[AwarenessFilter] | None = None,
    ) -> None:
        self.max_state_bytes = max_state_bytes
        self.max_clients = max_clients  # client ids one peer may own (0 = no limit)
        self.tombstone_seconds = tombstone_seconds
        self.filters = list(filters or [])
        self.records: dict[int, AwarenessRecord] = {}
        self.pending: dict[int, p.AwarenessEntry] = {}  # to send at the next flush
        self._relayed: set[int] = set()  # pending entries that came from other nodes

    # ------------------------------------------------------------ reading

    def live(self) -> list[p.AwarenessEntry]:
        records = self.records
        return [p.AwarenessEntry(cid, rec.clock, rec.state) for cid, rec in records.items() if rec.state is not None]

    def mark_seen(self, entries: list[p.AwarenessEntry], epoch: int) -> None:
        """These states were sent to every peer that joined up to ``epoch``."""
        for entry in entries:
            rec = self.records.get(entry.client_id)
            if rec is not None and rec.state is not None:
                rec.seen_epoch = max(rec.seen_epoch, epoch)

    def take_pending(self) -> tuple[list[p.AwarenessEntry], list[p.AwarenessEntry]]:
        """(everything to send now, the part that came from our own peers -- what the relay publishes)."""
        entries = list(self.pending.values())
        local = [e for e in entries if e.client_id not in self._relayed]
        self.pending = {}
        self._relayed.clear()
        return entries, local

    # ------------------------------------------------------- local peers

    def receive(self, room: Any, ps: PeerState, entries: tuple[p.AwarenessEntry, ...]) -> list[p.AwarenessEntry]:
        """Apply a peer's awareness message; returns the entries accepted (the peer is told about refusals)."""
        limit = self.max_state_bytes
        accepted: list[p.AwarenessEntry] = []
        claimed: list[int] = []
        for entry in entries:
            cid = entry.client_id
            if self._over_quota(ps, entry):
                ps.control(
                    {
                        "type": "error",
                        "code": "awareness_rejected",
                        "message": f"a connection may own at most {self.max_clients} awareness client ids",
                    }
                )
                continue
            if entry.state is not None:
                if len(entry.state) > limit or len(entry.state.encode()) > limit:
                    ps.control(
                        {
                            "type": "error",
                            "code": "awareness_too_large",
                            "message": f"awareness state of client {cid} exceeds {limit} bytes; dropped",
                        }
                    )
                    continue
                parsed = p.parse_awareness_state(entry.state)  # malformed JSON drops the peer
                if self.filters:
                    try:
                        for awareness_filter in self.filters:
                            parsed = awareness_filter(room, ps, cid, parsed)
                    except AwarenessRejected as exc:
                        if exc.notify:
                            ps.control({"type": "error", "code": exc.code, "message": str(exc)})
                        continue
                    entry = p.AwarenessEntry(cid, entry.clock, json.dumps(parsed, separators=(",", ":")))
            outcome = self._apply_local(ps, entry)
            if outcome is True:
                accepted.append(entry)
            elif outcome == "claimed":
                claimed.append(cid)
        if claimed:
            ps.control(
                {
                    "type": "error",
                    "code": "awareness_client_id_taken",
                    "message": f"client id(s) {claimed[:10]} belong to another connection; dropped",
                }
            )
        return accepted

    def _over_quota(self, ps: PeerState, entry: p.AwarenessEntry) -> bool:
        cid = entry.client_id
        return bool(
            self.max_clients
            and entry.state is not None
            and cid not in ps.client_ids
            and len(ps.client_ids) >= self.max_clients
            and (cid not in self.records or self.records[cid].owner is None)
        )

    def _apply_local(self, ps: PeerState, entry: p.AwarenessEntry) -> bool | str:
        """One entry from a local peer: True if accepted, "claimed" if it claims another user's id."""
        cid = entry.client_id
        rec = self.records.get(cid)
        if rec is None:
            if entry.state is None:
                return False
            self.records[cid] = AwarenessRecord(entry.clock, entry.state, ps)
            ps.client_ids.add(cid)
            self.pending[cid] = entry
            return True
        if rec.owner is ps:
            if entry.clock > rec.clock or (entry.clock == rec.clock and entry.state is None and rec.state is not None):
                rec.clock = entry.clock
                rec.state = entry.state
                self.pending[cid] = entry
                return True
            return False
        if rec.owner is None:
            # A removed client id. Its owner may be back on a new connection
            # with the clock it had; a peer that already saw the old state
            # may only be echoing it. Only a newer clock, or a peer that
            # joined after the state was last sent out, may revive it.
            if entry.state is None:
                return False
            if entry.clock > rec.clock or ps.epoch > rec.seen_epoch:
                clock = max(entry.clock, rec.clock + 1)
                rec.clock, rec.state, rec.owner = clock, entry.state, ps
                ps.client_ids.add(cid)
                self.pending[cid] = p.AwarenessEntry(cid, clock, entry.state)
                return True
            return False
        if rec.owner.remote is not None:
            # Relayed from another node: the client now talks to us (it
            # reconnected here); a newer clock takes the entry over.
            if entry.clock > rec.clock and entry.state is not None:
                rec.clock, rec.state, rec.owner = entry.clock, entry.state, ps
                ps.client_ids.add(cid)
                self.pending[cid] = entry
                return True
            return False
        if entry.clock > rec.clock and not _same_user(ps, rec.owner):
            # Owned by another user's live connection, with a clock its owner
            # never sent: not an echo but a claim on someone else's client id.
            # (The same user may be reconnecting before the old socket died.)
            return "claimed"
        # Owned by another live peer. Stock clients re-send others' states;
        # silently ignoring them is what stops the echo loop.
        return False

    def release(self, ps: PeerState, now: float) -> None:
        """A peer left: each state it owned becomes a removal that every peer receives."""
        for client_id in ps.client_ids:
            rec = self.records.get(client_id)
            if rec is None or rec.owner is not ps:
                continue
            rec.owner = None
            rec.removed_at = now
            if rec.state is not None:
                rec.clock += 1
                rec.state = None
                self.pending[client_id] = p.AwarenessEntry(client_id, rec.clock, None)
        self.prune(now)

    def prune(self, now: float) -> None:
        """Forget removals older than the tombstone horizon."""
        horizon = now - self.tombstone_seconds
        stale = [cid for cid, rec in self.records.items() if rec.owner is None and rec.removed_at < horizon]
        for cid in stale:
            del self.records[cid]

    # -------------------------------------------------------- other nodes

    def apply_remote(self, owner: PeerState, entries: list[p.AwarenessEntry], now: float) -> bool:
        """States relayed from another node (``owner`` stands for its clients); True if anything changed."""
        changed = False
        for entry in entries:
            cid = entry.client_id
            rec = self.records.get(cid)
            if rec is None:
                if entry.state is None:
                    continue
                rec = self.records[cid] = AwarenessRecord(entry.clock, entry.state, owner)
            elif rec.owner is not None and rec.owner.remote is None:
                continue  # one of our own connections owns it
            elif entry.clock == rec.clock and rec.owner is owner and entry.state is not None:
                rec.relayed_at = now  # heartbeat: still alive on its node
                continue
            elif entry.clock > rec.clock or (
                entry.clock == rec.clock and entry.state is None and rec.state is not None
            ):
                rec.clock, rec.state = entry.clock, entry.state
                rec.owner = owner if entry.state is not None else None
                if entry.state is None:
                    rec.removed_at = now
            else:
                continue
            rec.relayed_at = now
            self.pending[cid] = p.AwarenessEntry(cid, rec.clock, rec.state)
            self._relayed.add(cid)
            changed = True
        return changed

    def expire_remote(self, ttl: float, now: float) -> bool:
        """Drop relayed states not refreshed within ``ttl`` seconds (their node died); True if any."""
        expired = False
        for cid, rec in self.records.items():
            if rec.owner is not None and rec.owner.remote is not None and now - rec.relayed_at > ttl:
                rec.owner = None
                rec.removed_at = now
                if rec.state is not None:
                    rec.clock += 1
                    rec.state = None
                    self.pending[cid] = p.AwarenessEntry(cid, rec.clock, None)
                    self._relayed.add(cid)
                    expired = True
        return expired


def _same_user(a: PeerState, b: PeerState) -> bool:
    ida, idb = getattr(a.identity, "user_id", None), getattr(b.identity, "user_id", None)
    return ida is not None and ida == idb
