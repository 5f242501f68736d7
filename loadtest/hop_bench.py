"""Cross-node hop benchmark: same-node vs cross-node delivery latency in one room.

    python -m loadtest.hop_bench                                    # 1 x 20, 2 writers at 10/s
    python -m loadtest.hop_bench --clients 100 --writers 10 --rate 100
    python -m loadtest.hop_bench --profile-node 1 --profile-out /tmp/relay.svg   # py-spy on node 1

One room, ``--clients`` lean websocket clients dealt alternately over two
``collab serve`` nodes sharing one redis-server (AOF, ``appendfsync always``,
as docs/operations.md recommends). The first ``--writers`` clients (so half
on each node) each set their own key of the ``config`` map ``--rate`` times
a second (the fan-out scenario's markers: ``loadtest/fanout.py``). Every
delivery to a client is a latency sample, from the writer's send to the
receiver's frame, filed as **same-node** (receiver on the writer's node) or
**cross-node** (the update went through Redis and the other node's relay).

Both nodes and Redis are pinned to core 0 (``--server-cores``), the harness
to core 1 (``--harness-cores``), as in the issue's measurement. After the
run every client must have received every other writer's every update
(``lost`` and ``duplicates`` are reported; nothing may be lost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

from loadtest.fanout import BUCKET_US, BUCKETS, HIST_LIMIT, FanoutClient, FanoutWriter, RunState, _percentiles
from loadtest.scale_bench import Redis, _cpu
from tests.support import ServerProcess

_now_ns = time.perf_counter_ns


class HopRun(RunState):
    """The fan-out run state with two histograms: same-node and cross-node deliveries."""

    def __init__(self) -> None:
        super().__init__(1)
        self.node_of_writer: dict[int, int] = {}
        self.hists = {True: array("q", bytes(8 * BUCKETS)), False: array("q", bytes(8 * BUCKETS))}
        self.overflows: dict[bool, list[int]] = {True: [], False: []}
        self.counts = {True: 0, False: 0}
        self.measuring = False


def _record(client: FanoutClient, m: bytes, markers_before: int) -> None:
    run: HopRun = client.run  # type: ignore[assignment]
    if not run.measuring:
        return
    fid = client.frame_ids[-1] if len(client.frame_ids) > markers_before else None
    if fid is None:
        return
    writers, _, sent = run.markers[0][fid]
    if not sent:
        return
    now = (_now_ns() - run.t0) // 1000
    for w, ts in zip(writers, sent):
        if w == client.wid:
            continue
        same = run.node_of_writer[w] == client.node  # type: ignore[attr-defined]
        d = now - ts
        if 0 <= d < HIST_LIMIT:
            run.hists[same][d // BUCKET_US] += 1
        else:
            run.overflows[same].append(d)
        run.counts[same] += 1


class HopClient(FanoutClient):
    node = 0

    def on_message(self, m: bytes) -> None:
        n = len(self.frame_ids)
        super().on_message(m)
        _record(self, m, n)


class HopWriter(FanoutWriter):
    node = 0

    def on_message(self, m: bytes) -> None:
        n = len(self.frame_ids)
        super().on_message(m)
        _record(self, m, n)


class FsyncRedis(Redis):
    """The scale bench's redis-server (AOF on), with the fsync policy as a parameter."""

    def __init__(self, workdir: Path, appendfsync: str = "always") -> None:
        super().__init__(workdir)
        self.appendfsync = appendfsync

    def start(self) -> Redis:
        import redis as redis_lib

        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "",
                "--appendonly", "yes", "--appendfsync", self.appendfsync,
                "--logfile", str(self.workdir / "redis.log")]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_lib.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return self
            except redis_lib.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")


def pin(pid: int, cores: str) -> None:
    """Every thread of ``pid`` to ``cores`` (taskset -a)."""
    subprocess.run(["taskset", "-a", "-p", "-c", cores, str(pid)], check=True, stdout=subprocess.DEVNULL)


