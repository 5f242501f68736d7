"""The wire protocol as plain functions over bytes (sans-I/O).

Every websocket binary frame carries exactly one message: ``varUint(type)``
followed by a type-specific payload. Types 0 (sync), 1 (awareness) and 3
(query awareness) are the standard Yjs/y-websocket messages; type 100 is our
own control channel carrying one msgpack map, sent only to peers that opted
in with ``hello``. Nothing here touches a socket, so everything can be tested
with properties and fuzzed.

``decode_message`` raises :class:`ProtocolError` -- and nothing else -- for
any malformed input; the error carries the websocket close code to use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 1

# Message types (first varUint of a frame).
MSG_SYNC = 0
MSG_AWARENESS = 1
MSG_AUTH = 2  # y-protocols' auth message; clients never send it, we never use it
MSG_QUERY_AWARENESS = 3
MSG_CONTROL = 100

# Sync sub-types (second varUint of a sync message).
SYNC_STEP1 = 0
SYNC_STEP2 = 1
SYNC_UPDATE = 2

# Close codes used by the server.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003  # text frame
CLOSE_INVALID_PAYLOAD = 1007  # malformed message or CRDT update
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_RESTART = 1012
# Room limit reached: try again. Also the code the server records for a slow
# consumer, whose TCP connection is dropped (that client sees 1006).
CLOSE_TRY_AGAIN = 1013

# lib0 varUints are JavaScript-safe integers: at most 2**53 - 1, 8 bytes.
_MAX_VARUINT_BYTES = 8
MAX_SAFE_INTEGER = 2**53 - 1

# The smallest valid Yjs v1 update: zero struct clients, zero delete-set clients.
EMPTY_UPDATE = b"\x00\x00"


class ProtocolError(Exception):
    """A message that cannot be accepted; ``code`` is the close code to send."""

    def __init__(self, reason: str, code: int = CLOSE_INVALID_PAYLOAD) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# ---------------------------------------------------------------- primitives


def write_var_uint(value: int) -> bytes:
    """lib0 varUint: 7 bits per byte, least significant first."""
    if value < 0:
        raise ValueError("varUint must be non-negative")
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_var_uint(buf: bytes, pos: int) -> tuple[int, int]:
    """Read a varUint at ``pos``; return (value, next position)."""
    end = len(buf)
    if pos < end:
        byte = buf[pos]
        if byte < 0x80:  # one byte: most counts, clocks and lengths
            return byte, pos + 1
    result = 0
    shift = 0
    for _ in range(_MAX_VARUINT_BYTES):
        if pos >= end:
            raise ProtocolError("truncated varUint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if result > MAX_SAFE_INTEGER:
                raise ProtocolError("varUint exceeds 2^53-1")
            return result, pos
        shift += 7
    raise ProtocolError("varUint longer than 8 bytes")


def write_var_bytes(data: bytes) -> bytes:
    return write_var_uint(len(data)) + data


def read_var_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    length, pos = read_var_uint(buf, pos)
    end = pos + length
    if end > len(buf):
        raise ProtocolError("length prefix exceeds message")
    return bytes(buf[pos:end]), end


def write_var_string(text: str) -> bytes:
    """varUint(UTF-8 byte length) + bytes (not the character count)."""
    return write_var_bytes(text.encode("utf-8"))


def read_var_string(buf: bytes, pos: int) -> tuple[str, int]:
    raw, pos = read_var_bytes(buf, pos)
    try:
        return raw.decode("utf-8"), pos
    except UnicodeDecodeError:
        raise ProtocolError("string is not valid UTF-8") from None


# ------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True)
class SyncStep1:
    state_vector: bytes


@dataclass(frozen=True, slots=True)
class SyncStep2:
    update: bytes


@dataclass(frozen=True, slots=True)
class SyncUpdate:
    update: bytes


@dataclass(frozen=True, slots=True)
class AwarenessMessage:
    """An awareness update; ``entries`` is decoded and checked, ``raw`` kept."""

    entries: tuple[AwarenessEntry, ...]


@dataclass(frozen=True, slots=True)
class AwarenessEntry:
    client_id: int
    clock: int
    state: str | None  # the JSON text, or None when the client is removed


@dataclass(frozen=True, slots=True)
class QueryAwareness:
    pass


@dataclass(frozen=True, slots=True)
class Control:
    """One control-channel map; ``type`` is its ``"type"`` field."""

    type: str
    body: dict[str, Any]


Message = SyncStep1 | SyncStep2 | SyncUpdate | AwarenessMessage | QueryAwareness | Control


def decode_message(frame: bytes) -> Message:
    """Decode one frame. Raises ProtocolError for anything malformed."""
    if not frame:
        raise ProtocolError("empty message")
    msg_type, pos = read_var_uint(frame, 0)
    if msg_type == MSG_SYNC:
        sub, pos = read_var_uint(frame, pos)
        payload, pos = read_var_bytes(frame, pos)
        _expect_end(frame, pos)
        if sub == SYNC_STEP1:
            check_state_vector(payload)
            return SyncStep1(payload)
        if sub == SYNC_STEP2:
            check_update_plausible(payload)
            return SyncStep2(payload)
        if sub == SYNC_UPDATE:
            check_update_plausible(payload)
            return SyncUpdate(payload)
        raise ProtocolError(f"unknown sync message type {sub}")
    if msg_type == MSG_AWARENESS:
        payload, pos = read_var_bytes(frame, pos)
        _expect_end(frame, pos)
        return AwarenessMessage(decode_awareness_update(payload))
    if msg_type == MSG_QUERY_AWARENESS:
        _expect_end(frame, pos)
        return QueryAwareness()
    if msg_type == MSG_CONTROL:
        return decode_control(frame[pos:])
    raise ProtocolError(f"unknown message type {msg_type}")


def _expect_end(frame: bytes, pos: int) -> None:
    if pos != len(frame):
        raise ProtocolError("trailing bytes after message")


def check_state_vector(sv: bytes) -> None:
    """A state vector is varUint(n) then n (client, clock) pairs, nothing more."""
    count, pos = read_var_uint(sv, 0)
    # Each pair needs at least two bytes: refuse absurd counts before looping.
    if count * 2 > len(sv) - pos:
        raise ProtocolError("state vector declares more entries than it holds")
    for _ in range(count):
        _, pos = read_var_uint(sv, pos)
        _, pos = read_var_uint(sv, pos)
    _expect_end(sv, pos)


def check_update_plausible(update: bytes) -> None:
    """Cheap guard run before pycrdt sees an update.

    A Yjs v1 update starts with the number of clients that have structs, and
    each client block starts with its struct count. pycrdt pre-allocates for
    those counts, so a few bytes declaring 2^27 clients make it allocate
    hundreds of MiB before it fails. Every client block takes at least three
    bytes and every struct at least one, so counts larger than the bytes left
    cannot be honest.
    """
    if not update:
        raise ProtocolError("empty update")
    clients, pos = read_var_uint(update, 0)
    remaining = len(update) - pos
    if clients * 3 > remaining:
        raise ProtocolError("update declares more clients than it holds")
    if clients:
        structs, pos = read_var_uint(update, pos)
        if structs > len(update) - pos:
            raise ProtocolError("update declares more structs than it holds")
    else:
        # Deletions only: the delete set's client count, each client taking at
        # least two bytes (id, range count). pycrdt reads counts past 2^32
        # truncated and would accept what Yjs refuses.
        deleting, pos = read_var_uint(update, pos)
        if deleting * 2 > len(update) - pos:
            raise ProtocolError("delete set declares more clients than it holds")


def decode_awareness_update(payload: bytes) -> tuple[AwarenessEntry, ...]:
    count, pos = read_var_uint(payload, 0)
    # An entry takes at least three bytes (id, clock, empty string length).
    if count * 3 > len(payload) - pos:
        raise ProtocolError("awareness update declares more entries than it holds")
    entries = []
    for _ in range(count):
        client_id, pos = read_var_uint(payload, pos)
        clock, pos = read_var_uint(payload, pos)
        text, pos = read_var_string(payload, pos)
        entries.append(AwarenessEntry(client_id, clock, None if text == "null" else text))
    _expect_end(payload, pos)
    return tuple(entries)


def decode_control(payload: bytes) -> Control:
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"control message is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("control message must be a msgpack map")
    kind = body.get("type")
    if not isinstance(kind, str) or not kind:
        raise ProtocolError("control message needs a string 'type'")
    return Control(kind, body)


# ------------------------------------------------------------------ encoders


def encode_sync_step1(state_vector: bytes) -> bytes:
    return b"\x00\x00" + write_var_bytes(state_vector)


def encode_sync_step2(update: bytes) -> bytes:
    return b"\x00\x01" + write_var_bytes(update)


def encode_sync_update(update: bytes) -> bytes:
    return b"\x00\x02" + write_var_bytes(update)


def encode_awareness_update(entries: list[AwarenessEntry] | tuple[AwarenessEntry, ...]) -> bytes:
    """The awareness payload (without the message type)."""
    parts = [write_var_uint(len(entries))]
    for entry in entries:
        parts.append(write_var_uint(entry.client_id))
        parts.append(write_var_uint(entry.clock))
        parts.append(write_var_string("null" if entry.state is None else entry.state))
    return b"".join(parts)


def encode_awareness(entries: list[AwarenessEntry] | tuple[AwarenessEntry, ...]) -> bytes:
    return b"\x01" + write_var_bytes(encode_awareness_update(entries))


def encode_query_awareness() -> bytes:
    return b"\x03"


def encode_control(body: dict[str, Any]) -> bytes:
    if not isinstance(body.get("type"), str):
        raise ValueError("control messages need a string 'type'")
    return write_var_uint(MSG_CONTROL) + msgpack.packb(body, use_bin_type=True)


def encode_message(message: Message) -> bytes:
    """Encode any decoded message again (used by tests and the client)."""
    if isinstance(message, SyncStep1):
        return encode_sync_step1(message.state_vector)
    if isinstance(message, SyncStep2):
        return encode_sync_step2(message.update)
    if isinstance(message, SyncUpdate):
        return encode_sync_update(message.update)
    if isinstance(message, AwarenessMessage):
        return encode_awareness(message.entries)
    if isinstance(message, QueryAwareness):
        return encode_query_awareness()
    if isinstance(message, Control):
        return encode_control(message.body)
    raise TypeError(f"not a message: {message!r}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_awareness_state(text: str) -> Any:
    """Parse an awareness JSON state; ProtocolError if it is not JSON.

    Python's json accepts NaN and Infinity, which JavaScript's JSON.parse
    rejects: relaying them would make every stock client throw. Deep nesting
    raises RecursionError, which must not escape either.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ProtocolError("awareness state is not valid JSON") from None
