"""HTTP edits benchmark: PATCH latency at a steady rate, then one large bulk job.

    python -m loadtest.edits_bench [--workspaces 50] [--rate 200] [--seconds 30]
                                   [--bulk 1000] [--batch-size 100] [--parallelism 8] [--pin]

Starts, as processes it owns, the reference backend and the collaboration
server (forwarding to it), connects one websocket client per workspace (so
every PATCH is also broadcast), then:

1. **PATCH**: ``--rate`` ``PATCH /api/workspaces/{id}/config`` per second on
   a fixed (open-loop) schedule, round-robin over ``--workspaces``
   workspaces, for ``--seconds``, over ``--connections`` keep-alive
   connections (a minimal HTTP/1.1 client: httpx cost more CPU than the
   server); latency from the moment a request was due to its answer
   (waiting for a free connection included), p50/p90/p99/max.
2. **bulk**: one ``POST /api/bulk`` over ``--bulk`` new workspaces (each is
   opened, seeded from the backend, patched, forwarded); the time until the
   job reports ``completed``.

Prints one JSON object (with nproc and load average before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pycrdt

from collab.client import CollabClient
from loadtest.forward_bench import Proc, percentile


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client (the load generator must cost far less than the server).

    httpx spends a few ms of CPU per request: at 200 requests/s on a 2-core
    machine the load generator, not the server, was the bottleneck.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes) -> int:
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                head = (
                    f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                    f"Content-Type: application/merge-patch+json\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                self.writer.write(head.encode() + body)
                await self.writer.drain()
                status_line = await self.reader.readline()
                if not status_line:
                    raise ConnectionError("closed")
                length = 0
                while True:
                    line = await self.reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    await self.reader.readexactly(length)
                return int(status_line.split()[1])
            except (ConnectionError, asyncio.IncompleteReadError, OSError):
                self.close()  # the server closed an idle keep-alive connection: once more on a new one
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def patch_phase(port: int, names: list[str], rate: float, seconds: float, connections: int) -> dict[str, Any]:
    """Open loop: request i is due at start + i/rate; its latency counts from then (queueing included)."""
    latencies: list[float] = []
    statuses: dict[Any, int] = {}
    queue: asyncio.Queue = asyncio.Queue()
    n = int(rate * seconds)

    async def worker() -> None:
        conn = RawConnection("127.0.0.1", port)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                i, due = item
                body = json.dumps({"description": f"patch {i}"}).encode()
                try:
                    outcome: Any = await conn.request(
                        "PATCH", f"/api/workspaces/{names[i % len(names)]}/config?user=bench", body
                    )
                except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                    outcome = type(exc).__name__
                latencies.append(time.perf_counter() - due)
                statuses[outcome] = statuses.get(outcome, 0) + 1
        finally:
            conn.close()

    workers = [asyncio.get_running_loop().create_task(worker()) for _ in range(connections)]
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((i, due))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    ms = [x * 1000 for x in latencies]
    return {
        "requests": n,
        "connections": connections,
        "achieved_rate": round(n / elapsed, 1),
        "statuses": statuses,
        "latency_ms": {
            "p50": round(percentile(ms, 0.50), 2),
            "p90": round(percentile(ms, 0.90), 2),
            "p99": round(percentile(ms, 0.99), 2),
            "max": round(max(ms), 2),
        },
    }


async def bulk_phase(base: str, count: int, batch_size: int, parallelism: int) -> dict[str, Any]:
    names = [f"bulk-ds-{i:04d}" for i in range(count)]
    body = {
        "workspaces": names,
        "patch": {"schedule": {"cron": "0 3 * * *"}},
        "batch_size": batch_size,
        "parallelism": parallelism,
    }
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        created = await client.post("/api/bulk?user=bench", json=body)
        created.raise_for_status()
        job = created.json()["job"]
        while True:
            state = (await client.get(f"/api/bulk/{job}?user=bench")).json()
            if state["state"] not in ("pending", "running", "rolling_back"):
                break
            await asyncio.sleep(0.1)
        duration = time.perf_counter() - started
    return {
        "workspaces": count,
        "batch_size": batch_size,
        "parallelism": parallelism,
        "state": state["state"],
        "counts": state["counts"],
        "seconds": round(duration, 2),
        "workspaces_per_second": round(count / duration, 1),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edits-bench-"))
    pin = args.pin and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    result: dict[str, Any] = {
        "command": " ".join(["python -m loadtest.edits_bench", *sys.argv[1:]]),
        "nproc": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "pinned": pin,
    }
    backend = Proc(
        "refbackend",
        [sys.executable, "-m", "refbackend", "--port", "0", "--db", str(work / "backend.sqlite3")],
        {},
        work / "backend.log",
        r"refbackend listening on http://[\d.]+:(\d+)",
        1 if pin else None,
    ).start()
    server = Proc(
        "collab",
        [sys.executable, "-m", "collab", "serve", "--port", "0", "--data-dir", str(work / "data")],
        {
            "COLLAB_BACKEND_URL": f"http://127.0.0.1:{backend.port}",
            "COLLAB_LOG_LEVEL": "warning",
            "COLLAB_BACKEND_PULL_SECONDS": "0",
        },
        work / "server.log",
        r"listening on http://[\d.]+:(\d+)",
        0 if pin else None,
    ).start()
    base = f"http://127.0.0.1:{server.port}"
    names = [f"edit-ds-{i:02d}" for i in range(args.workspaces)]
    clients = [await CollabClient(f"ws://127.0.0.1:{server.port}/ws", n).connect(timeout=30) for n in names]
    try:
        cpu0, load0 = server.cpu_seconds(), time.process_time()
        result["patch"] = await patch_phase(server.port, names, args.rate, args.seconds, args.connections)
        result["patch"]["server_cpu_percent"] = round(100 * (server.cpu_seconds() - cpu0) / args.seconds, 1)
        result["patch"]["load_generator_cpu_percent"] = round(100 * (time.process_time() - load0) / args.seconds, 1)
        # Every connected client got the PATCHes of its workspace (broadcast).
        await asyncio.sleep(1.0)
        result["patch"]["clients_updated"] = sum(
            1 for c in clients if "description" in (c.doc.get("config", type=pycrdt.Map).to_py() or {})
        )
        if args.bulk:
            result["bulk"] = await bulk_phase(base, args.bulk, args.batch_size, args.parallelism)
    finally:
        for client in clients:
            await client.close()
        server.stop()
        backend.stop()
    result["loadavg_after"] = os.getloadavg()
    result["workdir"] = str(work)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.edits_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--workspaces", type=int, default=50)
    parser.add_argument("--rate", type=float, default=200.0, help="PATCH requests per second")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=32, help="keep-alive HTTP connections of the load")
    parser.add_argument("--bulk", type=int, default=1000, help="workspaces of the bulk job (0: none)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--parallelism", type=int, default=8)
    parser.add_argument(
        "--pin",
        action="store_true",
        help="server on CPU 0, backend, clients and load generator on CPU 1 (on 2 cores the load side "
        "saturates CPU 1 and the figures measure it, not the server: off by default)",
    )
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
