"""A room's CRDT document: what goes in is checked for layout and made Yjs-exact first.

:class:`RoomDocument` owns the pycrdt ``Doc`` and what must stay true of it:
an update is integrated only whole (no structs left waiting for a missing
dependency, no restated history), text that cuts a surrogate pair is
prepared as Yjs integrates it (``rooms/textsplit.py``, which may rebuild the
document: observers move to the new one), and the encoded size is tracked
for the document cap. It knows nothing of peers, guards or the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pycrdt

from codec import protocol as p
from rooms import textsplit, ystructs
from rooms.config import config_map

log = logging.getLogger("collab.room")

MISSING = "update depends on data this server does not have; reconnect to resync"
# Relayed and stored updates waiting for what they build on (see RoomDocument.integrate).
HELD_MAX = 10_000


class RoomDocument:
    def __init__(self, workspace_id: str, on_update: Callable[[pycrdt.TransactionEvent], None]) -> None:
        self.workspace_id = workspace_id
        self.doc = pycrdt.Doc()
        self._on_update = on_update
        self._sub: Any = self.doc.observe(on_update)
        self._on_config: Callable[[list[Any]], None] | None = None
        self._config_sub: Any = None
        # Where the text holds surrogate pairs, so that a cut between two
        # halves is integrated as Yjs does it.
        self.splits = textsplit.TextSplits()
        self._sv: dict[int, int] | None = None  # parsed state vector (None: recompute)
        # Encoded size: exact after a measurement, an upper bound (exact +
        # bytes applied since) otherwise.
        self.size_bytes = 0
        self._size_exact = False
        self.metrics: Any = None  # collab.metrics.Counters (surrogate_splits)
        # Relayed or stored updates that arrived before something they build on.
        self.held: list[tuple[bytes, ystructs.Shape]] = []
        self._held_overflow = False

    # ------------------------------------------------------------ loading

    def load(self, history: list[bytes]) -> None:
        """Replay stored updates without telling the observer (a load is not news).

        In stored order, except that an update stored before one it builds on
        waits for it (``integrate``).
        """
        self.doc.unobserve(self._sub)
        self._sub = None
        for update in history:
            self.integrate(update, self._replay)
        self._sv = None
        self._sub = self.doc.observe(self._on_update)
        self.measure()

    def _replay(self, update: bytes) -> None:
        update = self.prepare_text(update)  # may replace self.doc: call it first
        self.doc.apply_update(update)

    # ------------------------------------------------ out of causal order

    def integrate(self, update: bytes, apply: Callable[[bytes], None]) -> None:
        """``apply(update)`` once everything it builds on is in the document, then what that unblocks.

        Other nodes' updates come in the order Redis stored them, which is not
        always causal: appends retried through a failover land in any order,
        and so do a room's appends sent over several connections. Yjs keeps
        such an update pending until its dependencies arrive; pycrdt 0.14
        often never integrates it (structs lost to this document: measured, 1
        in 3 shuffled orders of a three-client session end behind, while Yjs
        converges on every one). So an update that is not ready is held here
        and applied when it is.
        """
        shape = _shape(update)
        if shape is not None and not self._ready(shape):
            if len(self.held) < HELD_MAX:
                self.held.append((update, shape))  # parsed once: held updates are checked again often
                return
            if not self._held_overflow:  # bounded: past this, pycrdt gets it as it is
                self._held_overflow = True
                log.error("%s: %d relayed updates wait for what they build on", self.workspace_id, len(self.held))
            shape = None
        self._apply_ready(update, shape, apply)
        while self.held:
            ready = [(u, shape) for u, shape in self.held if self._ready(shape)]
            if not ready:
                return
            taken = {id(u) for u, _ in ready}
            self.held = [(u, shape) for u, shape in self.held if id(u) not in taken]
            for u, shape in ready:
                self._apply_ready(u, shape, apply)

    def _apply_ready(self, update: bytes, shape: ystructs.Shape | None, apply: Callable[[bytes], None]) -> None:
        try:
            apply(update)
        except BaseException:
            self._sv = None
            raise
        if shape is None or shape.skips or self._sv is None:
            self._sv = None
        else:  # integrated whole: its runs extend the state vector (no need to read it back)
            self.advanced(shape.ranges)

    def _ready(self, shape: ystructs.Shape) -> bool:
        """Every struct and reference an update builds on is here or in it."""
        known = self.state_vector()
        ends: dict[int, int] = {}
        for client, start, end in shape.ranges:
            have = known.get(client, 0)
            if start > have:
                return False
            ends[client] = max(have, end)
        for client, _clock, end, ref_client, ref_clock in shape.refs:
            if end > known.get(client, 0) and ref_clock >= max(known.get(ref_client, 0), ends.get(ref_client, 0)):
                return False
        # Deletions of items not here yet are left to pycrdt, as for clients' updates (``check``):
        # it applies them when the items arrive, and a load must replay them where the room did.
        return True

    def observe_config(self, callback: Callable[[list[Any]], None]) -> None:
        """Deep events of the ``config`` map go to ``callback`` (kept across rebuilds).

        pycrdt's raw events (``Map.integrated.observe_deep``): its wrapped events
        convert every slot of every event to Python objects, three times the
        cost of applying a small update; the callback reads only paths and keys.
        """
        self._on_config = callback
        self._config_sub = _observe_config(self.doc, callback)

    # ------------------------------------------------------ state vector

    def state_vector(self) -> dict[int, int]:
        """The state vector as a dict, kept up to date between client updates."""
        if self._sv is None:
            self._sv = ystructs.state_vector(self.doc.get_state())
        return self._sv

    def stale(self) -> None:
        """The document changed by other means (a server change): recompute the state vector when asked."""
        self._sv = None

    def advanced(self, ranges: list[tuple[int, int, int]]) -> None:
        """A checked client update integrated completely: its runs extend the cached state vector."""
        known = self.state_vector()
        for client, _start, end in ranges:
            if end > known.get(client, 0):
                known[client] = end

    # -------------------------------------------------------------- size

    def measure(self) -> int:
        self.size_bytes = len(self.doc.get_update())
        self._size_exact = True
        return self.size_bytes

    def grew(self, nbytes: int) -> None:
        self.size_bytes += nbytes
        self._size_exact = False

    def too_large(self, update: bytes, cap: int) -> bool:
        """Whether applying ``update`` could take the document past ``cap`` bytes."""
        if not cap or update[:1] == b"\x00":
            return False  # no cap, or no structs: only deletions, which never grow it
        if self.size_bytes + len(update) <= cap:
            return False
        if not self._size_exact:
            self.measure()
        return self.size_bytes + len(update) > cap

    # ---------------------------------------------------------- checking

    def check(self, update: bytes, deletes: bool = False) -> list[tuple[int, int, int]]:
        """Refuse (ProtocolError 1007) an update that would not integrate completely.

        pycrdt keeps structs whose dependencies it lacks (a gap in a client's
        clocks, an origin the server never saw) "pending", and shows them in
        the document and in get_update() -- so newcomers get them -- but not
        in the update events that live peers get: the two would diverge for
        as long as the gap stays open. A run of structs that starts below the
        server's clock for its client and ends above it restates part of that
        client's history (a forged or colliding id: a real client's step 2 is
        cut at our state vector), and pycrdt splices the new part onto what
        the server has: peers and newcomers end up disagreeing too.

        Decided from the update's layout and the state vector, without
        applying anything; only an update whose structs refer to other
        clients' new structs in the same update is tried on a scratch copy
        (only pycrdt knows whether such references resolve). With
        ``deletes``, deletions of unknown items count as missing too.
        Returns the update's runs of structs, ``[(client, start, end)]``.
        """
        if update[:1] == b"\x00" and not deletes:
            return []  # deletions only: pycrdt applies them when the items arrive, for everyone alike
        shape = ystructs.shape(update)
        known = self.state_vector()
        ends: dict[int, int] = {}
        for client, start, end in shape.ranges:
            have = known.get(client, 0)
            if start > have:
                raise p.ProtocolError(MISSING)
            if start < have < end:
                raise p.ProtocolError("update conflicts with what this server has for its client id; reconnect")
            ends[client] = max(have, end, ends.get(client, 0))
        if shape.skips:
            raise p.ProtocolError(MISSING)
        within = False
        for client, _clock, end, ref_client, ref_clock in shape.refs:
            if end <= known.get(client, 0) or ref_clock < known.get(ref_client, 0):
                continue  # a struct the server has (ignored), or a reference to one it has
            if ref_clock < ends.get(ref_client, 0):
                within = True  # another client's new struct in this update
                continue
            raise p.ProtocolError(MISSING)
        if deletes:
            for client, clock, length in shape.deletes:
                if clock + length > ends.get(client, known.get(client, 0)):
                    raise p.ProtocolError(MISSING)
        if within:
            scratch = pycrdt.Doc()
            scratch.apply_update(self.doc.get_update())
            apply_checked(scratch, update)
            if pycrdt.get_update(update, scratch.get_state())[:1] != b"\x00":
                raise p.ProtocolError(MISSING)
        return shape.ranges

    def cut_at_state(self, update: bytes) -> bytes:
        """``update`` without what the document already has of a client's run (relay races)."""
        if update[:1] == b"\x00":
            return update
        try:
            known = self.state_vector()
            if any(start < known.get(client, 0) < end for client, start, end in ystructs.shape(update).ranges):
                return pycrdt.get_update(update, self.doc.get_state())
        except (ValueError, RuntimeError, p.ProtocolError):
            pass
        return update

    def problems(self) -> list[str]:
        """Why the state this document hands out would not load in Yjs (empty: it would)."""
        return ystructs.problems(self.doc.get_update(), ystructs.state_vector(self.doc.get_state()))

    # --------------------------------------------------- surrogate pairs

    def prepare_text(self, update: bytes) -> bytes:
        """``update`` ready for pycrdt: any surrogate pair it cuts is broken first, as Yjs does.

        A pair cut in text the document already holds can't be changed in
        place (pycrdt items are immutable), so the document is rebuilt from
        its own state with that pair broken; this happens only when an edit
        actually lands between two halves.
        """
        plan = self.splits.plan(update, self.state_vector)
        if plan is None:
            return update
        if plan.in_document:
            self._break_pairs(plan.in_document)
        if self.metrics is not None:
            self.metrics.surrogate_splits += 1
        return plan.update

    def _break_pairs(self, pairs: set[tuple[int, int]]) -> None:
        doc = rebuilt(self.doc, pairs, self.splits)
        if doc is None:
            return  # those pairs were deleted meanwhile
        log.info(
            "room %s: an edit cuts %d surrogate pair(s); replaced by U+FFFD as Yjs does", self.workspace_id, len(pairs)
        )
        old = self.doc
        if self._sub is not None:
            old.unobserve(self._sub)
            self._sub = doc.observe(self._on_update)
        if self._config_sub is not None:
            self._config_sub.drop()  # (config_map() returns a new wrapper: unobserve() can't find it)
            self._config_sub = _observe_config(doc, self._on_config)
        self.doc = doc
        self._sv = None


