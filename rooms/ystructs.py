"""Just enough of the Yjs v1 update format to find each client's run of structs.

pycrdt does not say where a client's structs start in an update, and the
start of the second client's block can only be found by walking the first
block's structs (their lengths depend on their content). This walks them
without building anything. Malformed input raises ProtocolError.

Format (lib0, Yjs ``writeStructs``/``readItemContent``):
``varUint(#clients)``, then per client ``varUint(#structs) varUint(client)
varUint(clock)`` and the structs; an item is an info byte, optional origin
(bit 8) and right origin (bit 7) ids, parent info when it has neither, an
optional parent key (bit 6) and its content (low 5 bits give the kind).
"""

from __future__ import annotations

import re

from codec import protocol as p

# A UTF-8 encoded character outside the BMP (two UTF-16 code units in Yjs).
ASTRAL_UTF8 = re.compile(rb"[\xf0-\xf4][\x80-\xbf]{3}")


class Shape:
    """What an update holds, as far as dependencies go (and, on request, its text layout)."""

    __slots__ = ("ranges", "refs", "skips", "deletes", "cuts", "astral")

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, int]] = []  # (client, first clock, end clock) per block
        # (client, clock, end) of a struct, and (client, clock) of an item it
        # refers to (origin, right origin, parent) in another client's run.
        self.refs: list[tuple[int, int, int, int, int]] = []
        self.skips = False  # a Skip struct: a gap in a client's run
        self.deletes: list[tuple[int, int, int]] = []  # (client, clock, length) of the delete set
        # Text layout, filled only by ``shape(update, text=True)``: every id at
        # which Yjs cuts an item it already holds -- (client, clock) where a
        # new piece starts -- from origins, right origins and the delete set;
        # and each string content that holds characters outside the BMP, as
        # (client, clock of the item, start, end of its varString in the
        # update, UTF-16 offsets of its surrogate pairs' first halves).
        self.cuts: list[tuple[int, int]] = []
        self.astral: list[tuple[int, int, int, int, list[int]]] = []


def block_ranges(update: bytes) -> list[tuple[int, int, int]]:
    """``[(client, first clock, end clock)]`` for each client block of the update."""
    return shape(update).ranges


def shape(update: bytes, text: bool = False) -> Shape:
    try:
        return _walk(update, text)
    except (IndexError, UnicodeDecodeError, RecursionError):
        raise p.ProtocolError("malformed update") from None


def _walk(buf: bytes, text: bool) -> Shape:
    read = p.read_var_uint
    out = Shape()
    clients, pos = read(buf, 0)
    if clients * 3 > len(buf) - pos:
        raise p.ProtocolError("update declares more clients than it holds")
    for _ in range(clients):
        structs, pos = read(buf, pos)
        if structs > len(buf) - pos:
            raise p.ProtocolError("update declares more structs than it holds")
        client, pos = read(buf, pos)
        start, pos = read(buf, pos)
        clock = start
        for _ in range(structs):
            info = buf[pos]
            pos += 1
            kind = info & 0x1F
            if kind in (0, 10):  # GC, Skip
                length = buf[pos]
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = read(buf, pos)
                if kind == 10:
                    out.skips = True
            else:
                refs = []
                if info & 0x80:  # origin
                    ref_client, pos = read(buf, pos)
                    ref_clock, pos = read(buf, pos)
                    refs.append((ref_client, ref_clock))
                    if text:  # the item it follows ends there
                        out.cuts.append((ref_client, ref_clock + 1))
                if info & 0x40:  # right origin
                    ref_client, pos = read(buf, pos)
                    ref_clock, pos = read(buf, pos)
                    refs.append((ref_client, ref_clock))
                    if text:  # the item it precedes starts there
                        out.cuts.append((ref_client, ref_clock))
                if not info & 0xC0:
                    parent_is_root, pos = read(buf, pos)
                    if parent_is_root == 1:
                        _, pos = p.read_var_bytes(buf, pos)
                    else:
                        ref_client, pos = read(buf, pos)
                        ref_clock, pos = read(buf, pos)
                        refs.append((ref_client, ref_clock))
                    if info & 0x20:
                        _, pos = p.read_var_bytes(buf, pos)
                start_of_content = pos
                length, pos = _content(buf, pos, kind)
                if text and kind == 4:
                    _note_astral(out, buf, start_of_content, pos, client, clock)
                for ref_client, ref_clock in refs:
                    if ref_client != client:  # a client's own run integrates in clock order
                        out.refs.append((client, clock, clock + length, ref_client, ref_clock))
            clock += length
        out.ranges.append((client, start, clock))
    clients, pos = read(buf, pos)
    if clients * 2 > len(buf) - pos:
        raise p.ProtocolError("delete set declares more clients than it holds")
    for _ in range(clients):
        client, pos = read(buf, pos)
        count, pos = read(buf, pos)
        if count * 2 > len(buf) - pos:
            raise p.ProtocolError("delete set declares more ranges than it holds")
        for _ in range(count):
            clock, pos = read(buf, pos)
            length, pos = read(buf, pos)
            out.deletes.append((client, clock, length))
            if text:  # a partly deleted item is cut at both ends of the range
                out.cuts.append((client, clock))
                out.cuts.append((client, clock + length))
    return out


