"""First contact, as a new user meets it: the landing page at /, the README's
"your first edit" with the stock client, and the log lines for closes, refusals
and forwarding (one each, naming the workspace and the user)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import httpx
import pycrdt
import pytest

from collab.client import CollabClient
from tests.forwarding_support import FAST_FORWARDING, BackendProcess
from tests.support import ROOT, eventually

NODE = shutil.which("node")
WAIT = 15.0


def test_landing_page_links_where_to_go(server):
    page = httpx.get(server.http_url + "/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    for link in ('href="/admin', 'href="/metrics"', "/workspaces/", 'href="/docs/operations.md"',
                 'href="/docs/configuration.md"', 'href="/openapi.json"'):  # fmt: skip
        assert link in text, link
    assert f"ws://127.0.0.1:{server.port}/ws/&lt;workspace&gt;" in text
    assert "{{" not in text  # every placeholder filled
    doc = httpx.get(server.http_url + "/docs/configuration.md", timeout=5)
    assert doc.status_code == 200 and "COLLAB_PORT" in doc.text
    assert httpx.get(server.http_url + "/docs/..%2Fpyproject.toml", timeout=5).status_code == 404
    assert httpx.get(server.http_url + "/docs/nope.md", timeout=5).status_code == 404


def readme_first_edit() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Your first edit", 1)[1]
    return re.search(r"```js\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(NODE is None, reason="needs node (`make deps-test`)")
async def test_readme_first_edit_and_the_log_lines(server_factory, tmp_path):
    if not (ROOT / "js" / "node_modules" / "y-websocket").is_dir():
        pytest.fail("run `make js`: the stock client is missing")
    backend = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log").start()
    try:
        server = server_factory(env={"COLLAB_BACKEND_URL": backend.url, "COLLAB_LOG_LEVEL": "info", **FAST_FORWARDING})
        code = readme_first_edit()
        assert code.count("\n") == 5, "the README promises five lines"
        script = ROOT / "js" / f".first-edit-test-{os.getpid()}.mjs"  # in js/ so node finds its modules
        script.write_text(code.replace("127.0.0.1:8765", f"127.0.0.1:{server.port}"))
        try:
            done = subprocess.run([NODE, script.name], cwd=script.parent, capture_output=True, text=True, timeout=30)
        finally:
            script.unlink()
        assert done.returncode == 0, done.stderr

        admin = f"{server.http_url}/api/admin/rooms/ds-1/config?user=ops&role=admin"
        config = httpx.get(admin, timeout=5).json()["config"]
        assert config["type"] == "postgresql"
        assert config["connection"] == {"host": "db.internal", "port": 5432}

        def at_backend():
            reply = httpx.get(f"{backend.url}/data-sources/ds-1", timeout=5)
            return reply.status_code == 200 and reply.json()["config"].get("connection", {}).get("port") == 5432

        await eventually(at_backend, WAIT, what="the first edit at the backend")

        # The obvious mistake: refused, reverted, logged with who and what.
        async with CollabClient(server.ws_url, "ds-1", query="user=bob&role=editor", hello=True) as bob:
            bob.doc.get("config", type=pycrdt.Map)["type"] = "postgres"
            await bob.until(lambda: any(m["type"] == "rejected" for m in bob.control), WAIT, "rejection")
            await bob.until(lambda: bob.doc.get("config", type=pycrdt.Map)["type"] == "postgresql", WAIT, "revert")

        def logged():
            log = server.log()
            lines = [
                "forwarded workspace=ds-1 user=alice",
                "refused change workspace=ds-1 user=bob paths=type",
                "closed workspace=ds-1 user=alice",
                "closed workspace=ds-1 user=bob",
            ]
            return all(line in log for line in lines)

        await eventually(logged, WAIT, what=f"log lines, got:\n{server.log()}")
        for line in server.log().splitlines():
            if "closed workspace=ds-1 user=bob" in line:
                assert " INFO " in line
    finally:
        backend.stop()
