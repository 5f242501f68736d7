"""Soak the differential test: many seeds of stock-client sessions, then kill -9 and verify.

    python -m loadtest textfuzz --spawn-server --seeds 200 [--clients 3] [--steps 300] [--parallel 2]

Each seed runs ``js/differential.mjs`` (stock ``yjs`` + ``y-websocket``
clients making random edits with real text) in its own room; Yjs is the
oracle for what the server must hold. With ``--spawn-server`` the server is
then killed with SIGKILL (by its PID), restarted on the same data directory,
and every room is checked again. Only loopback targets; every session has a
hard timeout, so the command always ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.fanout import TargetError, check_target

JS_DIR = Path(__file__).resolve().parent.parent / "js"


async def run_seed(url: str, room: str, seed: int, clients: int, steps: int, extra: list[str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        shutil.which("node") or "node", "differential.mjs", "--url", url, "--room", room, "--seed", str(seed),
        "--clients", str(clients), "--steps", str(steps), "--timeout", "120", *extra,
        cwd=JS_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 150)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return {"ok": False, "seed": seed, "problems": ["session did not end within 150 s"]}
    lines = out.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else {"ok": False, "seed": seed, "problems": ["no output"]}


async def barrier(url: str, room: str) -> None:
    """Everything the room received is stored once a fresh `saved` ack arrives."""
    from collab.client import CollabClient

    async with CollabClient(url, room, hello=True) as client:
        await client.wait_saved(30)


async def soak(args: argparse.Namespace, url: str, restart) -> dict[str, Any]:
    seeds = list(range(args.start, args.start + args.seeds))
    outdir = Path(tempfile.mkdtemp(prefix="textfuzz-"))
    sem = asyncio.Semaphore(args.parallel)
    started = time.monotonic()

    async def one(seed: int) -> dict[str, Any]:
        async with sem:
            out = ["--out", str(outdir / f"{seed}.json")]
            result = await run_seed(url, f"fuzz-{seed}", seed, args.clients, args.steps, out)
            if not args.quiet:
                print(f"seed {seed}: {'ok' if result['ok'] else result['problems']}", file=sys.stderr)
            return result

    results = await asyncio.gather(*(one(s) for s in seeds))
    report: dict[str, Any] = {
        "seeds": len(seeds),
        "failed": [r for r in results if not r["ok"]],
        "replacement_chars": sum(r.get("replacement", 0) for r in results),
        "session_seconds": round(time.monotonic() - started, 1),
    }
    if restart is not None:
        for seed in seeds:
            await barrier(url, f"fuzz-{seed}")
        url = await asyncio.to_thread(restart)
        after = []
        for seed in seeds:
            if (outdir / f"{seed}.json").exists():
                extra = ["--expect", str(outdir / f"{seed}.json")]
                after.append(await run_seed(url, f"fuzz-{seed}", seed, args.clients, args.steps, extra))
        report["failed_after_restart"] = [r for r in after if not r["ok"]]
    shutil.rmtree(outdir, ignore_errors=True)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest textfuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="server websocket base URL (rooms are URL/<name>)")
    parser.add_argument("--spawn-server", action="store_true", help="start our server, kill -9 and restart it")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--start", type=int, default=1, help="first seed")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=2, help="sessions at once")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    server = None
    restart = None
    if args.spawn_server:
        from loadtest.serve import PinnedServer

        data = tempfile.mkdtemp(prefix="textfuzz-data-")
        server = PinnedServer(cpu=None, data_dir=data).start()
        url = server.ws_url

        def restart() -> str:
            nonlocal server
            os.kill(server.pid, signal.SIGKILL)
            server.proc.wait(10)
            server = PinnedServer(cpu=None, data_dir=data, port=server.port).start()
            return server.ws_url
    elif args.url:
        url = args.url
    else:
        print("--url or --spawn-server is required", file=sys.stderr)
        return 2
    try:
        check_target(url, allow_remote=False)
        report = asyncio.run(soak(args, url, restart))
    except TargetError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.data_dir, ignore_errors=True)
    failures = len(report["failed"]) + len(report.get("failed_after_restart", []))
    print(
        f"textfuzz: {report['seeds']} seeds, {len(report['failed'])} failed, "
        f"{len(report.get('failed_after_restart', []))} failed after kill -9 + restart, "
        f"{report['replacement_chars']} U+FFFD from cut pairs, {report['session_seconds']} s of sessions"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return 1 if failures else 0
