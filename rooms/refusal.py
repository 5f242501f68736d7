"""Refusing an update: apply it, revert it at once, and keep only the net effect.

A refused update can't just be dropped: its author already shows the change,
and only a server change that deletes what it inserted (and re-inserts what
it deleted) makes the author's copy converge back. The update is applied in a
transaction tracked by an UndoManager; everything it inserted is deleted by
id (this covers root types the UndoManager could not scope), then the undo
restores what it deleted. The net effect, taken from the document after the
garbage collector dropped the refused content, is what peers receive and the
store keeps: the refused content never leaves the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pycrdt

from codec import protocol as p
from rooms.config import config_snapshot, diff
from rooms.document import RoomDocument, apply_checked
from rooms.ystructs import state_vector

REFUSED = "refused"  # transaction origin of updates applied only to be reverted


@dataclass(frozen=True, slots=True)
class Reverted:
    """What applying and reverting an update left."""

    net: bytes  # the document's change: for every peer and the store
    paths: list[str]  # configuration paths the update tried to change
    error: p.ProtocolError | None  # the update was malformed (after partly integrating): drop its author


def apply_and_revert(document: RoomDocument, update: bytes) -> Reverted:
    """Apply ``update`` to the room's document and revert it (the caller keeps its own observers quiet)."""
    doc = document.doc
    config_before = config_snapshot(doc)
    sv_before = doc.get_state()
    undo = None
    error: p.ProtocolError | None = None
    try:
        undo = _undo_manager(doc)
        try:
            update = document.prepare_text(update)
            if undo is not None and document.doc is not doc:
                # Breaking a surrogate pair rebuilt the document: track the new one.
                undo.clear()
                doc = document.doc
                undo = _undo_manager(doc)
            with doc.transaction(origin=REFUSED):
                apply_checked(doc, update)
        except p.ProtocolError as exc:
            error = exc  # pycrdt may have integrated part of it: revert that too
        paths = sorted(diff(config_before, config_snapshot(doc)))
        inserted = _new_ranges(sv_before, doc.get_state())
        if inserted:
            with doc.transaction(origin="server"):
                doc.apply_update(delete_set_update(inserted))
        if undo is not None and undo.can_undo():
            undo.undo()
    finally:
        document.stale()
        if undo is not None:
            undo.clear()
    return Reverted(doc.get_update(sv_before), paths, error)


def _undo_manager(doc: pycrdt.Doc) -> pycrdt.UndoManager | None:
    roots = _undo_scopes(doc)
    if not roots:
        return None
    undo = pycrdt.UndoManager(scopes=roots, capture_timeout_millis=0)
    undo.include_origin(REFUSED)
    return undo


def _undo_scopes(doc: pycrdt.Doc) -> list[Any]:
    """Every root type, for an UndoManager's scope.

    Roots that only clients have typed (created by their updates) come back
    untyped; any type will do to name the branch for the scope, so they are
    cast to Text (which changes nothing that is encoded).
    """
    scopes = []
    for name, root in list(doc.items()):
        if root is None:
            try:
                root = doc.get(name, type=pycrdt.Text)
            except Exception:
                continue
        scopes.append(root)
    return scopes


def _new_ranges(before: bytes, after: bytes) -> dict[int, tuple[int, int]]:
    """Per client, the clock range [start, end) that ``after`` has beyond ``before``."""
    old = state_vector(before)
    return {c: (old.get(c, 0), clock) for c, clock in state_vector(after).items() if clock > old.get(c, 0)}


def delete_set_update(ranges: dict[int, tuple[int, int]]) -> bytes:
    """A Yjs v1 update with no structs and a delete set covering ``ranges``."""
    parts = [b"\x00", p.write_var_uint(len(ranges))]
    for client, (start, end) in ranges.items():
        parts += [p.write_var_uint(client), b"\x01", p.write_var_uint(start), p.write_var_uint(end - start)]
    return b"".join(parts)
