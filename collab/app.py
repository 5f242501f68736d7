"""The ASGI application: ``create_app(settings)`` builds everything.

No module-level state: the store, the room manager and the set of live
connections hang off the ``App`` object that ``create_app`` returns, so tests
can run several independent servers in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from clocks import Clock, SystemClock
from codec import protocol as p
from collab import __version__, logs
from collab.admin import AdminAPI
from collab.auth import (
    Authenticator,
    DevelopmentAuthenticator,
    authenticator_from_settings,
)
from collab.connection import Connection, ConnectionRegistry, ConnectionServices
from collab.console import Console
from collab.extensions import Extension, control_handlers
from collab.gate import (
    PUBLIC,
    WORKSPACE_ID,
    Gate,
    GatedRoute,
    GatedWebSocketRoute,
    GateError,
    check_workspace_id,
    server_role,
    service,
    workspace_role,
)
from collab.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from collab.metrics import Metrics
from collab.security import ConnectionLimiter, OriginPolicy
from collab.settings import Settings
from persistence.base import DocumentStore
from persistence.sqlite import SQLiteDocumentStore
from rooms.manager import RoomManager
from rooms.room import Room, RoomTuning

log = logging.getLogger("collab.app")

__all__ = ["WORKSPACE_ID", "App", "create_app", "default_extensions"]

# Who may open the websocket of a workspace: any role there (viewers read only).
WEBSOCKET_REQUIRES = workspace_role("viewer")


class App:
    """Everything one server instance owns."""

    def __init__(
        self,
        settings: Settings,
        store: DocumentStore | None = None,
        authenticator: Authenticator | None = None,
        extensions: list[Extension] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()  # the one clock of this server (clocks/)
        self.extensions: list[Extension] = list(extensions or [])
        self.authenticator: Authenticator = authenticator or authenticator_from_settings(settings)
        development = settings.auth_mode == "development"
        self.origins = OriginPolicy(settings.allowed_origins, allow_all=development and not settings.allowed_origins)
        self.limiter = ConnectionLimiter(settings.max_connections, settings.max_connections_per_ip)
        self.stats: dict[str, int] = {
            "refused_origin": 0,
            "refused_limit": 0,
            "auth_failed": 0,
            "rate_limited": 0,
        }
        self._last_refusal_log = 0.0
        if store is None and settings.uses_redis_store:
            from persistence.redis import RedisDocumentStore

            store = RedisDocumentStore(
                settings.redis_url,
                settings.node_id,
                timeout=settings.redis_timeout_seconds,
                ack_replicas=settings.redis_ack_replicas,
                ack_timeout_ms=settings.redis_ack_timeout_ms,
                retry_seconds=settings.redis_retry_seconds,
            )
        self.store: DocumentStore = store or SQLiteDocumentStore(
            settings.database_path, synchronous=settings.sqlite_synchronous
        )
        self.room_tuning = RoomTuning(
            flush_interval=settings.flush_interval_ms / 1000.0,
            flush_min_gap=settings.flush_min_gap_ms / 1000.0,
            compact_every_updates=settings.compact_every_updates,
            compact_every_bytes=settings.compact_every_bytes,
            max_awareness_state_bytes=settings.max_awareness_state_bytes,
            max_awareness_clients=settings.max_awareness_clients_per_connection,
            max_document_bytes=settings.max_document_bytes,
            server_version=__version__,
            limits={
                "max_message_bytes": settings.max_message_bytes,
                "max_awareness_state_bytes": settings.max_awareness_state_bytes,
                "peer_queue_frames": settings.peer_queue_frames,
                "max_document_bytes": settings.max_document_bytes,
                "message_rate": settings.message_rate,
                "message_burst": settings.message_burst,
                "byte_rate": settings.byte_rate,
                "byte_burst": settings.byte_burst,
            },
        )
        self.rooms = RoomManager(
            self.store,
            self.room_tuning,
            idle_grace=settings.room_idle_seconds,
            room_factory=self._make_room,
            max_rooms=settings.max_rooms,
        )
        # What every room gets from the extensions, composed once.
        self._control_handlers = control_handlers(self.extensions)
        self._guards = [guard for ext in self.extensions for guard in ext.guards()]
        self._listeners = [listener for ext in self.extensions for listener in ext.listeners()]
        self.connections = ConnectionRegistry()  # joined websocket connections
        self.metrics = Metrics(self)
        self.counters = self.metrics.counters
        self.gate = Gate(self.authenticator, settings)
        self.connection_services = ConnectionServices(
            settings=settings,
            authenticator=self.authenticator,
            gate=self.gate,
            requires=WEBSOCKET_REQUIRES,
            rooms=self.rooms,
            counters=self.counters,
            refusals=self.stats,
            registry=self.connections,
        )
        self.admin = AdminAPI(self)
        self.console = Console(self)  # the landing page (/) and the operator console (/admin)
        self._redis: Any = None  # client for the readiness check, when COLLAB_REDIS_URL is set

    @property
    def accepting(self) -> bool:
        """True from startup until the shutdown begins."""
        return self.connections.accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self.connections.accepting = value

    def _make_room(self, workspace_id: str) -> Room:
        room = Room(
            workspace_id,
            self.store,
            self.room_tuning,
            control_handlers=self._control_handlers,
            guards=self._guards,
            listeners=self._listeners,
            clock=self.clock,
        )
        room.metrics = self.counters
        return room

    def routes(self) -> list:
        """Every route with the requirement it declares; all served through ``self.gate``.

        /metrics: the metrics token or a server admin (open in development
        mode without a token). /openapi.json: public (it describes the API,
        as docs/ do; nothing about this deployment).
        """
        routes = [
            GatedRoute("/healthz", self.healthz, requires=PUBLIC),
            GatedRoute("/readyz", self.readyz, requires=PUBLIC),
            GatedRoute("/metrics", self.metrics_endpoint, requires=service("metrics")),
            GatedRoute("/openapi.json", self.openapi_endpoint, requires=PUBLIC),
            GatedRoute("/admin/stats", self.admin_stats, requires=server_role("admin")),
            *self.admin.routes(),
            *self.console.routes(),
            GatedWebSocketRoute("/ws/{workspace_id}", self.websocket, requires=WEBSOCKET_REQUIRES),
        ]
        for ext in self.extensions:
            routes.extend(ext.routes())
        return self.gate.bind(routes)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette):
        self._announce_security()
        await self.store.open()
        for ext in self.extensions:
            await ext.start(self)
        self.accepting = True
        log.info("store open at %s", getattr(self.store, "path", self.store))
        try:
            yield
        finally:
            await self.shutdown()

    def _announce_security(self) -> None:
        settings = self.settings
        if settings.auth_mode == "development" and isinstance(self.authenticator, DevelopmentAuthenticator):
            banner = "!" * 78
            # Loud even when the log level hides warnings.
            if log.isEnabledFor(logging.WARNING):
                emit = log.warning
            elif settings.log_format == "json":
                emit = _json_stderr_warning
            else:
                emit = _stderr_warning
            emit(
                "\n%s\n"
                "!! DEVELOPMENT MODE: NO AUTHENTICATION. Anyone who can reach this port may\n"
                "!! connect as anyone, with any role (?user=alice&role=admin), to any workspace,\n"
                "!! from any web origin. For production set COLLAB_AUTH_MODE=jwt with\n"
                "!! COLLAB_JWT_SECRET or COLLAB_JWT_PUBLIC_KEY_FILE (see docs/security.md).\n"
                "%s",
                banner,
                banner,
            )
        if settings.auth_mode == "jwt" and not settings.allowed_origins:
            log.warning(
                "COLLAB_ALLOWED_ORIGINS is empty: every browser page (any websocket with an Origin "
                "header) is refused; non-browser clients are served"
            )

    async def close_connections(self, timeout: float) -> None:
        """First step of a graceful shutdown, while the server still reads sockets.

        Stop accepting, make everything received durable (so its ``saved``
        acks go out), then close every peer with 1012 through a proper
        closing handshake, and wait (bounded) until they are gone. uvicorn's
        own shutdown sends 1012 and closes the socket at once, which resets
        the connection of a client that is still sending: its close frame is
        lost and it sees 1006.
        """
        self.accepting = False
        for ext in self.extensions:
            try:
                ext.closing()  # e.g. end event streams, which uvicorn would otherwise wait for
            except Exception:
                log.exception("extension %s failed to start closing", ext.name)
        try:
            async with asyncio.timeout(timeout):
                await self.rooms.close()
                self.connections.close_all(p.CLOSE_RESTART, "server restarting")
                await self.connections.wait_empty()
        except TimeoutError:
            log.warning("%d connections still open after %.1fs; closing them abruptly", len(self.connections), timeout)

    async def shutdown(self) -> None:
        """Stop accepting, flush every room, tell clients to reconnect (1012)."""
        self.accepting = False
        await self.rooms.close()
        self.connections.close_all(p.CLOSE_RESTART, "server restarting")
        for ext in reversed(self.extensions):
            try:
                await ext.stop()
            except Exception:
                log.exception("stopping extension %s failed", ext.name)
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None
        await self.store.close()

    # ---------------------------------------------------------- endpoints

    async def healthz(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    async def readyz(self, request: Request) -> JSONResponse:
        checks: dict[str, Any] = {}
        ok = self.accepting
        try:
            async with asyncio.timeout(2):
                await self.store.check()
            checks["store"] = "ok"
        except Exception as exc:
            checks["store"] = f"error: {exc}"
            ok = False
        if self.settings.redis_url:
            try:
                await self.redis_check()
                checks["redis"] = "ok"
            except Exception as exc:
                checks["redis"] = f"error: {type(exc).__name__}: {exc}"
                ok = False
        for ext in self.extensions:
            try:
                async with asyncio.timeout(2):
                    result = await ext.check()
                checks[ext.name] = result if isinstance(result, str) else "ok"
            except Exception as exc:
                checks[ext.name] = f"error: {exc}"
                ok = False
        if not self.accepting:
            checks["server"] = "not accepting connections (starting or shutting down)"
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def redis_check(self, timeout: float = 2.0) -> None:
        """PING the shared Redis (COLLAB_REDIS_URL); raises when it does not answer. For /readyz and /metrics."""
        async with asyncio.timeout(timeout):
            await self._redis_client().ping()

    def _redis_client(self) -> Any:
        if self._redis is None:
            from persistence.redisconn import connect

            self._redis = connect(self.settings.redis_url, timeout=1.5, max_connections=2)
        return self._redis

    async def metrics_endpoint(self, request: Request) -> Response:
        """Prometheus metrics (the gate asks for COLLAB_METRICS_TOKEN or a server admin)."""
        return Response(await self.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def openapi_endpoint(self, request: Request) -> JSONResponse:
        """The OpenAPI description of the HTTP endpoints."""
        from collab.openapi import build

        return JSONResponse(build(list(request.app.routes), __version__))

    async def admin_stats(self, request: Request) -> JSONResponse:
        """Connection counts and refusals of this node."""
        return JSONResponse(
            {
                "connections": self.limiter.total,
                "peers": len(self.connections),
                "rooms": len(self.rooms.rooms),
                "addresses": len(self.limiter.per_ip),
                "refused": dict(self.stats),
                # For leak checks: every asyncio task of this process (writers, renewals, retries...).
                "tasks": len(asyncio.all_tasks()),
                "task_names": sorted(
                    (t.get_coro().__qualname__ if hasattr(t.get_coro(), "__qualname__") else t.get_name())
                    for t in asyncio.all_tasks()
                ),
            }
        )

    # ---------------------------------------------------------- websocket

    async def websocket(self, ws: WebSocket) -> None:
        """Checks before the handshake, then authentication, then the room."""
        workspace_id = ws.path_params["workspace_id"]
        try:
            check_workspace_id(workspace_id)
        except GateError as exc:  # the same 404 as every HTTP route, before any handshake
            await self._deny(ws, exc.status, exc.reason)
            return
        origin = ws.headers.get("origin")
        if not self.origins.allows(origin):
            self.stats["refused_origin"] += 1
            self._log_refusal("refused websocket from origin %r", (origin or "")[:200])
            await self._deny(ws, 403, "origin not allowed")
            return
        address = ws.client.host if ws.client else "unknown"
        refusal = self.limiter.acquire(address)
        if refusal is not None:
            self.stats["refused_limit"] += 1
            self._log_refusal("refused websocket from %s: %s", address, refusal)
            await self._deny(ws, 503, refusal)
            return
        try:
            await Connection(ws, self.connection_services, workspace_id).run()
        finally:
            self.limiter.release(address)

    async def _deny(self, ws: WebSocket, status: int, reason: str) -> None:
        """Refuse the handshake with an HTTP status (no websocket is opened)."""
        headers = {"Retry-After": "5"} if status == 503 else None
        try:
            await ws.send_denial_response(JSONResponse({"error": reason}, status_code=status, headers=headers))
        except RuntimeError:  # a server without the denial-response extension answers 403
            await ws.close(p.CLOSE_POLICY, reason)

    def _log_refusal(self, message: str, *args: Any) -> None:
        """Refusals come in floods under attack: log at most one per second."""
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:
            self._last_refusal_log = now
            log.warning(message + " (refusals so far: %s)", *args, self.stats)


async def _http_error(request: Request, exc: Exception) -> Response:
    """HTTP errors as JSON: ``{"error": "..."}``."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _json_stderr_warning(message: str, *args: Any) -> None:
    logs.announce(message % args, "json", level="warning", stream=sys.stderr)