def _observe_config(doc: pycrdt.Doc, callback: Callable[[list[Any]], None]) -> Any:
    def deliver(events: list[Any]) -> None:
        try:
            callback(events)
        except Exception:  # never into pycrdt's commit
            log.exception("config observer failed")

    return config_map(doc).integrated.observe_deep(deliver)


def _shape(update: bytes) -> ystructs.Shape | None:
    try:
        return ystructs.shape(update)
    except p.ProtocolError:
        return None  # malformed: applying it reports that


def apply_checked(doc: pycrdt.Doc, update: bytes) -> None:
    """Apply a client's update; anything pycrdt refuses becomes a ProtocolError (1007).

    Besides ValueError, pycrdt raises RuntimeError for some structurally
    invalid updates ("block parent must be deleted or shared ref type"), and
    a Rust panic surfaces as pyo3's PanicException, a BaseException.
    """
    try:
        doc.apply_update(update)
    except (ValueError, RuntimeError) as exc:
        raise p.ProtocolError(f"invalid CRDT update: {exc}") from None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise p.ProtocolError("invalid CRDT update (decoder panic)") from None


def replay(history: list[bytes]) -> pycrdt.Doc:
    """A document from stored updates, integrated as a room integrates them (surrogate pairs included)."""
    doc = pycrdt.Doc()
    splits = textsplit.TextSplits()
    for update in history:
        plan = splits.plan(update, lambda d=doc: ystructs.state_vector(d.get_state()))
        if plan is not None:
            if plan.in_document:
                doc = rebuilt(doc, plan.in_document, splits) or doc
            update = plan.update
        doc.apply_update(update)
    return doc


def rebuilt(doc: pycrdt.Doc, pairs: set[tuple[int, int]], splits: textsplit.TextSplits) -> pycrdt.Doc | None:
    """A copy of ``doc`` with those surrogate pairs broken (None: none of them is in its text any more)."""
    state = doc.get_update()
    fixed = textsplit.break_pairs(state, pairs)
    if fixed == state:
        return None
    new = pycrdt.Doc(client_id=doc.client_id)
    new.apply_update(fixed)
    if splits.early_deletes:
        # Deletes still waiting for their items are not part of get_update().
        new.apply_update(textsplit.delete_set_update(splits.early_deletes))
    return new
