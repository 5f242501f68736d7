"""One websocket connection: everything about one socket, from the handshake to the close.

A ``Connection`` authenticates its client (from the handshake, or from a
first ``auth`` message, keeping what a stock client sends before it),
throttles what it reads, refreshes its token, joins its room and feeds it the
decoded messages, all in the one ASGI task of the socket. It is also the
room's peer: ``send`` writes a frame straight into the socket when the server
allows it (``collab.wsserver``) and queues it otherwise; one writer task,
started only when frames have to wait, drains the queue. A client that stops
reading fills the queue and its TCP connection is dropped (it sees 1006; the
server counts a 1013 ``slow_consumer``) instead of slowing anyone else down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket

from codec import protocol as p
from collab import logs
from collab.auth import CLOSE_FORBIDDEN, CLOSE_UNAUTHENTICATED, Authenticator, AuthError, Identity
from collab.gate import Gate, GateError, Requirement
from collab.metrics import Counters, close_kind
from collab.security import RateExceeded, RateLimiter
from collab.settings import Settings
from collab.wsserver import GONE, WRITE_BINARY, WRITTEN
from persistence.base import StoreError
from rooms.manager import RoomLimitReached, RoomManager
from rooms.room import PeerState, Room

log = logging.getLogger("collab.connection")


class ConnectionRegistry:
    """The live connections of one server, for shutdown, metrics and the admin API."""

    def __init__(self) -> None:
        self.accepting = False  # False while starting and once shutting down
        self._live: set[Connection] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._live))

    def add(self, conn: Connection) -> None:
        self._live.add(conn)
        self._empty.clear()

    def discard(self, conn: Connection) -> None:
        self._live.discard(conn)
        if not self._live:
            self._empty.set()

    def close_all(self, code: int, reason: str) -> None:
        for conn in list(self._live):
            conn.close(code, reason)

    async def wait_empty(self) -> None:
        await self._empty.wait()


@dataclass(slots=True)
class ConnectionServices:
    """What a connection uses of the server it runs in (built once by the app)."""

    settings: Settings
    authenticator: Authenticator
    gate: Gate
    requires: Requirement  # who may open a workspace's websocket
    rooms: RoomManager
    counters: Counters
    refusals: dict[str, int]  # the app's refusal counts (auth_failed, rate_limited, ...)
    registry: ConnectionRegistry


class _Refuse(Exception):
    """Close with this code and reason (raised while reading)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Connection:
    """One socket: read loop, pre-auth buffer, rate limits, token refresh, outgoing queue; the room's peer."""

    __slots__ = (
        "ws",
        "services",
        "workspace_id",
        "label",
        "identity",
        "room",
        "state",
        "close_code",
        "close_reason",
        "overflowed",
        "_closed",
        "_queue",
        "_wake",
        "_writer",
        "_write_now",
        "_rate",
        "_refreshed",
        "_task",
        "_interruptible",
        "_interrupted",
    )

    def __init__(self, ws: WebSocket, services: ConnectionServices, workspace_id: str) -> None:
        self.ws = ws
        self.services = services
        self.workspace_id = workspace_id
        client = ws.client
        self.label = f"{workspace_id} {client.host}:{client.port}" if client else workspace_id
        self.identity: Identity | None = None
        self.room: Room | None = None
        self.state: PeerState | None = None  # the room's record of this connection, once joined
        self.close_code: int | None = None
        self.close_reason = ""
        self.overflowed = False
        self._closed = False
        self._queue: deque[bytes] | None = None  # made when a frame first has to wait
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._write_now = ws.scope.get("extensions", {}).get(WRITE_BINARY)
        settings = services.settings
        self._rate = (
            RateLimiter(settings.message_rate, settings.message_burst, settings.rate_limit_grace),
            RateLimiter(settings.byte_rate, settings.byte_burst, settings.rate_limit_grace, unit="bytes"),
        )
        self._refreshed: asyncio.Event | None = None  # set when a fresh token arrives (token clients only)
        self._task: asyncio.Task[Any] | None = None
        self._interruptible = False  # the read loop is waiting (close() may cancel it)
        self._interrupted = False

    # ------------------------------------------------------------ Peer protocol

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued(self) -> int:
        """Frames waiting in the outgoing queue."""
        return len(self._queue) if self._queue else 0

    def send(self, frame: bytes) -> None:
        """Write ``frame`` now if the socket takes it, else queue it (never blocks)."""
        if self._closed:
            return
        queue = self._queue
        if not queue and self._write_now is not None:  # nothing waiting: this frame may go at once
            result = self._write_now(frame)
            if result == WRITTEN:
                counters = self.services.counters
                counters.messages_out += 1
                counters.bytes_out += len(frame)
                return
            if result == GONE:
                self._gone()
                return
        if queue is None:
            queue = self._queue = deque()
        if len(queue) >= self.services.settings.peer_queue_frames:
            self.overflowed = True
            self.close(p.CLOSE_TRY_AGAIN, "outgoing queue overflow; reconnect to resync")
            return
        queue.append(frame)
        if self._writer is None:
            self._wake = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        assert self._wake is not None
        self._wake.set()

    def close(self, code: int, reason: str) -> None:
        """Close with ``code`` (idempotent); the connection's task ends and cleans up."""
        if self._closed:
            return
        self.close_code = code
        self.close_reason = reason
        if code not in (p.CLOSE_NORMAL, p.CLOSE_GOING_AWAY, p.CLOSE_RESTART):
            log.debug("closing %s: %d %s", self.label, code, reason)  # the close is logged (info) at the end
        self._closed = True
        self._interrupt()

    def _gone(self) -> None:
        """The client went away; nothing more to send."""
        if not self._closed:
            self._closed = True
            self._interrupt()

    def _interrupt(self) -> None:
        # Closed from elsewhere (the room, a timer, the shutdown) while the read
        # loop waits: cancel that wait. Closes from inside the loop are seen
        # after the message that caused them.
        if self._interruptible and self._task is not None and not self._interrupted:
            self._interrupted = True
            self._task.cancel()

    # ------------------------------------------------------------ lifetime

    async def run(self) -> None:
        """Serve the socket until it closes (called in its ASGI task)."""
        ws, services = self.ws, self.services
        self._task = asyncio.current_task()
        await ws.accept()
        logs.bind(workspace=self.workspace_id)  # every log line of this connection names its workspace
        if not services.registry.accepting:
            await self._refuse(p.CLOSE_RESTART, "server shutting down")
            return
        try:
            identity, pending = await self._authenticate()
        except _Refuse as exc:
            await self._refuse(exc.code, exc.reason)
            return
        if identity is None:
            services.counters.closed(None, "client_closed")
            return  # the client went away before authenticating
        self.identity = identity
        logs.bind(user=identity.user_id)
        if not services.registry.accepting:  # the shutdown began while it authenticated
            await self._refuse(p.CLOSE_RESTART, "server restarting")
            return
        try:
            room = await services.rooms.open_room(self.workspace_id)
        except RoomLimitReached:
            await self._refuse(p.CLOSE_TRY_AGAIN, "room limit reached on this server; try again or another node")
            return
        except StoreError as exc:
            log.error("cannot load workspace %s: %s", self.workspace_id, exc)
            await self._refuse(p.CLOSE_TRY_AGAIN, "storage unavailable; reconnect shortly")
            return
        except Exception:
            log.exception("cannot load workspace %s", self.workspace_id)
            await self._refuse(p.CLOSE_INTERNAL_ERROR, "cannot load workspace")
            return
        self.room = room
        services.registry.add(self)
        self.state = room.join(self, identity)
        watch = None
        if identity.expires_at is not None:
            self._refreshed = asyncio.Event()
            watch = asyncio.get_running_loop().create_task(self._watch_expiry())
        try:
            await self._read_loop(pending)
        finally:
            if watch is not None:
                watch.cancel()
            room.leave(self)
            services.rooms.room_left(room)
            try:
                await self._finish()
            finally:
                services.registry.discard(self)
                client = ws.client
                log.info(
                    "closed workspace=%s user=%s from %s: %s",
                    self.workspace_id,
                    identity.user_id,
                    f"{client.host}:{client.port}" if client else "?",
                    f"{self.close_code} {self.close_reason}" if self.close_code is not None else "the client left",
                )

    async def _authenticate(self) -> tuple[Identity | None, list[p.Message]]:
        """Who the client is, and what it sent before it said so; raises ``_Refuse``."""
        services = self.services
        try:
            async with asyncio.timeout(services.settings.preauth_timeout):
                identity = await services.authenticator.authenticate(self.ws, self.workspace_id)
                pending: list[p.Message] = []
                if identity is None:
                    identity, pending = await self._authenticate_by_message()
                if identity is not None:
                    services.gate.authorize(identity, services.requires, self.ws)
                return identity, pending
        except GateError as exc:
            services.refusals["auth_failed"] += 1
            raise _Refuse(exc.close_code, exc.reason) from None
        except TimeoutError:
            services.refusals["auth_failed"] += 1
            raise _Refuse(CLOSE_UNAUTHENTICATED, "authentication timeout") from None
        except AuthError as exc:
            services.refusals["auth_failed"] += 1
            raise _Refuse(exc.code, exc.reason) from None
        except _Refuse:
            raise
        except Exception:  # a broken authenticator: refuse, never let the client in
            log.exception("authenticator failed for %s", self.workspace_id)
            raise _Refuse(p.CLOSE_INTERNAL_ERROR, "authentication failed") from None

    async def _authenticate_by_message(self) -> tuple[Identity | None, list[p.Message]]:
        """No credentials in the handshake: the first control message must be ``auth``.

        Other messages that come first (a stock client sends sync step 1 and
        its awareness on open) are kept, up to COLLAB_PREAUTH_MAX_BYTES and
        _MAX_FRAMES, and handled once the client is authenticated.
        """
        verify = getattr(self.services.authenticator, "authenticate_token", None)
        if verify is None:
            raise AuthError(CLOSE_UNAUTHENTICATED, "authentication required")
        settings, counters = self.services.settings, self.services.counters
        pending: list[p.Message] = []
        buffered = 0
        while True:
            message = await self.ws.receive()
            data = message.get("bytes")
            if data is None:
                if message["type"] == "websocket.disconnect":
                    return None, []
                raise _Refuse(p.CLOSE_UNSUPPORTED_DATA, "text frames are not supported; send binary")
            counters.messages_in += 1
            counters.bytes_in += len(data)
            await self._throttle(len(data))
            if len(data) > settings.preauth_max_bytes:
                raise _Refuse(p.CLOSE_TOO_BIG, "message too large before authentication")
            try:
                msg = p.decode_message(data)
            except p.ProtocolError as exc:
                raise _Refuse(exc.code, exc.reason) from None
            if isinstance(msg, p.Control):
                if msg.type != "auth":
                    raise AuthError(CLOSE_UNAUTHENTICATED, "authentication required: send auth first")
                return await verify(msg.body.get("token"), self.workspace_id), pending
            buffered += len(data)
            if buffered > settings.preauth_max_bytes or len(pending) >= settings.preauth_max_frames:
                raise _Refuse(p.CLOSE_POLICY, "too much data before authentication")
            pending.append(msg)

    async def _throttle(self, size: int) -> None:
        """Take a message's tokens; wait for them if the client is over its rate (raises past the grace).

        Messages and bytes are counted apart: CPU goes with both (decoding an
        update costs about 1 s per MiB of small structs on one core).
        """
        rate = self._rate
        try:
            delay = max(rate[0].take(), rate[1].take(size))
        except RateExceeded as exc:
            self.services.refusals["rate_limited"] += 1
            raise _Refuse(p.CLOSE_POLICY, str(exc)) from None
        if delay > 0:
            await asyncio.sleep(delay)  # not reading is what slows the client down (TCP backpressure)

    async def _read_loop(self, pending: list[p.Message]) -> None:
        receive = self.ws.receive
        max_bytes = self.services.settings.max_message_bytes
        counters = self.services.counters
        try:
            for msg in pending:
                await self._dispatch(msg)
                if self._closed:
                    return
            pending.clear()
            handled = 0
            while not self._closed:
                self._interruptible = True
                message = await receive()
                self._interruptible = False
                data = message.get("bytes")
                if data is None:
                    if message["type"] == "websocket.disconnect":
                        self._gone()
                        return
                    self.close(p.CLOSE_UNSUPPORTED_DATA, "text frames are not supported; send binary")
                    return
                counters.messages_in += 1
                counters.bytes_in += len(data)
                if len(data) > max_bytes:
                    self.close(p.CLOSE_TOO_BIG, f"message exceeds {max_bytes} bytes")
                    return
                self._interruptible = True
                await self._throttle(len(data))
                self._interruptible = False
                msg = p.decode_message(data)
                if type(msg) is p.Control and msg.type == "auth":
                    self._interruptible = True
                    await self._refresh(msg)
                    self._interruptible = False
                else:
                    self._handle(msg)
                handled += 1
                if handled % 4 == 0 and not self._closed:
                    # receive() doesn't suspend while uvicorn has messages queued: without
                    # this, one client's burst (a TCP read can hold thousands of small
                    # messages) would run to the end before any flush, ack or other
                    # connection got a turn.
                    self._interruptible = True
                    await asyncio.sleep(0)
                    self._interruptible = False
        except asyncio.CancelledError:
            if not self._interrupted:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # our own close() interrupted the wait; go on to clean up
        except (p.ProtocolError, _Refuse) as exc:
            self.close(exc.code, exc.reason)
        except Exception as exc:  # a bug of ours: drop only this connection
            log.exception("error handling message in %s", self.workspace_id)
            self.close(p.CLOSE_INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
        finally:
            self._interruptible = False

    async def _dispatch(self, msg: p.Message) -> None:
        if type(msg) is p.Control and msg.type == "auth":
            await self._refresh(msg)
        else:
            self._handle(msg)

    def _handle(self, msg: p.Message) -> None:
        """Hand a decoded message to the room (``auth`` is handled by the read loop)."""
        state, room = self.state, self.room
        assert state is not None and room is not None
        was_opted_in = state.wants_control
        room.receive(state, msg)
        identity = state.identity
        if not was_opted_in and state.wants_control and identity.expires_at is not None:
            self._send_auth_status()  # tells a token client when to refresh
            if identity.expires_at - self.services.settings.token_refresh_window <= time.time():
                # The warning fell due before this peer opted in (and was not
                # sent to it then): ask for a fresh token now.
                state.control({"type": "auth.expiring", "expires_at": identity.expires_at})

    # ------------------------------------------------------------ token refresh

    def _send_auth_status(self, request: p.Control | None = None) -> None:
        state = self.state
        assert state is not None
        identity = state.identity
        body: dict[str, Any] = {"type": "auth.ok", "user": identity.public(), "expires_at": identity.expires_at}
        if request is not None and "id" in request.body:
            body["id"] = request.body["id"]
        state.control(body)

    async def _refresh(self, msg: p.Control) -> None:
        """A fresh token for the same user: new expiry (and role) for this connection."""
        services, state = self.services, self.state
        assert state is not None
        verify = getattr(services.authenticator, "authenticate_token", None)
        try:
            if verify is None:
                raise AuthError(CLOSE_UNAUTHENTICATED, "this server does not accept tokens in messages")
            fresh = await verify(msg.body.get("token"), self.workspace_id)
            services.gate.authorize(fresh, services.requires, self.ws)  # the same rule as at the handshake
        except AuthError as exc:
            services.refusals["auth_failed"] += 1
            self.close(exc.code, exc.reason)
            return
        except GateError as exc:
            services.refusals["auth_failed"] += 1
            self.close(exc.close_code, exc.reason)
            return
        if self._closed:
            return
        if fresh.user_id != state.identity.user_id:
            self.close(CLOSE_FORBIDDEN, "the new token is for another user")
            return
        state.identity = self.identity = fresh
        if self._refreshed is not None:
            self._refreshed.set()
        self._send_auth_status(msg)

    async def _wait_refresh(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a refresh; True if one came."""
        refreshed = self._refreshed
        assert refreshed is not None
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                await refreshed.wait()
        except TimeoutError:
            return False
        refreshed.clear()
        return True

    async def _watch_expiry(self) -> None:
        """Ask for a fresh token before the current one expires; close 4401 if none comes."""
        settings, state = self.services.settings, self.state
        assert state is not None
        window, grace = settings.token_refresh_window, settings.token_expiry_grace
        while not self._closed:
            identity = state.identity
            expires_at = identity.expires_at
            if expires_at is None:
                return
            if await self._wait_refresh(expires_at - window - time.time()):
                continue
            if state.identity is identity:
                state.control({"type": "auth.expiring", "expires_at": expires_at})
            if await self._wait_refresh(expires_at + grace - time.time()):
                continue
            if state.identity is identity:
                self.close(CLOSE_UNAUTHENTICATED, "token expired")
                return

    # ------------------------------------------------------------ writing and closing

    async def _write_loop(self) -> None:
        """Drain the queue through ASGI ``send`` (which waits while the transport is paused)."""
        send = self.ws.send_bytes
        queue, wake = self._queue, self._wake
        assert queue is not None
        counters = self.services.counters
        assert wake is not None
        try:
            while True:
                await wake.wait()
                wake.clear()
                while queue:
                    frame = queue[0]
                    await send(frame)
                    queue.popleft()
                    counters.messages_out += 1
                    counters.bytes_out += len(frame)
        except asyncio.CancelledError:
            raise
        except Exception:  # the socket went away under us
            self._gone()

    async def _finish(self, flush_timeout: float = 1.0) -> None:
        """Stop writing; send the close frame if we are the ones closing."""
        self._closed = True
        self.services.counters.closed(self.close_code, close_kind(self.close_code, self.overflowed))
        writer = self._writer
        if self.close_code in (p.CLOSE_GOING_AWAY, p.CLOSE_RESTART) and writer is not None:
            # Planned closes deliver what is queued first.
            try:
                async with asyncio.timeout(flush_timeout):
                    while self._queue and not writer.done():
                        assert self._wake is not None
                        self._wake.set()
                        await asyncio.sleep(0.005)
            except TimeoutError:
                pass
        if writer is not None:
            writer.cancel()
        self._queue = None
        if self.overflowed and abort_transport(self.ws):
            # It stopped reading: a close frame would wait behind megabytes in
            # the socket buffers, which stay allocated until then. Drop the TCP
            # connection; the client reconnects (1006) and resyncs.
            return
        if self.close_code is not None:
            try:
                async with asyncio.timeout(flush_timeout):
                    await self.ws.close(self.close_code, self.close_reason[:120])
            except Exception as exc:
                # A peer that does not read cannot be told. Closing the
                # transport normally would wait for its send buffer to drain,
                # which never happens: drop the TCP connection instead.
                log.info(
                    "cannot send close %d to %s (%s): dropping the connection",
                    self.close_code,
                    self.label,
                    type(exc).__name__,
                )
                abort_transport(self.ws)

    async def _refuse(self, code: int, reason: str) -> None:
        """Close a connection that never joined a room (counted by close code)."""
        kind = "room_limit" if code == p.CLOSE_TRY_AGAIN else close_kind(code)
        self.services.counters.closed(code, kind)
        log.info(
            "refused workspace=%s user=%s from %s: %d %s",
            logs.workspace_var.get() or "-",
            logs.user_var.get() or "-",
            self.ws.client.host if self.ws.client else "?",
            code,
            reason,
        )
        await close_quietly(self.ws, code, reason)


async def close_quietly(ws: WebSocket, code: int, reason: str) -> None:
    """Close a websocket that never joined a room; the client may be gone already."""
    try:
        async with asyncio.timeout(2):
            await ws.close(code, reason[:120])
    except Exception:
        pass


def abort_transport(ws: WebSocket) -> bool:
    """Drop the TCP connection under an ASGI websocket (best effort).

    ASGI gives no handle on the transport; uvicorn's websocket protocols pass
    their bound ``receive`` method, whose object owns ``transport``. Used
    only for peers that stopped reading, whose close frame can't be sent.
    """
    owner = getattr(getattr(ws, "_receive", None), "__self__", None)
    transport = getattr(owner, "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return False
    try:
        transport.abort()
    except Exception:
        return False
    return True
