"""The presence model: connection entries, participants, and the registry protocol.

A *connection entry* is what one node knows about one websocket connection in
a workspace: who it is (from the authenticated identity, never from what the
client claims), when it joined, when it was last active, and what it is
editing. Registries store entries per workspace, with an expiry that the
owning node keeps refreshing; a node that dies stops refreshing and its
entries disappear on their own.

A *participant* is a user in a workspace, folded from all of that user's
live entries on every node: two tabs are one participant with two
connections. ``build_roster`` does the folding, so every node computes the
same roster from the same entries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

# Heartbeats and polls run several times per TTL; entries outlive a few
# missed heartbeats but expire well inside the TTL after their node died.
HEARTBEATS_PER_TTL = 5  # a node refreshes its entries every ttl / 5
ENTRY_EXPIRY_FRACTION = 0.6  # an entry not refreshed for 0.6 * ttl is gone
POLLS_PER_TTL = 5  # nodes re-read the rosters they serve every ttl / 5


@dataclass(frozen=True, slots=True)
class ConnectionEntry:
    """One live connection of a user to a workspace, on one node."""

    workspace_id: str
    conn_id: str  # unique across nodes: "<node id>/<counter>"
    node: str
    user_id: str
    name: str
    color: str
    role: str = "editor"
    joined_at: float = 0.0  # unix time, seconds (millisecond resolution)
    last_active: float = 0.0  # unix time of the last change the connection made
    focus: str | None = None  # the config path it is editing (awareness "focus")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConnectionEntry:
        return cls(
            workspace_id=str(data["workspace_id"]),
            conn_id=str(data["conn_id"]),
            node=str(data["node"]),
            user_id=str(data["user_id"]),
            name=str(data.get("name") or data["user_id"]),
            color=str(data.get("color") or "#888888"),
            role=str(data.get("role") or "editor"),
            joined_at=float(data.get("joined_at") or 0.0),
            last_active=float(data.get("last_active") or 0.0),
            focus=data.get("focus") if isinstance(data.get("focus"), str) else None,
        )


@dataclass(slots=True)
class WorkspacePresence:
    """Everything a registry holds for one workspace."""

    entries: list[ConnectionEntry] = field(default_factory=list)
    locks: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Participant:
    """A user in a workspace, across all of their connections and nodes."""

    user_id: str
    name: str
    color: str
    role: str
    connections: int
    joined_at: float
    last_active: float
    node: str  # the node serving their most recently active connection
    nodes: tuple[str, ...]
    editing: str | None
    locks: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "name": self.name,
            "color": self.color,
            "role": self.role,
            "connections": self.connections,
            "joined_at": self.joined_at,
            "last_active": self.last_active,
            "node": self.node,
            "nodes": list(self.nodes),
            "editing": self.editing,
            "locks": list(self.locks),
        }


def live_locks(locks: Iterable[dict[str, Any]], now: float | None = None) -> list[dict[str, Any]]:
    """Locks not yet expired. ``expires_at`` is unix time in seconds (None: no expiry)."""
    now = time.time() if now is None else now
    out = []
    for lock in locks:
        expires = lock.get("expires_at")
        if isinstance(expires, int | float) and expires < now:
            continue
        out.append(lock)
    return out


def build_roster(state: WorkspacePresence, now: float | None = None) -> dict[str, Participant]:
    """Fold connection entries into participants (keyed by user id)."""
    by_user: dict[str, list[ConnectionEntry]] = {}
    for entry in state.entries:
        by_user.setdefault(entry.user_id, []).append(entry)
    locks_by_user: dict[str, set[str]] = {}
    for lock in live_locks(state.locks, now):
        user = lock.get("user_id")
        path = lock.get("path")
        if isinstance(user, str) and isinstance(path, str):
            locks_by_user.setdefault(user, set()).add(path)
    roster: dict[str, Participant] = {}
    no_locks: tuple[str, ...] = ()
    for user_id, entries in by_user.items():
        if len(entries) == 1:  # the common case, kept cheap: rosters are rebuilt on every change
            e = entries[0]
            held = locks_by_user.get(user_id)
            roster[user_id] = Participant(
                user_id, e.name, e.color, e.role, 1, e.joined_at, e.last_active, e.node, (e.node,), e.focus or None,
                tuple(sorted(held)) if held else no_locks,
            )  # fmt: skip
            continue
        # The most recently active connection speaks for the user's name and node;
        # ties broken by connection id so every node picks the same one.
        entries.sort(key=lambda e: (e.last_active, e.joined_at, e.conn_id))
        latest = entries[-1]
        focused = [e for e in entries if e.focus]
        roster[user_id] = Participant(
            user_id=user_id,
            name=latest.name,
            color=latest.color,
            role=latest.role,
            connections=len(entries),
            joined_at=min(e.joined_at for e in entries),
            last_active=latest.last_active,
            node=latest.node,
            nodes=tuple(sorted({e.node for e in entries})),
            editing=focused[-1].focus if focused else None,
            locks=tuple(sorted(locks_by_user.get(user_id, ()))),
        )
    return roster


def roster_json(roster: dict[str, Participant]) -> list[dict[str, Any]]:
    """Participants in a stable order: earliest joined first."""
    return [p.to_json() for p in sorted(roster.values(), key=lambda p: (p.joined_at, p.user_id))]


def roster_diff(
    old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(joins, leaves, updates) between two rosters of participant dicts."""
    joins = [p for uid, p in new.items() if uid not in old]
    leaves = [p for uid, p in old.items() if uid not in new]
    updates = [p for uid, p in new.items() if uid in old and old[uid] != p]
    return joins, leaves, updates


class PresenceRegistry(Protocol):
    """Where a node publishes its connections and reads everyone's.

    Writes are staged synchronously (``put``/``discard``/``set_locks``: the
    node's own view is current at once) and reach the shared store on
    ``sync``, which also tells the other nodes watching the workspace.
    ``read`` returns every live entry of a workspace from every node. Entries
    expire unless their node keeps running: a registry refreshes its own
    entries every ``ttl / HEARTBEATS_PER_TTL`` seconds, and an entry whose
    node stopped doing so is gone within ``ENTRY_EXPIRY_FRACTION * ttl``.
    """

    node_id: str
    ttl: float
    #: called with a workspace id when another node changed it (set by the owner)
    on_change: Callable[[str], None] | None

    async def start(self) -> None:
        """Connect and start heartbeating."""

    async def close(self, remove_entries: bool = True) -> None:
        """Stop heartbeating; by default remove this node's entries (a clean shutdown)."""

    def put(self, entry: ConnectionEntry) -> None:
        """Add or replace one of this node's entries (staged until ``sync``)."""

    def discard(self, workspace_id: str, conn_id: str) -> None:
        """Remove one of this node's entries (staged until ``sync``)."""

    def set_locks(self, workspace_id: str, locks: list[dict[str, Any]]) -> None:
        """Replace the workspace's lock list (staged until ``sync``)."""

    async def sync(self, workspace_id: str) -> None:
        """Write the workspace's staged changes and notify the other nodes."""

    async def read(self, workspace_id: str) -> WorkspacePresence:
        """Every live entry of the workspace (all nodes) and its locks."""

    async def watch(self, workspace_id: str) -> None:
        """Start calling ``on_change(workspace_id)`` when another node changes it."""

    async def unwatch(self, workspace_id: str) -> None:
        """Stop watching the workspace."""

    async def heartbeat(self) -> None:
        """Refresh the expiry of every entry of this node (run periodically by ``start``)."""

    async def check(self) -> None:
        """Raise if the registry cannot serve (for /readyz)."""
