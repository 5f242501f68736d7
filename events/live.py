"""Best-effort events: participants, locks and the workspace lifecycle, as a room listener.

These facts are not in the durable log: the node that sees one publishes it
at once, and it is lost if that node dies first. Ids are deterministic
where several nodes see the same fact (a lock change: workspace, path,
fence), so the sinks keep one of them; participant and lifecycle facts are
seen by one node only (its own connections, its own rooms).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

from events import types as t
from events.envelope import cloud_event

_PREFIX = os.urandom(4).hex()


class LiveEvents:
    """Room listener turning room and lock facts into events handed to ``emit``."""

    def __init__(self, emit: Callable[[dict[str, Any]], None], source: str, node_id: str) -> None:
        self.emit = emit
        self.source = source
        self.node_id = node_id
        self._ids = itertools.count(1)
        self._connections: dict[Any, str] = {}  # PeerState -> connection id
        self._focus: dict[Any, str | None] = {}
        self._locks: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}  # workspace -> (path, fence) -> lock
        self._lock_hints: dict[tuple[str, str, int], str] = {}  # (workspace, path, fence) -> how it ended
        self._open: dict[str, Any] = {}  # workspace -> room object seen at load
        self._watcher: asyncio.Task | None = None

    def _event(self, event_type: str, workspace: str, data: dict[str, Any], event_id: str | None = None) -> None:
        event_id = event_id or f"{workspace}/{self.node_id}/{_PREFIX}{next(self._ids):x}"
        self.emit(cloud_event(event_type, workspace, data, event_id=event_id, at=time.time(), source=self.source))

    # ------------------------------------------------------------ lifecycle

    async def on_load(self, room: Any) -> None:
        self._open[room.workspace_id] = room
        self._event(t.WORKSPACE_OPENED, room.workspace_id, {"node": self.node_id, "new": bool(room.is_new)})

    def watch_evictions(self, open_rooms: Callable[[], dict[str, Any]], interval: float = 0.5) -> None:
        """Rooms have no eviction hook: compare the rooms in memory with those seen loading."""

        async def run() -> None:
            while True:
                await asyncio.sleep(interval)
                current = open_rooms()
                for workspace, room in list(self._open.items()):
                    if current.get(workspace) is not room:
                        del self._open[workspace]
                        self._locks.pop(workspace, None)
                        self._event(t.WORKSPACE_EVICTED, workspace, {"node": self.node_id})

        self._watcher = asyncio.get_running_loop().create_task(run())

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    # --------------------------------------------------------- participants

    @staticmethod
    def _participant(ps: Any, connection: str) -> dict[str, Any]:
        identity = getattr(ps, "identity", None)
        return {
            "connection": connection,
            "user_id": getattr(identity, "user_id", None),
            "name": getattr(identity, "name", None),
            "role": getattr(identity, "role", None),
        }

    def on_join(self, room: Any, ps: Any) -> None:
        if getattr(ps, "remote", None):
            return  # another node's clients: that node reports them
        connection = f"{self.node_id}/{_PREFIX}{next(self._ids):x}"
        self._connections[ps] = connection
        self._event(
            t.PARTICIPANT_JOINED,
            room.workspace_id,
            {"participant": self._participant(ps, connection), "node": self.node_id},
        )

    def on_leave(self, room: Any, ps: Any) -> None:
        connection = self._connections.pop(ps, None)
        self._focus.pop(ps, None)
        if connection is None:
            return
        self._event(
            t.PARTICIPANT_LEFT,
            room.workspace_id,
            {"participant": self._participant(ps, connection), "node": self.node_id},
        )

    def on_awareness(self, room: Any, ps: Any, client_id: int, state: str | None) -> None:
        connection = self._connections.get(ps)
        if connection is None:
            return
        focus = None
        if state is not None:
            try:
                parsed = json.loads(state)
            except (TypeError, ValueError):
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("focus"), str):
                focus = parsed["focus"] or None
        previous = self._focus.get(ps)
        if focus == previous:
            return
        self._focus[ps] = focus
        self._event(
            t.PARTICIPANT_FOCUS,
            room.workspace_id,
            {"participant": self._participant(ps, connection), "focus": focus, "previous": previous},
        )

    # ---------------------------------------------------------------- locks

    def on_lock_event(self, event: Any) -> None:
        """The lease manager's own events: how a lease ended (forced, released, expired, lost)."""
        if event.kind in ("released", "forced", "expired", "lost") and event.fence:
            if len(self._lock_hints) > 10_000:
                self._lock_hints.clear()
            self._lock_hints[(event.workspace, event.path, event.fence)] = event.kind

    def on_locks_changed(self, room: Any, locks: list[dict[str, Any]]) -> None:
        workspace = room.workspace_id
        before = self._locks.get(workspace, {})
        after = {(lock["path"], int(lock["fence"])): lock for lock in locks}
        self._locks[workspace] = after
        now = time.time()
        for key, lock in before.items():
            if key in after:
                continue
            hint = self._lock_hints.pop((workspace, key[0], key[1]), None)
            if hint == "forced":
                reason = "forced"
            elif hint in ("expired", "lost"):
                reason = hint
            elif hint == "released":
                reason = "released"
            else:
                reason = "expired" if now >= float(lock.get("expires_at") or 0) - 0.05 else "released"
            self._event(
                t.UNLOCKED,
                workspace,
                {**_lock(lock), "reason": reason},
                event_id=f"{workspace}/lock/{key[1]}/{lock['path']}/ended",
            )
        for key, lock in after.items():
            if key not in before:
                self._event(
                    t.LOCKED, workspace, _lock(lock), event_id=f"{workspace}/lock/{key[1]}/{lock['path']}/acquired"
                )


def _lock(lock: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": lock["path"],
        "fence": lock.get("fence"),
        "holder": {"user_id": lock.get("user_id"), "name": lock.get("name"), "connection": lock.get("holder")},
        "expires_at": lock.get("expires_at"),
    }
