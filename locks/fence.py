"""The durable high-water mark of fencing tokens, kept in the document store.

Fences come from a per-workspace counter in the lock backend (a Redis key, or
a dict in memory). Backends lose that counter: Redis restarts empty, the
process restarts. So the document store keeps a *ceiling* per workspace that
is always at least every fence ever granted, and a backend that finds its
counter missing seeds it from the ceiling before granting anything.

Ceilings are reserved in blocks: a grant whose fence exceeds the cached
ceiling raises it to ``fence + block`` and waits until that write is durable
before the grant is answered; the next ``block`` grants need no write. After
a loss of the counter, fences therefore jump by up to ``block`` -- they stay
increasing, which is all a fence promises.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger("collab.locks")

CEILING_KEY = "locks.fence_ceiling"


class MetaStore(Protocol):
    async def get_meta(self, workspace_id: str, key: str) -> bytes | None: ...

    async def put_meta(self, workspace_id: str, key: str, value: bytes) -> None: ...


class MemoryMetaStore:
    """A MetaStore in a dict (tests, and stores without metadata support)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], bytes] = {}

    async def get_meta(self, workspace_id: str, key: str) -> bytes | None:
        return self.data.get((workspace_id, key))

    async def put_meta(self, workspace_id: str, key: str, value: bytes) -> None:
        self.data[(workspace_id, key)] = bytes(value)


class FenceKeeper:
    def __init__(self, store: MetaStore | None = None, block: int = 1000) -> None:
        if store is None or not hasattr(store, "get_meta"):
            if store is not None:
                log.warning("document store has no metadata API: fence high-water marks kept in memory only")
            store = MemoryMetaStore()
        self.store = store
        self.block = max(1, int(block))
        self._ceiling: dict[str, int] = {}
        self._granted: dict[str, int] = {}  # highest fence this process saw granted
        self._locks: dict[str, asyncio.Lock] = {}
        self.writes = 0

    def cached_ceiling(self, workspace: str) -> int:
        """The last ceiling this process read or wrote (0 if none yet)."""
        return self._ceiling.get(workspace, 0)

    def highest_granted(self, workspace: str) -> int:
        """The highest fence this process has seen granted (a floor for the counter)."""
        return self._granted.get(workspace, 0)

    async def durable_ceiling(self, workspace: str) -> int:
        """Read the stored ceiling (fresh, not cached)."""
        raw = await self.store.get_meta(workspace, CEILING_KEY)
        value = int(raw) if raw else 0
        if value > self._ceiling.get(workspace, 0):
            self._ceiling[workspace] = value
        return value

    async def cover(self, workspace: str, fence: int) -> None:
        """Make sure the stored ceiling is at least ``fence`` (durably) before returning."""
        if fence > self._granted.get(workspace, 0):
            self._granted[workspace] = fence
        if fence <= self._ceiling.get(workspace, 0):
            return
        lock = self._locks.setdefault(workspace, asyncio.Lock())
        async with lock:
            if fence <= self._ceiling.get(workspace, 0):
                return
            stored = await self.durable_ceiling(workspace)
            if fence <= stored:
                return
            new = max(stored, fence + self.block)
            await self.store.put_meta(workspace, CEILING_KEY, str(new).encode())
            self.writes += 1
            self._ceiling[workspace] = new
