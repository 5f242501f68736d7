"""The client package js/sdk (@datasource-collab/client) against a real server.

Each client is ``node js/sdk/e2e/driver.mjs``: the package's ``connectWorkspace``
on the stock yjs + y-websocket provider, scripted over JSON lines (see the header
of that script). The package's own checks (node --test, eslint, tsc) run here
too, so ``make test`` runs them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
from typing import Any

import pytest

from tests.forwarding_support import FAST_FORWARDING, BackendProcess
from tests.security_support import jwt_env, make_token
from tests.support import ROOT

NODE = shutil.which("node")
SDK = ROOT / "js" / "sdk"
WAIT = 15.0  # bound for every single wait

pytestmark = pytest.mark.skipif(NODE is None, reason="`node` is not on PATH (Node.js 20+ and `make js`)")


def _npm_bin(name: str) -> str:
    path = SDK / "node_modules" / ".bin" / name
    assert path.exists(), f"{path} is missing: run `make js` (npm ci in js/sdk)"
    return str(path)


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=SDK, capture_output=True, text=True, timeout=240)


# ------------------------------------------------------------------ the package's own checks


def test_package_unit_tests_pass():
    run = _run([NODE, "--test", "test/"])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "# fail 0" in run.stdout and "# pass " in run.stdout


def test_package_lints_clean():
    run = _run([_npm_bin("eslint"), "--max-warnings", "0", "."])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_type_declarations_check_against_the_example():
    run = _run([_npm_bin("tsc"), "-p", "tsconfig.json"])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_package_manifest_is_an_es_module_package_with_types():
    manifest = json.loads((SDK / "package.json").read_text())
    assert manifest["name"] == "@datasource-collab/client" and manifest["version"] == "0.1.0"
    assert manifest["type"] == "module"
    assert manifest["exports"]["."]["types"] == "./index.d.ts"
    assert (SDK / "package-lock.json").exists()
    # Importable by name from Node, as an app would.
    run = _run(
        [NODE, "-e", "import('@datasource-collab/client').then(m => console.log(Object.keys(m).sort().join(',')))"]
    )
    assert run.returncode == 0, run.stderr
    assert "connectWorkspace" in run.stdout and "bridgeToEventBus" in run.stdout


# ------------------------------------------------------------------ a scripted client


class SdkClient:
    """One ``node js/sdk/e2e/driver.mjs`` process."""

    _ids = itertools.count(1)

    def __init__(self, ws_url: str, workspace: str, user: str | None = None, token_for: str | None = None) -> None:
        self.argv = [NODE, "e2e/driver.mjs", "--url", ws_url, "--workspace", workspace, "--timeout", "120"]
        if user:
            self.argv += ["--user", user]
        self.token_for = token_for  # jwt mode: mint tokens for this user when asked
        self.token_ttl = 300.0
        self.tokens: list[str] = []
        self.hold_tokens = False  # True: token requests wait for release_tokens()
        self.held_tokens = 0
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.stderr = b""

    async def start(self) -> SdkClient:
        if self.token_for:
            self.argv.append("--jwt")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=SDK,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(lambda e: e["event"] == "synced" and e["synced"], what="synced")
        await self.wait_for(lambda e: e["event"] == "control" and e["message"]["type"] == "welcome", what="welcome")
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        while line := await self.proc.stdout.readline():
            event = json.loads(line)
            if event["event"] == "need_token":
                if self.hold_tokens:
                    self.held_tokens += 1
                else:
                    await self._give_token()
            self.events.append(event)
            self._changed.set()
        self.stderr = await self.proc.stderr.read() if self.proc.stderr else b""
        self._changed.set()

    async def _give_token(self) -> None:
        token = make_token(self.token_for, ttl=self.token_ttl)
        self.tokens.append(token)
        await self.send({"cmd": "token", "token": token})

    async def release_tokens(self) -> None:
        self.hold_tokens = False
        while self.held_tokens:
            self.held_tokens -= 1
            await self._give_token()

    async def send(self, cmd: dict[str, Any]) -> None:
        assert self.proc and self.proc.stdin
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def wait_for(self, predicate, timeout: float = WAIT, what: str = "event", start: int = 0) -> dict[str, Any]:
        """The first event from index ``start`` on that matches (bounded wait)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for event in self.events[start:]:
                if predicate(event):
                    return event
            if self._reader and self._reader.done():
                raise AssertionError(f"driver exited before {what}: {self.stderr.decode()[-3000:]}")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no {what} within {timeout}s; last events: {self.events[-8:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def call(self, cmd: str, timeout: float = WAIT, **body) -> dict[str, Any]:
        cid = next(self._ids)
        start = len(self.events)
        await self.send({"cmd": cmd, "id": cid, **body})
        return await self.wait_for(
            lambda e: e["event"] == "result" and e["id"] == cid, timeout, f"result of {cmd}", start
        )

    def controls(self, type_: str) -> list[dict[str, Any]]:
        return [e["message"] for e in self.events if e["event"] == "control" and e["message"]["type"] == type_]

    def bus(self) -> list[tuple[str, dict[str, Any]]]:
        return [(e["name"], e["payload"]) for e in self.events if e["event"] == "bus"]

    async def close(self) -> None:
        if self.proc and self.proc.returncode is None:
            try:
                await self.send({"cmd": "close"})
                await asyncio.wait_for(self.proc.wait(), 5)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                pass
            if self.proc.returncode is None:
                os.kill(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if self._reader:
            await asyncio.wait_for(self._reader, 5)


@pytest.fixture
async def clients():
    started: list[SdkClient] = []

    async def make(
        ws_url: str, workspace: str, user: str | None = None, token_for: str | None = None, ttl: float = 300.0
    ):
        client = SdkClient(ws_url, workspace, user, token_for)
        client.token_ttl = ttl
        started.append(client)
        return await client.start()

    yield make
    for client in started:
        await client.close()


async def eventually_dump(client: SdkClient, predicate, what: str, timeout: float = WAIT) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        dump = await client.call("dump")
        if predicate(dump):
            return dump
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{what}: last dump {dump}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ real-server scenarios


async def test_lock_contention_between_two_clients(server, clients):
    alice = await clients(server.ws_url, "ds-locks", "alice")
    bob = await clients(server.ws_url, "ds-locks", "bob")

    grant = await alice.call("acquire", path="connection", ttl=30)
    assert grant["ok"], grant
    assert grant["grant"]["path"] == "connection" and grant["grant"]["user_id"] == "alice"

    refused = await bob.call("acquire", path="connection.host")
    assert not refused["ok"] and refused["code"] == "conflict"
    assert refused["details"]["held_path"] == "connection" and refused["details"]["user_id"] == "alice"

    bad = await bob.call("acquire", path="no-such-root")
    assert not bad["ok"] and bad["code"] == "unknown_path"

    # Bob waits; the promise settles when Alice lets go.
    cid = next(SdkClient._ids)
    await bob.send({"cmd": "acquire", "id": cid, "path": "connection", "wait": 10})
    await bob.wait_for(
        lambda e: e["event"] == "control" and e["message"]["type"] == "lock.acquired", what="alice's broadcast"
    )
    released = await alice.call("release", path="connection")
    assert released["ok"] and released["answer"]["type"] == "lock.release.ok"
    won = await bob.wait_for(lambda e: e["event"] == "result" and e["id"] == cid, what="bob's grant")
    assert won["ok"] and won["grant"]["fence"] > grant["grant"]["fence"]

    # Lock state observables on both sides, and the roster's locks.
    for client, mine in ((alice, False), (bob, True)):
        dump = await eventually_dump(
            client,
            lambda d: (
                [(lk["path"], lk["user_id"]) for lk in d["locks"]] == [("connection", "bob")]
                and any(p["user_id"] == "bob" and p["locks"] == ["connection"] for p in d["participants"])
            ),
            "bob holds connection everywhere",
        )
        assert dump["locks"][0]["mine"] is mine
    not_held = await alice.call("release", path="connection")
    assert not not_held["ok"] and not_held["code"] == "not_held"


async def test_a_held_lock_is_kept_alive_by_the_package(server, clients):
    """A 2 s lease outlives several TTLs while its idle holder's package pings (awareness renews every 15 s)."""
    alice = await clients(server.ws_url, "ds-keepalive", "alice")
    bob = await clients(server.ws_url, "ds-keepalive", "bob")
    grant = await alice.call("acquire", path="connection", ttl=2)
    assert grant["ok"] and grant["grant"]["ttl"] == 2
    # Bob queues for 7 s (3.5 TTLs): without the pings the lease would lapse and he would get it.
    refused = await bob.call("acquire", path="connection", wait=7, timeout=WAIT + 7)
    assert not refused["ok"] and refused["code"] == "conflict", refused
    assert not bob.controls("lock.expired") and not alice.controls("lock.expired")
    assert (await alice.call("release", path="connection"))["ok"]


async def test_rejected_edit_is_shown_to_its_author_only(server, clients):
    alice = await clients(server.ws_url, "ds-reject", "alice")
    bob = await clients(server.ws_url, "ds-reject", "bob")

    await alice.call("edit", path="connection.host", value="db.internal")
    await eventually_dump(
        bob, lambda d: d["config"].get("connection", {}).get("host") == "db.internal", "host reaches bob"
    )

    # Invalid: the port is out of range.
    await bob.call("edit", path="connection.port", value=99999)
    rejected = await bob.wait_for(
        lambda e: e["event"] == "control" and e["message"]["type"] == "rejected", what="rejected"
    )
    msg = rejected["message"]
    assert msg["reason"] == "invalid" and msg["paths"] == ["connection.port"]
    assert msg["errors"][0]["path"] == "connection.port" and msg["errors"][0]["type"] == "less_than_equal"
    # The compensating update reaches the author's document; the valid field stays.
    await eventually_dump(bob, lambda d: d["config"]["connection"] == {"host": "db.internal"}, "bob's copy restored")

    # Locked: Alice holds connection, Bob's edit of it is undone and he is told who holds it.
    assert (await alice.call("acquire", path="connection"))["ok"]
    await bob.wait_for(lambda e: e["event"] == "control" and e["message"]["type"] == "lock.acquired", what="lock seen")
    await bob.call("edit", path="connection.host", value="evil")
    locked = await bob.wait_for(
        lambda e: e["event"] == "control" and e["message"]["type"] == "rejected" and e["message"]["reason"] == "locked",
        what="rejected (locked)",
    )
    assert locked["message"]["paths"] == ["connection.host"] and locked["message"]["user_id"] == "alice"
    await eventually_dump(bob, lambda d: d["config"]["connection"]["host"] == "db.internal", "bob's host restored")
    # Saved still settles for the author: the refused update was stored (and reverted).
    assert (await bob.call("saved"))["ok"]
    assert alice.controls("rejected") == [], "only the author is told"


async def test_when_saved_means_durable(server, clients):
    alice = await clients(server.ws_url, "ds-saved", "alice")
    await alice.call("edit", path="name", value="Orders")
    await alice.call("edit", path="description", value="nightly")
    saved = await alice.call("saved")
    assert saved["ok"], saved
    assert saved["ack"]["updates"] >= 2 and saved["ack"]["seq"] >= 1
    sent_acks = alice.controls("saved")
    assert sent_acks and sent_acks[-1]["updates"] >= saved["ack"]["updates"]

    # Durable: survives kill -9; a fresh client sees it after the restart.
    server.kill()
    await alice.wait_for(lambda e: e["event"] == "status" and e["status"] == "disconnected", what="disconnected")
    server.restart()
    fresh = await clients(server.ws_url, "ds-saved", "carol")
    dump = await fresh.call("dump")
    assert dump["config"] == {"name": "Orders", "description": "nightly"}


async def test_when_saved_waits_for_a_reconnect_when_offline(server, clients):
    """Edits made while the server is down: whenSaved settles after the reconnect's sync stored them."""
    alice = await clients(server.ws_url, "ds-offline", "alice")
    server.stop()
    await alice.wait_for(lambda e: e["event"] == "status" and e["status"] == "disconnected", what="disconnected")
    await alice.call("edit", path="name", value="written offline")
    cid = next(SdkClient._ids)
    await alice.send({"cmd": "saved", "id": cid, "timeout": 30000})
    await asyncio.sleep(0)  # the promise is pending while the server is down (checked below)
    assert not any(e["event"] == "result" and e["id"] == cid for e in alice.events)
    server.restart()
    saved = await alice.wait_for(
        lambda e: e["event"] == "result" and e["id"] == cid, timeout=30, what="saved after reconnect"
    )
    assert saved["ok"], saved
    other = await clients(server.ws_url, "ds-offline", "bob")
    assert (await other.call("dump"))["config"] == {"name": "written offline"}


async def test_reconnect_after_server_restart(server, clients):
    alice = await clients(server.ws_url, "ds-restart", "alice")
    bob = await clients(server.ws_url, "ds-restart", "bob")
    assert (await alice.call("acquire", path="name"))["ok"]
    server.stop()
    for client in (alice, bob):
        await client.wait_for(lambda e: e["event"] == "status" and e["status"] == "disconnected", what="disconnected")
    # A closed connection holds no lease: the lock state drops this client's own.
    await eventually_dump(alice, lambda d: d["locks"] == [], "alice's lease gone locally")
    mark = len(alice.events)
    server.restart()
    for client in (alice, bob):
        await client.wait_for(
            lambda e: e["event"] == "control" and e["message"]["type"] == "welcome",
            timeout=30,
            what="welcome again",
            start=mark if client is alice else 0,
        )
    await alice.wait_for(lambda e: e["event"] == "synced" and e["synced"], start=mark, what="synced again")
    # Everything works on the new connections: locks, edits, roster.
    assert (await alice.call("acquire", path="name"))["ok"]
    await alice.call("edit", path="name", value="after restart")
    assert (await alice.call("saved"))["ok"]
    await eventually_dump(bob, lambda d: d["config"].get("name") == "after restart", "edit reaches bob")
    await eventually_dump(
        bob, lambda d: sorted(p["user_id"] for p in d["participants"]) == ["alice", "bob"], "roster after restart"
    )
    refused = await bob.call("acquire", path="name")
    assert not refused["ok"] and refused["code"] == "conflict"


async def test_token_refresh_in_jwt_mode(server_factory, clients):
    srv = server_factory(env=jwt_env(COLLAB_TOKEN_REFRESH_WINDOW="3", COLLAB_TOKEN_EXPIRY_GRACE="0.5"), name="jwt")
    alice = await clients(srv.ws_url, "ds-jwt", token_for="alice", ttl=5)
    first_ok = await alice.wait_for(
        lambda e: e["event"] == "control" and e["message"]["type"] == "auth.ok", what="auth.ok"
    )
    await alice.wait_for(
        lambda e: e["event"] == "control" and e["message"]["type"] == "auth.expiring", what="auth.expiring"
    )
    # The package asked for a fresh token and sent it on the same connection.
    refreshed = await alice.wait_for(
        lambda e: (
            e["event"] == "control"
            and e["message"]["type"] == "auth.ok"
            and e["message"]["expires_at"] > first_ok["message"]["expires_at"]
        ),
        what="auth.ok for the fresh token",
    )
    assert len(alice.tokens) >= 2
    # Past the first token's expiry and grace the connection is still the same one, and works.
    await alice.wait_for(
        lambda e: (
            e["event"] == "control"
            and e["message"]["type"] == "auth.ok"
            and e["message"]["expires_at"] > refreshed["message"]["expires_at"]
        ),
        timeout=20,
        what="a second refresh",
    )
    assert not [e for e in alice.events if e["event"] in ("connection-close", "closed")], "never disconnected"
    await alice.call("edit", path="name", value="still authorised")
    assert (await alice.call("saved"))["ok"]
    dump = await alice.call("dump")
    assert dump["user"]["id"] == "alice" and dump["status"] == "connected"


async def test_expired_token_gets_a_fresh_one_and_reconnects(server_factory, clients):
    """No fresh token in time: the server closes 4401; getToken() is asked again and the client reconnects."""
    srv = server_factory(env=jwt_env(COLLAB_TOKEN_REFRESH_WINDOW="1", COLLAB_TOKEN_EXPIRY_GRACE="0.2"), name="jwt")
    alice = await clients(srv.ws_url, "ds-jwt-expire", token_for="alice", ttl=3)
    alice.hold_tokens = True  # the refresh asked for on auth.expiring gets no answer in time
    await alice.wait_for(lambda e: e["event"] == "need_token", start=1, what="refresh request")
    await alice.wait_for(lambda e: e["event"] == "connection-close" and e["code"] == 4401, timeout=20, what="4401")
    mark = len(alice.events)
    alice.token_ttl = 300
    await alice.release_tokens()
    await alice.wait_for(lambda e: e["event"] == "synced" and e["synced"], timeout=30, start=mark, what="synced again")
    await alice.call("edit", path="name", value="back")
    assert (await alice.call("saved"))["ok"]
    assert (await alice.call("dump"))["status"] == "connected"


async def test_event_bus_bridge_receives_the_exact_sequence(server, clients):
    alice = await clients(server.ws_url, "ds-bus", "alice")
    await alice.call("bridge")
    await alice.wait_for(
        lambda e: e["event"] == "control" and e["message"]["type"] == "presence.snapshot", what="snapshot"
    )

    async def bus_len(n: int) -> None:
        await alice.wait_for(lambda e: len(alice.bus()) >= n, what=f"{n} bus events")

    bob = await clients(server.ws_url, "ds-bus", "bob")
    await bus_len(1)
    assert (await bob.call("acquire", path="connection"))["ok"]
    await bus_len(2)
    await bob.call("edit", path="name", value="Orders")
    await bus_len(4)
    assert (await bob.call("release", path="connection"))["ok"]
    await bus_len(5)
    await alice.call("edit", path="description", value="nightly import")
    await bus_len(6)
    await bob.close()
    await bus_len(7)
    # And nothing more arrives once the session is quiet.
    assert (await alice.call("saved"))["ok"]

    got = [(name, _essentials(name, payload)) for name, payload in alice.bus()]
    assert got == [
        ("collaboration:participant:joined", {"userId": "bob", "initial": False}),
        ("collaboration:data_source:locked", {"path": "connection", "userId": "bob", "mine": False}),
        ("collaboration:operation:broadcast", {"paths": ["name"], "local": False}),
        ("collaboration:data_source:updated", {"paths": ["name"], "local": False}),
        ("collaboration:data_source:unlocked", {"path": "connection", "userId": "bob", "reason": "release"}),
        ("collaboration:data_source:updated", {"paths": ["description"], "local": True}),
        ("collaboration:participant:left", {"userId": "bob"}),
    ]
    updated = alice.bus()[5][1]
    assert updated["dataSourceId"] == "ds-bus"
    assert updated["config"] == {"name": "Orders", "description": "nightly import"}
    assert updated["changes"] == [
        {"path": "description", "action": "add", "oldValue": None, "newValue": "nightly import"}
    ]


def _essentials(name: str, payload: dict[str, Any]) -> dict[str, Any]:
    if name.startswith("collaboration:participant:"):
        return {
            k: payload[k] for k in ("userId", "initial") if k in payload and (k != "initial" or name.endswith("joined"))
        }
    if name == "collaboration:data_source:locked":
        return {k: payload[k] for k in ("path", "userId", "mine")}
    if name == "collaboration:data_source:unlocked":
        return {k: payload[k] for k in ("path", "userId", "reason")}
    return {k: payload[k] for k in ("paths", "local")}


# ------------------------------------------------------------------ the README's React hook


async def test_readme_react_hook_runs_against_the_server(server):
    """js/README.md's ```jsx block, compiled and rendered (react-test-renderer) against a real server."""
    proc = await asyncio.create_subprocess_exec(
        NODE,
        "e2e/readme-hook.mjs",
        "--url",
        server.ws_url,
        cwd=SDK,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
    events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert proc.returncode == 0 and events[-1]["event"] == "passed", (events[-3:], err.decode()[-3000:])
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == ["compiled", "connected", "locked-by-other", "rejected", "edited", "unmounted"]
    assert events[0]["exports"] == ["HostField", "collabSettings", "useDataSourceCollaboration"]


async def test_forwarded_and_forward_failed_are_surfaced_with_their_paths(server_factory, clients, tmp_path):
    backend = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log").start()
    try:
        backend.post("/admin/rules", {"path": "description", "value": "REFUSE-ME", "status": 422})
        srv = server_factory(env={**FAST_FORWARDING, "COLLAB_BACKEND_URL": backend.url}, name="fwd")
        alice = await clients(srv.ws_url, "ds-fwd", "alice")
        await alice.call("edit", path="name", value="Orders")
        assert (await alice.call("saved"))["ok"]
        forwarded = await alice.wait_for(
            lambda e: e["event"] == "control" and e["message"]["type"] == "forwarded", what="forwarded"
        )
        assert forwarded["message"]["pending"] == 0 and forwarded["message"]["seq"] >= 1
        await alice.call("edit", path="description", value="REFUSE-ME")
        failed = await alice.wait_for(
            lambda e: e["event"] == "control" and e["message"]["type"] == "forward.failed", what="forward.failed"
        )
        assert failed["message"]["paths"] == ["description"] and failed["message"]["status"] == 422
        # The refused value is put back to the backend's state, in this client's document too.
        await eventually_dump(alice, lambda d: "description" not in d["config"], "refused description reverted")
        assert backend.data_source("ds-fwd")["config"] == {"name": "Orders"}
    finally:
        backend.stop()
