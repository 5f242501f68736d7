"""A lean websocket client for the load generator (RFC 6455, binary frames only).

The ``websockets`` library costs tens of microseconds per received frame in
Python; a harness with a hundred clients in one process would measure itself.
This is an ``asyncio.Protocol`` that does the upgrade handshake, parses
unmasked server frames straight out of ``data_received`` and masks what it
sends. No extensions (the server's permessage-deflate is off by default and
we do not offer it), no text frames. Subclasses implement ``on_message``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct

try:  # C masking from the websockets package (already a dependency); pure Python otherwise
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover
    _c_apply_mask = None

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def apply_mask(data: bytes, mask: bytes) -> bytes:
    if _c_apply_mask is not None:
        return _c_apply_mask(data, mask)
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    mask = os.urandom(4)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return header + mask + apply_mask(payload, mask)


class HandshakeError(ConnectionError):
    pass


class LeanWebSocket(asyncio.Protocol):
    """Connect with ``await client.open(host, port, path)``; then ``send(bytes)``."""

    max_frame = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.is_open = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.frames_in = 0
        self.bytes_in = 0
        self._buf = b""
        self._frag: list[bytes] | None = None
        self._handshake: bytes | None = None
        self._handshaking = True
        self._key = b""
        self._opened: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ opening

    async def open(self, host: str, port: int, path: str, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        self._opened = loop.create_future()
        self.closed = loop.create_future()
        self._key = base64.b64encode(os.urandom(16))
        host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._handshake = (
            f"GET {path} HTTP/1.1\r\n"
            f"Host: {host_header}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "User-Agent: datasource-collab-loadtest\r\n"
            "\r\n"
        ).encode()
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: self, host, port)
            await self._opened

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._handshake)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        if self.close_code is None:
            self.close_code = 1006
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(HandshakeError(f"connection lost during handshake: {exc}"))
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
        self.on_closed()

    def _finish_handshake(self, data: bytes) -> bytes | None:
        """Consume the HTTP response; return what follows it, None if incomplete."""
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > 65536:
                self._fail_handshake("response headers too large")
            return None
        head, rest = self._buf[:end].decode("latin-1"), self._buf[end + 4 :]
        self._buf = b""
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[1] != "101":
            self._fail_handshake(f"upgrade refused: {lines[0]!r}")
            return None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            self._fail_handshake("bad Sec-WebSocket-Accept")
            return None
        if headers.get("sec-websocket-extensions"):
            self._fail_handshake(f"unexpected extensions {headers['sec-websocket-extensions']!r}")
            return None
        self._handshaking = False
        self.is_open = True
        assert self._opened is not None
        self._opened.set_result(None)
        return rest

    def _fail_handshake(self, reason: str) -> None:
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(HandshakeError(reason))
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        if self._handshaking:
            rest = self._finish_handshake(data)
            if not rest:
                return
            data = rest
        elif self._buf:
            data = self._buf + data
            self._buf = b""
        self.bytes_in += len(data)
        pos = 0
        n = len(data)
        while n - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1]
            if length & 0x80:
                self._protocol_error("server frames must not be masked")
                return
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
                if length > self.max_frame:
                    self._protocol_error("frame too large")
                    return
            end = start + length
            if end > n:
                break
            payload = data[start:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == OP_BINARY and b0 & 0x80:
                self.frames_in += 1
                self.on_message(payload)
            else:
                self._control_or_fragment(b0, opcode, payload)
            if self.transport is None or self.transport.is_closing():
                return
        if pos < n:
            self._buf = data[pos:]

    def _control_or_fragment(self, b0: int, opcode: int, payload: bytes) -> None:
        fin = b0 & 0x80
        if opcode == OP_PING:
            self._write(OP_PONG, payload)
        elif opcode == OP_PONG:
            pass
        elif opcode == OP_CLOSE:
            if len(payload) >= 2:
                self.close_code = int.from_bytes(payload[:2], "big")
                self.close_reason = payload[2:].decode("utf-8", "replace")
            else:
                self.close_code = 1005
            self._write(OP_CLOSE, payload[:2])
            self.is_open = False
            assert self.transport is not None
            self.transport.close()
        elif opcode == OP_BINARY:  # first fragment
            self._frag = [payload]
        elif opcode == OP_CONT and self._frag is not None:
            self._frag.append(payload)
            if fin:
                message = b"".join(self._frag)
                self._frag = None
                self.frames_in += 1
                self.on_message(message)
        else:
            self._protocol_error(f"unexpected opcode {opcode}")

    def _protocol_error(self, reason: str) -> None:
        self.close_code = 1002
        self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ writing

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(opcode, payload))

    def send(self, message: bytes) -> None:
        if self.is_open:
            self.transport.write(encode_frame(OP_BINARY, message))  # type: ignore[union-attr]

    async def close(self, timeout: float = 2.0) -> None:
        """Close handshake (1000), bounded; the transport is dropped after ``timeout``."""
        if self.transport is None or self.closed is None:
            return
        if self.is_open:
            self._write(OP_CLOSE, struct.pack("!H", 1000))
            self.is_open = False
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.closed)
        except TimeoutError:
            self.transport.abort()

    # ------------------------------------------------------------ hooks

    def on_message(self, message: bytes) -> None:  # pragma: no cover - overridden
        pass

    def on_closed(self) -> None:
        pass
