"""Every limit, against real server processes (small limits so the tests are quick)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time

import httpx
import pycrdt
import websockets

from codec import protocol as p
from collab.client import CollabClient
from tests.security_support import closed_with, handshake_status
from tests.support import eventually


def config_of(client: CollabClient) -> dict:
    return client.doc.get("config", type=pycrdt.Map).to_py() or {}


def text_of(client: CollabClient) -> str:
    return str(client.doc.get("notes", type=pycrdt.Text))


def admin_stats(server) -> dict:
    # Development mode: the query string is the identity.
    return httpx.get(f"{server.http_url}/admin/stats?user=ops&role=admin", timeout=5).json()


async def test_connections_per_address_and_per_process(server_factory):
    srv = server_factory(env={"COLLAB_MAX_CONNECTIONS": "3", "COLLAB_MAX_CONNECTIONS_PER_IP": "2"})
    url = f"{srv.ws_url}/ds-conn"

    def source(ip: str) -> dict:
        return {"local_addr": (ip, 0)}

    held = [await websockets.connect(url, **source("127.0.0.1")) for _ in range(2)]
    assert await handshake_status(url, **source("127.0.0.1")) == 503  # per address
    held.append(await websockets.connect(url, **source("127.0.0.2")))  # another address still gets in
    assert await handshake_status(url, **source("127.0.0.3")) == 503  # per process
    try:
        await websockets.connect(url, **source("127.0.0.3"))
    except websockets.InvalidStatus as exc:
        assert b"too many connections on this server" in exc.response.body
        assert exc.response.headers["Retry-After"] == "5"
    await held.pop(0).close()
    await eventually(lambda: admin_stats(srv)["connections"] == 2, 5, what="slot released")
    held.append(await websockets.connect(url, **source("127.0.0.1")))
    for ws in held:
        await ws.close()


async def test_message_rate_throttles_then_closes_after_the_grace(server_factory):
    srv = server_factory(
        env={"COLLAB_MESSAGE_RATE": "50", "COLLAB_MESSAGE_BURST": "20", "COLLAB_RATE_LIMIT_GRACE": "0.5"}
    )
    bystander = await CollabClient(srv.ws_url, "ds-rate", hello=True).connect()
    polite = await CollabClient(srv.ws_url, "ds-rate", hello=True).connect()
    flooder = await websockets.connect(f"{srv.ws_url}/ds-rate", compression=None)
    empty_update = p.encode_sync_update(p.EMPTY_UPDATE)  # no reply, no broadcast: only the rate counts

    async def flood() -> None:
        try:
            for _ in range(5000):
                await flooder.send(empty_update)
        except websockets.ConnectionClosed:
            pass

    async def behave() -> None:
        cfg = polite.doc.get("config", type=pycrdt.Map)
        for i in range(30):  # 20 messages/s for 1.5 s: under the rate
            cfg["i"] = i
            await polite.flush()
            await asyncio.sleep(0.05)

    started = time.monotonic()
    flooding = asyncio.create_task(flood())
    await behave()
    code, reason = await closed_with(flooder, 5)
    await flooding
    assert (code, reason) == (1008, "rate limit: more than 50 messages/s for 0.5s")
    assert time.monotonic() - started < 5
    await polite.wait_saved()
    await bystander.until(lambda: config_of(bystander).get("i") == 29, 5, "polite edits")
    assert not polite.closed.is_set() and not bystander.closed.is_set()
    for c in (bystander, polite):
        await c.close()


async def test_byte_rate_closes_a_sustained_flood_of_big_messages(server_factory):
    srv = server_factory(
        env={"COLLAB_BYTE_RATE": "65536", "COLLAB_BYTE_BURST": "131072", "COLLAB_RATE_LIMIT_GRACE": "0.5"}
    )
    bystander = await CollabClient(srv.ws_url, "ds-bytes", hello=True).connect()
    # A valid 24 KB state vector: the server answers each with a small step 2.
    entries = 8000
    sv = p.write_var_uint(entries) + b"".join(p.write_var_uint(c) + b"\x00" for c in range(1000, 1000 + entries))
    frame = p.encode_sync_step1(sv)
    assert 20_000 < len(frame) < 60_000
    flooder = await websockets.connect(f"{srv.ws_url}/ds-bytes", compression=None, max_size=None)

    async def flood() -> None:
        try:
            for _ in range(200):  # 8 MB at most
                await flooder.send(frame)
        except websockets.ConnectionClosed:
            pass

    started = time.monotonic()
    flooding = asyncio.create_task(flood())
    code, reason = await closed_with(flooder, 10)
    await flooding
    assert (code, reason) == (1008, "rate limit: more than 65536 bytes/s for 0.5s")
    assert time.monotonic() - started < 6
    bystander.doc.get("config", type=pycrdt.Map)["fine"] = True
    await bystander.wait_saved()
    await bystander.close()


async def test_document_size_and_room_count_limits(server_factory):
    srv = server_factory(
        env={"COLLAB_MAX_DOCUMENT_BYTES": "8192", "COLLAB_MAX_ROOMS": "2", "COLLAB_ROOM_IDLE_SECONDS": "60"}
    )
    writer = await CollabClient(srv.ws_url, "ds-big", hello=True).connect()
    other = await CollabClient(srv.ws_url, "ds-big", hello=True).connect()
    writer.doc.get("notes", type=pycrdt.Text).insert(0, "a" * 6000)
    await writer.wait_saved()
    writer.doc.get("notes", type=pycrdt.Text).insert(0, "b" * 4000)  # past 8 KiB: refused and reverted
    await writer.until(lambda: text_of(writer) == "a" * 6000, 5, "revert")
    assert [m["reason"] for m in writer.control if m["type"] == "rejected"] == ["document_too_large"]
    await writer.wait_saved()
    writer.doc.get("config", type=pycrdt.Map)["small"] = "fits"
    await other.until(lambda: config_of(other).get("small") == "fits", 5, "a small edit still fits")
    assert text_of(other) == "a" * 6000 and not writer.closed.is_set()

    # Rooms: ds-big and ds-r2 are open; a third is refused while both have peers.
    second = await CollabClient(srv.ws_url, "ds-r2").connect()
    third = CollabClient(srv.ws_url, "ds-r3")
    try:
        await third.connect(timeout=5)
    except (ConnectionError, websockets.ConnectionClosed):
        pass
    await third.wait_closed(5)
    assert third.close_code == 1013 and "room limit" in third.close_reason
    # Once a room is idle it gives its place up at once (after being flushed).
    await second.close()
    await eventually(lambda: admin_stats(srv)["peers"] == 2, 5, what="ds-r2 idle")
    third = await CollabClient(srv.ws_url, "ds-r3").connect()
    assert admin_stats(srv)["rooms"] == 2
    for c in (writer, other, third):
        await c.close()


def raw_websocket(port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """A websocket client that completes the handshake and then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: leave the frames that follow unread
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_client_that_stops_reading_is_cut_off_without_slowing_the_others(server_factory):
    srv = server_factory(env={"COLLAB_PEER_QUEUE_FRAMES": "32"})
    writer = await CollabClient(srv.ws_url, "ds-slow", hello=True).connect()
    reader = await CollabClient(srv.ws_url, "ds-slow").connect()
    stuck = await asyncio.to_thread(raw_websocket, srv.port, "/ws/ds-slow")
    try:
        await eventually(lambda: admin_stats(srv)["peers"] == 3, 5, what="three peers")
        cfg = writer.doc.get("config", type=pycrdt.Map)
        lags = []
        for i in range(200):  # 64 KiB each, 12.5 MiB in all: far more than the socket buffers hold
            with writer.doc.transaction():
                cfg["blob"] = os.urandom(24576).hex() + f"{i:08d}"
                cfg["seq"] = i
            await writer.flush()
            if i % 20 == 0:
                sent = time.monotonic()
                await reader.until(lambda i=i: config_of(reader).get("seq") == i, 5, "reader keeps up")
                lags.append(time.monotonic() - sent)
        await writer.wait_saved(10)
        await eventually(lambda: admin_stats(srv)["peers"] == 2, 10, what="the stuck client cut off")
        assert "closed workspace=ds-slow" in srv.log() and "1013 outgoing queue overflow" in srv.log()
        assert max(lags) < 1.0, lags
        # The server dropped the TCP connection (it could not even send a close frame).
        stuck.settimeout(5)

        def drain() -> bool:
            try:
                while stuck.recv(1 << 20):
                    pass
            except ConnectionResetError:
                pass
            return True

        assert await asyncio.wait_for(asyncio.to_thread(drain), 10)
    finally:
        stuck.close()
    await reader.until(lambda: config_of(reader) == config_of(writer), 5, "convergence")
    for c in (writer, reader):
        await c.close()
