"""Presence as a server extension: rosters, feeds, awareness policing.

Per workspace this node serves (websocket peers or event-stream readers), a
:class:`WorkspaceView` holds the last roster it published. Anything that may
change the roster (a join, a leave, a new focus, a lock change, another node's
notification, the periodic poll) marks the view dirty; one task per view then
writes this node's staged changes to the registry, reads the roster back,
diffs it against the published one and sends one ``presence.diff`` to every
opted-in peer and stream. The first change after a quiet spell goes out on the
next loop turn; later ones within ``presence_coalesce_ms`` are merged, so a
burst of awareness changes becomes one diff.

The same listener polices awareness: a state must be a JSON object; its
``user`` field gets the connection's ``id`` and ``role``, and the ``name`` /
``color`` the authenticator vouches for (``Identity.vouched``: a token's
``name`` claim...); a client's own name and colour stay otherwise, so stock
editor bindings keep their cursor labels (a state claiming another user is
dropped with an error); its ``focus`` must be
a short string; and each connection may send ``awareness_rate`` states per
second (bursts of ``awareness_burst``) -- beyond that they are dropped, with
one ``awareness_rate_limited`` error per flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import Metric
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute
from starlette.staticfiles import StaticFiles

from clocks import Clock, SystemClock
from codec import protocol as p
from collab.extensions import ControlRoute, Extension
from collab.gate import PUBLIC, GatedMount, GatedRoute, workspace_role
from collab.metrics import gauge
from presence.base import POLLS_PER_TTL, ConnectionEntry, PresenceRegistry, build_roster, roster_diff
from rooms.awareness import AwarenessRejected
from rooms.peer import Slot
from rooms.room import PeerState, Room

if TYPE_CHECKING:
    from collab.extensions import Host
    from collab.settings import Settings

log = logging.getLogger("collab.presence")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_FOCUS_CHARS = 256
MAX_LABEL_CHARS = 80  # a client's own awareness user name / colour longer than this is replaced by ours
ACTIVITY_RESOLUTION = 5.0  # seconds: last_active alone changes a roster at most this often
RETRY_SECONDS = 1.0  # after a registry failure
SSE_KEEPALIVE = 15.0
SSE_QUEUE = 256  # events buffered per stream before it is cut (the browser reconnects and resyncs)


@dataclass(eq=False, slots=True)
class ConnState:
    """This node's view of one connection."""

    peer: PeerState
    entry: ConnectionEntry
    serial: int  # order of joins on this node
    focus_by_client: dict[int, str | None] = field(default_factory=dict)
    state_hash: dict[int, int] = field(default_factory=dict)
    written_active: float = 0.0
    tokens: float = 0.0
    refilled: float = 0.0
    flood_reported: bool = False


_CONN = Slot[ConnState]("presence")  # a connection's presence record, on its PeerState


class Stream:
    """One event-stream reader (Server-Sent Events)."""

    __slots__ = ("queue", "needs_snapshot", "closed")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(SSE_QUEUE)
        self.needs_snapshot = True
        self.closed = False

    def push(self, message: dict[str, Any] | None) -> None:
        if self.closed:
            return
        if message is None or self.queue.full():
            # Shutting down, or a reader too slow to keep up: end the stream now
            # (EventSource reconnects by itself and starts again from a snapshot).
            self.closed = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(message)


@dataclass(eq=False, slots=True)
class WorkspaceView:
    workspace_id: str
    conns: set[ConnState] = field(default_factory=set)  # this node's connections to the workspace
    awaiting_snapshot: set[PeerState] = field(default_factory=set)
    streams: set[Stream] = field(default_factory=set)
    roster: dict[str, dict[str, Any]] = field(default_factory=dict)
    seq: int = 0
    dirty: bool = False
    task: asyncio.Task | None = None
    last_refresh: float = -1e9  # monotonic
    read_serial: int = 0  # joins up to this serial are in `roster`
    watching: bool = False

    @property
    def idle(self) -> bool:
        return not self.conns and not self.streams and self.task is None


