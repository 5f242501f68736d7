"""Hostile input against a live server (hypothesis, bounded example counts).

Malformed frames, random and mutated CRDT updates, length-prefix bombs and
compression bombs each close only their sender (with a protocol close code,
never 1011 or a dropped connection); two bystanders in the same room keep
converging throughout; and the server's peak memory stays under a ceiling.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time

import msgpack
import pycrdt
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec import protocol as p
from collab.client import CollabClient
from tests.security_support import jwt_env, rss_kib
from tests.support import ServerProcess

RSS_CEILING_MIB = 300
PROTOCOL_CLOSES = {1003, 1007, 1008, 1009}

live = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
few = settings(live, max_examples=40)


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    srv = ServerProcess(tmp / "data", tmp / "server.log", env={"COLLAB_MESSAGE_BURST": "1000"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def deflate_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deflate")
    srv = ServerProcess(tmp / "data", tmp / "server.log", env={"COLLAB_PER_MESSAGE_DEFLATE": "true"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-jwt")
    srv = ServerProcess(tmp / "data", tmp / "server.log", env=jwt_env()).start()
    yield srv
    srv.stop()


class Bystanders:
    """Two well-behaved clients in the room under attack."""

    def __init__(self, url: str, room: str) -> None:
        self.a = CollabClient(url, room, hello=True)
        self.b = CollabClient(url, room, hello=True)
        self.url = url
        self.room = room
        self.n = 0

    async def start(self) -> Bystanders:
        await self.a.connect()
        await self.b.connect()
        return self

    async def still_converging(self) -> None:
        """A fresh edit from a reaches b; neither was closed."""
        self.n += 1
        n = self.n
        self.a.doc.get("config", type=pycrdt.Map)["probe"] = n
        await self.b.until(lambda: self.b.doc.get("config", type=pycrdt.Map).get("probe") == n, 5, "probe edit")
        assert not self.a.closed.is_set() and not self.b.closed.is_set()

    async def final_check(self) -> None:
        """a, b and a newcomer hold the same document."""
        await self.a.wait_saved()
        self.b.doc.get("config", type=pycrdt.Map)["last"] = "word"
        await self.a.until(lambda: self.a.doc.get("config", type=pycrdt.Map).get("last") == "word", 5, "last")
        late = await CollabClient(self.url, self.room).connect()

        def contents(c: CollabClient):
            return {name: str(c.doc.get(name, type=pycrdt.Text)) for name in ("notes",)} | {
                "config": c.doc.get("config", type=pycrdt.Map).to_py()
            }

        ca, cb, cl = contents(self.a), contents(self.b), contents(late)
        assert ca == cb == cl, f"\na={ca}\nb={cb}\nlate={cl}"
        await late.close()

    async def close(self) -> None:
        await self.a.close()
        await self.b.close()


async def probe(url: str, frames: list[bytes | str], **connect) -> int | None:
    """Send ``frames`` then a sync step 1; the close code, or None if the server answered."""
    async with websockets.connect(url, max_size=None, compression=connect.pop("compression", None), **connect) as ws:
        try:
            for frame in frames:
                await ws.send(frame)
            await ws.send(p.encode_sync_step1(b"\x00"))
            async with asyncio.timeout(10):
                while True:
                    frame = await ws.recv()
                    if isinstance(frame, bytes) and frame[:2] == b"\x00\x01":
                        return None  # our step 2: the connection is alive and served
        except websockets.ConnectionClosed:
            return ws.close_code


def assert_memory_bounded(server: ServerProcess) -> None:
    peak = rss_kib(server.proc.pid, "VmHWM") / 1024
    print(f"server {server.port} peak RSS {peak:.0f} MiB")
    assert peak < RSS_CEILING_MIB, f"server peak RSS {peak:.0f} MiB"


# ------------------------------------------------------------------ strategies

frames = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda t, rest: bytes([t]) + rest, st.sampled_from([0, 1, 2, 3, 100]), st.binary(max_size=300)),
    st.builds(
        lambda sub, body: b"\x00" + bytes([sub]) + p.write_var_bytes(body),
        st.integers(0, 3),
        st.binary(max_size=300),
    ),
    st.builds(lambda body: b"\x01" + p.write_var_bytes(body), st.binary(max_size=300)),
)


_client_ids = itertools.count(1_000_000)


@st.composite
def crdt_updates(draw, unique: bool = False) -> bytes:
    """An update of a few random edits, from a random client: valid on its own, but two of
    them may share a client id (two histories under one id), unless ``unique``."""
    doc = pycrdt.Doc(client_id=next(_client_ids) if unique else draw(st.integers(1, 2**31)))
    cfg = doc.get("config", type=pycrdt.Map)
    text = doc.get("notes", type=pycrdt.Text)
    ascii_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)  # text indexes: ASCII
    ops = draw(st.lists(st.tuples(st.integers(0, 3), ascii_text, st.integers(0, 50)), max_size=6))
    for kind, value, pos in ops:
        if kind == 0:
            cfg[value or "k"] = draw(st.one_of(st.integers(-(2**31), 2**31), st.text(max_size=8), st.booleans()))
        elif kind == 1:
            text.insert(min(pos, len(text)), value or "x")
        elif kind == 2 and len(text):
            del text[min(pos, len(text) - 1)]
        else:
            cfg["nested"] = pycrdt.Map({"v": value, "n": [pos, value]})
    return doc.get_update()


@st.composite
def mutated_updates(draw) -> bytes:
    data = bytearray(draw(crdt_updates()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "varint"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 4))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "varint":
            data[pos:pos] = p.write_var_uint(draw(st.integers(2**20, 2**53 - 1)))
    return bytes(data)


def _bomb_templates(n: int) -> list[bytes]:
    v = p.write_var_uint(n)
    return [
        b"\x00\x02" + v + b"\x01\x02",  # update length prefix far beyond the frame
        b"\x00\x01" + v,  # step 2, same
        b"\x00\x00" + p.write_var_bytes(v + b"\x01\x01"),  # state vector declaring n entries
        b"\x00\x02" + p.write_var_bytes(v + b"\x01\x02\x03"),  # update declaring n clients
        b"\x00\x02" + p.write_var_bytes(b"\x01" + v + b"\x07\x00\x00"),  # n structs
        b"\x00\x02" + p.write_var_bytes(b"\x01\x01\x07\x00\x28\x01\x06config\x01k" + v),  # n values
        b"\x00\x02" + p.write_var_bytes(b"\x01\x01\x07\x00\x24\x01\x06config\x01k" + v + b"ab"),  # string of n
        b"\x00\x02" + p.write_var_bytes(b"\x00" + v + b"\x01\x01\x00\x01"),  # delete set of n clients
        b"\x01" + p.write_var_bytes(v + b"\x01\x01\x00"),  # awareness declaring n entries
        b"\x01" + p.write_var_bytes(b"\x01\x07\x01" + v + b"{}"),  # awareness state of n bytes
        b"\x01" + v,  # awareness payload of n bytes
        b"\x64" + b"\xdd" + min(n, 2**32 - 1).to_bytes(4, "big"),  # msgpack array32 of n
        b"\x64" + b"\xdf" + min(n, 2**32 - 1).to_bytes(4, "big"),  # msgpack map32 of n
        b"\x64" + b"\xdb" + min(n, 2**32 - 1).to_bytes(4, "big") + b"x",  # msgpack str32 of n
    ]


DEPTH_BOMBS = [
    b"\x64" + b"\x91" * 200_000 + b"\xc0",  # msgpack nested 200k deep
    b"\x01" + p.write_var_bytes(b"\x01\x07\x01" + p.write_var_string("[" * 30_000 + "]" * 30_000)),  # JSON depth
    b"\x01" + p.write_var_bytes(b"\x01\x07\x01" + p.write_var_string('{"a":NaN}')),
    b"\x64" + msgpack.packb({"type": "x" * 100_000}),
]


# ----------------------------------------------------------------------- tests


@pytest.fixture
async def bystanders(hostile_server, request):
    room = "ds-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name[5:40])
    group = await Bystanders(hostile_server.ws_url, room).start()
    yield group
    await group.final_check()
    await group.close()
    assert_memory_bounded(hostile_server)


@live
@given(frame=frames)
async def test_malformed_frames_close_only_their_sender(hostile_server, bystanders, frame):
    code = await probe(f"{hostile_server.ws_url}/{bystanders.room}", [frame])
    assert code is None or code in PROTOCOL_CLOSES, code
    await bystanders.still_converging()


@live
@given(update=mutated_updates(), subtype=st.sampled_from([1, 2]))
async def test_mutated_crdt_updates_close_only_their_sender(hostile_server, bystanders, update, subtype):
    frame = b"\x00" + bytes([subtype]) + p.write_var_bytes(update)
    code = await probe(f"{hostile_server.ws_url}/{bystanders.room}", [frame])
    assert code is None or code == 1007, code
    await bystanders.still_converging()


@few
@given(update=crdt_updates(unique=True))
async def test_random_valid_updates_are_accepted(hostile_server, bystanders, update):
    code = await probe(f"{hostile_server.ws_url}/{bystanders.room}", [p.encode_sync_update(update)])
    assert code is None
    await bystanders.still_converging()


@few
@given(n=st.integers(2**20, 2**53 - 1), which=st.integers(0, len(_bomb_templates(1)) - 1))
async def test_length_prefix_bombs(hostile_server, bystanders, n, which):
    started = time.monotonic()
    code = await probe(f"{hostile_server.ws_url}/{bystanders.room}", [_bomb_templates(n)[which]])
    assert code in (1007, 1009), code
    assert time.monotonic() - started < 2
    await bystanders.still_converging()


@pytest.mark.parametrize("index", range(len(DEPTH_BOMBS)))
async def test_depth_and_value_bombs(hostile_server, bystanders, index):
    code = await probe(f"{hostile_server.ws_url}/{bystanders.room}", [DEPTH_BOMBS[index]])
    # The long control type is valid msgpack: it gets an `unknown_type` error
    # only after hello, so without hello it closes 1008 (control before hello).
    assert code in (1007, 1008), code
    await bystanders.still_converging()


@few
@given(frame=frames)
async def test_garbage_before_authentication(jwt_server, frame):
    code = await probe(f"{jwt_server.ws_url}/ds-preauth", [frame])
    assert code in PROTOCOL_CLOSES | {4401}, code


async def test_compression_and_size_bombs(deflate_server, hostile_server):
    zeros = b"\x00" * (20 * 1024 * 1024)
    for server, compression in ((deflate_server, "deflate"), (hostile_server, None)):
        group = await Bystanders(server.ws_url, "ds-bombs").start()
        # 20 MiB of zeros: about 20 KiB on the wire when deflated.
        started = time.monotonic()
        code = await probe(f"{server.ws_url}/ds-bombs", [zeros], compression=compression)
        assert code == 1009
        assert time.monotonic() - started < 2
        # A frame that declares 2^62 bytes in its header, and never sends them.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /ws/ds-bombs HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"\x82\xff" + (2**62).to_bytes(8, "big") + b"\x00\x00\x00\x00" + b"\x00" * 100)
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)  # the server closes: EOF
        assert re.search(rb"\x88[\x02-\x7d]\x03\xf1", rest), rest[-80:]  # after step 1: a close frame, 1009
        writer.close()
        await group.still_converging()
        await group.final_check()
        await group.close()
        assert_memory_bounded(server)


async def test_memory_stays_bounded_after_everything(hostile_server, deflate_server, jwt_server):
    for server in (hostile_server, deflate_server, jwt_server):
        assert server.proc.poll() is None, "server died"
        assert_memory_bounded(server)
        assert "Traceback" not in server.log_path.read_text()
