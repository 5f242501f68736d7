"""Configuration locks in the server: control messages, renewal, enforcement.

* ``lock.acquire`` / ``lock.release`` / ``lock.list`` / ``lock.force_release``
  on the control channel (see docs/protocol.md, "Control messages: locks").
* A holder is one connection. While it is alive -- it sent something within
  the TTL -- its leases are renewed every TTL/3; a clean or abrupt disconnect
  releases them at once; a silent connection's leases lapse TTL after its last
  message. A renewal that finds the lease gone or taken is a *lost* lock: it
  is broadcast at once and never re-acquired silently.
* Every change of lock state is broadcast to the room's opted-in peers
  (``lock.acquired``, ``lock.released``, ``lock.expired``, ``lock.lost``) and
  reported to room listeners as ``on_locks_changed(room, locks)``.
* The guard rejects a peer's changes to paths overlapping a lease of another
  holder; the room compensates them for everyone.

Each node keeps a *view* of every lease of the workspaces it hosts: its own
grants and releases go in at once, other nodes' changes arrive by the
backend's events (Redis pub/sub) and are re-read from the backend, expiries
are noticed by a timer at the earliest expiry, and (with Redis) a periodic
re-read covers lost events. The guard enforces that view: when the backend is
unreachable, the node keeps enforcing what it last knew until it lapses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, Metric
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from clocks import Clock, SystemClock, Timer
from codec import protocol as p
from collab import logs
from collab.extensions import ControlRoute, Extension
from collab.gate import GatedRoute, server_role, workspace_role
from collab.metrics import gauge
from locks.base import Lease, LeaseManager, LockConflict, LockEvent, LockNotHeld, LockUnavailable, new_token
from locks.fence import FenceKeeper
from locks.memory import MemoryLeaseManager
from rooms.config import Rejection, covers, overlaps
from rooms.peer import Slot
from rooms.room import PeerState, Room

if TYPE_CHECKING:
    from collab.extensions import Host
    from collab.settings import Settings

log = logging.getLogger("collab.locks")

_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(eq=False, slots=True)
class _Held:
    lease: Lease
    ttl: float
    task: asyncio.Task | None = None


@dataclass(eq=False, slots=True)
class _Conn:
    id: str
    ps: PeerState
    room: Room
    leases: dict[str, _Held] = field(default_factory=dict)
    pending: dict[str, asyncio.Task] = field(default_factory=dict)
    pending_refs: dict[str, dict] = field(default_factory=dict)  # path -> the request's id echo
    tokens: float = 0.0
    refilled: float = 0.0


_CONN = Slot[_Conn]("locks")  # a connection's leases and pending requests, on its PeerState

@dataclass(eq=False, slots=True)
class _Space:
    """What this node knows of one workspace's leases."""

    room: Room
    view: dict[str, Lease] = field(default_factory=dict)  # path -> lease (token blank unless ours)
    version: int = 0  # bumped by every local change; a re-read started before one is stale
    hints: dict[tuple[str, int], str] = field(default_factory=dict)  # (path, fence) -> why it ended
    timer: Timer | None = None
    refresh_task: asyncio.Task | None = None
    dirty: bool = False


