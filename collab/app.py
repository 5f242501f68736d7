"""The ASGI application: ``create_app(settings)`` builds everything.

No module-level state: the store, the room manager and the set of live
connections hang off the ``App`` object that ``create_app`` returns, so tests
can run several independent servers in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from collab import __version__
from collab import protocol as p
from collab.auth import Authenticator, AuthError, DevelopmentAuthenticator
from collab.connection import WebSocketPeer
from collab.extensions import Extension
from collab.settings import Settings
from persistence.base import DocumentStore
from persistence.sqlite import SQLiteDocumentStore
from rooms.manager import RoomManager
from rooms.room import Room, RoomConfig

log = logging.getLogger("collab.app")

# Workspace ids are path segments: letters, digits and . _ : - (case-sensitive).
WORKSPACE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


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
        self.authenticator: Authenticator = authenticator or DevelopmentAuthenticator()
        self.store: DocumentStore = store or SQLiteDocumentStore(
            settings.database_path, synchronous=settings.sqlite_synchronous
        )
        self.room_config = RoomConfig(
            flush_interval=settings.flush_interval_ms / 1000.0,
            compact_every_updates=settings.compact_every_updates,
            compact_every_bytes=settings.compact_every_bytes,
            max_awareness_state_bytes=settings.max_awareness_state_bytes,
            server_version=__version__,
            limits={
                "max_message_bytes": settings.max_message_bytes,
                "max_awareness_state_bytes": settings.max_awareness_state_bytes,
                "peer_queue_frames": settings.peer_queue_frames,
            },
        )
        self.rooms = RoomManager(
            self.store, self.room_config, idle_grace=settings.room_idle_seconds, room_factory=self._make_room
        )
        self.peers: set[WebSocketPeer] = set()
        self.accepting = False

    def _make_room(self, workspace_id: str) -> Room:
        handlers: dict = {}
        guards: list = []
        listeners: list = []
        for ext in self.extensions:
            handlers.update(ext.control_handlers())
            guards.extend(ext.guards())
            listeners.extend(ext.listeners())
        return Room(
            workspace_id,
            self.store,
            self.room_config,
            control_handlers=handlers,
            guards=guards,
            listeners=listeners,
        )

    def routes(self) -> list:
        routes = [
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            WebSocketRoute("/ws/{workspace_id}", self.websocket),
        ]
        for ext in self.extensions:
            routes.extend(ext.routes())
        return routes

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette):
        await self.store.open()
        for ext in self.extensions:
            await ext.start(self)
        self.accepting = True
        log.info("store open at %s", getattr(self.store, "path", self.store))
        try:
            yield
        finally:
            await self.shutdown()

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
        for ext in self.extensions:
            try:
                async with asyncio.timeout(2):
                    await ext.check()
                checks[ext.name] = "ok"
            except Exception as exc:
                checks[ext.name] = f"error: {exc}"
                ok = False
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def websocket(self, ws: WebSocket) -> None:
        workspace_id = ws.path_params["workspace_id"]
        await ws.accept()
        if not WORKSPACE_ID.fullmatch(workspace_id):
            await ws.close(p.CLOSE_POLICY, "invalid workspace id")
            return
        if not self.accepting:
            await ws.close(p.CLOSE_RESTART, "server shutting down")
            return
        try:
            identity = await self.authenticator.authenticate(ws, workspace_id)
        except AuthError as exc:
            await ws.close(exc.code, exc.reason)
            return
        try:
            room = await self.rooms.open_room(workspace_id)
        except Exception:
            log.exception("cannot load workspace %s", workspace_id)
            await ws.close(p.CLOSE_INTERNAL_ERROR, "cannot load workspace")
            return
        client = ws.client
        peer = WebSocketPeer(
            ws,
            self.settings.peer_queue_frames,
            label=f"{workspace_id} {client.host}:{client.port}" if client else workspace_id,
        )
        self.peers.add(peer)
        state = room.join(peer, identity)
        reader = asyncio.get_running_loop().create_task(self._read_loop(ws, peer, room, state))
        try:
            await peer.closed
        finally:
            reader.cancel()
            room.leave(peer)
            self.rooms.room_left(room)
            self.peers.discard(peer)
            await peer.finish()

    async def _read_loop(self, ws: WebSocket, peer: WebSocketPeer, room, state) -> None:
        receive = ws.receive
        max_bytes = self.settings.max_message_bytes
        try:
            while True:
                message = await receive()
                data = message.get("bytes")
                if data is None:
                    if message["type"] == "websocket.disconnect":
                        peer.disconnected()
                        return
                    peer.close(p.CLOSE_UNSUPPORTED_DATA, "text frames are not supported; send binary")
                    return
                if len(data) > max_bytes:
                    peer.close(p.CLOSE_TOO_BIG, f"message exceeds {max_bytes} bytes")
                    return
                room.receive(state, p.decode_message(data))
                if peer.closed.done():
                    return
        except p.ProtocolError as exc:
            peer.close(exc.code, exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: drop only this peer
            log.exception("error handling message in %s", room.workspace_id)
            peer.close(p.CLOSE_INTERNAL_ERROR, f"internal error: {type(exc).__name__}")


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
    app = Starlette(routes=core.routes(), lifespan=core.lifespan)
    app.state.core = core
    return app


def default_extensions(settings: Settings) -> list[Extension]:
    """The features a server built from settings runs with, in hook order."""
    extensions: list[Extension] = []
    from presence.extension import PresenceExtension

    # Presence first: it stamps awareness states before anything else sees them.
    extensions.append(PresenceExtension(settings))
    if settings.locks_enabled:
        from locks.extension import LockExtension

        extensions.append(LockExtension(settings))
    from forwarding.extension import ForwardingExtension

    # Forwarding goes last: its validation guard sees what other guards (locks)
    # let through, and it finds their ``fence_for`` among the extensions.
    extensions.append(ForwardingExtension())
    return extensions
