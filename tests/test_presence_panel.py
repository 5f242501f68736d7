"""The participant-awareness panel page in headless Chromium (Debian's package, via playwright-core).

The server runs in this process (so the test can also fire the locks hook);
``js/panel.mjs`` drives the browser. Set ``COLLAB_UPDATE_SCREENSHOT=1`` to
refresh ``docs/presence-panel.png`` from this run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from collab.app import create_app
from collab.settings import Settings
from tests.presence_support import close_all, person, roster_of
from tests.support import ROOT, eventually

NODE = shutil.which("node")
CHROMIUM = os.environ.get("COLLAB_CHROMIUM", "/usr/bin/chromium")
JS_DIR = ROOT / "js"
WAIT = 15.0

pytestmark = pytest.mark.skipif(
    NODE is None or not Path(CHROMIUM).exists(),
    reason="needs node and Debian's chromium (`make deps-test` installs both)",
)


class Panel:
    """``node js/panel.mjs``: a headless Chromium showing the panel page."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._ids = iter(range(1, 1_000_000))
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None

    async def start(self) -> Panel:
        if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
            pytest.fail(f"run `npm ci` in {JS_DIR}: playwright-core is missing")
        self.proc = await asyncio.create_subprocess_exec(
            NODE, "panel.mjs", "--url", self.url, "--chromium", CHROMIUM, "--timeout", "90",
            cwd=JS_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=1 << 22,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        await self._until(lambda: any(e["event"] == "ready" for e in self.events), 30, "panel ready")
        return self

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
            self._changed.set()
        self.stderr = await self.proc.stderr.read()
        self._changed.set()

    async def _until(self, predicate, timeout: float, what: str) -> None:
        async def loop():
            while not predicate():
                if self._reader.done():
                    raise AssertionError(f"panel driver exited waiting for {what}: {self.events[-5:]} {self.stderr!r}")
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(loop(), timeout)
        except TimeoutError:
            raise TimeoutError(f"timed out waiting for {what}; last events {self.events[-5:]}") from None

    async def command(self, cmd: str, **fields: Any) -> dict[str, Any]:
        cid = next(self._ids)
        self.proc.stdin.write((json.dumps({"cmd": cmd, "id": cid, **fields}) + "\n").encode())
        await self.proc.stdin.drain()
        reply: dict[str, Any] = {}

        def answered() -> bool:
            for e in self.events:
                if e.get("id") != cid:
                    continue
                if e["event"] == "error":
                    raise AssertionError(f"panel: {cmd} failed: {e['message']}")
                if e["event"] == "ack":
                    return True
                reply.update(e)
            return False

        await self._until(answered, WAIT, cmd)
        return reply

    async def wait_user(self, user: str, present: bool = True) -> None:
        await self.command("wait_user", user=user, present=present, timeout=int(WAIT * 1000) - 1000)

    def page_errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == "console"]

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), 10)
        if self._reader:
            await asyncio.wait_for(self._reader, 5)


@contextlib.asynccontextmanager
async def in_process_server(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", port=0, log_level="warning")
    settings.data_dir.mkdir()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="websockets-sansio"))
    task = asyncio.create_task(server.serve())

    def started() -> bool:
        assert not task.done(), "server failed to start"
        return server.started

    await eventually(started, 10, what="the in-process server started")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield app.state.core, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/ws"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def test_panel_shows_participants_focus_locks_and_live_joins_and_leaves(tmp_path):
    ws = "ds-panel"
    async with in_process_server(tmp_path) as (core, http_url, ws_url):
        alice = await person(ws_url, ws, "alice")
        await alice.set_awareness({"focus": "connection.host"})
        bob = await person(ws_url, ws, "bob")
        await bob.set_awareness({"focus": "schedule.cron"})
        carol = await person(ws_url, ws, "carol")
        carol_tab = await person(ws_url, ws, "carol")
        await alice.until(lambda: (roster_of(alice.control).get("carol") or {}).get("connections") == 2, 5, "carol")

        panel = await Panel(f"{http_url}/workspaces/{ws}?user=viewer").start()
        try:
            for user in ("alice", "bob", "carol"):
                await panel.wait_user(user)
            state = await panel.command("state")
            shown = {p["user_id"]: p for p in state["participants"]}
            assert set(shown) == {"alice", "bob", "carol"}  # the viewer itself is not a participant
            assert shown["alice"]["editing"] == "connection.host"
            assert shown["bob"]["editing"] == "schedule.cron"
            assert shown["carol"]["connections"] == 2 and shown["carol"]["editing"] is None

            # The locks feature reports a lock: a lock icon on the holder's card.
            room = core.rooms.rooms[ws]
            lock = {"path": "connection.host", "user_id": "alice", "holder": "x", "fence": 1, "expires_at": None}
            room.notify("on_locks_changed", [lock])
            await panel.command("wait_text", selector='li[data-user-id="alice"] .locks', text="connection.host")

            # Live join and leave.
            dave = await person(ws_url, ws, "dave")
            await dave.set_awareness({"focus": "connection.port"})
            await panel.wait_user("dave")
            await panel.command("wait_text", selector="#feed", text="Dave joined")
            await bob.close()
            await panel.wait_user("bob", present=False)
            await panel.command("wait_text", selector="#feed", text="Bob left")
            await panel.command("wait_text", selector='li[data-user-id="dave"]', text="connection.port")

            state = await panel.command("state")
            assert [p["user_id"] for p in state["participants"]] == ["alice", "carol", "dave"]
            assert state["status"] == "live"
            assert {(f["kind"], f["user_id"]) for f in state["feed"]} >= {("join", "dave"), ("leave", "bob")}
            shot = tmp_path / "presence-panel.png"
            await panel.command("screenshot", path=str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("COLLAB_UPDATE_SCREENSHOT"):
                shutil.copy(shot, ROOT / "docs" / "presence-panel.png")
            assert panel.page_errors() == []
        finally:
            await panel.stop()
            await close_all(alice, carol, carol_tab, dave)
