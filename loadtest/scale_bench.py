"""Scale-out benchmark: cross-node fan-out latency and throughput for 1, 2 and 3 nodes.

    python -m loadtest.scale_bench                      # every configuration below
    python -m loadtest.scale_bench --latency-updates 1000 --seconds 10 --writers 6 --readers 6

Configurations: one node on SQLite (the single-node default), then one, two
and three nodes sharing a redis-server (AOF on, ``appendfsync always``:
the setting under which nothing acknowledged is lost).

* Latency: one writer on node A, one reader on node B (the same node when
  there is one). The writer sets a map key every ``--interval`` ms; the
  latency of an update is from just before its frame is sent to the moment
  the reader's document holds it. p50/p99 over ``--latency-updates``.
* Throughput: ``--writers`` clients write as fast as their acks allow (a
  window of ``--window`` unacknowledged updates each) for ``--seconds``,
  ``--readers`` more clients only read; clients are dealt round-robin over
  the nodes. Reported: acknowledged (durable) updates/s, and deliveries/s
  (frames received by all clients).

Every server and the redis-server are child processes on free loopback
ports, ended by their PID. Rate limits are off for the load (COLLAB_MESSAGE_RATE=0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pycrdt

from collab.client import CollabClient
from tests.redis_support import RedisProcess
from tests.support import ServerProcess


class Redis(RedisProcess):
    """redis-server with an fsync-always AOF (what a deployment runs), stopped by its PID."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, appendonly=True)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else float("nan")


async def latency(nodes: list[ServerProcess], workspace: str, count: int, interval: float) -> dict:
    a, b = nodes[0], nodes[1 % len(nodes)]
    writer = await CollabClient(a.ws_url, workspace, query="user=w").connect()
    reader = await CollabClient(b.ws_url, workspace, query="user=r").connect()
    sent: dict[str, float] = {}
    got: list[float] = []
    seen: set[str] = set()
    rmap = reader.doc.get("lat", type=pycrdt.Map)

    def on_update(_update: bytes) -> None:
        now = time.perf_counter()
        for key in list(sent.keys() - seen):
            if key in rmap:
                seen.add(key)
                got.append((now - sent[key]) * 1000)

    reader.on_update = on_update
    wmap = writer.doc.get("lat", type=pycrdt.Map)
    for i in range(count):
        key = f"k{i}"
        sent[key] = time.perf_counter()
        wmap[key] = i
        await writer.flush()
        await asyncio.sleep(interval)
    await reader.until(lambda: len(seen) == count, 30, "every latency sample")
    await writer.close()
    await reader.close()
    return {"p50_ms": pct(got, 0.5), "p99_ms": pct(got, 0.99), "max_ms": pct(got, 1.0), "samples": len(got)}


async def throughput(nodes: list[ServerProcess], workspace: str, writers: int, readers: int, seconds: float,
                     window: int) -> dict:  # fmt: skip
    clients = []
    for i in range(writers + readers):
        node = nodes[i % len(nodes)]
        clients.append(await CollabClient(node.ws_url, workspace, hello=True, query=f"user=t{i}").connect())
    frames0 = sum(c.received_frames for c in clients)
    stop = time.monotonic() + seconds
    acked = [0] * writers

    async def write(idx: int, c: CollabClient) -> None:
        m = c.doc.get(f"w{idx}", type=pycrdt.Map)
        n = 0
        while time.monotonic() < stop:
            m[f"k{n % 50}"] = n
            n += 1
            await c.flush()
            if c.updates_sent - c.updates_saved >= window:
                await c.until(lambda: c.updates_sent - c.updates_saved < window, 30, "ack window")
        await c.wait_saved(30)
        acked[idx] = c.updates_saved

    started = time.monotonic()
    await asyncio.gather(*(write(i, clients[i]) for i in range(writers)))
    took = time.monotonic() - started
    frames = sum(c.received_frames for c in clients) - frames0
    for c in clients:
        await c.close()
    return {"acked_updates_per_s": round(sum(acked) / took), "deliveries_per_s": round(frames / took),
            "seconds": round(took, 1)}  # fmt: skip


async def run_config(name: str, count: int, redis: Redis | None, args, tmp: Path) -> dict:
    nodes = []
    try:
        for i in range(count):
            env = {"COLLAB_MESSAGE_RATE": "0", "COLLAB_BYTE_RATE": "0", "COLLAB_LOG_LEVEL": "warning",
                   "COLLAB_MAX_CONNECTIONS_PER_IP": "0", "COLLAB_LOCKS_ENABLED": "true"}  # fmt: skip
            if redis is not None:
                env |= {"COLLAB_REDIS_URL": redis.url, "COLLAB_NODE_ID": f"n{i}"}
            srv = ServerProcess(tmp / f"{name}-{i}", tmp / f"{name}-{i}.log", env=env)
            nodes.append(srv.start())
        lat = await latency(nodes, f"lat-{name}", args.latency_updates, args.interval / 1000)
        thr = await throughput(nodes, f"thr-{name}", args.writers, args.readers, args.seconds, args.window)
        return {"config": name, "nodes": count, "store": "redis" if redis else "sqlite", "latency": lat,
                "throughput": thr}  # fmt: skip
    finally:
        for srv in nodes:
            srv.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-updates", type=int, default=500)
    parser.add_argument("--interval", type=float, default=10.0, help="ms between latency probes")
    parser.add_argument("--writers", type=int, default=6)
    parser.add_argument("--readers", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--window", type=int, default=20, help="unacknowledged updates per writer")
    parser.add_argument("--configs", default="sqlite-1,redis-1,redis-2,redis-3")
    args = parser.parse_args()
    print(json.dumps({"machine": {"nproc": os.cpu_count(), "cpu": _cpu(), "python": platform.python_version()},
                      "params": vars(args)}), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmpdir:
        tmp = Path(tmpdir)
        redis = Redis(tmp / "redis").start()
        try:
            for config in args.configs.split(","):
                store, count = config.split("-")
                result = await run_config(config, int(count), redis if store == "redis" else None, args, tmp)
                print(json.dumps(result), flush=True)
        finally:
            redis.stop()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    asyncio.run(main())
