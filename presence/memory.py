"""In-process presence registry: the embedded default (no Redis needed).

Entries live in a :class:`MemoryBackend`. Each server has its own backend
unless several registries are handed the same one, which is how tests run
several "nodes" in one process under the same contract as Redis: per-entry
expiry refreshed by a heartbeat, and change notification to the other
registries watching a workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from clocks import Clock, SystemClock
from presence.base import ENTRY_EXPIRY_FRACTION, HEARTBEATS_PER_TTL, ConnectionEntry, WorkspacePresence

log = logging.getLogger("collab.presence")


class MemoryBackend:
    """The shared store: entries with an expiry time, locks, watchers."""

    def __init__(self) -> None:
        self.entries: dict[str, dict[str, tuple[ConnectionEntry, float]]] = {}
        self.locks: dict[str, list[dict[str, Any]]] = {}
        self.watchers: dict[str, set[MemoryPresenceRegistry]] = {}

    def live(self, workspace_id: str, now: float) -> list[ConnectionEntry]:
        table = self.entries.get(workspace_id)
        if not table:
            return []
        expired = [cid for cid, (_, expires) in table.items() if expires <= now]
        for cid in expired:
            del table[cid]
        if not table:
            del self.entries[workspace_id]
            return []
        return [entry for entry, _ in table.values()]

    def notify(self, workspace_id: str, origin: MemoryPresenceRegistry) -> None:
        for registry in list(self.watchers.get(workspace_id, ())):
            if registry is not origin and registry.on_change is not None:
                registry.on_change(workspace_id)


class MemoryPresenceRegistry:
    """A :class:`presence.base.PresenceRegistry` kept in this process."""

    def __init__(
        self, node_id: str, ttl: float = 30.0, backend: MemoryBackend | None = None, clock: Clock | None = None
    ) -> None:
        self.node_id = node_id
        self.ttl = ttl
        # Entry expiry and the heartbeat; registries sharing a backend share a clock.
        self.clock = clock or SystemClock()
        self.backend = backend or MemoryBackend()
        self.on_change: Callable[[str], None] | None = None
        self._own: dict[str, dict[str, ConnectionEntry]] = {}
        self._heartbeat: asyncio.Task | None = None
        self._closed = False

    @property
    def entry_expiry(self) -> float:
        return self.ttl * ENTRY_EXPIRY_FRACTION

    async def start(self) -> None:
        self._closed = False
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def close(self, remove_entries: bool = True) -> None:
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        for workspace_id in list(self.backend.watchers):
            self.backend.watchers[workspace_id].discard(self)
        if remove_entries:
            for workspace_id, own in self._own.items():
                table = self.backend.entries.get(workspace_id, {})
                for conn_id in own:
                    table.pop(conn_id, None)
                self.backend.notify(workspace_id, self)
        self._own.clear()

    # ------------------------------------------------------------- writes

    def put(self, entry: ConnectionEntry) -> None:
        if self._closed:
            return
        self._own.setdefault(entry.workspace_id, {})[entry.conn_id] = entry
        expires = self.clock.monotonic() + self.entry_expiry
        self.backend.entries.setdefault(entry.workspace_id, {})[entry.conn_id] = (entry, expires)

    def discard(self, workspace_id: str, conn_id: str) -> None:
        own = self._own.get(workspace_id)
        if own is None or own.pop(conn_id, None) is None:
            return
        if not own:
            del self._own[workspace_id]
        table = self.backend.entries.get(workspace_id)
        if table is not None:
            table.pop(conn_id, None)

    def set_locks(self, workspace_id: str, locks: list[dict[str, Any]]) -> None:
        if locks:
            self.backend.locks[workspace_id] = [dict(lock) for lock in locks]
        else:
            self.backend.locks.pop(workspace_id, None)

    async def sync(self, workspace_id: str) -> None:
        if not self._closed:
            self.backend.notify(workspace_id, self)

    # -------------------------------------------------------------- reads

    async def read(self, workspace_id: str) -> WorkspacePresence:
        entries = self.backend.live(workspace_id, self.clock.monotonic())
        own = self._own.get(workspace_id, {})
        leftovers = [e.conn_id for e in entries if e.node == self.node_id and e.conn_id not in own]
        if leftovers:  # our node id, not our connections: an earlier run of this node left them
            table = self.backend.entries.get(workspace_id, {})
            for conn_id in leftovers:
                table.pop(conn_id, None)
            entries = [e for e in entries if e.conn_id not in leftovers]
            self.backend.notify(workspace_id, self)
        return WorkspacePresence(entries=entries, locks=list(self.backend.locks.get(workspace_id, ())))

    async def watch(self, workspace_id: str) -> None:
        self.backend.watchers.setdefault(workspace_id, set()).add(self)

    async def unwatch(self, workspace_id: str) -> None:
        watchers = self.backend.watchers.get(workspace_id)
        if watchers is not None:
            watchers.discard(self)
            if not watchers:
                del self.backend.watchers[workspace_id]

    # ---------------------------------------------------------- liveness

    async def heartbeat(self) -> None:
        expires = self.clock.monotonic() + self.entry_expiry
        for workspace_id, own in self._own.items():
            table = self.backend.entries.setdefault(workspace_id, {})
            for conn_id, entry in own.items():
                table[conn_id] = (entry, expires)

    async def _heartbeat_loop(self) -> None:
        interval = self.ttl / HEARTBEATS_PER_TTL
        while True:
            await self.clock.sleep(interval)
            try:
                await self.heartbeat()
            except Exception:  # pragma: no cover - nothing here does I/O
                log.exception("presence heartbeat failed")

    async def check(self) -> None:
        if self._closed:
            raise RuntimeError("presence registry closed")

    def own_entries(self, workspace_id: str) -> list[ConnectionEntry]:
        return list(self._own.get(workspace_id, {}).values())
