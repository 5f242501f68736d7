"""A websocket connection as a room peer.

The room hands frames to ``send``, which only appends to a bounded queue;
one writer task per connection drains it. A peer that stops reading fills its
queue and its TCP connection is dropped instead of slowing anyone else down:
the client sees 1006 (a close frame would wait behind everything it did not
read); the server logs and counts it as 1013, ``slow_consumer``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from starlette.websockets import WebSocket

from codec import protocol as p
from collab.metrics import close_kind

log = logging.getLogger("collab.connection")


class WebSocketPeer:
    __slots__ = (
        "ws",
        "max_queue",
        "_queue",
        "_wake",
        "_writer",
        "closed",
        "close_code",
        "close_reason",
        "label",
        "overflowed",
        "counters",
    )

    def __init__(self, ws: WebSocket, max_queue: int, label: str = "", counters: Any = None) -> None:
        self.ws = ws
        self.max_queue = max_queue
        self.label = label
        self._queue: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.overflowed = False
        self.counters = counters  # collab.metrics.Counters (frames and bytes written, closes)
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    # -- Peer protocol

    def send(self, frame: bytes) -> None:
        if self.closed.done():
            return
        if len(self._queue) >= self.max_queue:
            self.overflowed = True
            self.close(p.CLOSE_TRY_AGAIN, "outgoing queue overflow; reconnect to resync")
            return
        self._queue.append(frame)
        self._wake.set()

    def close(self, code: int, reason: str) -> None:
        if self.closed.done():
            return
        self.close_code = code
        self.close_reason = reason
        if code not in (p.CLOSE_NORMAL, p.CLOSE_GOING_AWAY, p.CLOSE_RESTART):
            log.debug("closing %s: %d %s", self.label, code, reason)  # the app logs the close (info)
        self.closed.set_result(None)

    def disconnected(self) -> None:
        """The client went away; nothing more to send."""
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- writing

    async def _write_loop(self) -> None:
        send = self.ws.send_bytes
        queue = self._queue
        counters = self.counters
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while queue:
                    frame = queue.popleft()
                    await send(frame)
                    if counters is not None:
                        counters.messages_out += 1
                        counters.bytes_out += len(frame)
        except asyncio.CancelledError:
            raise
        except Exception:  # the socket went away under us
            self.disconnected()

    async def finish(self, flush_timeout: float = 1.0) -> None:
        """Stop writing; send the close frame if we are the ones closing."""
        if self.counters is not None:
            self.counters.closed(self.close_code, close_kind(self.close_code, self.overflowed))
        if self.close_code is not None and self.close_code in (p.CLOSE_GOING_AWAY, p.CLOSE_RESTART):
            # Planned closes deliver what is queued first.
            try:
                async with asyncio.timeout(flush_timeout):
                    while self._queue and not self._writer.done():
                        self._wake.set()
                        await asyncio.sleep(0.005)
            except TimeoutError:
                pass
        self._writer.cancel()
        self._queue.clear()
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
                log.info("cannot send close %d to %s (%s): dropping the connection", self.close_code, self.label,
                         type(exc).__name__)
                abort_transport(self.ws)


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
