"""Lock benchmark: round trips as a client sees them, and grants/s under contention.

    python -m loadtest.locks_bench                     # both backends, defaults below
    python -m loadtest.locks_bench --backend redis --holders 100 --duration 10

For each backend (in-process, Redis) it starts its own ``collab serve`` process
(and its own ``redis-server`` on a free port, unless ``--redis-url``), pinned
with ``taskset`` when available: the server (and Redis) on ``--server-cpus``,
this load generator on ``--client-cpus``.

Phase 1, latency: ``--holders`` connections spread over ``--workspaces``
rooms, each locking its own path (``scan_rules.h<i>``) in a loop: acquire,
hold ``--hold`` seconds (±50 %), release. Nearly all of them hold a lease at
any instant; leases have ``--ttl`` and every client pings every TTL/3, so the
server renews them meanwhile. Reported: acquire->grant and release->ok round
trips, p50/p99/max.

Phase 2, contention: ``--contenders`` connections in one room race for one
path (``connection``) with ``wait``: acquire, release at once, again. Reported:
grants per second (each grant is a hand-off to the next waiter).

The clients are lean: raw websockets, hello, then only control messages are
decoded; requests are matched to replies by ``id``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import websockets

from codec import protocol as p
from procs import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- processes


def _pin(cmd: list[str], cpus: str | None) -> list[str]:
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *cmd]
    return cmd


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def start_redis(workdir: Path, cpus: str | None) -> tuple[ManagedProcess, str]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = ManagedProcess(_pin(cmd + ["--dir", str(workdir)], cpus), name="redis-server",
                          log_path=workdir / "redis.log", port=port)  # fmt: skip
    return proc.start(10), f"redis://127.0.0.1:{port}/0"


def start_server(data: Path, env: dict[str, str], cpus: str | None) -> tuple[ManagedProcess, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "collab", "serve", "--port", str(port), "--data-dir", str(data)]
    proc = ManagedProcess(
        _pin(cmd, cpus),
        name="server",
        log_path=data.parent / f"{data.name}.log",
        env={"COLLAB_LOG_LEVEL": "warning", **env},
        port=port,
        ready_url=f"http://127.0.0.1:{port}/healthz",
    )
    return proc.start(20), port


# ------------------------------------------------------------------ client


class LockClient:
    """A lean control-channel client: hello, then lock requests by id."""

    _ids = itertools.count(1)

    def __init__(self, url: str, keepalive: float = 0.0) -> None:
        self.url = url
        self.keepalive = keepalive
        self.ws: Any = None
        self.pending: dict[int, asyncio.Future] = {}
        self.broadcasts = 0
        self._reader: asyncio.Task | None = None
        self._pinger: asyncio.Task | None = None

    async def connect(self) -> LockClient:
        self.ws = await websockets.connect(self.url, max_size=None, compression=None, open_timeout=20)
        await self.ws.send(p.encode_control({"type": "hello", "protocol": p.PROTOCOL_VERSION}))
        self._reader = asyncio.create_task(self._read())
        await self.request({"type": "ping"})
        if self.keepalive > 0:
            self._pinger = asyncio.create_task(self._ping())
        return self

    async def _ping(self) -> None:
        """Holders show they are alive once per TTL/3 (the server renews only then)."""
        frame = p.encode_control({"type": "ping"})
        await asyncio.sleep(random.random() * self.keepalive)
        while True:
            await self.ws.send(frame)
            await asyncio.sleep(self.keepalive)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if frame[:1] != b"\x64":
                    continue  # sync and awareness: not our business here
                body = msgpack.unpackb(frame[1:], raw=False)
                fut = self.pending.pop(body.get("id"), None) if "id" in body else None
                if fut is not None and not fut.done():
                    fut.set_result(body)
                else:
                    self.broadcasts += 1
        except websockets.ConnectionClosed:
            pass
        finally:
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))

    async def request(self, body: dict[str, Any], timeout: float = 60) -> dict[str, Any]:
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        await self.ws.send(p.encode_control({**body, "id": rid}))
        return await asyncio.wait_for(fut, timeout)

    async def close(self) -> None:
        if self._pinger:
            self._pinger.cancel()
        await self.ws.close()
        if self._reader:
            await asyncio.gather(self._reader, return_exceptions=True)


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "n": len(ordered),
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
    }


# ------------------------------------------------------------------ phases


async def latency_phase(
    base: str, holders: int, workspaces: int, duration: float, hold: float, ttl: float, pids: dict[str, int]
) -> dict[str, Any]:
    clients = []
    for i in range(holders):
        clients.append(await LockClient(f"{base}/bench-lat-{i % workspaces}?user=h{i}", ttl / 3).connect())
    acquire_rtt: list[float] = []
    release_rtt: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.perf_counter() + duration
    warmup_until = time.perf_counter() + min(1.0, duration / 5)
    concurrent_samples: list[int] = []
    holding = 0

    async def run(i: int, client: LockClient) -> None:
        nonlocal holding
        rng = random.Random(i)
        path = f"scan_rules.h{i}"
        await asyncio.sleep(rng.random() * hold)  # spread the starts
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            reply = await client.request({"type": "lock.acquire", "path": path})
            t1 = time.perf_counter()
            if reply["type"] != "lock.granted":
                key = reply.get("code", reply["type"])
                errors[key] = errors.get(key, 0) + 1
                await asyncio.sleep(hold)
                continue
            holding += 1
            await asyncio.sleep(hold * (0.5 + rng.random()))
            holding -= 1
            t2 = time.perf_counter()
            reply = await client.request({"type": "lock.release", "path": path})
            t3 = time.perf_counter()
            if t0 > warmup_until:
                acquire_rtt.append(t1 - t0)
                release_rtt.append(t3 - t2)
            if reply["type"] != "lock.release.ok":
                key = reply.get("code", reply["type"])
                errors[key] = errors.get(key, 0) + 1

    cpu: dict[str, list[float]] = {}

    async def sample() -> None:
        while time.perf_counter() < stop_at:
            await asyncio.sleep(0.05)
            if time.perf_counter() > warmup_until:
                if not cpu:  # the measured window starts after connecting and warming up
                    cpu.update({name: [cpu_seconds(pid)] for name, pid in pids.items()})
                concurrent_samples.append(holding)
        for name, pid in pids.items():
            cpu.setdefault(name, [cpu_seconds(pid)]).append(cpu_seconds(pid))

    started = time.perf_counter()
    await asyncio.gather(sample(), *(run(i, c) for i, c in enumerate(clients)))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.close()
    return {
        "holders": holders,
        "workspaces": workspaces,
        "hold_s": hold,
        "ttl_s": ttl,
        "duration_s": round(elapsed, 2),
        "acquires_per_s": round(len(acquire_rtt) / max(1e-9, elapsed - min(1.0, duration / 5)), 1),
        "mean_concurrent_holders": round(statistics.fmean(concurrent_samples), 1) if concurrent_samples else 0,
        "acquire": percentiles(acquire_rtt),
        "release": percentiles(release_rtt),
        # CPU per acquire+release cycle in the measured window (renewals, pings
        # and broadcasts included): far less sensitive to other load than latency.
        "cpu_ms_per_cycle": {
            name: round((v[-1] - v[0]) * 1000 / max(1, len(acquire_rtt)), 3) for name, v in cpu.items()
        },
        "errors": errors,
    }


async def contention_phase(base: str, contenders: int, duration: float) -> dict[str, Any]:
    clients = [await LockClient(f"{base}/bench-contention?user=c{i}").connect() for i in range(contenders)]
    grants = 0
    errors: dict[str, int] = {}
    fences: list[int] = []
    stop_at = time.perf_counter() + duration

    async def run(client: LockClient) -> None:
        nonlocal grants
        while time.perf_counter() < stop_at:
            reply = await client.request({"type": "lock.acquire", "path": "connection", "wait": 30})
            if reply["type"] != "lock.granted":
                key = reply.get("code", reply["type"])
                errors[key] = errors.get(key, 0) + 1
                continue
            grants += 1
            fences.append(reply["fence"])
            reply = await client.request({"type": "lock.release", "path": "connection"})
            if reply["type"] != "lock.release.ok":
                key = reply.get("code", reply["type"])
                errors[key] = errors.get(key, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(run(c) for c in clients))
    elapsed = time.perf_counter() - started
    for client in clients:
        await client.close()
    return {
        "contenders": contenders,
        "duration_s": round(elapsed, 2),
        "grants": grants,
        "grants_per_s": round(grants / elapsed, 1),
        "fences_increasing": fences == sorted(fences) and len(set(fences)) == len(fences),
        "errors": errors,
    }


# -------------------------------------------------------------------- main


def _stats(port: int) -> dict[str, Any]:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/admin/locks/stats?user=bench&role=admin", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return {}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "platform": platform.platform()}


async def bench_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    redis_proc = None
    env = {
        "COLLAB_LOCK_TTL_SECONDS": str(args.ttl),
        "COLLAB_LOCK_RATE_PER_SECOND": "10000",
        "COLLAB_LOCK_RATE_BURST": "10000",
    }
    if backend == "redis":
        if args.redis_url:
            env["COLLAB_REDIS_URL"] = args.redis_url
        else:
            redis_proc, url = start_redis(workdir / "redis", args.redis_cpus)
            env["COLLAB_REDIS_URL"] = url
    server, port = start_server(workdir / f"data-{backend}", env, args.server_cpus)
    base = f"ws://127.0.0.1:{port}/ws"
    try:
        result: dict[str, Any] = {"backend": backend}
        pids = {"server": server.pid, **({"redis": redis_proc.pid} if redis_proc else {})}
        result["latency"] = await latency_phase(
            base, args.holders, args.workspaces, args.duration, args.hold, args.ttl, pids
        )
        result["server_stats"] = _stats(port)
        result["contention"] = await contention_phase(base, args.contenders, args.contention_duration)
        return result
    finally:
        server.stop()
        if redis_proc is not None:
            redis_proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.locks_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["memory", "redis", "both"], default="both")
    parser.add_argument("--holders", type=int, default=100)
    parser.add_argument("--workspaces", type=int, default=10)
    parser.add_argument("--hold", type=float, default=1.0, help="mean seconds a lease is held in phase 1")
    parser.add_argument("--ttl", type=float, default=3.0, help="lease TTL (renewed every TTL/3 while held)")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--contenders", type=int, default=20)
    parser.add_argument("--contention-duration", type=float, default=5.0)
    parser.add_argument("--redis-url", help="use this Redis instead of starting one")
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list for the server ('' = no pin)")
    parser.add_argument("--redis-cpus", default="0", help="taskset CPU list for redis-server ('' = no pin)")
    parser.add_argument("--client-cpus", default="1", help="taskset CPU list for this load generator")
    parser.add_argument("--repeat", type=int, default=1, help="runs per backend (each reported)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    if args.client_cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
        except (OSError, ValueError):
            pass
    backends = ["memory", "redis"] if args.backend == "both" else [args.backend]
    results = {"machine": machine(), "args": vars(args), "results": []}
    with tempfile.TemporaryDirectory(prefix="locks-bench-") as tmp:
        for backend, run in itertools.product(backends, range(args.repeat)):
            load_before = os.getloadavg()[0]
            result = asyncio.run(bench_backend(backend, args, Path(tmp) / f"{backend}-{run}"))
            # Other work on the machine shows here: the 1-minute load average.
            result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            results["results"].append(result)
            lat, con = result["latency"], result["contention"]
            print(
                f"{backend:7s} acquire p50 {lat['acquire'].get('p50_ms')} ms  p99 {lat['acquire'].get('p99_ms')} ms"
                f" | release p50 {lat['release'].get('p50_ms')} ms  p99 {lat['release'].get('p99_ms')} ms"
                f" | {lat['acquires_per_s']} acquires/s, ~{lat['mean_concurrent_holders']} holding"
                f" | contention: {con['grants_per_s']} grants/s ({con['contenders']} contenders)"
                f" | errors {lat['errors'] or con['errors'] or 'none'} | load {result['loadavg_1m']}",
                flush=True,
            )
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
