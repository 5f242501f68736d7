"""Presence against real server processes: timing goals, feeds, bad input, nodes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time

import httpx
import pytest

from codec import protocol as p
from tests.presence_support import close_all, first_snapshot, person, roster_of, until_users, users
from tests.support import ROOT

PEER_SCRIPT = """
import asyncio, sys
from collab.client import CollabClient
async def main():
    url, workspace, user = sys.argv[1:4]
    c = CollabClient(url, workspace, hello=True, query=f"user={user}&name={user}")
    await c.set_awareness({"focus": "connection.port"})
    await c.connect()
    await c.until(lambda: any(m["type"] == "presence.snapshot" for m in c.control), 10, "snapshot")
    print("ready", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


@contextlib.asynccontextmanager
async def peer_process(tmp_path, ws_url: str, workspace: str, user: str):
    """A participant in a child process (so it can be SIGKILLed or SIGSTOPped); ended by its PID."""
    script = tmp_path / "presence_peer.py"
    script.write_text(PEER_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), ws_url, workspace, user, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 15)
        assert line.strip() == b"ready", line
        yield proc
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)


async def test_clean_leave_reaches_everyone_within_a_second(server):
    ws = "ds-leave"
    people = [await person(server.ws_url, ws, u) for u in ("ann", "ben", "cat", "dan")]
    everyone = {"ann", "ben", "cat", "dan"}
    for c in people:
        await until_users(c, everyone, 5)
    dan = people.pop()
    await dan.close()
    # The goal is the bound: everyone sees the leave within a second of the close.
    await asyncio.gather(*(until_users(c, everyone - {"dan"}, 1.0, "dan's leave within 1 s") for c in people))
    await close_all(*people)


async def test_late_joiner_snapshot_lists_exactly_the_live_participants(server):
    ws = "ds-late"
    watcher = await person(server.ws_url, ws, "watcher")
    ann = await person(server.ws_url, ws, "ann")
    ben = await person(server.ws_url, ws, "ben")
    ben_tab = await person(server.ws_url, ws, "ben")  # a second tab
    cat = await person(server.ws_url, ws, "cat")
    await ann.set_awareness({"focus": "connection.host"})
    await until_users(watcher, {"watcher", "ann", "ben", "cat"}, 5)
    await cat.abort()  # no close handshake
    await ben_tab.close()
    await until_users(watcher, {"watcher", "ann", "ben"}, 5)
    await watcher.until(lambda: roster_of(watcher.control)["ben"]["connections"] == 1, 5, "ben down to one tab")
    late = await person(server.ws_url, ws, "late")
    snapshot = first_snapshot(late)
    by_user = {x["user_id"]: x for x in snapshot["participants"]}
    assert set(by_user) == {"watcher", "ann", "ben", "late"}
    assert by_user["ann"]["editing"] == "connection.host"
    assert by_user["ben"]["connections"] == 1
    assert [x["user_id"] for x in snapshot["participants"]][-1] == "late"  # ordered by arrival
    # The HTTP roster says the same.
    async with httpx.AsyncClient() as http:
        body = (await http.get(f"{server.http_url}/api/workspaces/{ws}/participants")).json()
    assert {x["user_id"] for x in body["participants"]} == {"watcher", "ann", "ben", "late"}
    await close_all(watcher, ann, ben, late)


