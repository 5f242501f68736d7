"""What replica acks cost: `saved` ack latency with COLLAB_REDIS_ACK_REPLICAS=0 and =1.

    python -m loadtest.replica_acks_bench                 # 500 sequential writes per setting
    python -m loadtest.replica_acks_bench --writes 2000 --window 20

A redis-server primary (AOF on, ``appendfsync always``) with one replica, and
one `collab serve` node, all child processes on free loopback ports, ended by
their PID. For each setting, one client writes a map key, waits for its
`saved` ack, and writes the next (latency: send to ack); then it keeps
``--window`` writes in flight for ``--seconds`` (acknowledged writes/s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import pycrdt

from collab.client import CollabClient
from tests.redis_topologies import ConfiguredRedis
from tests.support import ServerProcess


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


async def sequential(url: str, writes: int) -> dict:
    async with CollabClient(url, "bench-seq", hello=True, query="user=bench") as c:
        items = c.doc.get("items", type=pycrdt.Map)
        took = []
        for i in range(writes):
            started = time.perf_counter()
            items[f"k{i % 50}"] = i
            await c.wait_saved(10)
            took.append(time.perf_counter() - started)
    return {"p50_ms": pct(took, 0.5), "p99_ms": pct(took, 0.99), "mean_ms": round(sum(took) / len(took) * 1000, 3)}


async def windowed(url: str, window: int, seconds: float) -> dict:
    async with CollabClient(url, "bench-window", hello=True, query="user=bench") as c:
        items = c.doc.get("items", type=pycrdt.Map)
        base = c.updates_saved
        started = time.perf_counter()
        i = 0
        while time.perf_counter() - started < seconds:
            if c.updates_sent - c.updates_saved < window:
                items[f"k{i % 50}"] = i
                i += 1
                await c.flush()
            await asyncio.sleep(0 if c.updates_sent - c.updates_saved < window else 0.0005)
        await c.wait_saved(10)
        took = time.perf_counter() - started
    return {"acked_writes_per_s": round((c.updates_saved - base) / took)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(json.dumps({"params": vars(args), "loadavg": os.getloadavg()}), flush=True)
    with tempfile.TemporaryDirectory(prefix="replica-acks-") as tmpdir:
        tmp = Path(tmpdir)
        primary = ConfiguredRedis(tmp / "primary", []).start()
        replica = ConfiguredRedis(tmp / "replica", ["--replicaof", "127.0.0.1", str(primary.port)]).start()
        try:
            while replica.client().info("replication").get("master_link_status") != "up":
                await asyncio.sleep(0.05)
            for acks in ("0", "1"):
                env = {
                    "COLLAB_REDIS_URL": primary.url,
                    "COLLAB_NODE_ID": f"n{acks}",
                    "COLLAB_LOG_LEVEL": "warning",
                    "COLLAB_MESSAGE_RATE": "0",
                    "COLLAB_BYTE_RATE": "0",
                    "COLLAB_REDIS_ACK_REPLICAS": acks,
                }
                srv = ServerProcess(tmp / f"srv-{acks}", tmp / f"srv-{acks}.log", env=env).start()
                try:
                    seq = await sequential(srv.ws_url, args.writes)
                    win = await windowed(srv.ws_url, args.window, args.seconds)
                finally:
                    srv.stop()
                print(json.dumps({"ack_replicas": int(acks), "sequential": seq, "windowed": win,
                                  "loadavg": os.getloadavg()}), flush=True)  # fmt: skip
        finally:
            replica.stop()
            primary.stop()


if __name__ == "__main__":
    asyncio.run(main())