class LockExtension(Extension):
    name = "locks"

    def __init__(self, settings: Settings, manager: LeaseManager | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.manager: LeaseManager | None = manager
        # Renewals, liveness, expiry timers and rate limits; give a manager built
        # outside the same clock (tests: a ManualClock for both).
        self.clock: Clock = clock or SystemClock()
        self.default_ttl = settings.lock_ttl_seconds
        self.min_ttl = min(settings.lock_min_ttl_seconds, settings.lock_max_ttl_seconds)
        self.max_ttl = settings.lock_max_ttl_seconds
        self.max_wait = settings.lock_max_wait_seconds
        self.roots = [r for r in settings.lockable_paths if r]
        self._node = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._by_id: dict[str, _Conn] = {}  # this node's connections (their records are in _CONN slots)
        self.guard = _LockGuard(self)
        self._spaces: dict[str, _Space] = {}
        self._tasks: set[asyncio.Task] = set()
        self._periodic: asyncio.Task | None = None
        self._stopping = False
        self._app: Any = None
        self.stats = {k: 0 for k in ("granted", "released", "renewed", "expired", "lost", "rejected_updates")}

    # ------------------------------------------------------------ extension

    def control_routes(self) -> list[ControlRoute]:
        return [
            ControlRoute("lock.acquire", self._on_acquire, requires="editor", error_type="lock.error"),
            ControlRoute("lock.release", self._on_release, requires="editor", error_type="lock.error"),
            ControlRoute("lock.list", self._on_list, error_type="lock.error"),
            ControlRoute("lock.force_release", self._on_force_release, requires="admin", error_type="lock.error"),
        ]

    def guards(self) -> list:
        return [self.guard]

    def listeners(self) -> list:
        return [self]

    def routes(self) -> list:
        return [
            GatedRoute("/admin/locks/stats", self._stats_endpoint, requires=server_role("admin")),
            GatedRoute(
                "/api/admin/rooms/{workspace_id}/locks/{path}/release",
                self._release_endpoint,
                methods=["POST"],
                requires=workspace_role("admin"),
            ),
        ]

    async def room_report(self, workspace_id: str) -> dict[str, Any]:
        return {"locks": await self.current_locks(workspace_id)}

    async def _release_endpoint(self, request: Request) -> JSONResponse:
        """``POST /api/admin/rooms/{id}/locks/{path}/release``: force-release a lock."""
        workspace_id = request.state.workspace_id
        logs.bind(workspace=workspace_id, user=request.state.identity.user_id)
        path = request.path_params["path"]
        if not path or len(path) > 512:
            raise HTTPException(400, "invalid lock path")
        try:
            released = await self.force_release(workspace_id, path)
        except LockUnavailable as exc:
            raise HTTPException(503, f"lock service unavailable: {exc}") from None
        if released is None:
            raise HTTPException(404, f"nobody holds a lock on exactly {path!r}")
        # Admin actions are logged together, under collab.admin, with who did them.
        logging.getLogger("collab.admin").warning(
            "admin force-released the lock on %s held by %s", path, released.get("user_id")
        )
        return JSONResponse({"workspace": workspace_id, "released": released})

    async def _stats_endpoint(self, request: Request) -> JSONResponse:
        """Counters for operators and benchmarks (no lock contents); admins only."""
        return JSONResponse(
            {
                "backend": getattr(self.manager, "name", None),
                "connections": len(self._by_id),
                "workspaces": len(self._spaces),
                "held": sum(len(c.leases) for c in self._by_id.values()),
                "pending": sum(len(c.pending) for c in self._by_id.values()),
                "pubsub_connected": getattr(self.manager, "pubsub_connected", None),
                "events": self.stats,
                "manager": getattr(self.manager, "stats", {}),
            }
        )

    async def start(self, app: Host) -> None:
        self._app = app
        if self.manager is None:
            fences = FenceKeeper(app.store, block=self.settings.lock_fence_block)
            if self.settings.redis_url:
                from locks.redis import RedisLeaseManager

                self.manager = RedisLeaseManager(
                    self.settings.redis_url,
                    fences,
                    timeout=self.settings.lock_redis_timeout_seconds,
                    poll_interval=min(0.5, max(0.05, self.default_ttl / 10)),
                    clock=self.clock,
                )
            else:
                self.manager = MemoryLeaseManager(fences, clock=self.clock)
        await self.manager.start()
        self.manager.subscribe(self._on_backend_event)
        if getattr(self.manager, "name", "") != "memory":
            self._periodic = asyncio.get_running_loop().create_task(self._reread_periodically())
        log.info("locks: %s backend, default TTL %.1fs", getattr(self.manager, "name", "?"), self.default_ttl)

    async def stop(self) -> None:
        """Release what this node's connections hold (a clean shutdown is a clean disconnect)."""
        self._stopping = True
        if self._periodic is not None:
            self._periodic.cancel()
        releases = []
        for conn in list(self._by_id.values()):
            for task in conn.pending.values():
                task.cancel()
            for held in conn.leases.values():
                if held.task is not None:
                    held.task.cancel()
                releases.append(self.manager.release(held.lease))
            conn.leases.clear()
        # Releases already under way (connections that left during shutdown) finish too.
        pending = [asyncio.ensure_future(r) for r in releases] + list(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=2)
        for space in self._spaces.values():
            if space.timer is not None:
                space.timer.cancel()
            if space.refresh_task is not None:
                space.refresh_task.cancel()
        tasks = [t for t in [*pending, *self._tasks] if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *pending, return_exceptions=True)
        if self.manager is not None:
            await self.manager.close()

    async def check(self) -> str:
        """The lock backend, reported by /readyz but never failing it: without
        it the node still syncs edits (lock requests fail with ``unavailable``)."""
        if self.manager is None:
            return "not started"
        try:
            await self.manager.check()
        except Exception as exc:
            return f"unavailable, not required: {type(exc).__name__}: {exc}"[:300]
        return "ok"

    # ------------------------------------------------------- public helpers

    def fence_for(self, room: Room, peer: PeerState, paths) -> int | None:
        """The highest fence among ``peer``'s leases covering any of ``paths``."""
        conn = _CONN.get(peer)
        if conn is None:
            return None
        best = None
        for held in conn.leases.values():
            if any(covers(held.lease.path, path) for path in paths):
                if best is None or held.lease.fence > best:
                    best = held.lease.fence
        return best

    def connection_id(self, peer: PeerState) -> str | None:
        conn = _CONN.get(peer)
        return conn.id if conn else None

    def lease_with_token(self, workspace: str, path: str, token: str) -> dict[str, Any] | None:
        """The lease on exactly ``path`` held through this node, if ``token`` is its token (else None)."""
        if not token:
            return None
        for conn in self._by_id.values():
            held = conn.leases.get(path)
            if held is not None and held.lease.workspace == workspace:
                if secrets.compare_digest(held.lease.token.encode(), token.encode()):
                    return _record(held.lease)
        return None

    def room_summary(self, workspace_id: str) -> dict[str, Any]:
        return {"locks": len(self.locks(workspace_id))}

    def holders_here(self) -> set[str]:
        """Holder ids of this node's connections (the cluster-wide admin API says which node holds a lock)."""
        return set(self._by_id)

    def admin_summary(self) -> dict[str, Any]:
        return {
            "locks": {
                "held": sum(len(space.view) for space in self._spaces.values()),
                "held_local": sum(len(conn.leases) for conn in self._by_id.values()),
                "pending": sum(len(conn.pending) for conn in self._by_id.values()),
            }
        }

    def metrics(self) -> Iterable[Metric]:
        summary = self.admin_summary()["locks"]
        yield gauge("collab_locks_held", "Locks held in the workspaces this node serves (any node's holders)",
                    summary["held"])  # fmt: skip
        yield gauge("collab_locks_held_local", "Locks held by this node's connections", summary["held_local"])
        yield gauge("collab_lock_requests_pending", "Lock requests waiting on this node", summary["pending"])
        events = CounterMetricFamily("collab_lock_events", "Lock events on this node", labels=["event"])
        for event, count in sorted(self.stats.items()):
            events.add_metric([event], count)
        yield events

    def locks(self, workspace: str) -> list[dict[str, Any]]:
        space = self._spaces.get(workspace)
        return [_record(lease) for lease in space.view.values()] if space else []

    async def current_locks(self, workspace: str) -> list[dict[str, Any]]:
        """A workspace's leases as the backend has them (admin API); this node's view if it can't answer."""
        try:
            leases = await self.manager.list(workspace)
        except LockUnavailable:
            return self.locks(workspace)
        return [_record(lease) for lease in leases]

    async def force_release(self, workspace: str, path: str) -> dict[str, Any] | None:
        """Administrative release of the lease on exactly ``path`` (admin API).

        Like ``lock.force_release``: the room's peers (the holder included) get
        ``lock.released`` with reason ``forced``; other nodes learn it from the
        backend. None if nobody holds it; raises LockUnavailable.
        """
        lease = await self.manager.force_release(workspace, path)
        if lease is None:
            return None
        self._local_change(workspace, removed=lease, kind="released", reason="forced")
        return _record(lease)

    def lockable(self, path: str) -> bool:
        parts = path.split(".")
        if len(parts) > self.settings.lock_max_depth or not all(_SEGMENT.fullmatch(x) for x in parts):
            return False
        return any(covers(root, path) for root in self.roots)

    # ------------------------------------------------------------- listeners

    def on_join(self, room: Room, ps: PeerState) -> None:
        conn = _Conn(f"{self._node}-{next(self._ids)}", ps, room)
        _CONN.set(ps, conn)
        self._by_id[conn.id] = conn
        space = self._spaces.get(room.workspace_id)
        if space is None:
            space = self._spaces[room.workspace_id] = _Space(room)
            self._refresh(room.workspace_id)
        else:
            space.room = room

    def on_leave(self, room: Room, ps: PeerState) -> None:
        conn = _CONN.pop(ps)
        if conn is not None:
            self._by_id.pop(conn.id, None)
            for task in conn.pending.values():
                task.cancel()
            for held in list(conn.leases.values()):
                self._spawn(self._release(conn, held, "disconnect", ref=None))
            conn.leases.clear()
        self._maybe_untrack(room.workspace_id)

    # ----------------------------------------------------------------- guard

    def rejections(self, room: Room, peer: PeerState | None, changes) -> list[Rejection]:
        if peer is None:
            return []
        space = self._spaces.get(room.workspace_id)
        if space is None or not space.view:
            return []
        conn = _CONN.get(peer)
        mine = conn.id if conn is not None else None
        refused: dict[str, tuple[Lease, list[str]]] = {}
        for path in changes:
            for lease in space.view.values():
                if lease.holder != mine and overlaps(lease.path, path):
                    refused.setdefault(lease.path, (lease, []))[1].append(path)
                    break
        if refused:
            self.stats["rejected_updates"] += 1
        return [
            Rejection(
                sorted(paths),
                "locked",
                {
                    "path": lease.path,
                    "holder": lease.holder,
                    "user_id": lease.user_id,
                    "name": lease.name,
                    "fence": lease.fence,
                    "expires_at": round(lease.expires_at, 3),
                },
            )
            for lease, paths in refused.values()
        ]

    # -------------------------------------------------------------- requests

    def _on_acquire(self, room: Room, ps: PeerState, message: p.Control) -> None:
        conn = self._conn(room, ps)
        body = message.body
        ref = _ref(body)
        path = body.get("path")
        if not self._valid_request(conn, path, ref):
            return
        ttl = _number(body.get("ttl", self.default_ttl))
        wait = _number(body.get("wait", 0))
        if ttl is None or ttl <= 0:
            return self._error(conn, ref, "bad_request", "ttl must be a positive number of seconds", path)
        if wait is None or wait < 0:
            return self._error(conn, ref, "bad_request", "wait must be a non-negative number of seconds", path)
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        wait = min(wait, self.max_wait)
        held = conn.leases.get(path)
        if held is not None and held.lease.expires_at <= self.clock.now():
            self._drop_local_holder(held.lease)  # lapsed: never answer from it
            held = None
        if held is not None:  # idempotent: answer with the lease it holds
            return conn.ps.control({"type": "lock.granted", **ref, **_record(held.lease), "ttl": held.ttl})
        if path in conn.pending:
            return self._error(conn, ref, "pending", f"a request for {path!r} is already in progress", path)
        if len(conn.leases) + len(conn.pending) >= self.settings.lock_max_per_connection:
            return self._error(
                conn, ref, "too_many", f"at most {self.settings.lock_max_per_connection} locks per connection", path
            )
        if len(conn.pending) >= self.settings.lock_max_pending_per_connection:
            return self._error(conn, ref, "busy", "too many lock requests in progress on this connection", path)
        task = asyncio.get_running_loop().create_task(self._acquire(conn, path, ttl, wait, ref))
        conn.pending[path] = task
        conn.pending_refs[path] = ref

    def _on_release(self, room: Room, ps: PeerState, message: p.Control) -> None:
        conn = self._conn(room, ps)
        ref = _ref(message.body)
        path = message.body.get("path")
        if not self._valid_request(conn, path, ref, check_lockable=False):
            return
        pending = conn.pending.pop(path, None)
        if pending is not None:  # withdraw a request still waiting
            pending.cancel()
            self._error(conn, conn.pending_refs.pop(path, {}), "cancelled", f"request for {path!r} withdrawn", path)
            return conn.ps.control({"type": "lock.release.ok", **ref, "path": path, "cancelled": True})
        held = conn.leases.pop(path, None)
        if held is None:
            return self._error(conn, ref, "not_held", f"this connection holds no lock on {path!r}", path)
        self._spawn(self._release(conn, held, "release", ref))

    def _on_list(self, room: Room, ps: PeerState, message: p.Control) -> None:
        conn = self._conn(room, ps)
        ref = _ref(message.body)
        if not self._rate_ok(conn, ref):
            return
        self._spawn(self._list(conn, ref))

    def _on_force_release(self, room: Room, ps: PeerState, message: p.Control) -> None:
        conn = self._conn(room, ps)
        ref = _ref(message.body)
        path = message.body.get("path")
        if not self._valid_request(conn, path, ref, check_lockable=False):
            return
        self._spawn(self._force_release(conn, path, ref))

    def _valid_request(self, conn: _Conn, path: Any, ref: dict, check_lockable: bool = True) -> bool:
        if not self._rate_ok(conn, ref):
            return False
        if not isinstance(path, str) or not path:
            self._error(conn, ref, "bad_request", "'path' must be a non-empty string")
            return False
        if len(path) > 512:
            self._error(conn, ref, "bad_request", "'path' is too long")
            return False
        if check_lockable and not self.lockable(path):
            self._error(
                conn,
                ref,
                "unknown_path",
                f"{path!r} is not a lockable configuration path (lockable: {', '.join(self.roots)} and below)",
                path,
            )
            return False
        return True

    def _rate_ok(self, conn: _Conn, ref: dict) -> bool:
        now = self.clock.monotonic()
        rate = self.settings.lock_rate_per_second
        burst = self.settings.lock_rate_burst
        if conn.refilled == 0.0:
            conn.tokens = burst
        else:
            conn.tokens = min(burst, conn.tokens + (now - conn.refilled) * rate)
        conn.refilled = now
        if conn.tokens < 1:
            self._error(conn, ref, "rate_limited", f"more than {rate:g} lock requests per second; slow down")
            return False
        conn.tokens -= 1
        return True

    def _error(self, conn: _Conn, ref: dict, code: str, message: str, path: Any = None) -> None:
        body = {"type": "lock.error", **ref, "code": code, "message": message}
        if isinstance(path, str):
            body["path"] = path
        conn.ps.control(body)

    # ------------------------------------------------------------ operations

    async def _acquire(self, conn: _Conn, path: str, ttl: float, wait: float, ref: dict) -> None:
        ws = conn.room.workspace_id
        identity = conn.ps.identity
        user_id = getattr(identity, "user_id", "") or ""
        name = getattr(identity, "name", "") or ""
        try:
            lease = await self.manager.acquire(ws, path, conn.id, user_id, ttl, wait, name=name, token=new_token())
        except LockConflict as exc:
            conn.ps.control({"type": "lock.conflict", **ref, **_conflict(exc)})
            return
        except LockUnavailable as exc:
            self._error(conn, ref, "unavailable", f"lock service unavailable: {exc}", path)
            return
        except Exception as exc:  # a bug of ours: answer, do not leave the client hanging
            log.exception("lock acquire failed")
            self._error(conn, ref, "internal", f"internal error: {type(exc).__name__}", path)
            return
        finally:
            if conn.pending.get(path) is asyncio.current_task():
                del conn.pending[path]
                conn.pending_refs.pop(path, None)
        if not conn.ps.alive or _CONN.get(conn.ps) is not conn or self._stopping:
            self._spawn(self._quiet_release(lease))  # the holder left while we waited
            return
        held = _Held(lease, ttl)
        conn.leases[path] = held
        held.task = asyncio.get_running_loop().create_task(self._renew_loop(conn, held))
        # The token goes to the holder only: presented with an HTTP edit (X-Lock-Token),
        # it lets the holder's own backend-side tools edit the locked paths.
        conn.ps.control({"type": "lock.granted", **ref, **_record(lease), "ttl": ttl, "token": lease.token})
        self._local_change(ws, added=lease)

    async def _release(self, conn: _Conn, held: _Held, reason: str, ref: dict | None) -> None:
        """Release one lease (the holder asked, or disconnected)."""
        if held.task is not None:
            held.task.cancel()
        lease = held.lease
        ws = lease.workspace
        try:
            await self.manager.release(lease)
        except LockNotHeld as exc:
            if ref is not None:
                self._error(conn, ref, "not_held", f"the lock on {lease.path!r} was already lost ({exc.reason})")
            self._local_change(ws, removed=lease, kind="lost", reason=exc.reason)
            return
        except LockUnavailable as exc:
            if ref is not None:
                self._error(
                    conn,
                    ref,
                    "unavailable",
                    f"lock service unavailable ({exc}); the lock lapses by itself at its expiry",
                    lease.path,
                )
            return  # the view drops it when it lapses
        if ref is not None:
            conn.ps.control({"type": "lock.release.ok", **ref, "path": lease.path, "fence": lease.fence})
        self._local_change(ws, removed=lease, kind="released", reason=reason)

    async def _quiet_release(self, lease: Lease) -> None:
        try:
            await self.manager.release(lease)
        except (LockNotHeld, LockUnavailable):
            pass

    async def _force_release(self, conn: _Conn, path: str, ref: dict) -> None:
        ws = conn.room.workspace_id
        try:
            lease = await self.manager.force_release(ws, path)
        except LockUnavailable as exc:
            return self._error(conn, ref, "unavailable", f"lock service unavailable: {exc}", path)
        if lease is None:
            return self._error(conn, ref, "not_held", f"nobody holds a lock on exactly {path!r}", path)
        conn.ps.control({"type": "lock.release.ok", **ref, "path": path, "fence": lease.fence, "forced": True})
        self._local_change(ws, removed=lease, kind="released", reason="forced")

    async def _list(self, conn: _Conn, ref: dict) -> None:
        ws = conn.room.workspace_id
        try:
            await self._reread(ws)
        except LockUnavailable:
            pass  # answer with what this node last knew
        conn.ps.control({"type": "lock.state", **ref, "you": conn.id, "locks": self.locks(ws)})

    async def _renew_loop(self, conn: _Conn, held: _Held) -> None:
        try:
            await self._renew(conn, held)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("renewing %s failed", held.lease.path)

    async def _renew(self, conn: _Conn, held: _Held) -> None:
        """Renew every TTL/3 while the holder shows signs of life."""
        ttl = held.ttl
        interval = ttl / 3
        while True:
            await self.clock.sleep(interval)
            interval = ttl / 3
            lease = held.lease
            if conn.leases.get(lease.path) is not held:
                return
            # A holder that said nothing for a TTL is gone or frozen: its lease
            # lasts exactly until TTL after its last message, not a moment more.
            left = conn.ps.last_seen + ttl - self.clock.monotonic()
            if left < 0.01:
                if self.clock.now() >= lease.expires_at:
                    return  # lapsed; the view's timer reports it as expired
                interval = max(0.01, lease.expires_at - self.clock.now())
                continue
            try:
                renewed = await self.manager.renew(lease, min(ttl, left))
            except LockNotHeld as exc:
                if conn.leases.get(lease.path) is held:
                    del conn.leases[lease.path]
                    self._local_change(lease.workspace, removed=lease, kind="lost", reason=exc.reason)
                return
            except LockUnavailable:
                if self.clock.now() >= lease.expires_at - 0.05:
                    # We cannot know we still hold it: tell everyone it is lost.
                    if conn.leases.get(lease.path) is held:
                        del conn.leases[lease.path]
                        self._local_change(lease.workspace, removed=lease, kind="lost", reason="unavailable")
                    return
                interval = min(interval, max(0.05, (lease.expires_at - self.clock.now()) / 4))
                continue
            self.stats["renewed"] += 1
            if conn.leases.get(lease.path) is held:
                held.lease = renewed
                space = self._spaces.get(lease.workspace)
                if space is not None and (seen := space.view.get(lease.path)) is not None:
                    if seen.fence == renewed.fence:
                        space.view[lease.path] = renewed
                        self._arm(lease.workspace, space)

    # ------------------------------------------------------------------ view

    def _local_change(
        self,
        ws: str,
        *,
        added: Lease | None = None,
        removed: Lease | None = None,
        kind: str = "released",
        reason: str | None = None,
    ) -> None:
        space = self._spaces.get(ws)
        if space is None:
            if removed is not None:
                self._drop_local_holder(removed)
            return
        space.version += 1
        changed = False
        if removed is not None:
            self._drop_local_holder(removed)  # e.g. an admin forced one of ours: stop renewing it
            current = space.view.get(removed.path)
            if current is not None and current.fence == removed.fence:
                del space.view[removed.path]
                self._announce(space, kind, reason, current)
                changed = True
        if added is not None:
            previous = space.view.get(added.path)
            if previous is None or previous.fence != added.fence:
                if previous is not None:
                    ended = self._ended(space, previous)
                    # Ours, and lapsed (we are granting its path to someone else): its
                    # holder must not keep answering from it (tests/test_locks.py test_2).
                    self._drop_local_holder(previous)
                    self._announce(space, *ended, previous)
                space.view[added.path] = added
                self._announce(space, "acquired", None, added)
                changed = True
        if changed:
            self._changed(space)

    def _apply(self, ws: str, leases: list[Lease]) -> None:
        """Bring the view in line with the backend's list of leases."""
        space = self._spaces.get(ws)
        if space is None:
            return
        fresh = {lease.path: lease for lease in leases}
        changed = False
        for path, old in list(space.view.items()):
            new = fresh.get(path)
            if new is not None and new.fence == old.fence:
                if new.expires_at > old.expires_at or not old.token:
                    # Keep our own token; take the newer expiry.
                    space.view[path] = new if not old.token else old.with_expiry(new.expires_at)
                continue
            del space.view[path]
            ended = self._ended(space, old)
            self._drop_local_holder(old)
            self._announce(space, *ended, old)
            changed = True
        for path, new in fresh.items():
            if path not in space.view:
                space.view[path] = new
                self._announce(space, "acquired", None, new)
                changed = True
        space.hints.clear()
        if changed:
            self._changed(space)
        else:
            self._arm(ws, space)

    def _ended(self, space: _Space, lease: Lease) -> tuple[str, str | None]:
        """How a lease that vanished from the backend ended: (kind, reason)."""
        hint = space.hints.get((lease.path, lease.fence))
        if hint == "forced":
            return "released", "forced"
        if hint == "released":
            return "released", "release"
        if hint == "lost":
            return "lost", "gone"
        if hint == "expired" or self.clock.now() >= lease.expires_at - 0.05:
            return "expired", None
        conn = self._by_id.get(lease.holder)
        if conn is not None and (held := conn.leases.get(lease.path)) is not None and held.lease.fence == lease.fence:
            # One of our holders, who did not release it: it was lost (e.g. Redis lost its data).
            return "lost", "gone"
        return "released", "release"

    def _drop_local_holder(self, lease: Lease) -> None:
        """A lease of one of our connections vanished from the backend (expiry, admin)."""
        conn = self._by_id.get(lease.holder)
        if conn is not None:
            held = conn.leases.get(lease.path)
            if held is not None and held.lease.fence == lease.fence:
                del conn.leases[lease.path]
                if held.task is not None:
                    held.task.cancel()

    def _announce(self, space: _Space, kind: str, reason: str | None, lease: Lease) -> None:
        key = "granted" if kind == "acquired" else kind
        if key in self.stats:
            self.stats[key] += 1
        body = {"type": f"lock.{kind}", **_record(lease)}
        if reason is not None:
            body["reason"] = reason
        frame = p.encode_control(body)
        for ps in space.room.peers.values():
            if ps.wants_control and ps.alive:
                ps.peer.send(frame)

    def _changed(self, space: _Space) -> None:
        self._arm(space.room.workspace_id, space)
        space.room.notify("on_locks_changed", [_record(lease) for lease in space.view.values()])

    def _arm(self, ws: str, space: _Space) -> None:
        """A timer at the earliest expiry in the view: lapsed leases are re-read."""
        if space.timer is not None:
            space.timer.cancel()
            space.timer = None
        if space.view:
            delay = max(0.0, min(lease.expires_at for lease in space.view.values()) - self.clock.now())
            space.timer = self.clock.call_later(delay + 0.002, self._refresh, ws)

    def _refresh(self, ws: str) -> None:
        """Re-read a workspace's leases from the backend (coalesced)."""
        space = self._spaces.get(ws)
        if space is None or self._stopping:
            return
        if space.refresh_task is not None and not space.refresh_task.done():
            space.dirty = True
            return
        space.refresh_task = asyncio.get_running_loop().create_task(self._refresh_loop(ws, space))

    async def _refresh_loop(self, ws: str, space: _Space) -> None:
        while True:
            space.dirty = False
            try:
                await self._reread(ws)
            except LockUnavailable:
                # Keep enforcing what we knew; drop only what has certainly lapsed.
                now = self.clock.now()
                lapsed = [lease for lease in space.view.values() if lease.expires_at <= now]
                if lapsed:
                    self._apply(ws, [lease for lease in space.view.values() if lease.expires_at > now])
                else:
                    self._arm(ws, space)
                # Try again soon.
                if space.timer is None and space.view:
                    space.timer = self.clock.call_later(0.5, self._refresh, ws)
            if not space.dirty or self._spaces.get(ws) is not space:
                return

    async def _reread(self, ws: str) -> None:
        space = self._spaces.get(ws)
        if space is None:
            return
        for _ in range(5):
            version = space.version
            leases = await self.manager.list(ws)
            if space.version == version:
                self._apply(ws, leases)
                return
            # A local change landed while we read: that read may predate it.

    def _on_backend_event(self, event: LockEvent) -> None:
        if event.kind == "reset":
            for ws in list(self._spaces):
                self._refresh(ws)
            return
        space = self._spaces.get(event.workspace)
        if space is None:
            return
        if event.kind in ("acquired", "released") and event.holder.startswith(self._node + "-"):
            return  # our own connections' grants and releases: applied by us, in order
        if event.kind in ("released", "forced", "lost", "expired"):
            space.hints[(event.path, event.fence)] = event.kind
        self._refresh(event.workspace)

    async def _reread_periodically(self) -> None:
        """Lost pub/sub messages cost at most this long (Redis backend only)."""
        interval = min(10.0, max(1.0, self.default_ttl / 3))
        while True:
            await self.clock.sleep(interval)
            for ws in list(self._spaces):
                self._refresh(ws)

    def _maybe_untrack(self, ws: str) -> None:
        space = self._spaces.get(ws)
        if space is None or space.room.peers:
            return
        if any(conn.room.workspace_id == ws for conn in self._by_id.values()):
            return
        if space.timer is not None:
            space.timer.cancel()
        del self._spaces[ws]

    # --------------------------------------------------------------- helpers

    def _conn(self, room: Room, ps: PeerState) -> _Conn:
        conn = _CONN.get(ps)
        if conn is None:  # a room built without on_join (tests)
            self.on_join(room, ps)
            conn = _CONN.get(ps)
            assert conn is not None
        return conn

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _LockGuard:
    """The UpdateGuard: changes to paths locked by another holder do not stand."""

    def __init__(self, ext: LockExtension) -> None:
        self.ext = ext

    def check(self, room: Room, peer: PeerState | None, changes, config) -> list[Rejection]:
        return self.ext.rejections(room, peer, changes)


def _record(lease: Lease) -> dict[str, Any]:
    return lease.public()


def _conflict(exc: LockConflict) -> dict[str, Any]:
    if exc.lease is not None:
        lease = exc.lease
        return {
            "path": exc.path,
            "reason": "held",
            "held_path": lease.path,
            "holder": lease.holder,
            "user_id": lease.user_id,
            "name": lease.name,
            "expires_at": round(lease.expires_at, 3),
        }
    return {"path": exc.path, "reason": "queued", "held_path": exc.queued_path}


def _ref(body: dict[str, Any]) -> dict[str, Any]:
    return {"id": body["id"]} if "id" in body else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
