"""The server's document against Yjs itself, with the stock clients and real text.

js/differential.mjs runs stock Yjs + y-websocket clients making seeded
random concurrent edits (emoji, ZWJ sequences, combining marks, other
scripts; deletes of random UTF-16 ranges that cut surrogate pairs; maps,
arrays, XML text; pauses and disconnects). Yjs is the oracle: the clients
must converge, and a fresh Yjs document built from the server's full state
must load and equal theirs -- after a ``kill -9`` and restart too.
More seeds: ``python -m loadtest textfuzz``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3

import httpx
import pytest

from collab.client import CollabClient
from tests.support import ROOT
from tests.test_js_client import node_clients  # noqa: F401  (fixture)

NODE = shutil.which("node")
SEEDS = range(1, 11)


async def run_differential(ws_url: str, room: str, seed: int, *extra: str, timeout: float = 90) -> dict:
    proc = await asyncio.create_subprocess_exec(
        NODE, "differential.mjs", "--url", ws_url, "--room", room, "--seed", str(seed), "--timeout", "75", *extra,
        cwd=ROOT / "js", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = out.decode().strip().splitlines()
    assert lines, f"differential.mjs printed nothing (exit {proc.returncode}):\n{err.decode()[-3000:]}"
    result = json.loads(lines[-1])
    result["stderr"] = err.decode()[-3000:]
    return result


async def durable(server, room: str) -> None:
    """Wait until everything the room received is stored: a `saved` ack comes after all earlier appends."""
    async with CollabClient(server.ws_url, room, hello=True) as barrier:
        await barrier.wait_saved(15)


async def test_stock_clients_and_server_agree_on_random_edits_and_after_kill_9(server, tmp_path):
    assert NODE, "node is required for the stock-client tests"
    results = {}
    for seed in SEEDS:
        room = f"diff-{seed}"
        results[seed] = await run_differential(server.ws_url, room, seed, "--out", str(tmp_path / f"{seed}.json"))
    failed = {s: r for s, r in results.items() if not r["ok"]}
    assert not failed, json.dumps(failed, ensure_ascii=False)[:6000]
    # The sessions really cut pairs (U+FFFD appeared) and kept some whole.
    assert sum(r["replacement"] for r in results.values()) > 0
    assert sum(r["astral"] for r in results.values()) > 0

    async with httpx.AsyncClient(timeout=30) as http:
        for seed in SEEDS:
            await durable(server, f"diff-{seed}")
            check = (await http.get(f"{server.http_url}/api/admin/rooms/diff-{seed}/consistency?role=admin")).json()
            assert check["well_formed"] and check["memory"]["problems"] == [] == check["store"]["problems"], check
    server.kill()
    server.restart()
    for seed in SEEDS:
        result = await run_differential(server.ws_url, f"diff-{seed}", seed, "--expect", str(tmp_path / f"{seed}.json"))
        assert result["ok"], json.dumps(result, ensure_ascii=False)[:6000]


async def test_late_joiner_gets_the_text_after_a_split_emoji(server, node_clients):  # noqa: F811
    """insert(0, 'a🙂b'); delete(2, 1): Yjs shows 'a�b' -- and so must a late joiner, also after kill -9."""
    a = await node_clients(server.ws_url, "ds-emoji", "a")
    await a.command("text_insert", text="text", index=0, content="a🙂b")
    await a.command("text_delete", text="text", index=2, length=1)
    await a.until(lambda: a.doc["text"] == "a\ufffdb", what="a's own text")
    c = await node_clients(server.ws_url, "ds-emoji", "c")
    assert c.synced_docs[-1]["text"] == "a\ufffdb"

    await durable(server, "ds-emoji")
    server.kill()
    server.restart()
    d = await node_clients(server.ws_url, "ds-emoji", "d")
    assert d.synced_docs[-1]["text"] == "a\ufffdb"
    for client in (a, c, d):
        client.assert_clean()


@pytest.mark.parametrize("mode", ["astral", "bmp"])
async def test_fresh_document_after_many_cuts_loads_in_yjs(server, tmp_path, mode):
    """One more seed per alphabet, so a failure says whether astral text is the cause."""
    extra = ["--clients", "2", "--steps", "120"] + (["--bmp-only", "1"] if mode == "bmp" else [])
    result = await run_differential(server.ws_url, f"alpha-{mode}", 42, *extra)
    assert result["ok"], json.dumps(result, ensure_ascii=False)[:4000]
    if mode == "bmp":
        assert result["astral"] == 0


async def test_snapshots_written_by_compaction_load_in_yjs(server_factory, tmp_path):
    """Compaction every 10 updates: what a restart loads is mostly snapshots of the rebuilt document."""
    server = server_factory(env={"COLLAB_COMPACT_EVERY_UPDATES": "10"}, name="compacting")
    for seed in (101, 102):
        result = await run_differential(server.ws_url, f"snap-{seed}", seed, "--out", str(tmp_path / f"{seed}.json"))
        assert result["ok"], json.dumps(result, ensure_ascii=False)[:4000]
        await durable(server, f"snap-{seed}")
    server.kill()
    server.restart()
    for seed in (101, 102):
        result = await run_differential(server.ws_url, f"snap-{seed}", seed, "--expect", str(tmp_path / f"{seed}.json"))
        assert result["ok"], json.dumps(result, ensure_ascii=False)[:4000]
    with sqlite3.connect(server.data_dir / "collab.sqlite3") as db:
        snapshots = db.execute("SELECT COUNT(*) FROM documents WHERE snapshot IS NOT NULL").fetchone()[0]
    assert snapshots == 2  # both rooms were compacted at least once
