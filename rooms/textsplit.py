"""Keep pycrdt's text equal to Yjs's when an edit cuts a character in two.

Yjs counts text in UTF-16 code units, so an edit can land between the two
halves of a surrogate pair (an emoji, say): a delete of one unit, or an insert
whose neighbour is one half. When Yjs cuts an item there, it replaces each
half with U+FFFD (one unit each), so clocks stay aligned with content.
pycrdt stores text as UTF-8 and cannot hold half a pair: it cuts elsewhere,
and from then on its clocks no longer match the content -- text vanishes and
the state it hands out is one Yjs cannot load.

So the server does Yjs's replacement itself, before pycrdt ever sees the
cut: :class:`TextSplits` knows where the document's text holds pairs, and
for an update that would cut one it says which pairs to break -- in the
update's own strings (bytes rewritten here) or in text the document already
holds (the room rebuilds its document from its state with those pairs
broken). Both engines then integrate the update identically, and the
document stays byte-for-byte what a Yjs client holds. Updates with no
astral character, into a document without one, skip all of this.

Pure functions and a plain index: no pycrdt, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from codec import protocol as p
from rooms import ystructs

REPLACEMENT = "\ufffd".encode()


@dataclass(slots=True)
class Plan:
    """What to do before integrating one update."""

    update: bytes  # the update to apply (its own pairs broken where it cuts them)
    in_document: set[tuple[int, int]] = field(default_factory=set)  # pairs to break in the document first


class TextSplits:
    """Where a document's text holds surrogate pairs, by the id of each pair's first half.

    The index may hold pairs whose item was deleted since (a delete removes
    text without telling us which); breaking one of those is a no-op. A
    delete that arrives before the text it deletes is remembered, so the
    pair it will cut is broken when the text arrives.
    """

    def __init__(self) -> None:
        self.pairs: set[tuple[int, int]] = set()
        self._early_cuts: set[tuple[int, int]] = set()  # cuts of deletes still waiting for their items
        self.early_deletes: set[tuple[int, int, int]] = set()  # those deletes, (client, clock, length)

    @property
    def quiet(self) -> bool:
        """True while no pair and no early delete is known: every plain update is fast."""
        return not self.pairs and not self._early_cuts

    def plan(self, update: bytes, known: Callable[[], dict[int, int]]) -> Plan | None:
        """Prepare ``update`` for a document whose state vector ``known()`` gives; None: apply it as is."""
        if self.quiet and ystructs.ASTRAL_UTF8.search(update) is None:
            return None
        shape = ystructs.shape(update, text=True)
        incoming = {(c, clock + off): None for c, clock, _s, _e, offsets in shape.astral for off in offsets}
        state = dict(known()) if shape.deletes else {}
        for client, _start, end in shape.ranges:  # the update's own structs arrive with it
            state[client] = max(state.get(client, 0), end)
        for client, clock, length in shape.deletes:
            if clock + length > state.get(client, 0):
                self.early_deletes.add((client, clock, length))
                self._early_cuts.update({(client, clock), (client, clock + length)})
        hit: set[tuple[int, int]] = set()
        for client, clock in shape.cuts:
            hit.add((client, clock - 1))  # a cut at k splits the pair whose first half is k - 1
        for client, clock in self._early_cuts:
            if (client, clock - 1) in incoming:
                hit.add((client, clock - 1))
        in_document = hit & self.pairs
        in_update = {pair for pair in hit if pair in incoming}
        self.pairs -= in_document
        self.pairs.update(pair for pair in incoming if pair not in in_update)
        if not in_document and not in_update:
            return None
        if in_update:
            update = break_pairs(update, in_update, shape)
        return Plan(update=update, in_document=in_document)

    def learn(self, state: bytes) -> None:
        """Index the pairs of a whole document state (on load and after a rebuild)."""
        if ystructs.ASTRAL_UTF8.search(state) is None:
            return
        shape = ystructs.shape(state, text=True)
        self.pairs.update((c, clock + off) for c, clock, _s, _e, offsets in shape.astral for off in offsets)


def break_pairs(update: bytes, pairs: set[tuple[int, int]], shape: ystructs.Shape | None = None) -> bytes:
    """``update`` with each listed surrogate pair (by its first half's id) replaced by two U+FFFD.

    Everything else stays byte for byte; a pair not found (deleted text, or
    not in this update) is left alone. Raises ProtocolError for a malformed
    update.
    """
    if shape is None:
        shape = ystructs.shape(update, text=True)
    out: list[bytes] = []
    done = 0
    for client, clock, start, end, offsets in shape.astral:
        chosen = {off for off in offsets if (client, clock + off) in pairs}
        if not chosen:
            continue
        _, data = p.read_var_uint(update, start)
        text = update[data:end].decode("utf-8", "surrogatepass")
        pieces = []
        unit = 0
        for ch in text:
            if ord(ch) > 0xFFFF:
                pieces.append("\ufffd\ufffd" if unit in chosen else ch)
                unit += 2
            else:
                pieces.append(ch)
                unit += 1
        raw = "".join(pieces).encode("utf-8", "surrogatepass")
        out += [update[done:start], p.write_var_uint(len(raw)), raw]
        done = end
    if not out:
        return update
    out.append(update[done:])
    return b"".join(out)


def delete_set_update(ranges: set[tuple[int, int, int]]) -> bytes:
    """A Yjs v1 update with no structs that deletes ``(client, clock, length)`` ranges."""
    by_client: dict[int, list[tuple[int, int]]] = {}
    for client, clock, length in sorted(ranges):
        by_client.setdefault(client, []).append((clock, length))
    parts = [b"\x00", p.write_var_uint(len(by_client))]
    for client, spans in by_client.items():
        parts += [p.write_var_uint(client), p.write_var_uint(len(spans))]
        for clock, length in spans:
            parts += [p.write_var_uint(clock), p.write_var_uint(length)]
    return b"".join(parts)
