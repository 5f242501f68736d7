"""The stock JavaScript clients (yjs + y-websocket's WebsocketProvider, run by node)
against our server, side by side with the Python ``CollabClient``.

Each node process runs ``js/client.mjs``: commands go in as JSON lines on its
stdin, events come out as JSON lines on its stdout (see the header of that
script). The processes exit by themselves when stdin closes or after a hard
timeout; the fixture also ends every one it started, by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
from typing import Any

import pycrdt
import pytest

from codec import protocol as p
from collab.client import CollabClient
from tests.support import ROOT, eventually

NODE = shutil.which("node")
JS_DIR = ROOT / "js"
SCRIPT = "client.mjs"
HARD_TIMEOUT = 60  # seconds; the node script exits by itself after this
WAIT = 15.0  # bound for every single wait in these tests

pytestmark = pytest.mark.skipif(
    NODE is None, reason="`node` is not on PATH: the stock Yjs client tests need Node.js 20+ (and `npm ci` in js/)"
)


class NodeClient:
    """One ``node js/client.mjs`` process: a stock Yjs client we script."""

    _ids = itertools.count(1)

    def __init__(self, ws_url: str, room: str, label: str = "") -> None:
        self.ws_url = ws_url
        self.room = room
        self.label = label
        self.proc: asyncio.subprocess.Process | None = None
        self.client_id: int | None = None
        self.events: list[dict[str, Any]] = []
        self.doc: dict[str, Any] = {"config": {}, "text": ""}  # latest contents the node reported
        self.synced_docs: list[dict[str, Any]] = []  # contents at each "synced" event
        self.awareness: dict[int, Any] = {}  # latest awareness states the node holds
        self.unknown_frames: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.stderr = bytearray()
        self.exited = False
        self._tasks: list[asyncio.Task] = []
        self._waiters: list[asyncio.Future] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, wait_synced: bool = True) -> NodeClient:
        self.proc = await asyncio.create_subprocess_exec(
            NODE,
            SCRIPT,
            "--url",
            self.ws_url,
            "--room",
            self.room,
            "--timeout",
            str(HARD_TIMEOUT),
            *(["--label", self.label] if self.label else []),
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 22,
        )
        self._tasks = [asyncio.create_task(self._read_stdout()), asyncio.create_task(self._read_stderr())]
        await self.until(lambda: self.client_id is not None, WAIT, "node client ready")
        if wait_synced:
            await self.wait_synced()
        return self

    async def wait_synced(self, count: int = 1) -> None:
        await self.until(lambda: len(self.synced_docs) >= count, WAIT, "node client synced")

    # ------------------------------------------------------------- events

    async def _read_stdout(self) -> None:
        assert self.proc and self.proc.stdout
        try:
            async for raw in self.proc.stdout:
                try:
                    event = json.loads(raw)
                except ValueError:
                    self.errors.append({"event": "error", "message": f"not JSON: {raw[:200]!r}"})
                    continue
                self._handle(event)
                self._wake()
        finally:
            await self.proc.wait()
            self.exited = True
            self._wake()

    async def _read_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        async for raw in self.proc.stderr:
            self.stderr += raw

    def _handle(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        kind = event.get("event")
        if kind == "ready":
            self.client_id = int(event["clientID"])
        elif kind in ("doc", "synced", "dump"):
            self.doc = {"config": event["config"], "text": event["text"]}
            if kind == "synced":
                self.synced_docs.append(self.doc)
        elif kind == "awareness":
            self.awareness = {int(k): v for k, v in event["states"].items()}
        elif kind == "frame_unknown":
            self.unknown_frames.append(event)
        elif kind == "error":
            self.errors.append(event)

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def until(self, predicate, timeout: float = WAIT, what: str = "condition") -> None:
        """Wait (bounded) until ``predicate()`` holds; re-checked on every event."""

        async def loop() -> None:
            while not predicate():
                if self.exited:
                    raise ConnectionError(
                        f"node client exited ({self.proc.returncode}) waiting for {what}\n{self.diag()}"
                    )
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut

        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}\n{self.diag()}") from None

    def diag(self) -> str:
        tail = "\n".join(json.dumps(e) for e in self.events[-15:])
        stderr = self.stderr.decode(errors="replace")[-2000:]
        return f"last events of node {self.label or self.client_id}:\n{tail}\nstderr:\n{stderr}"

    def peer_states(self) -> dict[int, Any]:
        return {cid: s for cid, s in self.awareness.items() if cid != self.client_id and s is not None}

    # ----------------------------------------------------------- commands

    async def command(self, cmd: str, *, wait: bool = True, **fields: Any) -> dict[str, Any] | None:
        """Send one command; with ``wait`` return its ack (or its dump/stats reply)."""
        assert self.proc and self.proc.stdin
        cid = next(self._ids)
        start = len(self.events)
        self.proc.stdin.write((json.dumps({"cmd": cmd, "id": cid, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        if not wait:
            return None
        reply: dict[str, Any] = {}

        def answered() -> bool:
            for event in self.events[start:]:
                if event.get("id") != cid:
                    continue
                if event["event"] == "error":
                    raise AssertionError(f"node rejected {cmd}: {event['message']}")
                if event["event"] in ("dump", "stats"):
                    reply.update(event)
                if event["event"] == "ack":
                    return True
            return False

        await self.until(answered, WAIT, f"ack of {cmd}")
        return reply

    async def dump(self) -> dict[str, Any]:
        reply = await self.command("dump")
        return {"config": reply["config"], "text": reply["text"]}

    async def stats(self) -> dict[str, Any]:
        return await self.command("stats")

    async def close(self) -> int:
        """Clean close (the provider sends its awareness as null, then a close frame)."""
        await self.command("close", wait=False)
        await self.until(lambda: self.exited, WAIT, "node client exit after close")
        return self.proc.returncode

    async def kill(self) -> int:
        """SIGKILL this process (by its own PID): no close frame, no awareness removal."""
        os.kill(self.pid, signal.SIGKILL)
        await self.until(lambda: self.exited, WAIT, "node client exit after SIGKILL")
        return self.proc.returncode

    async def cleanup(self) -> None:
        """End the process if it still runs: close stdin, then SIGKILL by PID."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                await asyncio.wait_for(self.proc.wait(), 5)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def assert_clean(self) -> None:
        """No frame the stock client cannot handle, no error, nothing on stderr."""
        assert self.unknown_frames == [], f"node client got frames it has no handler for: {self.unknown_frames}"
        assert self.errors == [], f"node client reported errors: {self.errors}"
        stderr = self.stderr.decode(errors="replace")
        assert "Unable to compute message" not in stderr, stderr
        assert stderr.strip() == "", f"node client wrote to stderr:\n{stderr}"


