"""The workspace configuration as the room sees it: a plain view of the ``config`` map, and the guards over it.

The view is kept current from the document's own deep events: only the paths
a transaction touched are re-read. After a client update the guards (locks,
validation) see what changed; a path they refuse is put back by a server
change in a transaction of its own, so every peer converges on the restored
value. Tracking is off (no view, no cost) when no guard and no listener
cares about configuration changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pycrdt

from rooms.config import (
    Changes,
    Rejection,
    UpdateGuard,
    changes_at,
    config_map,
    config_snapshot,
    reread,
    restore,
    touched_paths,
)


@dataclass(slots=True)
class Verdict:
    """What the guards made of one update's configuration changes."""

    changes: Changes = field(default_factory=dict)  # what stays (path -> (old, new))
    attempted: Changes = field(default_factory=dict)  # what the update tried
    rejections: list[Rejection] = field(default_factory=list)


class ConfigGuarding:
    def __init__(self, guards: list[UpdateGuard], tracking: bool) -> None:
        self.guards = guards
        self.tracking = tracking  # a guard or a listener needs the view
        self.view: dict[str, Any] = {}
        self._touched: dict[str, Any] = {}  # path -> new value reported by the events (or REREAD)

    def start(self, doc: pycrdt.Doc) -> None:
        """Read the whole view once (at load); events keep it current from then on."""
        self.view = config_snapshot(doc)
        self._touched = {}

    def on_events(self, events: list[Any]) -> None:
        """The ``config`` map's deep events: remember which paths they touched (and their new values)."""
        touched_paths(events, self._touched)

    def take_touched(self) -> dict[str, Any]:
        touched, self._touched = self._touched, {}
        return touched

    def resync(self, doc: pycrdt.Doc) -> None:
        """Re-read the whole view (after a refusal rewrote the document)."""
        self.view = config_snapshot(doc)
        self._touched = {}

    def check(self, room: Any, peer: Any, doc: pycrdt.Doc) -> Verdict:
        """Run the guards over what the last update changed; put refused paths back."""
        touched = self.take_touched()
        if not touched:
            return Verdict()
        old = self.view

        def cfg() -> pycrdt.Map:  # read only for values the events did not carry
            return config_map(doc)

        new = reread(cfg, old, touched)
        changes = changes_at(old, new, touched)
        verdict = Verdict(changes=changes, attempted=changes)
        if not changes:
            self.view = new
            return verdict
        for guard in self.guards:
            found = guard.check(room, peer, changes, new)
            if not found:
                continue
            verdict.rejections.extend(found)
            with doc.transaction(origin="server"):
                for rejection in found:
                    for path in rejection.paths:
                        restore(doc, path, old)
            more = self.take_touched()
            new = reread(cfg, new, more)
            touched = {**touched, **more}
            changes = changes_at(old, new, touched)
            if not changes:
                break
        self.view = new
        verdict.changes = changes
        return verdict

    def changed(self, doc: pycrdt.Doc) -> Changes:
        """What the last transaction (a server or relayed change) did to the view; the view follows."""
        touched = self.take_touched()
        if not touched:
            return {}
        old = self.view
        self.view = reread(lambda: config_map(doc), old, touched)
        return changes_at(old, self.view, touched)