async def test_killed_and_frozen_clients_leave_within_the_ping_timeout(server_factory, tmp_path):
    interval, timeout = 0.5, 1.0
    server = server_factory(env={"COLLAB_PING_INTERVAL": str(interval), "COLLAB_PING_TIMEOUT": str(timeout)})
    ws = "ds-killed"
    watcher = await person(server.ws_url, ws, "watcher")
    async with peer_process(tmp_path, server.ws_url, ws, "killed") as killed:
        async with peer_process(tmp_path, server.ws_url, ws, "frozen") as frozen:
            await until_users(watcher, {"watcher", "killed", "frozen"}, 5)
            assert roster_of(watcher.control)["frozen"]["editing"] == "connection.port"

            # SIGKILL: the kernel closes the socket, so the server sees it at once (bound: 1 s).
            os.kill(killed.pid, signal.SIGKILL)
            await until_users(watcher, {"watcher", "frozen"}, 1.0, "killed client's leave within 1 s")

            # SIGSTOP: the TCP connection stays open; only the ping timeout finds it.
            os.kill(frozen.pid, signal.SIGSTOP)
            # The goal (ping interval + timeout), plus a margin for a busy machine, as the bound.
            took = await until_users(watcher, {"watcher"}, interval + timeout + 1.0, "frozen client's leave")
            print(f"frozen client left the roster after {took:.2f}s (ping {interval}s + {timeout}s)")
            # Thawed, its connection is gone for good: no ghost comes back.
            os.kill(frozen.pid, signal.SIGCONT)
            late = await person(server.ws_url, ws, "late")
            assert {x["user_id"] for x in first_snapshot(late)["participants"]} == {"watcher", "late"}
            await until_users(watcher, {"watcher", "late"}, 5)
    await close_all(watcher, late)


async def test_rest_and_event_stream_feeds(server):
    ws = "ds-feeds"
    async with httpx.AsyncClient(timeout=5) as http:
        empty = await http.get(f"{server.http_url}/api/workspaces/{ws}/participants")
        assert empty.status_code == 200 and empty.json()["participants"] == []
        assert (await http.get(f"{server.http_url}/api/workspaces/bad%20id/participants")).status_code == 404
        page = await http.get(f"{server.http_url}/workspaces/{ws}")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert (await http.get(f"{server.http_url}/presence/static/panel.js")).status_code == 200

        events: list[dict] = []
        got = asyncio.Event()

        async def read_stream():
            url = f"{server.http_url}/api/workspaces/{ws}/participants/events"
            async with http.stream("GET", url) as resp:
                assert resp.headers["content-type"].startswith("text/event-stream")
                kind = None
                async for line in resp.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        message = json.loads(line[6:])
                        assert message["type"] == kind
                        events.append(message)
                        got.set()

        reader = asyncio.create_task(read_stream())

        async def until(predicate, what):
            async with asyncio.timeout(5):
                while not predicate():
                    got.clear()
                    await got.wait()

        try:
            await until(lambda: events, "snapshot")
            assert events[0]["type"] == "presence.snapshot" and events[0]["participants"] == []
            ann = await person(server.ws_url, ws, "ann")
            await until(lambda: roster_of(events) and "ann" in roster_of(events), "ann's join")
            await ann.set_awareness({"focus": "schedule.cron"})
            await until(lambda: roster_of(events)["ann"]["editing"] == "schedule.cron", "ann's focus")
            await ann.close()
            await until(lambda: roster_of(events) == {}, "ann's leave")
            assert [e["type"] for e in events].count("presence.snapshot") == 1
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def test_bad_awareness_is_dropped_with_an_error_to_its_sender_only(server_factory):
    rate, burst, window = 5.0, 10, 0.05  # the flood error is re-armed only after burst / rate = 2 s of quiet
    server = server_factory(env={"COLLAB_AWARENESS_RATE": str(rate), "COLLAB_AWARENESS_BURST": str(burst)})
    ws = "ds-bad-awareness"
    watcher = await person(server.ws_url, ws, "watcher")
    bad = await person(server.ws_url, ws, "mallory")
    await watcher.set_awareness({"focus": "mine"})
    await bad.until(lambda: watcher.client_id in bad.peer_states(), 5, "watcher's awareness")
    await bad.set_awareness({"focus": "ok"})
    await watcher.until(lambda: roster_of(watcher.control).get("mallory", {}).get("editing") == "ok", 5, "focus")
    diffs_before = sum(m["type"] == "presence.diff" for m in watcher.control)

    def errors(client):
        return [m["code"] for m in client.control if m["type"] == "error"]

    cid = bad.client_id
    frames = [
        p.encode_awareness([p.AwarenessEntry(cid, 100, json.dumps({"big": "x" * 70_000}))]),  # over 64 KiB
        p.encode_awareness([p.AwarenessEntry(cid, 101, "[1, 2, 3]")]),  # not an object
        p.encode_awareness([p.AwarenessEntry(cid, 102, json.dumps({"user": {"id": "watcher"}}))]),  # someone else
        p.encode_awareness([p.AwarenessEntry(watcher.client_id, 5, json.dumps({"focus": "x"}))]),  # their client id
    ]
    for frame in frames:
        await bad.send_raw(frame)
    expected = ["awareness_too_large", "awareness_malformed", "awareness_user_mismatch", "awareness_client_id_taken"]
    await bad.until(lambda: errors(bad) == expected, 5, "an error for each bad state")

    # A flood: 500 states at once. One error, few diffs, nobody else disturbed.
    flood = [p.encode_awareness([p.AwarenessEntry(cid, c, json.dumps({"focus": f"f{c}"}))]) for c in range(200, 700)]
    start = time.monotonic()
    for frame in flood:
        await bad.send_raw(frame)
    await bad.send_raw(p.encode_control({"type": "ping", "id": "after"}))
    await bad.until(lambda: any(m.get("id") == "after" for m in bad.control), 10, "pong after the flood")
    elapsed = time.monotonic() - start
    assert errors(bad).count("awareness_rate_limited") == 1
    assert "watcher" in roster_of(bad.control)
    await watcher.send_raw(p.encode_control({"type": "ping", "id": "w"}))
    await watcher.until(lambda: any(m.get("id") == "w" for m in watcher.control), 5, "watcher unaffected")
    assert errors(watcher) == []
    await watcher.until(lambda: roster_of(watcher.control)["mallory"]["editing"] != "ok", 5, "a flood state")
    diffs = sum(m["type"] == "presence.diff" for m in watcher.control) - diffs_before
    # At most the states the rate limit let through, and at most one diff per coalescing window.
    accepted = burst + rate * elapsed
    assert 1 <= diffs <= min(accepted, elapsed / window + 1) + 1, (diffs, elapsed)
    assert watcher.peer_states()[cid]["user"]["id"] == "mallory"
    assert not bad.closed.is_set()
    await close_all(watcher, bad)