@pytest.fixture
async def node_clients():
    """``spawn(ws_url, room, label)`` starts node clients; all are ended after the test."""
    if not (JS_DIR / "node_modules" / "y-websocket").is_dir():
        pytest.fail(f"run `npm ci` in {JS_DIR}: node is installed but js/node_modules is missing")
    started: list[NodeClient] = []

    async def spawn(ws_url: str, room: str, label: str = "", wait_synced: bool = True) -> NodeClient:
        client = NodeClient(ws_url, room, label)
        started.append(client)
        return await client.start(wait_synced=wait_synced)

    yield spawn
    # Each process gets stdin EOF (it exits by itself), then SIGKILL by its PID if it lingers.
    await asyncio.gather(*(c.cleanup() for c in started))


def norm(value: Any) -> Any:
    """JSON-comparable form: pycrdt reads every number back as a float."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [norm(v) for v in value]
    return value


def py_contents(client: CollabClient) -> dict[str, Any]:
    return {
        "config": norm(client.doc.get("config", type=pycrdt.Map).to_py() or {}),
        "text": str(client.doc.get("text", type=pycrdt.Text)),
    }


def stamped(state: Any, **fields: Any) -> bool:
    """The server stamps an awareness state's ``user`` with the connection's
    identity (presence): true if ``state`` is stamped and otherwise ``fields``."""
    if not isinstance(state, dict) or not isinstance(state.get("user"), dict) or "id" not in state["user"]:
        return False
    return {k: v for k, v in state.items() if k != "user"} == fields


async def py_client(server, room: str, **kw: Any) -> CollabClient:
    return await CollabClient(server.ws_url, room, **kw).connect(timeout=WAIT)


# ------------------------------------------------------------------ tests


async def test_concurrent_edits_converge_between_node_and_python(server, node_clients):
    room = "ds-js-converge"
    py = await py_client(server, room)
    node = await node_clients(server.ws_url, room, "node")
    config = py.doc.get("config", type=pycrdt.Map)
    text = py.doc.get("text", type=pycrdt.Text)

    # Both sides edit without waiting for each other, so their edits cross in flight:
    # same map key ("shared"), disjoint keys, and text inserts at the same position.
    for i in range(15):
        await node.command(
            "transact",
            wait=False,
            ops=[
                {"cmd": "set", "map": "config", "key": f"node{i}", "value": {"i": i, "who": "node"}},
                {"cmd": "set", "map": "config", "key": "shared", "value": f"node-{i}"},
                {"cmd": "text_insert", "text": "text", "index": 0, "content": f"[n{i}]"},
            ],
        )
        with py.doc.transaction():
            config[f"py{i}"] = i
            config["shared"] = f"py-{i}"
            text.insert(0, f"<p{i}>")
        await py.flush()
    await node.command("set", key="host", value="db.internal")
    config["port"] = 5432
    text += "!"

    def converged() -> bool:
        mine = py_contents(py)
        return (
            mine == norm(node.doc)
            and "host" in mine["config"]
            and "port" in mine["config"]
            and len(mine["config"]) == 33
        )

    try:
        await eventually(converged, WAIT, what="python and node converging")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\npy={py_contents(py)!r}\nnode={node.doc!r}") from None
    final = norm(await node.dump())
    assert final == py_contents(py)
    assert final["config"]["host"] == "db.internal" and final["config"]["port"] == 5432
    assert final["config"]["node14"] == {"i": 14, "who": "node"} and final["config"]["py14"] == 14
    assert final["config"]["shared"] in {"node-14", "py-14"}  # one side's last write wins, the same everywhere
    for i in range(15):
        assert f"[n{i}]" in final["text"] and f"<p{i}>" in final["text"]
    assert final["text"].count("!") == 1  # where it lands depends on concurrent inserts at 0
    assert len(final["text"]) == sum(len(f"[n{i}]") + len(f"<p{i}>") for i in range(15)) + 1

    # The server's own document agrees too: a fresh client syncs to the same contents.
    fresh = await py_client(server, room)
    assert py_contents(fresh) == final
    await fresh.close()
    await py.close()
    node.assert_clean()


async def test_awareness_crosses_both_ways_and_removals_arrive(server, node_clients):
    room = "ds-js-awareness"
    py = await py_client(server, room)
    await py.set_awareness({"user": {"name": "py", "color": "#f00"}})
    node = await node_clients(server.ws_url, room, "node")
    observer = await node_clients(server.ws_url, room, "observer")
    await node.command("awareness", state={"user": {"name": "node", "color": "#0f0"}})

    # Python -> node (sent to the node on join) and node -> Python.
    await node.until(
        lambda: stamped(node.peer_states().get(py.client_id)),
        WAIT,
        "python awareness at node",
    )
    await py.until(
        lambda: stamped(py.peer_states().get(node.client_id)),
        WAIT,
        "node awareness at python",
    )
    await observer.until(
        lambda: set(observer.peer_states()) == {py.client_id, node.client_id}, WAIT, "both states at the observer"
    )

    # Updates after the first state travel too, both ways.
    await py.set_awareness({"user": {"name": "py", "color": "#f00"}, "cursor": 7})
    await node.until(
        lambda: (node.peer_states().get(py.client_id) or {}).get("cursor") == 7, WAIT, "python awareness update at node"
    )
    await node.command("awareness_field", field="cursor", value=3)
    await py.until(
        lambda: (py.peer_states().get(node.client_id) or {}).get("cursor") == 3, WAIT, "node awareness update at python"
    )

    # A clean close: y-websocket sends its state as null, then closes.
    node_id = node.client_id
    assert await node.close() == 0
    await py.until(lambda: node_id not in py.peer_states(), WAIT, "removal of the closed node client")
    assert py.awareness[node_id][1] is None  # an explicit removal, not a state never seen
    await observer.until(lambda: node_id not in observer.peer_states(), WAIT, "removal at the observer")

    # SIGKILL: no close frame, no null state; the server must broadcast the removal on socket close.
    victim = await node_clients(server.ws_url, room, "victim")
    await victim.command("awareness", state={"user": {"name": "victim"}})
    await py.until(
        lambda: stamped(py.peer_states().get(victim.client_id)),
        WAIT,
        "victim awareness at python",
    )
    await observer.until(lambda: victim.client_id in observer.peer_states(), WAIT, "victim at the observer")
    victim_id = victim.client_id
    assert await victim.kill() == -signal.SIGKILL
    await py.until(lambda: victim_id not in py.peer_states(), WAIT, "removal of the killed node client")
    assert py.awareness[victim_id][1] is None
    await observer.until(lambda: victim_id not in observer.peer_states(), WAIT, "killed client removed at observer")

    # And the Python client's own departure reaches the stock client.
    py_id = py.client_id
    await py.close()
    await observer.until(lambda: py_id not in observer.peer_states(), WAIT, "python removal at the observer")
    assert observer.peer_states() == {}
    for client in (node, victim, observer):
        client.assert_clean()


async def test_late_joining_node_client_gets_full_state(server_factory, node_clients):
    # Rooms are evicted as soon as they are empty, so the last join below reloads from the store.
    server = server_factory(env={"COLLAB_ROOM_IDLE_SECONDS": "0"})
    room = "ds-js-late"
    py = await py_client(server, room, hello=True)
    config = py.doc.get("config", type=pycrdt.Map)
    text = py.doc.get("text", type=pycrdt.Text)
    for i in range(20):
        config[f"key{i}"] = {"n": i, "label": f"välue-{i}"}
    config["nested"] = {"list": [1, 2, {"deep": True}], "none": None}
    text += "héllo wörld 🌍"
    del config["key0"]
    text.insert(0, ">> ")
    await py.set_awareness({"user": "py"})
    await py.wait_saved(WAIT)
    expected = py_contents(py)

    late = await node_clients(server.ws_url, room, "late")
    # The first step 2 the client gets (the moment it turns synced) already holds everything.
    assert norm(late.synced_docs[0]) == expected
    await late.until(lambda: stamped(late.peer_states().get(py.client_id)), WAIT, "awareness on join")
    assert await late.close() == 0

    # After everyone left (room evicted, state only in the store), a new stock client still gets it all.
    await py.close()
    later = await node_clients(server.ws_url, room, "later")
    assert norm(later.synced_docs[0]) == expected
    assert later.peer_states() == {}
    assert await later.close() == 0
    late.assert_clean()
    later.assert_clean()


async def test_node_client_never_receives_control_messages(server, node_clients):
    room = "ds-js-control"
    ctl = await py_client(server, room, hello=True)  # opted in: gets welcome, saved acks, pong
    node = await node_clients(server.ws_url, room, "node")
    plain = await py_client(server, room)
    await ctl.set_awareness({"user": "ctl"})
    config = ctl.doc.get("config", type=pycrdt.Map)
    for i in range(10):
        config[f"k{i}"] = i
        await node.command("set", wait=False, key=f"n{i}", value=i)
    await ctl.send_raw(p.encode_control({"type": "ping", "id": 1}))
    await ctl.send_raw(p.encode_control({"type": "no-such-type", "id": 2}))  # answered with an error, to ctl only
    await ctl.wait_saved(WAIT)
    await ctl.until(lambda: any(m["type"] == "pong" for m in ctl.control), WAIT, "pong")
    await ctl.until(lambda: any(m["type"] == "error" for m in ctl.control), WAIT, "error reply")
    await node.until(lambda: all(f"k{i}" in node.doc["config"] for i in range(10)), WAIT, "ctl edits at node")
    await ctl.until(lambda: all(f"n{i}" in py_contents(ctl)["config"] for i in range(10)), WAIT, "node edits at ctl")
    await node.until(lambda: ctl.client_id in node.peer_states(), WAIT, "ctl awareness at node")
    assert {m["type"] for m in ctl.control} >= {"welcome", "saved", "pong", "error"}
    assert plain.control == []  # the Python client without hello gets none either

    # One more round trip through the server after everything above, so any
    # stray control frame would have been delivered before we count.
    await node.command("set", key="last", value=True)
    await ctl.until(lambda: py_contents(ctl)["config"].get("last") is True, WAIT, "last edit at ctl")
    await node.until(lambda: node.doc["config"].get("last") is True, WAIT, "echo of last edit")
    stats = await node.stats()
    assert stats["frames"] > 0
    assert stats["unknown"] == 0, node.unknown_frames
    assert "100" not in stats["by_type"], stats
    assert set(stats["by_type"]) <= {"0", "1", "3"}, stats
    await ctl.close()
    await plain.close()
    assert await node.close() == 0
    node.assert_clean()


async def test_two_node_clients_converge_through_server(server, node_clients):
    room = "ds-js-two-nodes"
    a = await node_clients(server.ws_url, room, "a")
    b = await node_clients(server.ws_url, room, "b")
    await a.command("awareness", state={"user": "a"})
    await b.command("awareness", state={"user": "b"})
    for i in range(20):
        await a.command(
            "transact",
            wait=False,
            ops=[
                {"cmd": "set", "key": f"a{i}", "value": i},
                {"cmd": "set", "key": "shared", "value": f"a-{i}"},
                {"cmd": "text_insert", "index": 0, "content": f"(a{i})"},
            ],
        )
        await b.command(
            "transact",
            wait=False,
            ops=[
                {"cmd": "set", "key": f"b{i}", "value": [i, "b"]},
                {"cmd": "set", "key": "shared", "value": f"b-{i}"},
                {"cmd": "text_insert", "index": 0, "content": f"(b{i})"},
            ],
        )
    await a.command("text_delete", index=0, length=1)

    text_len = sum(len(f"(a{i})") + len(f"(b{i})") for i in range(20)) - 1

    def converged() -> bool:
        return a.doc == b.doc and len(a.doc["config"]) == 41 and len(a.doc["text"]) == text_len

    try:
        await eventually(converged, WAIT, what="two node clients converging")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\na={a.doc!r}\nb={b.doc!r}") from None
    da, db = await a.dump(), await b.dump()
    assert da == db
    assert da["config"]["shared"] in {"a-19", "b-19"}
    assert da["config"]["b7"] == [7, "b"]
    await a.until(lambda: stamped(a.peer_states().get(b.client_id)), WAIT, "b's awareness at a")
    await b.until(lambda: stamped(b.peer_states().get(a.client_id)), WAIT, "a's awareness at b")

    # The server holds the same document.
    fresh = await py_client(server, room)
    assert py_contents(fresh) == norm(da)
    await fresh.close()
    assert await a.close() == 0
    assert await b.close() == 0
    a.assert_clean()
    b.assert_clean()


async def test_node_offline_edits_reach_the_server_on_reconnect(server, node_clients):
    """The stock client's offline edits travel only in its step 2 answer to the server's step 1."""
    room = "ds-js-offline"
    py = await py_client(server, room)
    node = await node_clients(server.ws_url, room, "node")
    await node.command("disconnect")
    await node.until(lambda: any(e.get("status") == "disconnected" for e in node.events), WAIT, "disconnect")
    await node.command("set", key="offline", value="from-node")
    await node.command("text_insert", index=0, content="offline text")
    py.doc.get("config", type=pycrdt.Map)["online"] = "from-py"
    await py.flush()
    await node.command("connect")
    await node.wait_synced(2)
    expected = {"config": {"offline": "from-node", "online": "from-py"}, "text": "offline text"}
    await py.until(lambda: py_contents(py) == expected, WAIT, "offline edits at python")
    await node.until(lambda: norm(node.doc) == expected, WAIT, "python edit at node after reconnect")
    await py.close()
    assert await node.close() == 0
    node.assert_clean()
