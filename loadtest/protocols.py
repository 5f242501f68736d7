"""Wire dialects the harness speaks: plain y-websocket and Hocuspocus.

y-websocket (our server, the Yjs reference server): the room is the URL path,
each frame is one message ``varUint(type)`` + body (0 sync, 1 awareness).

Hocuspocus (``@hocuspocus/server`` 4.x, read in its ``ClientConnection.ts``
and ``MessageReceiver.ts``): every frame in both directions starts with
``varString(documentName)``; the client must send an Auth message first
(``name, varUint(2) Auth, varUint(0) Token, varString(token)``), messages
before it are queued by the server. The server answers a sync step 1 with a
``SyncReply`` (type 4: a sync message that does not ask for another step 1)
and acknowledges every update with ``SyncStatus`` (type 8); it also sends an
``Auth``/Authenticated reply. The adapter below prefixes outgoing frames,
strips the prefix from incoming ones, maps 4 to 0 and drops 2 and 8, so the
scenario code sees plain y-websocket messages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from codec import protocol as p

PROTOCOLS = ("y-websocket", "hocuspocus")


def var_string(s: str) -> bytes:
    b = s.encode()
    return p.write_var_uint(len(b)) + b


def room_of(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


class HocuspocusMixin:
    """Put before a ``LeanWebSocket`` subclass: ``class C(HocuspocusMixin, Client)``."""

    _hp_prefix = b""

    async def open(self, host: str, port: int, path: str, timeout: float = 10.0) -> None:
        self._hp_prefix = var_string(room_of(path))
        await super().open(host, port, path, timeout)  # type: ignore[misc]
        super().send(self._hp_prefix + b"\x02\x00" + var_string(""))  # type: ignore[misc]  # Auth, token ""

    def send(self, message: bytes) -> None:
        super().send(self._hp_prefix + message)  # type: ignore[misc]

    def on_message(self, m: bytes) -> None:
        pre = self._hp_prefix
        n = len(pre)
        if m[:n] != pre or len(m) <= n:
            return
        t = m[n]
        if t == 0 or t == 1:
            m = m[n:]
        elif t == 4:
            m = b"\x00" + m[n + 1 :]
        else:  # Auth reply, SyncStatus acks, stateless...
            return
        super().on_message(m)  # type: ignore[misc]


_adapted: dict[tuple[type, str], type] = {}


def client_class(base: type, protocol: str) -> type:
    """``base`` itself for y-websocket, a Hocuspocus-adapted subclass otherwise."""
    if protocol == "y-websocket":
        return base
    if protocol != "hocuspocus":
        raise ValueError(f"unknown protocol {protocol!r}")
    key = (base, protocol)
    if key not in _adapted:
        _adapted[key] = type(f"Hocuspocus{base.__name__}", (HocuspocusMixin, base), {})
    return _adapted[key]


@contextlib.contextmanager
def fanout_protocol(protocol: str) -> Iterator[None]:
    """Run ``loadtest.fanout`` unchanged against a Hocuspocus server.

    fanout.py builds its clients from module globals (``FanoutClient``,
    ``FanoutWriter``, and ``_fresh_state`` for the convergence probe); for
    the duration of the block they are replaced by adapted versions, so the
    fan-out code path and its measurements stay exactly the same.
    """
    if protocol == "y-websocket":
        yield
        return
    from loadtest import fanout

    async def fresh_state(host: str, port: int, path: str, map_name: str = "config"):
        import asyncio

        import pycrdt

        from loadtest.scenarios import SyncClient

        c = client_class(SyncClient, protocol)()
        await c.open(host, port, path)
        try:
            c.send(p.encode_sync_step1(b"\x00"))
            async with asyncio.timeout(10):
                _, m = await c.step2
        finally:
            await c.close()
        doc = pycrdt.Doc()
        doc.apply_update(p.read_var_bytes(m, 2)[0])
        return doc.get(map_name, type=pycrdt.Map).to_py()

    saved = fanout.FanoutClient, fanout.FanoutWriter, fanout._fresh_state
    fanout.FanoutClient = client_class(saved[0], protocol)  # type: ignore[misc]
    fanout.FanoutWriter = client_class(saved[1], protocol)  # type: ignore[misc]
    fanout._fresh_state = fresh_state  # type: ignore[assignment]
    try:
        yield
    finally:
        fanout.FanoutClient, fanout.FanoutWriter, fanout._fresh_state = saved  # type: ignore[misc]
