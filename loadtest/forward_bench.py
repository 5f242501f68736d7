"""Forwarding benchmark: lag at a steady rate, then the drain of a backlog after a backend outage.

    python -m loadtest.forward_bench [--workspaces 50] [--rate 100] [--steady 60] [--outage 60]
                                     [--debounce-ms 500] [--max-delay-ms 5000] [--batch-max 200] [--no-pin]

It starts, as processes it owns, the reference backend (``python -m
refbackend``) and the collaboration server (``python -m collab serve``) with
``COLLAB_BACKEND_URL`` pointing at it, then connects one client per workspace
and makes ``--rate`` configuration changes per second spread round-robin over
the workspaces:

1. **steady** (``--steady`` seconds): forwarding lag of every change, from
   the moment the room accepted it (audit ``at``) to the moment the backend's
   2xx reached the server (audit ``forwarded_at``), both on the server's
   clock, read from the server's SQLite file; p50/p90/p99/max.
2. **outage** (``--outage`` seconds): the backend is stopped (SIGTERM) while
   the same load goes on; every change piles up in the outbox.
3. **drain**: the load stops, the backend is started again on the same port;
   the time until the outbox is empty gives the drain rate (changes/s and
   requests/s).

At the end every workspace's configuration at the backend is compared with
the last value written, and the backend's log of applied requests is checked
for gaps and double application.

By default the server runs on CPU 0, the backend and this load generator on
CPU 1 (``--no-pin`` to leave scheduling alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pycrdt

from collab.client import CollabClient
from procs import ManagedProcess

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """A server or backend we start for the run (a procs.ManagedProcess), optionally pinned to one CPU."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, pattern: str, cpu: int | None):
        self.name, self.argv, self.env, self.log_path, self.cpu = name, argv, env, log, cpu
        self.child = ManagedProcess(
            argv,
            name=name,
            log_path=log,
            env={"PYTHONUNBUFFERED": "1", **env},
            cwd=ROOT,
            ready_log=pattern,
            cpus={cpu} if cpu is not None else None,
            stop_timeout=15,
        )
        self.argv = self.child.argv  # the same list: the caller edits it to restart on the same port
        self.port: int | None = None

    @property
    def proc(self):
        return self.child.proc

    def start(self, timeout: float = 30.0) -> Proc:
        self.child.start(timeout)
        self.port = self.child.port
        return self

    def stop(self) -> None:
        self.child.stop()

    def cpu_seconds(self) -> float:
        return self.child.cpu_seconds()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def outbox_pending(db_path: Path) -> int:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        return db.execute("SELECT COUNT(*) FROM outbox WHERE state='pending'").fetchone()[0]