class PresenceExtension(Extension):
    name = "presence"

    def room_summary(self, workspace_id: str) -> dict[str, Any]:
        view = self.views.get(workspace_id)
        return {"participants": len(view.roster) if view is not None else None}

    async def room_report(self, workspace_id: str) -> dict[str, Any]:
        """Every node's participants (from the registry); this node's last roster when the registry is down."""
        try:
            async with asyncio.timeout(2):
                state = await self.registry.read(workspace_id)
            roster = [part.to_json() for part in build_roster(state).values()]
        except Exception:
            view = self.views.get(workspace_id)
            roster = list(view.roster.values()) if view is not None else []
        roster.sort(key=lambda part: (part.get("joined_at", 0), part.get("user_id", "")))
        return {"participants": roster}

    def admin_summary(self) -> dict[str, Any]:
        return {
            "participants": sum(len(view.roster) for view in self.views.values()),
            "participant_streams": sum(len(view.streams) for view in self.views.values()),
        }

    def metrics(self) -> Iterable[Metric]:
        summary = self.admin_summary()
        yield gauge("collab_participants", "Participants (distinct users) in the rosters of the workspaces "
                    "this node serves", summary["participants"])  # fmt: skip
        yield gauge("collab_presence_streams", "Open participant event streams (SSE)", summary["participant_streams"])

    def __init__(
        self, settings: Settings, registry: PresenceRegistry | None = None, clock: Clock | None = None
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        # Join and activity times, rate limits, coalescing and polls; a registry
        # built outside should get the same clock.
        self.clock: Clock = clock or SystemClock()
        if registry is None:
            registry = make_registry(settings, self.clock)
        self.registry = registry
        self.coalesce = settings.presence_coalesce_ms / 1000.0
        self.rate = settings.awareness_rate
        self.burst = float(settings.awareness_burst)
        self.views: dict[str, WorkspaceView] = {}
        self.app: Host | None = None
        self._serial = itertools.count(1)
        # Connection ids are unique across nodes and across restarts of one node id.
        self._boot = secrets.token_hex(4)
        self._conn_ids = itertools.count(1)
        self._poller: asyncio.Task | None = None
        self._stopping = False
        self.stats = {"refreshes": 0, "diffs": 0, "snapshots": 0}

    # ---------------------------------------------------------- extension

    def listeners(self) -> list[Any]:
        return [self]

    def control_routes(self) -> list[ControlRoute]:
        return [ControlRoute("presence.get", self._handle_get)]

    def routes(self) -> list[BaseRoute]:
        viewer = workspace_role("viewer")
        return [
            GatedRoute("/api/workspaces/{workspace_id}/participants", self.participants_endpoint, requires=viewer),
            GatedRoute("/api/workspaces/{workspace_id}/participants/events", self.events_endpoint, requires=viewer),
            # The panel is static HTML; the data it shows comes from the two routes above.
            GatedRoute("/workspaces/{workspace_id}", self.panel_endpoint, requires=PUBLIC),
            GatedMount("/presence/static", StaticFiles(directory=STATIC_DIR), name="presence-static", requires=PUBLIC),
        ]

    async def start(self, app: Host) -> None:
        self.app = app
        self._stopping = False
        self.registry.on_change = self._remote_change
        await self.registry.start()
        self._poller = asyncio.get_running_loop().create_task(self._poll_loop())

    def closing(self) -> None:
        """End every event stream, so a shutdown does not wait for SSE clients."""
        self._stopping = True
        for view in self.views.values():
            for stream in view.streams:
                stream.push(None)

    async def stop(self) -> None:
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
        tasks = [v.task for v in self.views.values() if v.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *([self._poller] if self._poller else []), return_exceptions=True)
        for view in self.views.values():
            for stream in view.streams:
                stream.push(None)
        await self.registry.close(remove_entries=True)

    async def check(self) -> None:
        await self.registry.check()

    # ------------------------------------------------------- room hooks

    def on_join(self, room: Room, ps: PeerState) -> None:
        identity = ps.identity
        if identity is None or self._stopping:
            return
        now = round(self.clock.now(), 3)
        entry = ConnectionEntry(
            workspace_id=room.workspace_id,
            conn_id=f"{self.node_id}/{self._boot}/{next(self._conn_ids)}",
            node=self.node_id,
            user_id=identity.user_id,
            name=identity.name,
            color=identity.color,
            role=identity.role,
            joined_at=now,
            last_active=now,
        )
        view = self._view(room.workspace_id)
        conn = ConnState(
            peer=ps, entry=entry, serial=next(self._serial), written_active=now, tokens=self.burst,
            refilled=self.clock.monotonic(),
        )  # fmt: skip
        _CONN.set(ps, conn)
        view.conns.add(conn)
        self.registry.put(entry)
        self._mark(view)

    def on_hello(self, room: Room, ps: PeerState) -> None:
        view = self.views.get(room.workspace_id)
        if view is None or _CONN.get(ps) is None:
            return
        view.awaiting_snapshot.add(ps)
        self._mark(view)

    def on_leave(self, room: Room, ps: PeerState) -> None:
        view = self.views.get(room.workspace_id)
        if view is None:
            return
        conn = _CONN.pop(ps)
        view.awaiting_snapshot.discard(ps)
        if conn is None:
            return
        view.conns.discard(conn)
        self.registry.discard(room.workspace_id, conn.entry.conn_id)
        self._mark(view)

    def on_awareness(self, room: Room, ps: PeerState, client_id: int, state: str | None) -> None:
        view = self.views.get(room.workspace_id)
        conn = _CONN.get(ps) if view is not None else None
        if conn is None:
            return
        if state is None:
            conn.state_hash.pop(client_id, None)
            conn.focus_by_client.pop(client_id, None)
        else:
            digest = hash(state)
            if conn.state_hash.get(client_id) == digest:
                return  # the periodic renewal of an unchanged state is not activity
            conn.state_hash[client_id] = digest
            focus = None
            with contextlib.suppress(ValueError):
                parsed = json.loads(state)
                if isinstance(parsed, dict) and isinstance(parsed.get("focus"), str):
                    focus = parsed["focus"] or None
            conn.focus_by_client.pop(client_id, None)
            conn.focus_by_client[client_id] = focus  # most recent last
        now = round(self.clock.now(), 3)
        focus = next(reversed(conn.focus_by_client.values()), None) if conn.focus_by_client else None
        entry = conn.entry
        if focus == entry.focus and now - conn.written_active < ACTIVITY_RESOLUTION:
            return
        conn.entry = ConnectionEntry(
            **{**entry.to_json(), "focus": focus, "last_active": now if state is not None else entry.last_active}
        )
        conn.written_active = now
        self.registry.put(conn.entry)
        self._mark(view)

    def on_locks_changed(self, room: Room, locks: list[dict[str, Any]]) -> None:
        """Hook of the locks feature: the workspace's whole lock list changed."""
        clean = []
        for lock in locks or []:
            if isinstance(lock, dict) and isinstance(lock.get("path"), str):
                clean.append(
                    {k: lock.get(k) for k in ("path", "user_id", "holder", "fence", "expires_at") if k in lock}
                )
        self.registry.set_locks(room.workspace_id, clean)
        self._mark(self._view(room.workspace_id))

    def filter_awareness(self, room: Room, ps: PeerState, client_id: int, state: Any) -> Any:
        rec = room.awareness.get(client_id)
        if rec is not None and rec.owner is not None and rec.owner is not ps:
            # Another live connection's entry: an echo, which the room ignores
            # (or a claim on that client id, which the room reports).
            return state
        view = self.views.get(room.workspace_id)
        conn = _CONN.get(ps) if view is not None else None
        if conn is not None:
            self._take_token(conn)
        if not isinstance(state, dict):
            raise AwarenessRejected("an awareness state must be a JSON object; dropped", code="awareness_malformed")
        focus = state.get("focus")
        if focus is not None and (not isinstance(focus, str) or len(focus) > MAX_FOCUS_CHARS):
            raise AwarenessRejected(
                f"awareness 'focus' must be a config path string of at most {MAX_FOCUS_CHARS} characters; dropped",
                code="awareness_malformed",
            )
        identity = ps.identity
        if identity is None:
            return state
        user = state.get("user")
        public = identity.public()
        if isinstance(user, dict):
            claimed = next((user[k] for k in ("id", "user_id", "userId") if user.get(k) is not None), None)
            if claimed is not None and str(claimed) != identity.user_id:
                raise AwarenessRejected(
                    f"awareness state claims user {str(claimed)[:80]!r} but this connection is "
                    f"{identity.user_id!r}; dropped",
                    code="awareness_user_mismatch",
                )
            stamped = {k: v for k, v in user.items() if k not in ("user_id", "userId")}
        else:
            stamped = {}
        # What the server knows for sure is always stamped; name and colour only
        # when the authenticator vouches for them or the client set none.
        stamped["id"], stamped["role"] = public["id"], public["role"]
        for key in ("name", "color"):
            value = stamped.get(key)
            if key in identity.vouched or not (isinstance(value, str) and 0 < len(value) <= MAX_LABEL_CHARS):
                stamped[key] = public[key]
        return {**state, "user": stamped}

    def _take_token(self, conn: ConnState) -> None:
        now = self.clock.monotonic()
        conn.tokens = min(self.burst, conn.tokens + (now - conn.refilled) * self.rate)
        conn.refilled = now
        if conn.tokens >= self.burst:
            conn.flood_reported = False  # quiet long enough: the next flood is reported again
        if conn.tokens >= 1.0:
            conn.tokens -= 1.0
            return
        if conn.flood_reported:
            raise AwarenessRejected("rate limited", code="awareness_rate_limited", notify=False)
        conn.flood_reported = True
        raise AwarenessRejected(
            f"more than {self.rate:g} awareness updates per second; updates are dropped until the rate falls "
            "(send your latest state again afterwards)",
            code="awareness_rate_limited",
        )

    def _handle_get(self, room: Room, ps: PeerState, message: p.Control) -> None:
        """``presence.get``: the current roster, answered like the join snapshot."""
        view = self.views.get(room.workspace_id)
        conn = _CONN.get(ps)
        if view is None or conn is None:
            return
        ref = {"id": message.body["id"]} if "id" in message.body else {}
        if view.read_serial >= conn.serial:
            ps.control({**self._snapshot(view), **ref})
        else:
            view.awaiting_snapshot.add(ps)  # not in the published roster yet: answered by the next refresh
            self._mark(view)

    # ------------------------------------------------------------- views

    def _view(self, workspace_id: str) -> WorkspaceView:
        view = self.views.get(workspace_id)
        if view is None:
            view = self.views[workspace_id] = WorkspaceView(workspace_id)
        return view

    def _mark(self, view: WorkspaceView) -> None:
        view.dirty = True
        if view.task is None and not self._stopping:
            view.task = asyncio.get_running_loop().create_task(self._run(view))

    def _remote_change(self, workspace_id: str) -> None:
        view = self.views.get(workspace_id)
        if view is not None:
            self._mark(view)

    async def _run(self, view: WorkspaceView) -> None:
        try:
            while view.dirty and not self._stopping:
                # Leading edge: the first change after a quiet window goes out on the
                # next loop turn; changes within the window wait for its end.
                delay = view.last_refresh + self.coalesce - self.clock.monotonic()
                if delay > 0:
                    await self.clock.sleep(delay)
                view.dirty = False
                view.last_refresh = self.clock.monotonic()
                try:
                    await self._refresh(view)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("presence refresh of %s failed: %s", view.workspace_id, exc)
                    view.dirty = True
                    await asyncio.sleep(RETRY_SECONDS)
        finally:
            view.task = None
            if not self._stopping:
                self._maybe_drop(view)

    async def _refresh(self, view: WorkspaceView) -> None:
        ws = view.workspace_id
        if not view.watching:
            view.watching = True
            await self.registry.watch(ws)
        serial = next(self._serial)
        try:
            await self.registry.sync(ws)
        except Exception as exc:  # keep serving what we know; the registry retries on the next sync
            log.warning("presence: writing %s failed: %s", ws, exc)
            view.dirty = True
        state = await self.registry.read(ws)
        self.stats["refreshes"] += 1
        roster = {uid: part.to_json() for uid, part in build_roster(state, self.clock.now()).items()}
        joins, leaves, updates = roster_diff(view.roster, roster)
        changed = bool(joins or leaves or updates)
        if changed:
            view.seq += 1
            view.roster = roster
        view.read_serial = serial
        diff = None
        if changed:
            self.stats["diffs"] += 1
            diff = {
                "type": "presence.diff",
                "workspace": ws,
                "seq": view.seq,
                "joins": _ordered(joins),
                "leaves": _ordered(leaves),
                "updates": _ordered(updates),
            }
        snapshot = None
        snapshot_frame = diff_frame = b""
        for conn in list(view.conns):
            ps = conn.peer
            if not ps.wants_control or not ps.alive:
                continue
            if ps in view.awaiting_snapshot:
                if conn.serial > serial:
                    continue  # joined after this read: its own entry may be missing; next round
                view.awaiting_snapshot.discard(ps)
                if not snapshot_frame:
                    snapshot = snapshot or self._snapshot(view)
                    snapshot_frame = p.encode_control(snapshot)
                self.stats["snapshots"] += 1
                ps.peer.send(snapshot_frame)
            elif diff is not None:
                # Encoded once for everyone (what ps.control would do per peer).
                diff_frame = diff_frame or p.encode_control(diff)
                ps.peer.send(diff_frame)
        if view.awaiting_snapshot:
            view.dirty = True
        for stream in list(view.streams):
            if stream.needs_snapshot:
                stream.needs_snapshot = False
                snapshot = snapshot or self._snapshot(view)
                stream.push(snapshot)
            elif diff is not None:
                stream.push(diff)

    def _snapshot(self, view: WorkspaceView) -> dict[str, Any]:
        return {
            "type": "presence.snapshot",
            "workspace": view.workspace_id,
            "seq": view.seq,
            "node": self.node_id,
            "participants": _ordered(view.roster.values()),
        }

    def _maybe_drop(self, view: WorkspaceView) -> None:
        if view.idle and not view.dirty and self.views.get(view.workspace_id) is view:
            del self.views[view.workspace_id]
            if view.watching:
                asyncio.get_running_loop().create_task(self._unwatch(view.workspace_id))

    async def _unwatch(self, workspace_id: str) -> None:
        if workspace_id in self.views:
            return  # served again meanwhile
        try:
            await self.registry.unwatch(workspace_id)
        except Exception as exc:
            log.warning("presence: unwatch %s failed: %s", workspace_id, exc)

    async def _poll_loop(self) -> None:
        """Expiry makes no noise: re-read every served roster a few times per TTL.

        The views are spread over the interval rather than all marked at once,
        so a node serving many workspaces makes a steady trickle of reads.
        """
        interval = self.registry.ttl / POLLS_PER_TTL
        while True:
            views = list(self.views.values())
            if not views:
                await self.clock.sleep(interval)
                continue
            step = interval / len(views)
            for view in views:
                await self.clock.sleep(step)
                if self.views.get(view.workspace_id) is view:
                    self._mark(view)

    # ------------------------------------------------------------- HTTP

    async def participants_endpoint(self, request: Request) -> Response:
        """``GET /api/workspaces/{id}/participants``: the roster, read from the registry."""
        workspace_id = request.state.workspace_id  # checked by the gate
        try:
            state = await self.registry.read(workspace_id)
        except Exception as exc:
            return JSONResponse({"error": f"presence registry unavailable: {exc}"}, status_code=503)
        roster = {uid: part.to_json() for uid, part in build_roster(state, self.clock.now()).items()}
        return JSONResponse(
            {"workspace": workspace_id, "node": self.node_id, "participants": _ordered(roster.values())},
            headers={"Cache-Control": "no-store"},
        )

    async def events_endpoint(self, request: Request) -> Response:
        """``GET /api/workspaces/{id}/participants/events``: snapshot, then diffs (SSE)."""
        workspace_id = request.state.workspace_id  # checked by the gate
        if self._stopping:
            return JSONResponse({"error": "server shutting down"}, status_code=503)
        view = self._view(workspace_id)
        stream = Stream()
        view.streams.add(stream)
        self._mark(view)

        async def body():
            try:
                yield "retry: 1000\n\n"
                while True:
                    try:
                        message = await asyncio.wait_for(stream.queue.get(), SSE_KEEPALIVE)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if message is None:
                        return
                    data = json.dumps(message, separators=(",", ":"))
                    yield f"id: {message['seq']}\nevent: {message['type']}\ndata: {data}\n\n"
            finally:
                stream.closed = True
                view.streams.discard(stream)
                if not self._stopping:
                    self._maybe_drop(view)

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def panel_endpoint(self, request: Request) -> Response:
        """``GET /workspaces/{id}``: the participant-awareness panel (static HTML + JS)."""
        return FileResponse(STATIC_DIR / "panel.html", media_type="text/html", headers={"Cache-Control": "no-store"})


def _ordered(participants) -> list[dict[str, Any]]:
    return sorted(participants, key=lambda part: (part["joined_at"], part["user_id"]))


def make_registry(settings: Settings, clock: Clock | None = None) -> PresenceRegistry:
    ttl = settings.presence_ttl_seconds
    if settings.redis_url:
        from presence.redis import RedisPresenceRegistry

        return RedisPresenceRegistry(
            settings.redis_url, settings.node_id, ttl=ttl, timeout=settings.redis_timeout_seconds, clock=clock
        )
    from presence.memory import MemoryPresenceRegistry

    return MemoryPresenceRegistry(settings.node_id, ttl=ttl, clock=clock)
