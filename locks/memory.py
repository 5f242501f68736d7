"""In-process lease manager: the embedded default (one node, no Redis).

Same semantics as the Redis manager: overlapping paths of different holders
conflict, first come first served among waiters of overlapping paths, leases
lapse after their TTL (a timer per workspace notices), fences only increase --
seeded from the document store's high-water mark when the process starts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace

from clocks import Clock, SystemClock, Timer, wait_for
from locks.base import Lease, LockConflict, LockEvent, LockListener, LockNotHeld, LockUnavailable, new_token
from locks.fence import FenceKeeper
from rooms.config import overlaps

log = logging.getLogger("collab.locks")


@dataclass(eq=False, slots=True)
class _Waiter:
    path: str
    holder: str
    user_id: str
    name: str
    ttl: float
    token: str
    future: asyncio.Future


@dataclass(slots=True)
class _Space:
    leases: dict[str, Lease] = field(default_factory=dict)
    waiters: list[_Waiter] = field(default_factory=list)
    timer: Timer | None = None


class MemoryLeaseManager:
    name = "memory"

    def __init__(self, fences: FenceKeeper | None = None, clock: Clock | None = None) -> None:
        self.fences = fences or FenceKeeper()
        self.clock = clock or SystemClock()  # expiry, the expiry timer and wait timeouts all read this one
        self._spaces: dict[str, _Space] = {}
        self._counters: dict[str, int] = {}  # fence counters (kept while the process lives)
        self._listeners: list[LockListener] = []
        self._seeding: dict[str, asyncio.Task] = {}

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        for space in self._spaces.values():
            if space.timer is not None:
                space.timer.cancel()
            for waiter in space.waiters:
                if not waiter.future.done():
                    waiter.future.cancel()
        self._spaces.clear()

    async def check(self) -> None:
        pass

    def subscribe(self, listener: LockListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------ operations

    async def acquire(
        self,
        workspace: str,
        path: str,
        holder: str,
        user_id: str,
        ttl: float,
        wait: float = 0.0,
        *,
        name: str = "",
        token: str | None = None,
    ) -> Lease:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        await self._seed(workspace)
        space = self._space(workspace)
        self._expire(workspace, space)
        now = self.clock.now()
        own = space.leases.get(path)
        if own is not None and own.holder == holder:
            renewed = own.with_expiry(now + ttl, ttl)
            space.leases[path] = renewed
            self._arm(workspace, space)
            return renewed
        blocker = self._blocker(space, path, holder, None)
        if blocker is None:
            lease = self._grant(workspace, space, path, holder, user_id, name, ttl, token or new_token())
            return await self._covered(lease)
        if wait <= 0:
            raise blocker
        waiter = _Waiter(
            path, holder, user_id, name, ttl, token or new_token(), asyncio.get_running_loop().create_future()
        )
        space.waiters.append(waiter)
        try:
            await wait_for(self.clock, asyncio.shield(waiter.future), wait)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            self._abandon(workspace, waiter)
            raise
        if not waiter.future.done():
            self._abandon(workspace, waiter)
            # One last try without waiting: answers with the current blocker.
            return await self.acquire(workspace, path, holder, user_id, ttl, 0.0, name=name, token=waiter.token)
        return await self._covered(waiter.future.result())

    async def renew(self, lease: Lease, ttl: float | None = None) -> Lease:
        space = self._spaces.get(lease.workspace)
        if space is not None:
            self._expire(lease.workspace, space)
        current = space.leases.get(lease.path) if space is not None else None
        if current is None:
            raise LockNotHeld(f"lease on {lease.path!r} is gone", "gone")
        if current.token != lease.token:
            raise LockNotHeld(f"{lease.path!r} is held under another lease now", "taken")
        ttl = lease.ttl if ttl is None else ttl
        renewed = current.with_expiry(self.clock.now() + ttl, ttl)
        space.leases[lease.path] = renewed
        self._arm(lease.workspace, space)
        return renewed

    async def release(self, lease: Lease) -> None:
        space = self._spaces.get(lease.workspace)
        if space is not None:
            self._expire(lease.workspace, space)
        current = space.leases.get(lease.path) if space is not None else None
        if current is None:
            raise LockNotHeld(f"lease on {lease.path!r} is gone", "gone")
        if current.token != lease.token:
            raise LockNotHeld(f"{lease.path!r} is held under another lease now", "taken")
        del space.leases[lease.path]
        self._emit(LockEvent(lease.workspace, "released", lease.path, lease.holder, lease.fence))
        self._pump(lease.workspace, space)
        self._gc(lease.workspace, space)

    async def list(self, workspace: str) -> list[Lease]:
        space = self._spaces.get(workspace)
        if space is None:
            return []
        self._expire(workspace, space)
        return [replace(lease, token="") for lease in space.leases.values()]

    async def force_release(self, workspace: str, path: str) -> Lease | None:
        space = self._spaces.get(workspace)
        if space is None:
            return None
        self._expire(workspace, space)
        lease = space.leases.pop(path, None)
        if lease is None:
            return None
        self._emit(LockEvent(workspace, "forced", path, lease.holder, lease.fence))
        self._pump(workspace, space)
        self._gc(workspace, space)
        return replace(lease, token="")

    # ------------------------------------------------------------ internals

    def _space(self, workspace: str) -> _Space:
        space = self._spaces.get(workspace)
        if space is None:
            space = self._spaces[workspace] = _Space()
        return space

    async def _seed(self, workspace: str) -> None:
        """Start the fence counter above the durable high-water mark."""
        if workspace in self._counters:
            return
        task = self._seeding.get(workspace)
        if task is None:
            task = asyncio.ensure_future(self.fences.durable_ceiling(workspace))
            self._seeding[workspace] = task
            task.add_done_callback(lambda _t: self._seeding.pop(workspace, None))
        try:
            ceiling = await asyncio.shield(task)
        except Exception as exc:
            raise LockUnavailable(f"cannot read the fence high-water mark: {exc}") from exc
        self._counters[workspace] = max(self._counters.get(workspace, 0), ceiling)

    def _blocker(self, space: _Space, path: str, holder: str, before: _Waiter | None) -> LockConflict | None:
        for lease in space.leases.values():
            if lease.holder != holder and overlaps(lease.path, path):
                return LockConflict(path, lease)
        for waiter in space.waiters:
            if waiter is before:
                break
            if not waiter.future.done() and overlaps(waiter.path, path):
                return LockConflict(path, None, waiter.path)
        return None

    def _grant(
        self, workspace: str, space: _Space, path: str, holder: str, user_id: str, name: str, ttl: float, token: str
    ) -> Lease:
        fence = self._counters[workspace] + 1
        self._counters[workspace] = fence
        lease = Lease(workspace, path, holder, user_id, fence, self.clock.now() + ttl, token, name, ttl)
        space.leases[path] = lease
        self._arm(workspace, space)
        self._emit(LockEvent(workspace, "acquired", path, holder, lease.fence))
        return lease

    async def _covered(self, lease: Lease) -> Lease:
        """Record the fence durably before anyone learns of the grant."""
        try:
            await self.fences.cover(lease.workspace, lease.fence)
        except asyncio.CancelledError:
            self._drop(lease)
            raise
        except Exception as exc:
            self._drop(lease)
            raise LockUnavailable(f"cannot record the fence high-water mark: {exc}") from exc
        return lease

    def _drop(self, lease: Lease) -> None:
        space = self._spaces.get(lease.workspace)
        if space is not None and (current := space.leases.get(lease.path)) is not None:
            if current.token == lease.token:
                del space.leases[lease.path]
                self._emit(LockEvent(lease.workspace, "released", lease.path, lease.holder, lease.fence))
                self._pump(lease.workspace, space)
                self._gc(lease.workspace, space)

    def _abandon(self, workspace: str, waiter: _Waiter) -> None:
        """A waiter gave up (timeout or cancellation); undo a grant it did not take."""
        space = self._spaces.get(workspace)
        if space is not None and waiter in space.waiters:
            space.waiters.remove(waiter)
        if waiter.future.done() and not waiter.future.cancelled():
            self._drop(waiter.future.result())
        elif not waiter.future.done():
            waiter.future.cancel()
        if space is not None:
            self._pump(workspace, space)
            self._gc(workspace, space)

    def _pump(self, workspace: str, space: _Space) -> None:
        """Grant what waiters can now have, first come first served."""
        for waiter in list(space.waiters):
            if waiter.future.done():
                space.waiters.remove(waiter)
                continue
            if self._blocker(space, waiter.path, waiter.holder, waiter) is None:
                space.waiters.remove(waiter)
                lease = self._grant(
                    workspace, space, waiter.path, waiter.holder, waiter.user_id, waiter.name, waiter.ttl, waiter.token
                )
                waiter.future.set_result(lease)

    def _expire(self, workspace: str, space: _Space) -> None:
        now = self.clock.now()
        expired = [lease for lease in space.leases.values() if lease.expires_at <= now]
        if not expired:
            return
        for lease in expired:
            del space.leases[lease.path]
            self._emit(LockEvent(workspace, "expired", lease.path, lease.holder, lease.fence))
        self._pump(workspace, space)
        self._arm(workspace, space)

    def _arm(self, workspace: str, space: _Space) -> None:
        if space.timer is not None:
            space.timer.cancel()
            space.timer = None
        if space.leases:
            delay = max(0.0, min(lease.expires_at for lease in space.leases.values()) - self.clock.now())
            space.timer = self.clock.call_later(delay + 0.001, self._on_timer, workspace)

    def _on_timer(self, workspace: str) -> None:
        space = self._spaces.get(workspace)
        if space is None:
            return
        space.timer = None
        self._expire(workspace, space)
        self._arm(workspace, space)
        self._gc(workspace, space)

    def _gc(self, workspace: str, space: _Space) -> None:
        """Forget an empty workspace (its counter is re-seeded from the store)."""
        if not space.leases and not space.waiters and self._spaces.get(workspace) is space:
            if space.timer is not None:
                space.timer.cancel()
            del self._spaces[workspace]

    def _emit(self, event: LockEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("lock listener failed")