def _note_astral(out: Shape, buf: bytes, start: int, end: int, client: int, clock: int) -> None:
    """Record the surrogate pairs of one string content (``buf[start:end]`` is its varString)."""
    _, data = p.read_var_uint(buf, start)
    if ASTRAL_UTF8.search(buf, data, end) is None:
        return
    text = buf[data:end].decode("utf-8", "surrogatepass")
    offsets = []
    unit = 0
    for ch in text:
        if ord(ch) > 0xFFFF:
            offsets.append(unit)
            unit += 2
        else:
            unit += 1
    if offsets:
        out.astral.append((client, clock, start, end, offsets))


def _content(buf: bytes, pos: int, kind: int) -> tuple[int, int]:
    """Skip an item's content; return (its length in clock units, next position)."""
    read = p.read_var_uint
    if kind == 1:  # deleted
        return read(buf, pos)
    if kind == 2:  # JSON: count strings
        count, pos = read(buf, pos)
        for _ in range(count):
            _, pos = p.read_var_bytes(buf, pos)
        return count, pos
    if kind == 3:  # binary
        _, pos = p.read_var_bytes(buf, pos)
        return 1, pos
    if kind == 4:  # string: its length counts UTF-16 code units
        size = buf[pos]
        if size < 0x80:
            pos += 1
        else:
            size, pos = read(buf, pos)
        end = pos + size
        if end > len(buf):
            raise p.ProtocolError("length prefix exceeds message")
        raw = buf[pos:end]
        if raw.isascii():
            return size, end
        text = raw.decode("utf-8", "surrogatepass")
        return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF), end
    if kind == 5:  # embed
        _, pos = p.read_var_bytes(buf, pos)
        return 1, pos
    if kind == 6:  # format: key and value
        _, pos = p.read_var_bytes(buf, pos)
        _, pos = p.read_var_bytes(buf, pos)
        return 1, pos
    if kind == 7:  # type
        ref, pos = read(buf, pos)
        if ref in (3, 5):  # XmlElement, XmlHook: a name
            _, pos = p.read_var_bytes(buf, pos)
        elif ref not in (0, 1, 2, 4, 6):
            raise p.ProtocolError(f"unknown type ref {ref}")
        return 1, pos
    if kind == 8:  # any: count values
        count, pos = read(buf, pos)
        if count > len(buf) - pos:
            raise p.ProtocolError("update declares more values than it holds")
        for _ in range(count):
            pos = _any(buf, pos, 0)
        return count, pos
    if kind == 9:  # subdocument: guid and options
        _, pos = p.read_var_bytes(buf, pos)
        return 1, _any(buf, pos, 0)
    raise p.ProtocolError(f"unknown content kind {kind}")


def _any(buf: bytes, pos: int, depth: int) -> int:
    if depth > 100:
        raise p.ProtocolError("value nested too deeply")
    tag = buf[pos]
    pos += 1
    if tag in (127, 126, 121, 120):  # undefined, null, false, true
        return pos
    if tag == 125:  # varInt
        while buf[pos] & 0x80:
            pos += 1
        return pos + 1
    if tag == 124:  # float32
        return _need(buf, pos + 4)
    if tag in (123, 122):  # float64, bigint64
        return _need(buf, pos + 8)
    if tag in (119, 116):  # string, bytes
        _, pos = p.read_var_bytes(buf, pos)
        return pos
    if tag == 118:  # object
        count, pos = p.read_var_uint(buf, pos)
        if count > len(buf) - pos:
            raise p.ProtocolError("update declares more values than it holds")
        for _ in range(count):
            _, pos = p.read_var_bytes(buf, pos)
            pos = _any(buf, pos, depth + 1)
        return pos
    if tag == 117:  # array
        count, pos = p.read_var_uint(buf, pos)
        if count > len(buf) - pos:
            raise p.ProtocolError("update declares more values than it holds")
        for _ in range(count):
            pos = _any(buf, pos, depth + 1)
        return pos
    raise p.ProtocolError(f"unknown value tag {tag}")


def _need(buf: bytes, end: int) -> int:
    if end > len(buf):
        raise p.ProtocolError("truncated value")
    return end


def problems(state: bytes, state_vector: dict[int, int]) -> list[str]:
    """What makes an encoded document state one a Yjs client could fail to load.

    The state must walk cleanly, each client's structs must end exactly at
    the clock the state vector gives (content lengths and clocks agree), no
    origin or deletion may point between the two halves of a character (Yjs
    would cut it there and read different text), and no string may hold
    half a surrogate pair.
    """
    try:
        walked = shape(state, text=True)
    except p.ProtocolError as exc:
        return [f"does not decode: {exc}"]
    out = []
    ends = {client: end for client, _start, end in walked.ranges}
    for client in sorted(set(ends) | set(state_vector)):
        if ends.get(client, 0) != state_vector.get(client, 0):
            have, said = ends.get(client, 0), state_vector.get(client, 0)
            out.append(f"client {client}: structs end at clock {have}, the state vector says {said}")
    pairs = {(c, clock + off) for c, clock, _s, _e, offsets in walked.astral for off in offsets}
    inside = sorted({(c, k) for c, k in walked.cuts if (c, k - 1) in pairs})
    if inside:
        out.append(f"{len(inside)} reference(s) point between the halves of a character, e.g. {inside[0]}")
    if re.search(rb"\xed[\xa0-\xbf][\x80-\xbf]", state):
        out.append("a string holds half a surrogate pair")
    return out


def state_vector(sv: bytes) -> dict[int, int]:
    """An encoded state vector as ``{client: clock}``."""
    count, pos = p.read_var_uint(sv, 0)
    out = {}
    for _ in range(count):
        client, pos = p.read_var_uint(sv, pos)
        out[client], pos = p.read_var_uint(sv, pos)
    return out
