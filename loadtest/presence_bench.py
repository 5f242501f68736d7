"""Presence benchmark: fan-out latency and the cost of many participants.

    python -m loadtest.presence_bench                     # both scenarios, in-process registry
    python -m loadtest.presence_bench --registry redis    # rosters in a redis-server started here
    python -m loadtest.presence_bench --scenario fanout --participants 100 --changes 300
    python -m loadtest.presence_bench --scenario fanout --registry redis --nodes 2   # across two servers

Scenario ``fanout``: N participants (``hello`` clients) in one room. One at a
time, a participant changes its awareness ``focus``; the latency is measured
from just before that awareness frame is sent to the moment each other
participant has decoded the ``presence.diff`` that carries the new focus
(p50/p99 over every delivery). Changes are paced (``--interval``) so each one
is a change after a quiet spell, as a person's would be. With ``--nodes 2``
the participants are dealt across two servers sharing a Redis, so half of
the deliveries cross nodes (Redis write, publish, the other node's re-read).

Scenario ``scale``: R rooms with K participants each (1,000 across 100 by
default). Reports the server's memory per participant, the CPU it spends
while everyone is idle (heartbeats and roster polls) and while every
participant changes focus every ``--period`` seconds, and the fan-out latency
under that load. With ``--registry redis`` also Redis' memory and commands.

The server runs as a child process (``python -m collab serve``) on a free
loopback port, pinned to CPU 0 when there are two or more CPUs; this process
(the clients) pins itself to CPU 1. Everything started is ended by its PID.
Each run is bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from codec import protocol as p
from collab.client import CollabClient
from procs import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = r"listening on http://[\d.]+:(?P<port>\d+)"


# ------------------------------------------------------------------ processes


def start_redis(workdir: Path) -> tuple[ManagedProcess, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--daemonize", "no"]  # fmt: skip
    child = ManagedProcess(args, name="redis-server", log_path=workdir / "redis.log", port=port, stop_timeout=15)
    try:
        child.start(10)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return child, f"redis://127.0.0.1:{port}/0"


def start_server(workdir: Path, env: dict[str, str], cpu: int | None) -> tuple[ManagedProcess, str]:
    args = [sys.executable, "-m", "collab", "serve", "--port", "0", "--data-dir", str(workdir / "data")]
    child = ManagedProcess(
        args,
        name="server",
        log_path=workdir / "server.log",
        env={"PYTHONUNBUFFERED": "1", "COLLAB_LOG_LEVEL": "warning", **env},
        cwd=ROOT,
        ready_log=_LISTENING,
        cpus={cpu} if cpu is not None else None,
        stop_timeout=15,
    )
    try:
        child.start(20)
    except RuntimeError as exc:
        raise SystemExit(str(exc)) from None
    return child, f"ws://127.0.0.1:{child.port}/ws"


# -------------------------------------------------------------------- clients


class Tracker:
    """Counts deliveries of (user, focus) and wakes whoever waits for all of them."""

    def __init__(self, relay: Tracker | None = None) -> None:
        self.relay = relay  # the same changes, seen as awareness frames
        self.expected: dict[tuple[str, str], int] = {}
        self.expected_total: dict[tuple[str, str], int] = {}
        self.sent_at: dict[tuple[str, str], float] = {}
        self.latencies: list[float] = []
        self.first: list[float] = []  # per change: the first receiver's latency
        self.done: dict[tuple[str, str], asyncio.Event] = {}

    def expect(self, key: tuple[str, str], receivers: int) -> asyncio.Event:
        if self.relay is not None:
            self.relay.expect(key, receivers)
        self.expected[key] = receivers
        self.expected_total[key] = receivers
        self.done[key] = event = asyncio.Event()
        self.sent_at[key] = time.perf_counter()
        return event

    def seen(self, key: tuple[str, str], at: float) -> None:
        left = self.expected.get(key)
        if left is None:
            return
        self.latencies.append(at - self.sent_at[key])
        if left == self.expected_total.get(key):
            self.first.append(at - self.sent_at[key])
        if left <= 1:
            del self.expected[key]
            self.done.pop(key).set()
        else:
            self.expected[key] = left - 1


class Probe(CollabClient):
    """A participant that timestamps the presence diffs it decodes."""

    def __init__(self, url: str, workspace: str, user: str, tracker: Tracker) -> None:
        super().__init__(url, workspace, hello=True, query=f"user={user}&name={user}")
        self.user = user
        self.tracker = tracker
        self.roster: set[str] = set()
        self.diffs = 0

    def _handle(self, msg: p.Message) -> None:
        if isinstance(msg, p.AwarenessMessage) and self.tracker.relay is not None:
            # Baseline: the plain awareness relay of the same change (what Yjs alone gives).
            now = time.perf_counter()
            for entry in msg.entries:
                if entry.state is not None:
                    state = json.loads(entry.state)
                    user, focus = (state.get("user") or {}).get("id"), state.get("focus")
                    if user and focus:
                        self.tracker.relay.seen((user, focus), now)
            return
        if isinstance(msg, p.Control):
            body = msg.body
            if body["type"] == "presence.diff":
                now = time.perf_counter()
                self.diffs += 1
                for x in body["joins"] + body["updates"]:
                    if x.get("editing"):
                        self.tracker.seen((x["user_id"], x["editing"]), now)
                    self.roster.add(x["user_id"])
                for x in body["leaves"]:
                    self.roster.discard(x["user_id"])
                self._changed_remote()
                return  # not kept in .control: a long run would hold every diff
            if body["type"] == "presence.snapshot":
                self.roster = {x["user_id"] for x in body["participants"]}
                self._changed_remote()
                return
        super()._handle(msg)


async def connect_all(probes: list[Probe], batch: int = 50) -> None:
    for i in range(0, len(probes), batch):
        await asyncio.gather(*(c.connect(timeout=30) for c in probes[i : i + batch]))


async def wait_rosters(rooms: dict[str, list[Probe]], timeout: float) -> None:
    for members in rooms.values():
        names = {c.user for c in members}
        await asyncio.gather(
            *(c.until(lambda c=c, names=names: c.roster == names, timeout, "full roster") for c in members)
        )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# ------------------------------------------------------------------ scenarios


async def fanout(
    urls: list[str], servers: list[ManagedProcess], participants: int, changes: int, interval: float
) -> dict[str, Any]:
    """With several URLs (nodes), participants are dealt round-robin across them."""
    relay = Tracker()
    tracker = Tracker(relay)
    probes = [Probe(urls[i % len(urls)], "bench-fanout", f"u{i:04d}", tracker) for i in range(participants)]
    t0 = time.perf_counter()
    await connect_all(probes)
    await wait_rosters({"bench-fanout": probes}, 60)
    joined = time.perf_counter() - t0
    per_change: list[float] = []
    cpu0 = sum(s.cpu_seconds() for s in servers)
    for i in range(changes):
        changer = probes[i % participants]
        key = (changer.user, f"field.{i}")
        done = tracker.expect(key, participants - 1)
        await changer.set_awareness({"focus": key[1]})
        start = tracker.sent_at[key]
        await asyncio.wait_for(done.wait(), 10)
        per_change.append(time.perf_counter() - start)
        await asyncio.sleep(interval)
    cpu = sum(s.cpu_seconds() for s in servers) - cpu0
    diffs = sum(c.diffs for c in probes)
    await asyncio.gather(*(c.close() for c in probes), return_exceptions=True)
    lat = tracker.latencies
    return {
        "nodes": len(urls),
        "participants": participants,
        "changes": changes,
        "deliveries": len(lat),
        "join_all_seconds": round(joined, 2),
        "p50_ms": round(pct(lat, 50) * 1000, 2),
        "p99_ms": round(pct(lat, 99) * 1000, 2),
        "max_ms": round(max(lat) * 1000, 2),
        "first_receiver_p50_ms": round(statistics.median(tracker.first) * 1000, 2),
        "awareness_relay_p50_ms": round(pct(relay.latencies, 50) * 1000, 2),
        "awareness_relay_p99_ms": round(pct(relay.latencies, 99) * 1000, 2),
        "last_receiver_p50_ms": round(statistics.median(per_change) * 1000, 2),
        "diffs_received": diffs,
        "server_cpu_ms_per_change": round(cpu / changes * 1000, 2),
    }


async def scale(
    url: str, server: ManagedProcess, rooms: int, per_room: int, period: float, duration: float, redis_url: str | None
) -> dict[str, Any]:
    tracker = Tracker()
    by_room = {
        f"bench-scale-{r:03d}": [
            Probe(url, f"bench-scale-{r:03d}", f"r{r:03d}u{k:02d}", tracker) for k in range(per_room)
        ]
        for r in range(rooms)
    }
    probes = [c for members in by_room.values() for c in members]
    rss0 = server.rss_bytes()
    redis0 = _redis_info(redis_url)
    t0 = time.perf_counter()
    await connect_all(probes)
    await wait_rosters(by_room, 120)
    joined = time.perf_counter() - t0
    await asyncio.sleep(1.0)  # let the join burst settle before measuring memory
    rss1 = server.rss_bytes()
    redis1 = _redis_info(redis_url)

    # Idle: only heartbeats, roster polls and websocket pings.
    cpu0, w0 = server.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(min(10.0, duration))
    idle_cpu = (server.cpu_seconds() - cpu0) / (time.perf_counter() - w0)

    # Load: every participant changes focus every `period` seconds, spread evenly.
    total = len(probes)
    gap = period / total
    rounds = max(1, int(duration / period))
    cmd0 = redis1.get("total_commands_processed", 0) if redis1 else 0
    cpu0, w0 = server.cpu_seconds(), time.perf_counter()
    waits: list[asyncio.Task] = []
    next_at = time.perf_counter()
    for r in range(rounds):
        for c in probes:
            key = (c.user, f"f.{r}")
            done = tracker.expect(key, per_room - 1)
            await c.set_awareness({"focus": key[1]})
            waits.append(asyncio.ensure_future(asyncio.wait_for(done.wait(), 15)))
            next_at += gap
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
    await asyncio.gather(*waits)
    wall = time.perf_counter() - w0
    load_cpu = (server.cpu_seconds() - cpu0) / wall
    redis2 = _redis_info(redis_url)
    await asyncio.gather(*(c.close() for c in probes), return_exceptions=True)
    lat = tracker.latencies
    out = {
        "rooms": rooms,
        "per_room": per_room,
        "participants": total,
        "join_all_seconds": round(joined, 2),
        "server_rss_mib_before": round(rss0 / 2**20, 1),
        "server_rss_mib_after": round(rss1 / 2**20, 1),
        "rss_kib_per_participant": round((rss1 - rss0) / total / 1024, 1),
        "idle_cpu_percent": round(idle_cpu * 100, 1),
        "changes_per_second": round(total * rounds / wall, 1),
        "load_cpu_percent": round(load_cpu * 100, 1),
        "deliveries": len(lat),
        "p50_ms": round(pct(lat, 50) * 1000, 2),
        "p99_ms": round(pct(lat, 99) * 1000, 2),
    }
    if redis_url:
        out["redis_used_memory_kib_per_participant"] = round(
            (redis1["used_memory"] - redis0["used_memory"]) / total / 1024, 2
        )
        out["redis_commands_per_second_under_load"] = round(
            (redis2.get("total_commands_processed", 0) - cmd0) / wall, 1
        )
    return out


def _redis_info(url: str | None) -> dict[str, Any] | None:
    if not url:
        return None
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("memory")
        info.update(client.info("stats"))
        return info
    finally:
        client.close()


# ------------------------------------------------------------------------ main


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),  # other work on the machine skews the figures
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pin = (os.cpu_count() or 1) >= 2 and not args.no_pin
    if pin:
        os.sched_setaffinity(0, {1})
    results: dict[str, Any] = {"machine": machine(), "registry": args.registry, "pinned": pin}
    with tempfile.TemporaryDirectory(prefix="presence-bench-") as tmp:
        workdir = Path(tmp)
        redis_child, redis_url = (None, None)
        if args.registry == "redis":
            redis_child, redis_url = start_redis(workdir)
        env = {
            "COLLAB_PRESENCE_COALESCE_MS": str(args.coalesce_ms),
            "COLLAB_ROOM_IDLE_SECONDS": "60",
            **({"COLLAB_REDIS_URL": redis_url} if redis_url else {}),
        }
        server, url = start_server(workdir, env, 0 if pin else None)
        servers, urls = [server], [url]
        try:
            for n in range(1, args.nodes):
                node_dir = workdir / f"node{n}"
                node_dir.mkdir()
                node_env = {**env, "COLLAB_NODE_ID": f"bench-node-{n}"}
                extra, extra_url = start_server(node_dir, node_env, 0 if pin else None)
                servers.append(extra)
                urls.append(extra_url)
            if args.scenario in ("fanout", "all"):
                results["fanout"] = await asyncio.wait_for(
                    fanout(urls, servers, args.participants, args.changes, args.interval), args.max_seconds
                )
            if args.scenario in ("scale", "all"):
                results["scale"] = await asyncio.wait_for(
                    scale(url, server, args.rooms, args.per_room, args.period, args.duration, redis_url),
                    args.max_seconds,
                )
        finally:
            for child in servers:
                child.stop()
            if redis_child is not None:
                redis_child.stop()
            if args.server_log:
                shutil.copy(workdir / "server.log", args.server_log)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.presence_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["fanout", "scale", "all"], default="all")
    parser.add_argument("--registry", choices=["memory", "redis"], default="memory")
    parser.add_argument("--participants", type=int, default=100, help="fanout: participants in the room")
    parser.add_argument("--nodes", type=int, default=1, help="fanout: servers sharing the room (with redis)")
    parser.add_argument("--changes", type=int, default=300, help="fanout: focus changes measured")
    parser.add_argument("--interval", type=float, default=0.06, help="fanout: pause after each change (s)")
    parser.add_argument("--rooms", type=int, default=100, help="scale: rooms")
    parser.add_argument("--per-room", type=int, default=10, help="scale: participants per room")
    parser.add_argument("--period", type=float, default=10.0, help="scale: each participant changes focus this often")
    parser.add_argument("--duration", type=float, default=20.0, help="scale: seconds of load (and up to 10 idle)")
    parser.add_argument("--coalesce-ms", type=float, default=50.0, help="COLLAB_PRESENCE_COALESCE_MS for the server")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="hard bound per scenario")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and clients to CPUs 0 and 1")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--server-log", help="keep a copy of the server's log here")
    args = parser.parse_args(argv)
    if args.nodes > 1 and args.registry != "redis":
        parser.error("--nodes > 1 needs --registry redis")
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    m = results["machine"]
    print(
        f"machine: {m['nproc']} CPUs, {m['cpu']}; Python {m['python']}; load average {m['loadavg_1m_at_start']}; "
        f"registry {results['registry']}; server on CPU 0, clients on CPU 1: {results['pinned']}"
    )
    for name in ("fanout", "scale"):
        if name in results:
            print(f"\n[{name}]")
            for key, value in results[name].items():
                print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
