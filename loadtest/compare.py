"""Our server vs Hocuspocus vs the Yjs reference server, same harness, one run.

    (cd loadtest/peers && npm ci)          # once; benchmark only, not part of make test
    python -m loadtest compare --json /tmp/compare.json --markdown /tmp/compare.md

Each server is started fresh for every scenario, pinned to core 0
(``taskset -c 0``, open-files limit raised with ``prlimit``), listening on
127.0.0.1 only; this process pins itself to core 1. Only processes started
here are stopped, by PID.

Servers:
  ours        ``collab serve`` (SQLite persistence on, in a temp dir), with the
              per-connection limits that would throttle a load generator
              lifted: COLLAB_MESSAGE_RATE=0, COLLAB_BYTE_RATE=0,
              COLLAB_MAX_CONNECTIONS_PER_IP=0, COLLAB_MAX_CONNECTIONS=0,
              COLLAB_LOG_LEVEL=warning. No forwarding backend configured.
  hocuspocus  ``@hocuspocus/server`` (loadtest/peers/hocuspocus.mjs: in memory,
              no extensions), through the Hocuspocus dialect adapter.
  reference   ``@y/websocket-server`` utils (loadtest/peers/y-websocket.mjs:
              in memory, no persistence, no callback).

Scenarios (``--scenarios``, default all, in this order):
  connections  5,000 idle connections, 10 per room: server RSS per connection
  join         a new client syncs a 10,000-update document (step 1 -> step 2)
  cpu          1 room x 100 clients, 10 writers at 10 writes/s each: server
               CPU per delivered update
  sweep1       1 room x 100 clients, 10 writers: saturation sweep
  sweep50      50 rooms x 10 clients, 2 writers each: saturation sweep
  awareness    1 room x 100 clients, 10 movers every 50 ms
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest.protocols import fanout_protocol
from loadtest.serve import PinnedServer
from procs import ManagedProcess

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).resolve().parent / "peers"
SERVERS = ("ours", "hocuspocus", "reference")
SCENARIOS = ("connections", "join", "cpu", "sweep1", "sweep50", "awareness")


def _nofile() -> int:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)


NOFILE = _nofile()  # soft = hard limit for the servers (raising the hard limit needs privileges)
OUR_ENV = {
    "COLLAB_MESSAGE_RATE": "0",
    "COLLAB_BYTE_RATE": "0",
    "COLLAB_MAX_CONNECTIONS_PER_IP": "0",
    "COLLAB_MAX_CONNECTIONS": "0",
    "COLLAB_LOG_LEVEL": "warning",
}
_NODE_LISTENING = r"listening on (?P<port>\d+)"


class OurServer(PinnedServer):
    def command(self) -> list[str]:
        cmd = super().command()
        prlimit = shutil.which("prlimit")
        return [prlimit, f"--nofile={NOFILE}:{NOFILE}", *cmd] if prlimit else cmd


class NodeServer:
    """A peer server (Node.js) pinned to one core; stopped by its PID (a procs.ManagedProcess)."""

    def __init__(self, script: str, cpu: int | None, log_path: Path) -> None:
        self.script = PEERS / script
        self.cpu = cpu
        self.log_path = log_path
        self.child: ManagedProcess | None = None
        self.port: int | None = None

    @property
    def proc(self):
        return self.child.proc if self.child is not None else None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> NodeServer:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node not found")
        if not (PEERS / "node_modules").exists():
            raise RuntimeError(f"peers not installed: (cd {PEERS} && npm ci)")
        cmd = [node, str(self.script)]
        prlimit = shutil.which("prlimit")
        if prlimit:
            cmd = [prlimit, f"--nofile={NOFILE}:{NOFILE}", *cmd]
        if self.cpu is not None:
            cmd = ["taskset", "-c", str(self.cpu), *cmd]
        self.child = ManagedProcess(
            cmd,
            name=self.script.name,
            log_path=self.log_path,
            env={"HOST": "127.0.0.1", "PORT": "0", "NODE_ENV": "production"},
            cwd=PEERS,
            ready_log=_NODE_LISTENING,
        )
        self.child.start(timeout)
        self.port = self.child.port
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.child is not None:
            self.child.stop(timeout)


def node_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("@hocuspocus/server", "@y/websocket-server", "yjs", "ws", "y-protocols"):
        try:
            out[pkg] = json.loads((PEERS / "node_modules" / pkg / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            out[pkg] = None
    try:
        out["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["node"] = None
    return out


def start_server(kind: str, cpu: int | None, workdir: Path):
    if kind == "ours":
        return OurServer(cpu=cpu, data_dir=workdir / "ours-data", env=OUR_ENV, log_path=workdir / "ours.log").start()
    if kind == "hocuspocus":
        return NodeServer("hocuspocus.mjs", cpu, workdir / "hocuspocus.log").start()
    if kind == "reference":
        return NodeServer("y-websocket.mjs", cpu, workdir / "reference.log").start()
    raise ValueError(kind)


def protocol_of(kind: str) -> str:
    return "hocuspocus" if kind == "hocuspocus" else "y-websocket"


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _sweep_args(args: argparse.Namespace, url: str, pid: int, rooms: int, clients: int, writers: int, intervals: str):
    return argparse.Namespace(
        url=url,
        rooms=rooms,
        clients=clients,
        writers=writers,
        intervals=intervals,
        p99_limit=args.p99_limit,
        min_gain=0.05,
        duration=args.step_duration,
        drain=3.0,
        warmup=1.0,
        server_pid=pid,
        query="",
        quiet=args.quiet,
        allow_remote=False,
    )


async def run_scenario(kind: str, scenario: str, server, args: argparse.Namespace) -> dict[str, Any]:
    from loadtest import scenarios as sc
    from loadtest.cli import _sweep
    from loadtest.fanout import FanoutParams, print_table, run_fanout

    proto = protocol_of(kind)
    url, pid = server.ws_url, server.pid
    quiet = args.quiet
    if scenario == "connections":
        res = await sc.run_connections(
            url, args.connections, args.per_room, protocol=proto, server_pid=pid, progress=not quiet
        )
        sc.print_connections(res)
        return res.to_dict()
    if scenario == "join":
        res = await sc.run_join(
            url, args.join_updates, joins=args.joins, protocol=proto, server_pid=pid, progress=not quiet
        )
        sc.print_join(res)
        return res.to_dict()
    if scenario == "awareness":
        res = await sc.run_awareness(
            url, 1, 100, 10, 50.0, duration=args.step_duration, protocol=proto, server_pid=pid, progress=not quiet
        )
        sc.print_awareness(res)
        return res.to_dict()
    with fanout_protocol(proto):
        if scenario == "cpu":
            prm = FanoutParams(
                url=url,
                rooms=1,
                clients=100,
                writers=10,
                interval_ms=100.0,
                duration=args.cpu_duration,
                drain=3.0,
                server_pid=pid,
                progress=not quiet,
            )
            fres = await run_fanout(prm)
            print_table([fres])
            return fres.to_dict()
        if scenario == "sweep1":
            return await _sweep(_sweep_args(args, url, pid, 1, 100, 10, args.intervals1))
        if scenario == "sweep50":
            return await _sweep(_sweep_args(args, url, pid, 50, 10, 2, args.intervals50))
    raise ValueError(scenario)


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


def markdown(results: dict[str, dict[str, Any]], servers: list[str]) -> str:
    """One table: a row per figure, a column per server."""
    rows: list[tuple[str, list[str]]] = []

    def get(kind: str, scen: str) -> dict[str, Any] | None:
        r = results.get(kind, {}).get(scen)
        return r if isinstance(r, dict) and "error" not in r else None

    def sweep_cells(scen: str) -> None:
        sat, p99, stop = [], [], []
        for k in servers:
            r = get(k, scen)
            lg = r and r.get("last_good")
            if lg:
                sat.append(f"{lg['delivered_per_s']:,.0f}/s (T={lg['params']['interval_ms']:g} ms)")
                p99.append(f"{lg['latency_ms']['p99']} ms")
            else:
                sat.append("none" if r else "–")
                p99.append("–")
            stop.append((r or {}).get("stop_reason", results.get(k, {}).get(scen, {}).get("error", "–")))
        label = {"sweep1": "1 room × 100 clients, 10 writers", "sweep50": "50 rooms × 10 clients, 2 writers"}[scen]
        rows.append((f"{label}: saturation (last step p99 ≤ 100 ms)", sat))
        rows.append((f"{label}: p99 at that step", p99))
        rows.append((f"{label}: sweep stopped at", [str(s) for s in stop]))

    if any(get(k, "sweep1") for k in servers):
        sweep_cells("sweep1")
    if any(get(k, "sweep50") for k in servers):
        sweep_cells("sweep50")
    if any(get(k, "cpu") for k in servers):
        cells, util, lat = [], [], []
        for k in servers:
            r = get(k, "cpu")
            cells.append(_fmt(r and r.get("server_us_per_delivery"), ".2f") + " µs" if r else "–")
            util.append(f"{r['server_cpu_util'] * 100:.0f} %" if r and r.get("server_cpu_util") is not None else "–")
            lat.append(
                f"{r['latency_ms']['p50']} / {r['latency_ms']['p99']} ms, lost {r['lost']}, "
                f"{'converged' if r['converged'] else 'NOT converged'}"
                if r
                else "–"
            )
        rows.append(("server CPU per delivered update (1×100, 10 writers × 10/s)", cells))
        rows.append(("server CPU (share of its core) at that load", util))
        rows.append(("p50 / p99 latency at that load", lat))
    if any(get(k, "connections") for k in servers):
        cells = []
        for k in servers:
            r = get(k, "connections")
            cells.append(f"{r['kib_per_connection']} KiB ({r['connected']} open, {r['failed']} failed)" if r else "–")
        rows.append(("idle connection memory (RSS delta / connections)", cells))
    if any(get(k, "join") for k in servers):
        cells, first, size = [], [], []
        for k in servers:
            r = get(k, "join")
            if r:
                j = r["join_ms"]
                cells.append(f"{j['p50']} / {j['p95']} / {j['max']} ms ({r['joins_correct']}/{r['joins']} correct)")
                first.append(f"{r['first_join_ms']} ms")
                size.append(f"{r['step2_bytes']:,} B")
            else:
                cells.append("–")
                first.append("–")
                size.append("–")
        rows.append(("join 10,000-update doc, step 1 → step 2 p50 / p95 / max", cells))
        rows.append(("first join after seeding", first))
        rows.append(("step 2 size", size))
    if any(get(k, "awareness") for k in servers):
        cells, cpu = [], []
        for k in servers:
            r = get(k, "awareness")
            if r:
                lat = r["latency_ms"]
                cells.append(
                    f"{lat['p50']} / {lat['p99']} ms, {r['delivered']:,} of {r['max_deliveries']:,} delivered, "
                    f"stale {r['stale_final']}"
                )
                cpu.append(_fmt(r.get("server_us_per_delivery"), ".2f") + " µs")
            else:
                cells.append("–")
                cpu.append("–")
        rows.append(("awareness 1×100, 10 movers / 50 ms: p50 / p99", cells))
        rows.append(("awareness: server CPU per delivery", cpu))
    head = "| | " + " | ".join(servers) + " |\n|---|" + "---|" * len(servers) + "\n"
    return head + "".join(f"| {label} | " + " | ".join(cells) + " |\n" for label, cells in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest compare", description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--harness-cpu", type=int, default=1)
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--per-room", type=int, default=10)
    ap.add_argument("--join-updates", type=int, default=10_000)
    ap.add_argument("--joins", type=int, default=20)
    ap.add_argument("--intervals1", default="50,20,10,5,3,2,1.5,1", help="sweep1 write intervals, ms")
    ap.add_argument("--intervals50", default="50,20,10,5,3,2,1.5,1", help="sweep50 write intervals, ms")
    ap.add_argument("--p99-limit", type=float, default=100.0)
    ap.add_argument("--step-duration", type=float, default=5.0, help="seconds per sweep step / awareness run")
    ap.add_argument("--cpu-duration", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path, help="also draw the sweeps: p50/p99 latency against deliveries/s (PNG)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s}")
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s}")
    ncpu = os.cpu_count() or 1
    server_cpu = args.server_cpu if ncpu > 1 and args.server_cpu >= 0 else None
    if ncpu > 1 and args.harness_cpu >= 0:
        os.sched_setaffinity(0, {args.harness_cpu})
    from loadtest.cli import _run, environment
    from loadtest.scenarios import raise_nofile

    raise_nofile()
    results: dict[str, dict[str, Any]] = {k: {} for k in servers}
    loads: dict[str, dict[str, list[float]]] = {k: {} for k in servers}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="collab-compare-") as tmp:
        workdir = Path(tmp)
        for scen in scenarios:
            for kind in servers:
                print(f"\n=== {kind}: {scen} (load average {load_avg()}) ===", flush=True)
                server = None
                try:
                    server = start_server(kind, server_cpu, workdir)
                    time.sleep(0.5)
                    before = load_avg()

                    async def go(_args=None, kind=kind, scen=scen, server=server):
                        return await run_scenario(kind, scen, server, args)

                    results[kind][scen] = _run(go, argparse.Namespace(no_uvloop=False))
                    loads[kind][scen] = [*before, *load_avg()]
                except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
                    print(f"{kind} {scen} failed: {exc!r}", file=sys.stderr)
                    results[kind][scen] = {"error": repr(exc)}
                finally:
                    if server is not None:
                        server.stop()
                time.sleep(1.0)
    md = markdown(results, servers)
    print("\n" + md)
    out = {
        "servers": servers,
        "scenarios": scenarios,
        "results": results,
        "load_average_before_after": loads,
        "environment": {**environment(), **node_versions(), "load_average_end": load_avg()},
        "our_server_env": OUR_ENV,
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        args.markdown.write_text(md)
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.plot:
        from loadtest.plot import draw

        try:
            draw(out, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except ValueError as exc:
            print(f"no plot: {exc}", file=sys.stderr)
    return 0