async def test_a_killed_node_leaves_no_ghosts(server_factory, redis_server):
    ttl = 3.0  # by design gone within 0.8 * ttl: the rest is margin for a busy machine
    common = {
        "COLLAB_REDIS_URL": redis_server.url,
        "COLLAB_PRESENCE_TTL_SECONDS": str(ttl),
        "COLLAB_ROOM_IDLE_SECONDS": "0",
    }
    node_a = server_factory(env={**common, "COLLAB_NODE_ID": "node-a"}, name="a")
    node_b = server_factory(env={**common, "COLLAB_NODE_ID": "node-b"}, name="b")
    ws = "ds-nodes"
    ann = await person(node_a.ws_url, ws, "ann")
    ben = await person(node_b.ws_url, ws, "ben")
    cat = await person(node_b.ws_url, ws, "cat")
    await until_users(ann, {"ann", "ben", "cat"}, 5, "b's participants at a")
    await until_users(ben, {"ann", "ben", "cat"}, 5, "a's participant at b")
    assert roster_of(ann.control)["ben"]["node"] == "node-b"
    await cat.set_awareness({"focus": "connection.database"})
    await ann.until(lambda: roster_of(ann.control)["cat"]["editing"] == "connection.database", 5, "remote focus")
    # A clean leave on another node is prompt too.
    await cat.close()
    await until_users(ann, {"ann", "ben"}, 1.0, "cat's leave at a within 1 s")

    node_b.kill()
    took = await until_users(ann, {"ann"}, ttl, "b's participants gone at a within the presence TTL")
    print(f"killed node's participants left the roster after {took:.2f}s (presence TTL {ttl}s)")

    # No ghost afterwards: for another full TTL, every view of the roster stays exact.
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(round(ttl / 0.1)):
            body = (await http.get(f"{node_a.http_url}/api/workspaces/{ws}/participants")).json()
            assert [x["user_id"] for x in body["participants"]] == ["ann"]
            assert users(ann) == {"ann"}
            await asyncio.sleep(0.1)  # real time passes: a ghost would come back within the TTL
    late = await person(node_a.ws_url, ws, "late")
    assert {x["user_id"] for x in first_snapshot(late)["participants"]} == {"ann", "late"}

    # The node comes back (same node id): its new participants join, nothing old returns.
    node_b.restart()
    dan = await person(node_b.ws_url, ws, "dan")
    assert {x["user_id"] for x in first_snapshot(dan)["participants"]} == {"ann", "late", "dan"}
    await until_users(ann, {"ann", "late", "dan"}, 5)
    await close_all(ann, ben, late, dan)


