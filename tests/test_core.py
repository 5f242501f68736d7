"""Core behaviour against a real server process and real websocket clients."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys

import pycrdt
import pytest
import websockets

from codec import protocol as p
from collab.client import CollabClient
from tests.support import ROOT


def config_of(client: CollabClient) -> dict:
    return client.doc.get("config", type=pycrdt.Map).to_py() or {}


def text_of(client: CollabClient) -> str:
    return str(client.doc.get("notes", type=pycrdt.Text))


async def random_edits(client: CollabClient, rng: random.Random, count: int) -> None:
    cfg = client.doc.get("config", type=pycrdt.Map)
    text = client.doc.get("notes", type=pycrdt.Text)
    for i in range(count):
        if rng.random() < 0.5:
            cfg[f"k{rng.randrange(20)}"] = f"{client.client_id}-{i}"
        else:
            pos = rng.randrange(len(text) + 1)
            if len(text) > 5 and rng.random() < 0.3:
                del text[pos - 1 if pos else 0]
            else:
                text.insert(pos, rng.choice("abcdef"))
        if i % 7 == 0:
            await asyncio.sleep(0)  # let the sender task interleave with the other client


async def test_concurrent_random_edits_converge(server):
    a = await CollabClient(server.ws_url, "ds-conv", hello=True).connect()
    b = await CollabClient(server.ws_url, "ds-conv", hello=True).connect()
    await asyncio.gather(random_edits(a, random.Random(1), 200), random_edits(b, random.Random(2), 200))
    await asyncio.gather(a.wait_saved(20), b.wait_saved(20))

    def same() -> bool:
        return config_of(a) == config_of(b) and text_of(a) == text_of(b)

    try:
        await a.until(same, 10, "convergence")
    except TimeoutError:
        print("A", config_of(a), text_of(a))
        print("B", config_of(b), text_of(b))
        raise
    assert a.updates_sent >= 200 and b.updates_sent >= 200
    # A fresh client sees exactly the converged state.
    c = await CollabClient(server.ws_url, "ds-conv").connect()
    assert config_of(c) == config_of(a) and text_of(c) == text_of(a)
    for cl in (a, b, c):
        await cl.close()


async def test_late_joiner_offline_edits_and_isolation(server):
    a = await CollabClient(server.ws_url, "ds-1", hello=True).connect()
    a.doc.get("config", type=pycrdt.Map)["host"] = "pg.internal"
    await a.wait_saved()
    late = await CollabClient(server.ws_url, "ds-1").connect()
    assert config_of(late) == {"host": "pg.internal"}

    # Offline edits: b edits while disconnected, then reconnects with the same doc.
    b = await CollabClient(server.ws_url, "ds-1", hello=True).connect()
    await b.close()
    b.doc.get("config", type=pycrdt.Map)["port"] = 5432.0  # edited offline
    a.doc.get("config", type=pycrdt.Map)["database"] = "sales"  # concurrent online edit
    await a.wait_saved()
    b2 = CollabClient(server.ws_url, "ds-1", doc=b.doc, hello=True)
    await b2.connect()
    await a.until(lambda: config_of(a).get("port") == 5432.0, 5, "offline edit at a")
    await b2.until(lambda: config_of(b2).get("database") == "sales", 5, "online edit at b")
    assert config_of(a) == config_of(b2) == {"host": "pg.internal", "port": 5432.0, "database": "sales"}

    # Rooms are isolated: ds-10 is not ds-1.
    other = await CollabClient(server.ws_url, "ds-10").connect()
    assert config_of(other) == {}
    other.doc.get("config", type=pycrdt.Map)["host"] = "elsewhere"
    await other.flush()
    probe = await CollabClient(server.ws_url, "ds-10").connect()
    await probe.until(lambda: config_of(probe).get("host") == "elsewhere", 5, "edit in ds-10")
    assert config_of(a)["host"] == "pg.internal"
    for cl in (a, late, b2, other, probe):
        await cl.close()


async def test_awareness_join_clean_close_and_killed_client(server, tmp_path):
    watcher = await CollabClient(server.ws_url, "ds-aw").connect()
    alice = CollabClient(server.ws_url, "ds-aw")
    await alice.set_awareness({"user": {"name": "Alice"}, "focus": "connection.host"})
    await alice.connect()
    await watcher.until(lambda: alice.client_id in watcher.peer_states(), 5, "alice's awareness")
    assert watcher.peer_states()[alice.client_id]["focus"] == "connection.host"
    # A late joiner gets the known states on connect.
    late = await CollabClient(server.ws_url, "ds-aw").connect()
    await late.until(lambda: alice.client_id in late.peer_states(), 5, "states for late joiner")
    # Clean close: removal is broadcast.
    await alice.close()
    await watcher.until(lambda: alice.client_id not in watcher.peer_states(), 5, "removal after close")

    # Abrupt close: a client in another process, killed with SIGKILL.
    script = tmp_path / "peer.py"
    script.write_text(
        "import asyncio, sys\n"
        "from collab.client import CollabClient\n"
        "async def main():\n"
        "    c = CollabClient(sys.argv[1], 'ds-aw', client_id=424242)\n"
        "    await c.set_awareness({'user': {'name': 'Bob'}})\n"
        "    await c.connect()\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), server.ws_url, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.strip() == b"ready"
        await watcher.until(lambda: 424242 in watcher.peer_states(), 5, "bob's awareness")
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        await watcher.until(lambda: 424242 not in watcher.peer_states(), 5, "removal after kill")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await watcher.close()
    await late.close()


async def test_awareness_cannot_overwrite_another_clients_entry(server):
    a = CollabClient(server.ws_url, "ds-own", client_id=1001, query="user=a&name=A")
    await a.set_awareness({"user": {"name": "A"}})
    await a.connect()
    mallory = await CollabClient(server.ws_url, "ds-own").connect()
    await mallory.until(lambda: 1001 in mallory.peer_states(), 5, "a's state")
    # Mallory claims client 1001 with a newer clock.
    forged = p.AwarenessEntry(1001, 99, '{"user":{"name":"Mallory"}}')
    await mallory.send_raw(p.encode_awareness([forged]))
    await mallory.send_raw(p.encode_awareness([p.AwarenessEntry(1001, 100, "null")]))
    # A's own next change still flows, and nobody saw the forgery.
    await a.set_awareness({"user": {"name": "A"}, "focus": "schedule.cron"})
    observer = await CollabClient(server.ws_url, "ds-own").connect()
    await observer.until(lambda: observer.peer_states().get(1001, {}).get("focus") == "schedule.cron", 5, "a")
    assert observer.peer_states()[1001]["user"]["name"] == "A"
    assert mallory.peer_states()[1001]["user"]["name"] == "A"
    for cl in (a, mallory, observer):
        await cl.close()


async def test_kill_9_loses_nothing_acknowledged(server):
    writers = [await CollabClient(server.ws_url, "ds-durable", hello=True).connect() for _ in range(3)]
    expected = {}
    for round_ in range(5):
        for i, w in enumerate(writers):
            key = f"w{i}-r{round_}"
            w.doc.get("config", type=pycrdt.Map)[key] = round_ * 10 + i
            expected[key] = round_ * 10 + i
    await asyncio.gather(*(w.wait_saved() for w in writers))
    server.kill()
    server.restart()
    fresh = await CollabClient(server.ws_url, "ds-durable").connect()
    got = config_of(fresh)
    assert {k: got.get(k) for k in expected} == {k: float(v) for k, v in expected.items()}
    await fresh.close()


async def test_saved_ack_counts_and_welcome(server):
    c = CollabClient(server.ws_url, "ds-ack", hello=True)
    await c.connect()
    welcome = next(m for m in c.control if m["type"] == "welcome")
    assert welcome["workspace"] == "ds-ack"
    assert welcome["limits"]["max_message_bytes"] == 1024 * 1024
    cfg = c.doc.get("config", type=pycrdt.Map)
    for i in range(50):
        cfg[f"k{i}"] = i
    await c.wait_saved()
    saved = [m for m in c.control if m["type"] == "saved"]
    # 50 updates plus the step 2 answering the server's step 1.
    assert saved[-1]["updates"] == c.updates_sent == 51
    assert all(x["updates"] < y["updates"] for x, y in zip(saved, saved[1:]))  # strictly increasing
    await c.close()


async def test_stock_style_client_gets_no_control_messages(server):
    """A client that never says hello must never see type 100."""
    async with websockets.connect(f"{server.ws_url}/ds-quiet", compression=None) as ws:
        await ws.send(p.encode_sync_step1(b"\x00"))
        doc = pycrdt.Doc()
        doc.get("config", type=pycrdt.Map)["x"] = 1
        await ws.send(p.encode_sync_update(doc.get_update()))
        types = []
        async with asyncio.timeout(5):
            while True:
                frame = await ws.recv()
                types.append(frame[0])
                msg = p.decode_message(frame)
                if isinstance(msg, p.SyncUpdate):  # the echo of our update
                    break
        assert p.MSG_CONTROL not in types
        assert types[0] == p.MSG_SYNC


# ------------------------------------------------------------------ bad input

BAD_FRAMES = [
    (b"", 1007),
    (b"\x00", 1007),  # sync without sub-type
    (b"\x00\x07\x00", 1007),  # unknown sync sub-type
    (b"\x00\x02\x05\x01", 1007),  # truncated update
    (b"\x00\x02\x03\x01\x02\x03", 1007),  # garbage update (pycrdt rejects)
    (b"\x00\x02" + p.write_var_bytes(p.write_var_uint(2**27)), 1007),  # allocation bomb
    (b"\x09", 1007),  # unknown message type
    (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff", 1007),  # bad varint
    (b"\x01\x05\x01\x01\x01\x01", 1007),  # truncated awareness
    (b"\x64\xc1", 1007),  # invalid msgpack control
]


@pytest.mark.parametrize("frame,code", BAD_FRAMES)
async def test_malformed_frame_closes_only_its_sender(server, frame, code):
    a = await CollabClient(server.ws_url, "ds-bad", hello=True).connect()
    b = await CollabClient(server.ws_url, "ds-bad", hello=True).connect()
    bad = await CollabClient(server.ws_url, "ds-bad").connect()
    await bad.send_raw(frame)
    await bad.wait_closed(5)
    assert bad.close_code == code, bad.close_reason
    assert bad.close_reason
    # Everyone else carries on and converges.
    a.doc.get("config", type=pycrdt.Map)["after"] = "still fine"
    await a.wait_saved()
    await b.until(lambda: config_of(b).get("after") == "still fine", 5, "edit after bad frame")
    b.doc.get("config", type=pycrdt.Map)["reply"] = "ok"
    await a.until(lambda: config_of(a).get("reply") == "ok", 5, "reply")
    await a.close()
    await b.close()


async def test_text_frame_and_oversize_frame(server):
    keeper = await CollabClient(server.ws_url, "ds-limits", hello=True).connect()
    text = await CollabClient(server.ws_url, "ds-limits").connect()
    await text.send_raw("hello")
    await text.wait_closed(5)
    assert text.close_code == 1003

    big = await CollabClient(server.ws_url, "ds-limits").connect()
    doc = pycrdt.Doc()
    doc.get("config", type=pycrdt.Map)["blob"] = "x" * (1024 * 1024 + 10)
    try:
        await big.send_raw(p.encode_sync_update(doc.get_update()))
    except websockets.ConnectionClosed:
        pass  # the server may close (1009) before our 1 MiB write has drained
    await big.wait_closed(5)
    assert big.close_code == 1009

    keeper.doc.get("config", type=pycrdt.Map)["alive"] = True
    await keeper.wait_saved()
    await keeper.close()


async def test_invalid_workspace_id_is_refused(server):
    # The gate's one workspace-id check: 404 before any handshake, as on every HTTP route.
    with pytest.raises(websockets.InvalidStatus) as refused:
        await CollabClient(server.ws_url, "bad%20id").connect(timeout=5)
    assert refused.value.response.status_code == 404
