"""How much does a client that stops reading cost everyone else?

    python -m loadtest.slow_consumer [--readers 20] [--rate 200] [--payload 8192]
                                     [--stuck 1] [--queue-frames 2048] [--seconds 5]

Starts its own server (``python -m collab serve`` on a free loopback port,
data in a temporary directory), fills one room with readers and one writer,
and measures the writer-to-reader latency of every update in three phases:

1. baseline: only well-behaved clients;
2. stuck: ``--stuck`` extra clients complete the websocket handshake and then
   never read (4 KiB receive buffers), until the server cuts them off
   (their outgoing queue holds ``--queue-frames`` frames);
3. after: the same room once they are gone.

Prints one JSON object (latency percentiles in milliseconds per phase, the
time until the stuck clients were cut off, the server's peak RSS). Traffic
goes to 127.0.0.1 only; every phase is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pycrdt

from collab.client import CollabClient
from procs import ManagedProcess

ROOT = Path(__file__).resolve().parent.parent


def start_server(data_dir: Path, env: dict[str, str], cpu: int | None = None) -> tuple[ManagedProcess, int]:
    child = ManagedProcess(
        [sys.executable, "-m", "collab", "serve", "--port", "0", "--data-dir", str(data_dir / "data")],
        name="server",
        log_path=data_dir / "server.log",
        env={"PYTHONUNBUFFERED": "1", "COLLAB_LOG_LEVEL": "info", **env},
        cwd=ROOT,
        ready_log=r"listening on http://[\d.]+:(?P<port>\d+)",
        cpus={cpu} if cpu is not None else None,
        stop_timeout=15,
    )
    child.start(20)
    return child, child.port


def stuck_client(port: int, path: str) -> socket.socket:
    """Handshake, then never read again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(head.decode(errors="replace"))
    return sock


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    values = sorted(values)

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

    return {
        "n": len(values),
        "p50": pick(0.50),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": round(values[-1] * 1000, 2),
        "mean": round(statistics.fmean(values) * 1000, 2),
    }


async def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="slow-consumer-"))
    # The writer runs above the default per-connection message and byte rates: lift them.
    env = {"COLLAB_PEER_QUEUE_FRAMES": str(args.queue_frames), "COLLAB_MESSAGE_RATE": "0", "COLLAB_BYTE_RATE": "0"}
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})
    proc, port = start_server(tmp, env, args.server_cpu)
    url = f"ws://127.0.0.1:{port}/ws"
    room = "bench-slow"
    sent: dict[int, float] = {}
    samples: list[tuple[float, float]] = []  # (arrival time, latency)
    readers = []
    try:
        for _ in range(args.readers):
            reader = CollabClient(url, room)
            cfg = reader.doc.get("config", type=pycrdt.Map)
            seen = {"last": -1}

            def on_update(_update: bytes, cfg=cfg, seen=seen) -> None:
                seq = cfg.get("seq")
                if seq is not None and seq != seen["last"]:
                    seen["last"] = seq
                    now = time.perf_counter()
                    samples.append((now, now - sent[int(seq)]))

            reader.on_update = on_update
            readers.append(await reader.connect())
        writer = await CollabClient(url, room).connect()
        wcfg = writer.doc.get("config", type=pycrdt.Map)
        seq = 0
        payload = "x" * args.payload

        async def write_for(seconds: float, until=None) -> None:
            nonlocal seq
            interval = 1.0 / args.rate
            deadline = time.perf_counter() + seconds
            next_at = time.perf_counter()
            while time.perf_counter() < deadline and not (until and until()):
                with writer.doc.transaction():
                    wcfg["blob"] = payload + str(seq)
                    wcfg["seq"] = seq
                sent[seq] = time.perf_counter()
                await writer.flush()
                seq += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

        log_path = tmp / "server.log"

        def all_cut_off() -> bool:
            # The server logs each cut-off; reading its log puts no load on it.
            return log_path.read_bytes().count(b"1013 outgoing queue overflow") >= args.stuck

        phases: dict[str, dict] = {}
        t0 = time.perf_counter()
        await write_for(args.seconds)
        phases["baseline"] = percentiles([lat for at, lat in samples if at >= t0])

        stuck = [await asyncio.to_thread(stuck_client, port, f"/ws/{room}") for _ in range(args.stuck)]
        t1 = time.perf_counter()
        cut_at: list[float] = []

        async def watch() -> None:
            while not all_cut_off():
                await asyncio.sleep(0.05)
            cut_at.append(time.perf_counter())

        watcher = asyncio.create_task(watch())
        await write_for(args.max_stuck_seconds, until=lambda: bool(cut_at))
        watcher.cancel()
        t2 = time.perf_counter()
        phases["stuck"] = percentiles([lat for at, lat in samples if t1 <= at < t2])
        await write_for(args.seconds)
        phases["after"] = percentiles([lat for at, lat in samples if at >= t2])
        for sock in stuck:
            sock.close()
        peak = next(
            int(line.split()[1]) // 1024
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
        await writer.close()
        return {
            "pinned": {"server": args.server_cpu, "clients": args.client_cpu},
            "readers": args.readers,
            "rate_per_s": args.rate,
            "payload_bytes": args.payload,
            "stuck_clients": args.stuck,
            "queue_frames": args.queue_frames,
            "latency_ms": phases,
            "cut_off_after_s": round(cut_at[0] - t1, 2) if cut_at else None,
            "server_peak_rss_mib": peak,
        }
    finally:
        for reader in readers:
            await reader.close()
        proc.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.slow_consumer", description=__doc__.split("\n")[0])
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--rate", type=float, default=200.0, help="updates per second from the writer")
    parser.add_argument("--payload", type=int, default=8192, help="bytes per update")
    parser.add_argument("--stuck", type=int, default=1, help="clients that never read")
    parser.add_argument("--queue-frames", type=int, default=2048, help="COLLAB_PEER_QUEUE_FRAMES for the server")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the baseline and after phases")
    parser.add_argument("--max-stuck-seconds", type=float, default=60.0, help="bound on the stuck phase")
    parser.add_argument("--server-cpu", type=int, help="pin the server to this CPU (taskset)")
    parser.add_argument("--client-cpu", type=int, help="pin this load generator to this CPU")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