async def make_changes(clients: list[CollabClient], rate: float, seconds: float, counter: list[int]) -> None:
    """``rate`` changes per second, round-robin over the clients, on a fixed schedule."""
    start = time.monotonic()
    n = int(rate * seconds)
    for _ in range(n):
        i = counter[0]
        client = clients[i % len(clients)]
        client.doc.get("config", type=pycrdt.Map)["description"] = f"change {i}"
        counter[0] += 1
        await client.flush()
        delay = start + (i - counter[1] + 1) / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="forward-bench-"))
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    backend = Proc(
        "refbackend",
        [sys.executable, "-m", "refbackend", "--port", "0", "--db", str(work / "backend.sqlite3")],
        {},
        work / "backend.log",
        r"refbackend listening on http://[\d.]+:(\d+)",
        1 if pin else None,
    ).start()
    backend_url = f"http://127.0.0.1:{backend.port}"
    backend.argv[backend.argv.index("--port") + 1] = str(backend.port)  # restart on the same port
    server = Proc(
        "collab",
        [sys.executable, "-m", "collab", "serve", "--port", "0", "--data-dir", str(work / "data")],
        {
            "COLLAB_BACKEND_URL": backend_url,
            "COLLAB_LOG_LEVEL": "warning",
            "COLLAB_FORWARD_DEBOUNCE_MS": str(args.debounce_ms),
            "COLLAB_FORWARD_MAX_DELAY_MS": str(args.max_delay_ms),
            "COLLAB_FORWARD_BACKOFF_MAX_MS": str(args.backoff_max_ms),
            "COLLAB_FORWARD_BATCH_MAX": str(args.batch_max),
        },
        work / "server.log",
        r"listening on http://[\d.]+:(\d+)",
        0 if pin else None,
    ).start()
    ws_url = f"ws://127.0.0.1:{server.port}/ws"
    db_path = work / "data" / "collab.sqlite3"
    names = [f"bench-ds-{i}" for i in range(args.workspaces)]
    clients = [await CollabClient(ws_url, name, hello=True).connect(timeout=30) for name in names]
    counter = [0, 0]  # changes made, index offset of the current phase
    result: dict[str, Any] = {"workdir": str(work)}
    try:
        # 1. steady state
        steady_start = time.time()
        cpu0 = server.cpu_seconds()
        await make_changes(clients, args.rate, args.steady, counter)
        steady_end = time.time()
        cpu1 = server.cpu_seconds()
        for client in clients:
            await client.wait_saved(30)
        settle = time.monotonic() + args.max_delay_ms / 1000 + 30
        while outbox_pending(db_path) and time.monotonic() < settle:
            await asyncio.sleep(0.1)
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            lags = [
                r[0]
                for r in db.execute(
                    "SELECT forwarded_at - at FROM audit WHERE kind='accepted' AND forwarded_at IS NOT NULL "
                    "AND at BETWEEN ? AND ?",
                    (steady_start, steady_end),
                )
            ]
            steady_changes = db.execute(
                "SELECT COUNT(*) FROM audit WHERE kind='accepted' AND at BETWEEN ? AND ?", (steady_start, steady_end)
            ).fetchone()[0]
        stats_before = httpx.get(f"{backend_url}/admin/stats", timeout=10).json()
        result["steady"] = {
            "changes": steady_changes,
            "forwarded": len(lags),
            "achieved_rate": steady_changes / (steady_end - steady_start),
            "lag_p50_ms": percentile(lags, 0.50) * 1000,
            "lag_p90_ms": percentile(lags, 0.90) * 1000,
            "lag_p99_ms": percentile(lags, 0.99) * 1000,
            "lag_max_ms": max(lags) * 1000 if lags else None,
            "lag_mean_ms": statistics.fmean(lags) * 1000 if lags else None,
            "backend_requests": stats_before["outcomes"].get("applied", 0),
            "server_cpu_percent": 100 * (cpu1 - cpu0) / (steady_end - steady_start),
        }
        print(json.dumps({"steady": result["steady"]}), flush=True)

        # 2. outage under the same load
        if args.outage > 0:
            backend.stop()
            counter[1] = counter[0]
            outage_start = time.monotonic()
            outage_wall = time.time()
            await make_changes(clients, args.rate, args.outage, counter)
            for client in clients:
                await client.wait_saved(60)
            backlog = outbox_pending(db_path)
            outage_seconds = time.monotonic() - outage_start
            # 3. drain (the load has stopped)
            backend.start()
            ready_wall = time.time()
            drain_start = time.monotonic()
            while outbox_pending(db_path):
                if time.monotonic() - drain_start > 600:
                    raise RuntimeError("the backlog did not drain within 600 s")
                await asyncio.sleep(0.05)
            drain_seconds = time.monotonic() - drain_start
            with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
                first_ack, last_ack = db.execute(
                    "SELECT MIN(forwarded_at), MAX(forwarded_at) FROM audit WHERE kind='accepted' AND at >= ?",
                    (outage_wall,),
                ).fetchone()
            stats_after = httpx.get(f"{backend_url}/admin/stats", timeout=10).json()
            requests = stats_after["outcomes"].get("applied", 0) - stats_before["outcomes"].get("applied", 0)
            result["outage"] = {
                "outage_seconds": outage_seconds,
                "backlog_changes": backlog,
                "backend_ready_to_first_ack_s": first_ack - ready_wall,
                "first_to_last_ack_s": last_ack - first_ack,
                "backend_ready_to_empty_outbox_s": drain_seconds,
                "drain_rate_changes_per_s": backlog / drain_seconds,
                "drain_rate_after_first_ack_changes_per_s": backlog / max(last_ack - first_ack, 1e-3),
                "requests_during_drain": requests,
            }
            print(json.dumps({"outage": result["outage"]}), flush=True)

        # correctness: final values and the applied log
        last = {}
        for i in range(counter[0]):
            last[names[i % len(names)]] = f"change {i}"
        wrong = []
        async with httpx.AsyncClient(base_url=backend_url, timeout=10) as http:
            for name in names:
                body = (await http.get(f"/data-sources/{name}")).json()
                log = (await http.get(f"/admin/data-sources/{name}/log")).json()["applied"]
                expected = 1
                for entry in log:
                    if entry["first_seq"] != expected:
                        wrong.append((name, "gap or overlap", entry["first_seq"], expected))
                    expected = entry["seq"] + 1
                if body.get("config", {}).get("description") != last.get(name):
                    wrong.append((name, "final value", body.get("config"), last.get(name)))
        result["correct"] = not wrong
        result["problems"] = wrong[:10]
    finally:
        for client in clients:
            await client.close()
        server.stop()
        backend.stop()
    return result


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(), "kernel": platform.release()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.forward_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspaces", type=int, default=50)
    parser.add_argument("--rate", type=float, default=100.0, help="changes per second over all workspaces")
    parser.add_argument("--steady", type=float, default=60.0, help="seconds of steady load")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds the backend is down (0: skip)")
    parser.add_argument("--debounce-ms", type=float, default=500.0)
    parser.add_argument("--max-delay-ms", type=float, default=5000.0)
    parser.add_argument("--backoff-max-ms", type=float, default=10000.0)
    parser.add_argument("--batch-max", type=int, default=200, help="changes coalesced into one request at most")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and load to separate CPUs")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    result["machine"] = machine()
    result["parameters"] = vars(args)
    print(json.dumps(result, indent=2))
    return 0 if result.get("correct") else 1


if __name__ == "__main__":
    raise SystemExit(main())
