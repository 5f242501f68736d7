"""uvicorn's websocket protocol with one addition: a synchronous binary write.

A flush sends the same frame to every peer of a room. Through ASGI that is
one awaited ``send`` per peer, each a coroutine and, under load, a task
wake-up. This protocol (the default ``ws`` of ``collab serve``; uvicorn takes
a protocol class through its ``ws`` setting) puts ``write_binary`` in the
scope's extensions under ``collab.write_binary``: the connection calls it to
write a frame straight into the transport when the transport is not paused,
and falls back to its queue and ASGI ``send`` otherwise. Everything else
(handshake, pings, closes, reads) is uvicorn's.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.http11 import Request
from websockets.protocol import Protocol
from websockets.server import ServerProtocol

WRITE_BINARY = "collab.write_binary"

# write_binary results
WRITTEN = 1
NOT_NOW = 0  # the transport is paused (its buffer is above the high-water mark): queue and wait
GONE = -1  # closing or closed: nothing more can be written


def binary_frame_header(length: int) -> bytes:
    """The header of an unmasked, final, binary websocket frame (RFC 6455 §5.2), as a server sends it."""
    if length < 126:
        return bytes((0x82, length))
    if length < 65536:
        return bytes((0x82, 126)) + length.to_bytes(2, "big")
    return bytes((0x82, 127)) + length.to_bytes(8, "big")


class _ReceiveQueue:
    """The one-reader queue between the protocol and the ASGI ``receive``.

    uvicorn uses an ``asyncio.Queue`` (three deques, an Event, about 2.3 KiB
    per connection); the app's one task reading its socket needs a deque and
    a future.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class _LeanServerProtocol(ServerProtocol):
    """websockets' server protocol, without the handshake request kept alive for the connection's life.

    ``ServerProtocol.parse`` parses the request and then parses frames in the
    same generator, whose frame keeps the request (and its headers, about
    2.7 KiB) as a local until the connection ends. Once the request is parsed
    and nothing else is buffered, this parser hands over to a fresh frame
    parser at the same point of the stream.
    """

    def parse(self) -> Any:
        inner = ServerProtocol.parse(self)
        while True:
            try:
                next(inner)
            except StopIteration:
                return
            if any(isinstance(event, Request) for event in self.events) and not self.reader.buffer:
                inner.close()
                yield from Protocol.parse(self)
                return
            yield


class CollabWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol plus ``write_binary``, and lighter per connection.

    Besides the synchronous write (see the module docstring): a smaller
    receive queue, and the handshake's request and response objects are let
    go once the connection is open (about 3 KiB of headers per connection).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _ReceiveQueue()  # type: ignore[assignment]
        conn = self.conn
        self.conn = _LeanServerProtocol(
            extensions=conn.available_extensions, max_size=self.config.ws_max_size, logger=conn.logger
        )

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept":
            self.request = self.response = None  # type: ignore[assignment]

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the ASGI task is created but has not run yet
            scope["extensions"][WRITE_BINARY] = self.write_binary

    def write_binary(self, payload: bytes) -> int:
        """Write one binary message now: ``WRITTEN``, ``NOT_NOW`` (paused) or ``GONE``."""
        if self.close_sent or self.disconnected or self.initial_response is not None or not self.handshake_complete:
            return GONE
        if self.transport.is_closing():
            return GONE
        if not self.writable.is_set():
            return NOT_NOW
        if self.conn.extensions:  # permessage-deflate: the frame depends on this connection's compressor
            try:
                self.conn.send_binary(payload)
            except InvalidState:
                return GONE
            self.transport.write(b"".join(self.conn.data_to_send()))
        else:
            self.transport.write(binary_frame_header(len(payload)) + payload)
        return WRITTEN