def percentiles(run: HopRun, same: bool) -> dict[str, Any]:
    class _View:
        hist = run.hists[same]
        overflow = run.overflows[same]

    return _percentiles(_View, run.counts[same])  # type: ignore[arg-type]


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    redis = FsyncRedis(tmp / "redis", args.appendfsync).start()
    nodes: list[ServerProcess] = []
    profiler: subprocess.Popen | None = None
    try:
        pin(redis.proc.pid, args.server_cores)
        for i in range(2):
            env = {
                "COLLAB_MESSAGE_RATE": "0",
                "COLLAB_BYTE_RATE": "0",
                "COLLAB_LOG_LEVEL": "warning",
                "COLLAB_MAX_CONNECTIONS_PER_IP": "0",
                "COLLAB_REDIS_URL": redis.url,
                "COLLAB_NODE_ID": f"n{i}",
            }
            for item in args.env:
                k, _, v = item.partition("=")
                env[k] = v
            srv = ServerProcess(tmp / f"node-{i}", tmp / f"node-{i}.log", env=env).start()
            pin(srv.proc.pid, args.server_cores)
            nodes.append(srv)
        run = HopRun()
        ws = f"hop-{os.getpid()}"
        clients: list[FanoutClient] = []
        writers: list[HopWriter] = []
        for i in range(args.clients):
            node = i % 2
            if i < args.writers:
                c: FanoutClient = HopWriter(run, 0, i)
                run.node_of_writer[i] = node
                writers.append(c)  # type: ignore[arg-type]
            else:
                c = HopClient(run, 0)
            c.node = node  # type: ignore[attr-defined]
            await c.open("127.0.0.1", nodes[node].port, f"/ws/{ws}?user=u{i}")
            c.send(c.step1())
            clients.append(c)
        await asyncio.wait_for(asyncio.gather(*(c.synced for c in clients)), 30)
        if args.profile_node is not None:
            profiler = subprocess.Popen(
                ["py-spy", "record", "--nonblocking", "-r", "200", "-d", str(int(args.seconds + args.warmup)),
                 "-f", args.profile_format, "-o", args.profile_out, "-p", str(nodes[args.profile_node].proc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        period = 1.0 / args.rate
        start = time.perf_counter() + 0.05
        end_warm = start + args.warmup
        end = end_warm + args.seconds
        tick = 0
        while True:
            # Writers spread evenly over each period.
            for j, w in enumerate(writers):
                due = start + tick * period + j * period / len(writers)
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                run.measuring = time.perf_counter() >= end_warm
                w.write()
            tick += 1
            if start + tick * period >= end:
                break
        run.measuring = True
        sent = {w.wid: w.seq for w in writers}
        expected = sum(sent.values()) * (args.clients - 1)

        def received() -> int:
            return sum(c.count_received(sent)[0] for c in clients)

        deadline = time.monotonic() + 30
        while received() < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        got = [c.count_received(sent) for c in clients]
        # Final state: every client holds every writer's last value (a room reloaded from a
        # snapshot sends the state, not each intermediate value, so "lost" alone over-counts).
        stale = 0
        for c in clients:
            last: dict[int, int] = {}
            for fid in c.frame_ids:
                for w, q in zip(run.markers[0][fid][0], run.markers[0][fid][1]):
                    last[w] = max(last.get(w, -1), q)
            stale += sum(1 for w, n in sent.items() if w != c.wid and last.get(w, -1) != n - 1)
        for c in clients:
            await c.close()
        if profiler is not None:
            profiler.wait(60)
        return {
            "same_node_ms": percentiles(run, True),
            "cross_node_ms": percentiles(run, False),
            "sent_updates": sum(sent.values()),
            "expected_deliveries": expected,
            "delivered": sum(g[0] for g in got),
            "lost": expected - sum(g[0] for g in got),
            "duplicates": sum(g[1] for g in got),
            "final_value_missing": stale,  # (client, writer) pairs whose last value never arrived
            "disconnects": run.disconnects,
        }
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.terminate()
        for srv in nodes:
            srv.stop()
        redis.stop()
        for i in range(len(nodes)):  # what the relay had to say (gaps, reloads, Redis errors)
            lines = (tmp / f"node-{i}.log").read_text(errors="replace").splitlines()
            notes = [line[:200] for line in lines if "collab.relay" in line]
            if notes:
                print(json.dumps({"node": i, "relay_log": notes[:20], "relay_log_lines": len(notes)}), flush=True)
        if args.keep_logs:
            for i in range(len(nodes)):
                shutil.copy(tmp / f"node-{i}.log", Path(args.keep_logs) / f"node-{i}.log")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=10.0, help="writes per second per writer")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--appendfsync", default="always", help="Redis AOF fsync policy (always: durable acks)")
    parser.add_argument("--server-cores", default="0")
    parser.add_argument("--harness-cores", default="1")
    parser.add_argument("--env", action="append", default=[], help="K=V for both nodes (repeatable)")
    parser.add_argument("--profile-node", type=int, default=None, help="record node 0 or 1 with py-spy")
    parser.add_argument("--profile-out", default="/tmp/hop-profile.txt")
    parser.add_argument("--profile-format", default="raw", help="py-spy format: raw (collapsed stacks) or flamegraph")
    parser.add_argument("--label", default="")
    parser.add_argument("--keep-logs", default=None, help="copy the nodes' logs to this directory")
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(c) for c in args.harness_cores.split(",")})
    machine = {"nproc": os.cpu_count(), "cpu": _cpu(), "python": platform.python_version(),
               "loadavg_before": os.getloadavg()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hop-bench-") as tmpdir:
        result = await bench(args, Path(tmpdir))
    machine["loadavg_after"] = os.getloadavg()
    params = {k: v for k, v in vars(args).items() if not k.startswith("profile")}
    print(json.dumps({"machine": machine, "params": params, **result}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
