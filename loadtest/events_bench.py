"""Events benchmark: publish lag of configuration-updated events at a steady change rate.

    python -m loadtest.events_bench [--workspaces 20] [--rate 1000] [--seconds 30] [--webhook-batch 1]
                                    [--no-stream | --no-webhook | --no-events] [--no-pin]

It starts, as processes it owns, a ``redis-server`` (for the events stream)
and the collaboration server (``python -m collab serve``, SQLite store) with
``COLLAB_EVENTS_STREAM`` and one webhook (``COLLAB_EVENTS_WEBHOOK_URLS``)
pointing at a receiver in this process (asyncio, keep-alive, checks every
Standard Webhooks signature). It connects one client per workspace and
makes ``--rate`` configuration changes per second, round-robin over the
workspaces, for ``--seconds``.

Lag of each ``collaboration:data_source:updated`` event: from the event's
``time`` (the server's clock when it recorded the change, which is then
committed with the update in the same flush) to the moment this process
read it from the stream (a consumer group, XREADGROUP BLOCK) or received it
at the webhook; same machine, same clock. p50/p90/p99/max, and whether every
change arrived (once per sink).

By default the server runs on CPU 0, redis and this load generator on CPU 1
(``--no-pin`` to leave scheduling alone). The load average is printed with
the figures: on a shared machine they are only as good as it was idle.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from collab.client import CollabClient
from loadtest.forward_bench import Proc, machine, make_changes, percentile

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_" + base64.b64encode(b"events-benchmark-secret-0123456789").decode()
STREAM = "bench-events"
# --profile: the server under cProfile, stats written when it exits (SIGTERM is a clean exit).
_PROFILED = (
    "import cProfile, signal, sys; from collab.cli import main; out = sys.argv[1]; "
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "  # uvicorn raises the signal again once shut down
    "cProfile.run('main(sys.argv[2:])', out)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


class Receiver:
    """A minimal HTTP/1.1 keep-alive server: verifies each signature, records the lag of each update."""

    def __init__(self) -> None:
        self.key = base64.b64decode(SECRET.split("_", 1)[1])
        self.lags: dict[str, float] = {}
        self.bad = 0
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.decode().split("\r\n")[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                now = time.time()
                self.requests += 1
                signed = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
                expected = "v1," + base64.b64encode(hmac.new(self.key, signed, hashlib.sha256).digest()).decode()
                if not hmac.compare_digest(expected, headers.get("webhook-signature", "")):
                    self.bad += 1
                parsed = json.loads(body)
                for event in parsed if isinstance(parsed, list) else [parsed]:  # a CloudEvents batch, or one
                    if event["type"] == "collaboration:data_source:updated":
                        self.lags.setdefault(event["id"], now - event_time(event))
                writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def consume(url: str, lags: dict[str, float], stop: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.xgroup_create(STREAM, "bench", id="0", mkstream=True)
    except aioredis.ResponseError:
        pass
    while not stop.is_set():
        reply = await client.xreadgroup("bench", "c1", {STREAM: ">"}, count=1000, block=200)
        now = time.time()
        for _stream, entries in reply or []:
            ids = []
            for entry_id, fields in entries:
                ids.append(entry_id)
                if fields[b"type"] == b"collaboration:data_source:updated":
                    event = json.loads(fields[b"event"])
                    lags.setdefault(event["id"], now - event_time(event))
            if ids:
                await client.xack(STREAM, "bench", *ids)
    await client.aclose()


def summary(lags: list[float]) -> dict[str, Any]:
    return {
        "events": len(lags),
        "lag_p50_ms": round(percentile(lags, 0.50) * 1000, 1),
        "lag_p90_ms": round(percentile(lags, 0.90) * 1000, 1),
        "lag_p99_ms": round(percentile(lags, 0.99) * 1000, 1),
        "lag_max_ms": round(max(lags) * 1000, 1) if lags else None,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="events-bench-"))
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    redis_port = free_port()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed")
    redis_proc = subprocess.Popen(
        [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(work), "--logfile", str(work / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.sched_setaffinity(0, {1})) if pin else None,
    )  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    probe = aioredis.Redis.from_url(redis_url)
    for _ in range(200):
        try:
            await probe.ping()
            break
        except Exception:
            await asyncio.sleep(0.05)
    await probe.aclose()
    receiver = Receiver()
    hook = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    hook_port = hook.sockets[0].getsockname()[1]
    server = Proc(
        "collab",
        [
            sys.executable,
            *(["-c", _PROFILED, args.profile] if args.profile else ["-m", "collab"]),
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(work / "data"),
        ],  # fmt: skip
        {
            "COLLAB_LOG_LEVEL": "warning",
            **({} if args.no_stream else {"COLLAB_EVENTS_STREAM": STREAM, "COLLAB_EVENTS_REDIS_URL": redis_url}),
            **(
                {}
                if args.no_webhook
                else {
                    "COLLAB_EVENTS_WEBHOOK_URLS": f"http://127.0.0.1:{hook_port}/hook",
                    "COLLAB_EVENTS_WEBHOOK_SECRET": SECRET,
                    "COLLAB_EVENTS_WEBHOOK_BATCH_MAX": str(args.webhook_batch),
                }
            ),
            **({"COLLAB_EVENTS_ENABLED": "false"} if args.no_events else {}),
        },
        work / "server.log",
        r"listening on http://[\d.]+:(\d+)",
        0 if pin else None,
    ).start()
    ws_url = f"ws://127.0.0.1:{server.port}/ws"
    names = [f"bench-events-{i}" for i in range(args.workspaces)]
    clients = [await CollabClient(ws_url, name, hello=True).connect(timeout=30) for name in names]
    stream_lags: dict[str, float] = {}
    stop = asyncio.Event()
    consumer = asyncio.get_running_loop().create_task(consume(redis_url, stream_lags, stop))
    counter = [0, 0]
    result: dict[str, Any] = {"workdir": str(work), "load_average_before": os.getloadavg()}
    try:
        started = time.time()
        cpu0 = server.cpu_seconds()
        own0 = time.process_time()
        await make_changes(clients, args.rate, args.seconds, counter)
        elapsed = time.time() - started
        cpu1 = server.cpu_seconds()
        own1 = time.process_time()
        result["load_average_after"] = os.getloadavg()
        for client in clients:
            await client.wait_saved(60)
        made = counter[0]
        deadline = time.monotonic() + 60
        want_stream = 0 if (args.no_stream or args.no_events) else made
        want_hook = 0 if (args.no_webhook or args.no_events) else made
        while time.monotonic() < deadline and (len(stream_lags) < want_stream or len(receiver.lags) < want_hook):
            await asyncio.sleep(0.1)
        result["changes"] = made
        result["achieved_rate"] = round(made / elapsed, 1)
        result["server_cpu_percent"] = round(100 * (cpu1 - cpu0) / elapsed, 1)
        result["load_generator_cpu_percent"] = round(100 * (own1 - own0) / elapsed, 1)  # clients + receiver + reader
        result["stream"] = summary(list(stream_lags.values()))
        result["webhook"] = {
            **summary(list(receiver.lags.values())),
            "requests": receiver.requests,
            "bad_signatures": receiver.bad,
        }
        result["correct"] = len(stream_lags) == want_stream and len(receiver.lags) == want_hook and receiver.bad == 0
    finally:
        stop.set()
        await consumer
        for client in clients:
            await client.close()
        server.stop()
        hook.close()
        redis_proc.terminate()
        redis_proc.wait(10)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.events_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspaces", type=int, default=20)
    parser.add_argument("--rate", type=float, default=1000.0, help="changes per second over all workspaces")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of steady load")
    parser.add_argument("--webhook-batch", type=int, default=1, help="COLLAB_EVENTS_WEBHOOK_BATCH_MAX")
    parser.add_argument("--no-stream", action="store_true", help="no Redis Stream sink")
    parser.add_argument("--no-webhook", action="store_true", help="no webhook sink")
    parser.add_argument("--no-events", action="store_true", help="COLLAB_EVENTS_ENABLED=false (the baseline)")
    parser.add_argument("--profile", default=None, help="run the server under cProfile, writing this file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and load to separate CPUs")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    result["machine"] = machine()
    result["parameters"] = vars(args)
    print(json.dumps(result, indent=2))
    return 0 if result.get("correct") else 1


if __name__ == "__main__":
    raise SystemExit(main())