def _stderr_warning(message: str, *args: Any) -> None:
    print(message % args, file=sys.stderr, flush=True)


def create_app(
    settings: Settings | None = None,
    store: DocumentStore | None = None,
    authenticator: Authenticator | None = None,
    extensions: list[Extension] | None = None,
    clock: Clock | None = None,
) -> Starlette:
    """Build the Starlette application and everything it owns (``clock``: tests pass a ManualClock)."""
    settings = settings or Settings()
    clock = clock or SystemClock()
    if extensions is None:
        extensions = default_extensions(settings, clock=clock)
    core = App(settings, store, authenticator, extensions, clock=clock)
    app = CollabStarlette(
        core, routes=core.routes(), lifespan=core.lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.core = core
    return app


class CollabStarlette(Starlette):
    """Starlette, with a workspace's websocket handed straight to ``App.websocket``.

    A websocket lives for hours; through Starlette's middleware and router it
    would keep about ten suspended frames and closures alive for all that
    time (about 5 KiB per connection). ``/ws/{workspace_id}`` is matched
    here the way the router would (one path segment) and everything else goes
    through Starlette as usual. The route stays declared (``GatedWebSocketRoute``)
    for the route table and OpenAPI; ``App.websocket`` does its own checks.
    """

    def __init__(self, core: App, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._websocket = core.websocket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            path: str = scope["path"]
            workspace_id = path[4:]
            if path.startswith("/ws/") and workspace_id and "/" not in workspace_id:
                scope["app"] = self
                scope["path_params"] = {"workspace_id": workspace_id}
                await self._websocket(WebSocket(scope, receive, send))
                return
        await super().__call__(scope, receive, send)


def default_extensions(settings: Settings, forwarding: Any = None, clock: Clock | None = None) -> list[Extension]:
    """The features a server built from settings runs with, in hook order.

    ``forwarding``: the ForwardingSettings (read from the environment when None).
    """
    extensions: list[Extension] = []
    if settings.uses_redis_store:
        from scaleout.relay import RelayExtension

        extensions.append(RelayExtension(settings))
    if settings.redis_url:
        from scaleout.nodes import NodeDirectory

        extensions.append(NodeDirectory(settings))  # who holds what, for the cluster-wide admin API
    from presence.extension import PresenceExtension

    # Presence first: it stamps awareness states before anything else sees them.
    extensions.append(PresenceExtension(settings, clock=clock))
    if settings.locks_enabled:
        from locks.extension import LockExtension

        extensions.append(LockExtension(settings, clock=clock))
    from forwarding.extension import ForwardingExtension

    # Forwarding goes last: its validation guard sees what other guards (locks)
    # let through, and it finds their ``fence_for`` among the extensions.
    extensions.append(ForwardingExtension(forwarding))
    if settings.events_enabled:
        from events.extension import EventsExtension

        # After forwarding: its audit records are committed before the events listener hears of them.
        extensions.append(EventsExtension(settings))
    return extensions
