"""The client package in headless Chromium: esbuild bundles js/sdk/e2e/page.js into a
test page, and js/sdk/e2e/browser.mjs drives two browser contexts with playwright-core
(lock contention, a rejected edit shown to its author, reconnect after a server restart).

A browser that cannot start fails these tests; they never skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal

from tests.support import ROOT

NODE = shutil.which("node") or "node"
SDK = ROOT / "js" / "sdk"
CHROMIUM = os.environ.get("COLLAB_TEST_CHROMIUM", "/usr/bin/chromium")


async def _run_browser_script(server, chromium: str = CHROMIUM, timeout: float = 150.0) -> list[dict]:
    proc = await asyncio.create_subprocess_exec(
        NODE,
        "e2e/browser.mjs",
        "--server",
        server.http_url,
        "--chromium",
        chromium,
        "--timeout",
        "140",
        cwd=SDK,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    events: list[dict] = []
    try:
        async with asyncio.timeout(timeout):
            while line := await proc.stdout.readline():
                event = json.loads(line)
                events.append(event)
                if event["event"] == "need_restart":
                    server.stop()
                    server.restart()
                    proc.stdin.write(b'{"cmd": "restarted"}\n')
                    await proc.stdin.drain()
            await proc.wait()
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
    stderr = (await proc.stderr.read()).decode(errors="replace")
    events.append({"event": "exit", "code": proc.returncode, "stderr": stderr[-3000:]})
    return events


async def test_package_in_chromium_locks_rejections_and_restart(server):
    events = await _run_browser_script(server)
    names = [e["event"] for e in events]
    assert events[-1]["code"] == 0 and "passed" in names, events[-4:]
    assert [e["step"] for e in events if e["event"] == "step"] == ["locks", "rejected", "restart"]
    assert next(e for e in events if e["event"] == "bundled")["bytes"] > 10_000


async def test_a_browser_that_cannot_start_fails(server, tmp_path):
    """The failure mode `make test` relies on: no browser is an error with a clear message, not a skip."""
    events = await _run_browser_script(server, chromium=str(tmp_path / "no-chromium-here"), timeout=60)
    assert events[-1]["code"] == 2, events
    failed = [e for e in events if e["event"] == "failed"]
    assert failed and "the browser did not start" in failed[0]["error"]