async def test_stock_yjs_client_is_a_participant(server, node_clients):
    ws = "ds-presence-js"
    watcher = await person(server.ws_url, ws, "watcher")
    node = await node_clients(server.ws_url, ws, "stock")
    await watcher.until(lambda: len(users(watcher) or ()) == 2, 10, "the stock client's join")
    stock_id = next(u for u in users(watcher) if u != "watcher")
    await node.command("awareness", state={"user": {"name": "stock"}, "focus": "connection.host"})
    await watcher.until(lambda: roster_of(watcher.control)[stock_id]["editing"] == "connection.host", 10, "focus")
    assert await node.close() == 0
    await until_users(watcher, {"watcher"}, 1.0, "the stock client's clean leave")
    node.assert_clean()
    await watcher.close()


@pytest.fixture
async def node_clients():
    from tests.test_js_client import JS_DIR, NODE, NodeClient

    if NODE is None:
        pytest.skip("node is not installed")
    if not (JS_DIR / "node_modules" / "y-websocket").is_dir():
        pytest.fail(f"run `npm ci` in {JS_DIR}")
    started: list = []

    async def spawn(ws_url: str, room: str, label: str = "") -> NodeClient:
        client = NodeClient(ws_url, room, label)
        started.append(client)
        return await client.start()

    yield spawn
    await asyncio.gather(*(c.cleanup() for c in started))


async def test_locks_held_show_in_the_roster_on_every_node(server_factory, redis_server):
    """The locks feature's on_locks_changed hook fills each participant's ``locks``."""
    common = {"COLLAB_REDIS_URL": redis_server.url, "COLLAB_PRESENCE_TTL_SECONDS": "3"}
    node_a = server_factory(env={**common, "COLLAB_NODE_ID": "node-a"}, name="a")
    node_b = server_factory(env={**common, "COLLAB_NODE_ID": "node-b"}, name="b")
    ws = "ds-presence-locks"
    ann = await person(node_a.ws_url, ws, "ann")
    ben = await person(node_b.ws_url, ws, "ben")
    await until_users(ben, {"ann", "ben"}, 5)
    granted = await ann.acquire_lock("connection.host", ttl=30)
    assert granted["type"] == "lock.granted", granted
    for watcher in (ann, ben):
        await watcher.until(
            lambda w=watcher: roster_of(w.control)["ann"]["locks"] == ["connection.host"], 5, "ann's lock in roster"
        )
    assert roster_of(ben.control)["ben"]["locks"] == []
    released = await ann.release_lock("connection.host")
    assert released["type"] == "lock.release.ok", released
    await ben.until(lambda: roster_of(ben.control)["ann"]["locks"] == [], 5, "ann's lock gone from the roster")
    await close_all(ann, ben)
