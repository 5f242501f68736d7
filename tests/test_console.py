"""The operator console (/admin) in headless Chromium (Debian's package, via playwright-core).

A scripted session: two users in a workspace, one holding a lock, a change
that became a dead letter while the backend was down. The console shows the
room, its peers, the lock and the dead letter; a force-release (mouse) and a
retry (keyboard) done from the page take effect. ``COLLAB_UPDATE_SCREENSHOT=1``
refreshes docs/console.png from this run.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pycrdt
import pytest

from collab.client import CollabClient
from tests.forwarding_support import FAST_FORWARDING, BackendProcess
from tests.support import ROOT, eventually, free_port
from tests.test_presence_panel import CHROMIUM, JS_DIR, NODE, Panel, pytestmark  # noqa: F401  (same needs)

WAIT = 15.0
ROOM = "ds-console"


class Console(Panel):
    """``node js/console.mjs``: a headless Chromium showing /admin."""

    async def start(self) -> Console:
        if not (JS_DIR / "node_modules" / "playwright-core").is_dir():
            pytest.fail(f"run `npm ci` in {JS_DIR}: playwright-core is missing")
        self.proc = await asyncio.create_subprocess_exec(
            NODE, "console.mjs", "--url", self.url, "--chromium", CHROMIUM, "--timeout", "90",
            cwd=JS_DIR, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, limit=1 << 22,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read())
        await self._until(lambda: any(e["event"] == "ready" for e in self.events), 30, "console ready")
        return self

    async def wait(self, selector: str, text: str | None = None, gone: bool = False) -> None:
        await self.command("wait", selector=selector, text=text, gone=gone, timeout=int(WAIT * 1000) - 1000)

    async def rows(self, table: str) -> list[list[str]]:
        return (await self.command("rows", table=table))["rows"]


async def test_console_shows_a_session_and_its_buttons_work(server_factory, tmp_path):
    backend = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log", port=free_port()).start()
    env = {**FAST_FORWARDING, "COLLAB_BACKEND_URL": backend.url, "COLLAB_FORWARD_DEAD_LETTER_SECONDS": "1"}
    server = server_factory(env=env)
    alice = await CollabClient(server.ws_url, ROOM, hello=True, query="user=alice&name=Alice").connect(timeout=WAIT)
    bob = await CollabClient(server.ws_url, ROOM, hello=True, query="user=bob&name=Bob").connect(timeout=WAIT)
    console = None
    try:
        granted = await alice.acquire_lock("connection.host", ttl=120)
        assert granted["type"] == "lock.granted", granted
        config = alice.doc.get("config", type=pycrdt.Map)
        config["name"] = "Orders"
        await alice.wait_saved(WAIT)
        await alice.until(lambda: any(m["type"] == "forwarded" for m in alice.control), WAIT, "forwarded")
        # The backend goes away: the next change dead-letters after 1 s of failures.
        backend.stop()
        config["name"] = "Orders DB"
        await alice.wait_saved(WAIT)
        await alice.until(lambda: any(m["type"] == "forward.dead" for m in alice.control), WAIT, "dead letter")
        backend.restart()

        console = await Console(f"{server.http_url}/admin?user=ops&role=admin").start()
        # Rooms, peers, participants, the lock, the forwarding queue, the dead letter, the audit.
        await console.wait("#rooms tbody tr", ROOM)
        rooms = await console.rows("rooms")
        assert rooms[0][0] == ROOM and "alice" in rooms[0][1] and "bob" in rooms[0][1], rooms
        await console.wait("#participants tbody tr", "Bob")
        await console.wait("#locks tbody tr[data-lock]", "connection.host")
        locks = await console.rows("locks")
        assert locks[0][:3] == [ROOM, "connection.host", "Alice (alice)"], locks
        await console.wait("#dead tbody tr[data-dead]", "name")
        forwarding = await console.rows("forwarding")
        assert forwarding[0][0] == ROOM and forwarding[0][4] == "1", forwarding  # one dead letter
        audit = "\n".join(" | ".join(row) for row in await console.rows("audit"))
        # Old -> new values, newest first.
        assert 'Alice | accepted | name "Orders" → "Orders DB"' in audit, audit
        assert 'Alice | accepted | name → "Orders"' in audit, audit
        if os.environ.get("COLLAB_UPDATE_SCREENSHOT"):
            await console.command("screenshot", path=str(ROOT / "docs" / "console.png"))

        # Force-release with the mouse: the holder hears it, the lock is gone everywhere.
        await console.command("click", selector='button[data-action="release"][data-path="connection.host"]')
        await console.wait("#locks tbody tr[data-lock]", gone=True)
        await alice.until(
            lambda: any(m["type"] == "lock.released" and m.get("reason") == "forced" for m in alice.control),
            WAIT,
            "forced release at the holder",
        )
        admin = httpx.get(f"{server.http_url}/api/admin/rooms/{ROOM}?user=ops&role=admin", timeout=5).json()
        assert admin["locks"] == []
        assert "released" in (await console.command("text", selector="#status"))["text"]

        # Retry from the keyboard: focus the button, press Enter; the change reaches the backend.
        await console.command("press", selector='button[data-action="retry"]', key="Enter")
        await console.wait("#dead tbody tr[data-dead]", gone=True)

        def at_backend():
            source = backend.data_source(ROOM)
            return source is not None and source["config"].get("name") == "Orders DB"

        await eventually(at_backend, WAIT, what="the retried change at the backend")
        await console.wait("#forwarding tbody tr[data-forwarding] td:nth-child(5)", "0")
        assert console.page_errors() == []
    finally:
        if console is not None:
            await console.stop()
        await alice.close()
        await bob.close()
        backend.stop()


async def test_console_needs_the_admin_role(server):
    for query in ("", "?user=eve&role=editor"):
        page = httpx.get(f"{server.http_url}/admin{query}", timeout=5)
        assert page.status_code in (401, 403), page.text
        data = httpx.get(f"{server.http_url}/api/admin/console{query}", timeout=5)
        assert data.status_code in (401, 403) and "error" in data.json()
    ok = httpx.get(f"{server.http_url}/api/admin/console?user=ops&role=admin", timeout=5)
    assert ok.status_code == 200 and ok.json()["rooms"] == []


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_console_lists_dead_letters_nobody_has_open(server_factory, redis_factory, tmp_path, store):
    backend = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log", port=free_port()).start()
    env = {**FAST_FORWARDING, "COLLAB_BACKEND_URL": backend.url, "COLLAB_FORWARD_DEAD_LETTER_SECONDS": "1",
           "COLLAB_ROOM_IDLE_SECONDS": "0"}  # fmt: skip
    if store == "redis":
        env["COLLAB_REDIS_URL"] = redis_factory().url
    server = server_factory(env=env)
    try:
        async with CollabClient(server.ws_url, "ds-gone", hello=True, query="user=carol") as carol:
            backend.stop()
            carol.doc.get("config", type=pycrdt.Map)["name"] = "lost?"
            await carol.wait_saved(WAIT)
            await carol.until(lambda: any(m["type"] == "forward.dead" for m in carol.control), WAIT, "dead letter")
        url = f"{server.http_url}/api/admin/console?user=ops&role=admin"

        def listed():
            body = httpx.get(url, timeout=5).json()
            if body["rooms"]:
                return None  # the room is still in memory
            return {w["workspace"]: w for w in body["forwarding"]["workspaces"]}

        workspaces = await eventually(listed, WAIT, what="the room evicted")
        assert [d["paths"] for d in workspaces["ds-gone"]["dead"]] == [["name"]]
        assert workspaces["ds-gone"]["audit"][0]["kind"] == "dead_lettered"
        assert httpx.get(url, timeout=5).json()["forwarding"]["totals"]["dead"] == 1
    finally:
        backend.stop()


def test_console_in_jwt_mode_takes_the_token_from_its_address(server_factory):
    """A browser sends no Authorization header when it navigates: /admin?token=... (the page passes it on)."""
    from tests.security_support import jwt_env, make_token

    server = server_factory(env=jwt_env())
    admin = make_token("root", {"*": "admin"})
    editor = make_token("ed", {"*": "editor"})
    page = httpx.get(f"{server.http_url}/admin", params={"token": admin}, timeout=5)
    assert page.status_code == 200 and "new URLSearchParams(location.search)" in page.text  # the script, inlined
    assert httpx.get(f"{server.http_url}/api/admin/console", params={"token": admin}, timeout=5).status_code == 200
    for params in ({"token": editor}, {}, {"user": "ops", "role": "admin"}):
        assert httpx.get(f"{server.http_url}/admin", params=params, timeout=5).status_code in (401, 403), params
    landing = httpx.get(f"{server.http_url}/", timeout=5).text
    assert 'href="/admin"' in landing and "?user=" not in landing  # no development hints in jwt mode
