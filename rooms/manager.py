"""Creates rooms on first join and evicts them once idle and flushed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from persistence.base import DocumentStore
from rooms.room import Room, RoomTuning

log = logging.getLogger("collab.rooms")


class RoomLimitReached(Exception):
    """Opening one more room would exceed ``max_rooms``."""


class RoomManager:
    def __init__(
        self,
        store: DocumentStore,
        tuning: RoomTuning | None = None,
        idle_grace: float = 10.0,
        room_factory: Callable[[str], Room] | None = None,
        max_rooms: int = 0,
    ) -> None:
        self.store = store
        self.tuning = tuning or RoomTuning()
        self.idle_grace = idle_grace
        self.max_rooms = max_rooms  # rooms in memory, loading ones included (0 = no limit)
        self._factory = room_factory or (lambda wid: Room(wid, self.store, self.tuning))
        self.rooms: dict[str, Room] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._evictors: dict[str, asyncio.TimerHandle] = {}
        self._evicting: dict[str, asyncio.Task] = {}


    @property
    def loading(self) -> list[str]:
        """Workspaces whose room is being loaded from the store right now."""
        return sorted(self._loading)

    async def open_room(self, workspace_id: str) -> Room:
        """The loaded room for a workspace, loading it if needed."""
        while True:
            evicting = self._evicting.get(workspace_id)
            if evicting is not None:
                await asyncio.wait([evicting])
                continue
            self._cancel_eviction(workspace_id)
            room = self.rooms.get(workspace_id)
            if room is not None and room.loaded and not room.failed:
                return room
            task = self._loading.get(workspace_id)
            if task is None:
                if room is None and self.max_rooms and len(self.rooms) + len(self._loading) >= self.max_rooms:
                    eviction = self._evict_one_idle()
                    if eviction is None:
                        raise RoomLimitReached(f"room limit ({self.max_rooms}) reached")
                    await asyncio.wait([eviction])
                    continue
                task = asyncio.get_running_loop().create_task(self._load(workspace_id))
                self._loading[workspace_id] = task
            await asyncio.wait([task])
            if task.exception() is not None:
                raise task.exception()
            room = task.result()
            if room is self.rooms.get(workspace_id):
                return room

    async def _load(self, workspace_id: str) -> Room:
        try:
            room = self._factory(workspace_id)
            await room.load()
            self.rooms[workspace_id] = room
            return room
        finally:
            self._loading.pop(workspace_id, None)

    def room_left(self, room: Room) -> None:
        """Called after a peer left; schedules eviction when the room is empty."""
        if room.failed:
            if room.is_idle and self.rooms.get(room.workspace_id) is room:
                del self.rooms[room.workspace_id]
            return
        if room.is_idle and room.workspace_id not in self._evictors:
            loop = asyncio.get_running_loop()
            self._evictors[room.workspace_id] = loop.call_later(
                self.idle_grace, self._start_eviction, room.workspace_id
            )

    def _evict_one_idle(self) -> asyncio.Task | None:
        """At the room limit: an eviction that frees a slot (started now if needed), or None."""
        for task in self._evicting.values():
            return task
        for wid, room in list(self.rooms.items()):
            if room.is_idle:
                self._cancel_eviction(wid)
                self._start_eviction(wid)
                if wid in self._evicting:
                    return self._evicting[wid]
        return None

    async def evict_now(self, workspace_id: str) -> bool:
        """Evict a room at once if it is idle (drained first); True when it is no longer in memory."""
        evicting = self._evicting.get(workspace_id)
        if evicting is not None:
            await asyncio.wait([evicting])
        room = self.rooms.get(workspace_id)
        if room is None:
            return True
        if not room.is_idle:
            return False
        self._cancel_eviction(workspace_id)
        self._start_eviction(workspace_id)
        task = self._evicting.get(workspace_id)
        if task is not None:
            await asyncio.wait([task])
        return self.rooms.get(workspace_id) is not room

    def _cancel_eviction(self, workspace_id: str) -> None:
        handle = self._evictors.pop(workspace_id, None)
        if handle is not None:
            handle.cancel()

    def _start_eviction(self, workspace_id: str) -> None:
        self._evictors.pop(workspace_id, None)
        room = self.rooms.get(workspace_id)
        if room is None or not room.is_idle:
            return
        task = asyncio.get_running_loop().create_task(self._evict(room))
        self._evicting[workspace_id] = task

    async def _evict(self, room: Room) -> None:
        try:
            await room.drain()
            if room.is_idle and self.rooms.get(room.workspace_id) is room:
                del self.rooms[room.workspace_id]
                log.info("evicted room %s", room.workspace_id)
        finally:
            self._evicting.pop(room.workspace_id, None)

    async def close(self) -> None:
        """Flush every room (used at shutdown)."""
        for handle in self._evictors.values():
            handle.cancel()
        self._evictors.clear()
        for room in list(self.rooms.values()):
            await room.drain()
