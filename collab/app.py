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

from codec import protocol as p
from collab import __version__, logs
from collab.admin import AdminAPI
from collab.auth import (
    CLOSE_FORBIDDEN,
    CLOSE_UNAUTHENTICATED,
    Authenticator,
    AuthError,
    DevelopmentAuthenticator,
    Identity,
    authenticator_from_settings,
    has_role,
)
from collab.connection import WebSocketPeer
from collab.console import Console
from collab.extensions import Extension
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
from collab.metrics import Metrics, close_kind
from collab.security import ConnectionLimiter, OriginPolicy, RateExceeded, RateLimiter
from collab.settings import Settings
from persistence.base import DocumentStore, StoreError
from persistence.sqlite import SQLiteDocumentStore
from rooms.manager import RoomLimitReached, RoomManager
from rooms.room import PeerState, Room, RoomTuning

log = logging.getLogger("collab.app")

__all__ = ["WORKSPACE_ID", "App", "create_app", "default_extensions"]

# Who may open the websocket of a workspace: any role there (viewers read only).
WEBSOCKET_REQUIRES = workspace_role("viewer")


# Control messages that need a role, checked before any handler sees them (a
# second line of defence: the lock extension checks roles too, and answers in
# the same form). `lock.*force*` messages need admin.
CONTROL_ROLES: dict[str, str] = {
    "lock.acquire": "editor",
    "lock.release": "editor",
    "lock.renew": "editor",
    "lock.force_release": "admin",
}


def required_role(control_type: str) -> str | None:
    role = CONTROL_ROLES.get(control_type)
    if role is None and control_type.startswith("lock.") and "force" in control_type.lower():
        role = "admin"
    return role


class _Close(Exception):
    """Close the websocket with this code and reason (before it joined a room)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Session:
    """Per-connection authentication state: the token may be refreshed."""

    __slots__ = ("refreshed",)

    def __init__(self) -> None:
        self.refreshed = asyncio.Event()

    async def wait_refresh(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a refresh; True if one came."""
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await self.refreshed.wait()
        except TimeoutError:
            return False
        self.refreshed.clear()
        return True


class App:
    """Everything one server instance owns."""

    def __init__(
        self,
        settings: Settings,
        store: DocumentStore | None = None,
        authenticator: Authenticator | None = None,
        extensions: list[Extension] | None = None,
    ) -> None:
        self.settings = settings
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
        self.peers: set[WebSocketPeer] = set()
        self._no_peers = asyncio.Event()
        self._no_peers.set()
        self.accepting = False
        self.metrics = Metrics(self)
        self.counters = self.metrics.counters
        self.gate = Gate(self.authenticator, settings)
        self.admin = AdminAPI(self)
        self.console = Console(self)  # the landing page (/) and the operator console (/admin)
        self._redis: Any = None  # client for the readiness check, when COLLAB_REDIS_URL is set

    def _make_room(self, workspace_id: str) -> Room:
        handlers: dict = {}
        guards: list = []
        listeners: list = []
        for ext in self.extensions:
            handlers.update(ext.control_handlers())
            guards.extend(ext.guards())
            listeners.extend(ext.listeners())
        room = Room(
            workspace_id,
            self.store,
            self.room_tuning,
            control_handlers=handlers,
            guards=guards,
            listeners=listeners,
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
                for peer in list(self.peers):
                    peer.close(p.CLOSE_RESTART, "server restarting")
                await self._no_peers.wait()
        except TimeoutError:
            log.warning("%d connections still open after %.1fs; closing them abruptly", len(self.peers), timeout)

    async def shutdown(self) -> None:
        """Stop accepting, flush every room, tell clients to reconnect (1012)."""
        self.accepting = False
        await self.rooms.close()
        for peer in list(self.peers):
            peer.close(p.CLOSE_RESTART, "server restarting")
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
                "peers": len(self.peers),
                "rooms": len(self.rooms.rooms),
                "addresses": len(self.limiter.per_ip),
                "refused": dict(self.stats),
                # For leak checks: every asyncio task of this process (writers, renewals, retries...).
                "tasks": len(asyncio.all_tasks()),
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
            await self._serve(ws, workspace_id)
        finally:
            self.limiter.release(address)

    async def _serve(self, ws: WebSocket, workspace_id: str) -> None:
        await ws.accept()
        logs.bind(workspace=workspace_id)  # every log line of this connection names its workspace
        if not self.accepting:
            await self._close(ws, p.CLOSE_RESTART, "server shutting down")
            return
        settings = self.settings
        rate = (
            RateLimiter(settings.message_rate, settings.message_burst, settings.rate_limit_grace),
            RateLimiter(settings.byte_rate, settings.byte_burst, settings.rate_limit_grace, unit="bytes"),
        )
        try:
            async with asyncio.timeout(settings.preauth_timeout):
                identity = await self.authenticator.authenticate(ws, workspace_id)
                pending: list[p.Message] = []
                if identity is None:
                    identity, pending = await self._authenticate_by_message(ws, workspace_id, rate)
                if identity is not None:
                    self.gate.authorize(identity, WEBSOCKET_REQUIRES, ws)
        except GateError as exc:
            self.stats["auth_failed"] += 1
            await self._close(ws, exc.close_code, exc.reason)
            return
        except TimeoutError:
            self.stats["auth_failed"] += 1
            await self._close(ws, CLOSE_UNAUTHENTICATED, "authentication timeout")
            return
        except AuthError as exc:
            self.stats["auth_failed"] += 1
            await self._close(ws, exc.code, exc.reason)
            return
        except _Close as exc:
            await self._close(ws, exc.code, exc.reason)
            return
        except Exception:  # a broken authenticator: refuse, never let the client in
            log.exception("authenticator failed for %s", workspace_id)
            await self._close(ws, p.CLOSE_INTERNAL_ERROR, "authentication failed")
            return
        if identity is None:
            self.counters.closed(None, "client_closed")
            return  # the client went away before authenticating
        logs.bind(user=identity.user_id)
        if not self.accepting:  # the shutdown began while it authenticated
            await self._close(ws, p.CLOSE_RESTART, "server restarting")
            return
        try:
            room = await self.rooms.open_room(workspace_id)
        except RoomLimitReached:
            await self._close(ws, p.CLOSE_TRY_AGAIN, "room limit reached on this server; try again or another node")
            return
        except StoreError as exc:
            log.error("cannot load workspace %s: %s", workspace_id, exc)
            await _close(ws, p.CLOSE_TRY_AGAIN, "storage unavailable; reconnect shortly")
            return
        except Exception:
            log.exception("cannot load workspace %s", workspace_id)
            await self._close(ws, p.CLOSE_INTERNAL_ERROR, "cannot load workspace")
            return
        client = ws.client
        peer = WebSocketPeer(
            ws,
            settings.peer_queue_frames,
            label=f"{workspace_id} {client.host}:{client.port}" if client else workspace_id,
            counters=self.counters,
        )
        self.peers.add(peer)
        self._no_peers.clear()
        state = room.join(peer, identity)
        session = _Session()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._read_loop(ws, peer, room, state, rate, pending, session))]
        if getattr(identity, "expires_at", None) is not None:
            tasks.append(loop.create_task(self._watch_expiry(peer, state, session)))
        try:
            await peer.closed
        finally:
            for task in tasks:
                task.cancel()
            room.leave(peer)
            self.rooms.room_left(room)
            try:
                await peer.finish()
            finally:
                self.peers.discard(peer)
                if not self.peers:
                    self._no_peers.set()
                log.info(
                    "closed workspace=%s user=%s from %s: %s",
                    workspace_id,
                    identity.user_id,
                    f"{client.host}:{client.port}" if client else "?",
                    f"{peer.close_code} {peer.close_reason}" if peer.close_code is not None else "the client left",
                )

    async def _close(self, ws: WebSocket, code: int, reason: str) -> None:
        """Close a connection that never joined a room (counted by close code)."""
        kind = "room_limit" if code == p.CLOSE_TRY_AGAIN else close_kind(code)
        self.counters.closed(code, kind)
        log.info(
            "refused workspace=%s user=%s from %s: %d %s",
            logs.workspace_var.get() or "-",
            logs.user_var.get() or "-",
            ws.client.host if ws.client else "?",
            code,
            reason,
        )
        await _close(ws, code, reason)

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

    async def _authenticate_by_message(
        self, ws: WebSocket, workspace_id: str, rate: tuple[RateLimiter, RateLimiter]
    ) -> tuple[Identity | None, list[p.Message]]:
        """No credentials in the handshake: the first control message must be ``auth``.

        Other messages that come first (a stock client sends sync step 1 and
        its awareness on open) are kept, up to COLLAB_PREAUTH_MAX_BYTES and
        _MAX_FRAMES, and handled once the client is authenticated.
        """
        verify = getattr(self.authenticator, "authenticate_token", None)
        if verify is None:
            raise AuthError(CLOSE_UNAUTHENTICATED, "authentication required")
        settings = self.settings
        pending: list[p.Message] = []
        buffered = 0
        while True:
            message = await ws.receive()
            data = message.get("bytes")
            if data is None:
                if message["type"] == "websocket.disconnect":
                    return None, []
                raise _Close(p.CLOSE_UNSUPPORTED_DATA, "text frames are not supported; send binary")
            self.counters.messages_in += 1
            self.counters.bytes_in += len(data)
            await self._throttle(rate, len(data))
            if len(data) > settings.preauth_max_bytes:
                raise _Close(p.CLOSE_TOO_BIG, "message too large before authentication")
            try:
                msg = p.decode_message(data)
            except p.ProtocolError as exc:
                raise _Close(exc.code, exc.reason) from None
            if isinstance(msg, p.Control):
                if msg.type != "auth":
                    raise AuthError(CLOSE_UNAUTHENTICATED, "authentication required: send auth first")
                return await verify(msg.body.get("token"), workspace_id), pending
            buffered += len(data)
            if buffered > settings.preauth_max_bytes or len(pending) >= settings.preauth_max_frames:
                raise _Close(p.CLOSE_POLICY, "too much data before authentication")
            pending.append(msg)

    async def _throttle(self, rate: tuple[RateLimiter, RateLimiter], size: int) -> None:
        """Take a message's tokens; wait for them if the client is over its rate (raises past the grace).

        Messages and bytes are counted apart: CPU goes with both (decoding an
        update costs about 1 s per MiB of small structs on one core).
        """
        try:
            delay = max(rate[0].take(), rate[1].take(size))
        except RateExceeded as exc:
            self.stats["rate_limited"] += 1
            raise _Close(p.CLOSE_POLICY, str(exc)) from None
        if delay > 0:
            await asyncio.sleep(delay)  # not reading is what slows the client down (TCP backpressure)

    async def _read_loop(
        self,
        ws: WebSocket,
        peer: WebSocketPeer,
        room: Room,
        state: PeerState,
        rate: tuple[RateLimiter, RateLimiter],
        pending: list[p.Message],
        session: _Session,
    ) -> None:
        receive = ws.receive
        max_bytes = self.settings.max_message_bytes
        counters = self.counters
        try:
            for msg in pending:
                await self._handle(peer, room, state, msg, session)
                if peer.closed.done():
                    return
            pending.clear()
            handled = 0
            while True:
                message = await receive()
                data = message.get("bytes")
                if data is None:
                    if message["type"] == "websocket.disconnect":
                        peer.disconnected()
                        return
                    peer.close(p.CLOSE_UNSUPPORTED_DATA, "text frames are not supported; send binary")
                    return
                counters.messages_in += 1
                counters.bytes_in += len(data)
                if len(data) > max_bytes:
                    peer.close(p.CLOSE_TOO_BIG, f"message exceeds {max_bytes} bytes")
                    return
                await self._throttle(rate, len(data))
                await self._handle(peer, room, state, p.decode_message(data), session)
                if peer.closed.done():
                    return
                handled += 1
                if handled % 4 == 0:
                    # receive() doesn't suspend while uvicorn has messages queued: without
                    # this, one client's burst (a TCP read can hold thousands of small
                    # messages) would run to the end before any flush, ack or other
                    # connection got a turn.
                    await asyncio.sleep(0)
        except p.ProtocolError as exc:
            peer.close(exc.code, exc.reason)
        except _Close as exc:
            peer.close(exc.code, exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: drop only this peer
            log.exception("error handling message in %s", room.workspace_id)
            peer.close(p.CLOSE_INTERNAL_ERROR, f"internal error: {type(exc).__name__}")

    async def _handle(
        self, peer: WebSocketPeer, room: Room, state: PeerState, msg: p.Message, session: _Session
    ) -> None:
        if isinstance(msg, p.Control):
            if msg.type == "auth":
                await self._refresh(peer, room, state, msg, session)
                return
            role = required_role(msg.type)
            if role is not None and state.wants_control and not has_role(state.identity, role):
                body: dict[str, Any] = {
                    "type": "lock.error" if msg.type.startswith("lock.") else "error",
                    **({"id": msg.body["id"]} if "id" in msg.body else {}),
                    "code": "forbidden",
                    "message": f"{msg.type} needs the {role} role",
                }
                if isinstance(msg.body.get("path"), str):
                    body["path"] = msg.body["path"]
                state.control(body)
                return
        was_opted_in = state.wants_control
        room.receive(state, msg)
        if not was_opted_in and state.wants_control and getattr(state.identity, "expires_at", None) is not None:
            self._send_auth_status(state)  # tells a token client when to refresh
            expires_at = state.identity.expires_at
            if expires_at - self.settings.token_refresh_window <= time.time():
                # The warning fell due before this peer opted in (and was not
                # sent to it then): ask for a fresh token now.
                state.control({"type": "auth.expiring", "expires_at": expires_at})

    def _send_auth_status(self, state: PeerState, request: p.Control | None = None) -> None:
        identity = state.identity
        body: dict[str, Any] = {"type": "auth.ok", "user": identity.public(), "expires_at": identity.expires_at}
        if request is not None and "id" in request.body:
            body["id"] = request.body["id"]
        state.control(body)

    async def _refresh(
        self, peer: WebSocketPeer, room: Room, state: PeerState, msg: p.Control, session: _Session
    ) -> None:
        """A fresh token for the same user: new expiry (and role) for this connection."""
        verify = getattr(self.authenticator, "authenticate_token", None)
        try:
            if verify is None:
                raise AuthError(CLOSE_UNAUTHENTICATED, "this server does not accept tokens in messages")
            fresh = await verify(msg.body.get("token"), room.workspace_id)
            self.gate.authorize(fresh, WEBSOCKET_REQUIRES, peer.ws)  # the same rule as at the handshake
        except AuthError as exc:
            self.stats["auth_failed"] += 1
            peer.close(exc.code, exc.reason)
            return
        except GateError as exc:
            self.stats["auth_failed"] += 1
            peer.close(exc.close_code, exc.reason)
            return
        if fresh.user_id != state.identity.user_id:
            peer.close(CLOSE_FORBIDDEN, "the new token is for another user")
            return
        state.identity = fresh
        session.refreshed.set()
        self._send_auth_status(state, msg)

    async def _watch_expiry(self, peer: WebSocketPeer, state: PeerState, session: _Session) -> None:
        """Ask for a fresh token before the current one expires; close 4401 if none comes."""
        window = self.settings.token_refresh_window
        grace = self.settings.token_expiry_grace
        while not peer.closed.done():
            identity = state.identity
            expires_at = identity.expires_at
            if expires_at is None:
                return
            if await session.wait_refresh(expires_at - window - time.time()):
                continue
            if state.identity is identity:
                state.control({"type": "auth.expiring", "expires_at": expires_at})
            if await session.wait_refresh(expires_at + grace - time.time()):
                continue
            if state.identity is identity:
                peer.close(CLOSE_UNAUTHENTICATED, "token expired")
                return


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


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Close a websocket that never joined a room; the client may be gone already."""
    try:
        async with asyncio.timeout(2):
            await ws.close(code, reason[:120])
    except Exception:
        pass


def create_app(
    settings: Settings | None = None,
    store: DocumentStore | None = None,
    authenticator: Authenticator | None = None,
    extensions: list[Extension] | None = None,
) -> Starlette:
    """Build the Starlette application and everything it owns."""
    settings = settings or Settings()
    if extensions is None:
        extensions = default_extensions(settings)
    core = App(settings, store, authenticator, extensions)
    app = Starlette(routes=core.routes(), lifespan=core.lifespan, exception_handlers={HTTPException: _http_error})
    app.state.core = core
    return app


def default_extensions(settings: Settings, forwarding: Any = None) -> list[Extension]:
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
    extensions.append(PresenceExtension(settings))
    if settings.locks_enabled:
        from locks.extension import LockExtension

        extensions.append(LockExtension(settings))
    from forwarding.extension import ForwardingExtension

    # Forwarding goes last: its validation guard sees what other guards (locks)
    # let through, and it finds their ``fence_for`` among the extensions.
    extensions.append(ForwardingExtension(forwarding))
    return extensions
