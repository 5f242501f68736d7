"""``python -m loadtest {fanout,sweep,join,connections,awareness,locks,compare,serve}``.

fanout       one bounded run (duration + drain), prints a table, optional JSON
sweep        the same room shape with a shrinking write interval until p99
             exceeds the limit, updates are lost, or throughput stops growing
join         time for a new client to sync a document of N prior updates
connections  K idle connections: server memory per connection
awareness    presence (awareness) fan-out latency and deliveries
locks        lock acquire/release under contention (loadtest/locks_bench.py, our server only)
compare      ours vs Hocuspocus vs the Yjs reference server (loadtest/compare.py)
textfuzz     stock clients' random edits with real text, Yjs as the oracle (loadtest/textfuzz.py)
serve        start our server pinned to a core (see loadtest/serve.py)
roompath     the accepted-edit path without sockets: CPU per write (loadtest/roompath.py)

join/connections/awareness take --protocol hocuspocus to talk to a Hocuspocus server.

Targets must be loopback (127.0.0.0/8, localhost, ::1) unless --allow-remote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from loadtest.fanout import FanoutParams, FanoutResult, TargetError, check_target, print_table, run_fanout


def _add_run_args(p: argparse.ArgumentParser, sweep: bool) -> None:
    p.add_argument("--url", help="server websocket base URL, e.g. ws://127.0.0.1:8765/ws (rooms are URL/<name>)")
    p.add_argument("--rooms", type=int, default=1)
    p.add_argument("--clients", type=int, default=100, help="clients per room")
    p.add_argument("--writers", type=int, default=10, help="writers per room (among the clients)")
    if sweep:
        p.add_argument(
            "--intervals",
            default="100,50,20,10,5,2,1",
            help="write intervals in ms, tried in order (default %(default)s)",
        )
        p.add_argument("--p99-limit", type=float, default=100.0, help="stop when p99 exceeds this many ms")
        p.add_argument("--min-gain", type=float, default=0.05, help="stop when throughput grows less than this share")
    else:
        p.add_argument("--interval", type=float, default=10.0, help="ms between two edits of one writer")
    p.add_argument("--duration", type=float, default=20.0 if not sweep else 10.0, help="seconds of load (per step)")
    p.add_argument("--drain", type=float, default=5.0, help="seconds to wait for late deliveries after the load")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds between handshake and load")
    p.add_argument("--query", default="", help="query string for every room URL (e.g. identity: user=lt)")
    p.add_argument(
        "--protocol",
        choices=["y-websocket", "hocuspocus"],
        default="y-websocket",
        help="the server's dialect (hocuspocus: loadtest/protocols.py adapts the same clients)",
    )
    p.add_argument(
        "--map",
        default="config",
        help="the Y.Map the writers edit (default %(default)s: validated, audited and outboxed; any other name "
        "measures plain CRDT fan-out)",
    )
    p.add_argument("--server-pid", type=int, help="server PID: report its CPU time per delivery (/proc/PID/stat)")
    p.add_argument("--json", type=Path, help="also write the results here")
    if sweep:
        p.add_argument("--plot", type=Path, help="also draw p50/p99 latency against deliveries/s (PNG)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.add_argument("--harness-cpu", type=int, help="pin this process to a core (like taskset -c N)")
    p.add_argument(
        "--spawn-server",
        action="store_true",
        help="start our server for the run (pinned to --server-cpu, fresh temp data dir), stop it afterwards",
    )
    p.add_argument("--server-cpu", type=int, default=0, help="core for --spawn-server (-1: not pinned)")
    p.add_argument("--data-dir", help="data directory for --spawn-server (default: a temp dir)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="server websocket base URL, e.g. ws://127.0.0.1:8765/ws (rooms are URL/<name>)")
    p.add_argument("--protocol", choices=["y-websocket", "hocuspocus"], default="y-websocket")
    p.add_argument("--query", default="", help="query string for every room URL")
    p.add_argument("--server-pid", type=int, help="server PID: CPU and memory from /proc/PID")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    p.add_argument("--harness-cpu", type=int, help="pin this process to a core (like taskset -c N)")
    p.add_argument(
        "--spawn-server",
        action="store_true",
        help="start our server for the run (pinned, temp data dir, rate limits lifted as in compare)",
    )
    p.add_argument("--server-cpu", type=int, default=0, help="core for --spawn-server (-1: not pinned)")
    p.add_argument("--data-dir", help="data directory for --spawn-server (default: a temp dir)")


def _add_scenario_args(sub) -> None:
    j = sub.add_parser("join", help="new client sync time for a document of N updates")
    _add_common(j)
    j.add_argument("--updates", type=int, default=10_000)
    j.add_argument("--keys", type=int, default=1000, help="distinct map keys the updates cycle over")
    j.add_argument("--joins", type=int, default=20)
    c = sub.add_parser("connections", help="K idle connections: server memory per connection")
    _add_common(c)
    c.add_argument("--connections", type=int, default=5000)
    c.add_argument("--per-room", type=int, default=10)
    c.add_argument("--awareness", action="store_true", help="each client also sets an awareness state")
    c.add_argument("--settle", type=float, default=3.0, help="seconds between the last connect and the RSS reading")
    a = sub.add_parser("awareness", help="presence fan-out")
    _add_common(a)
    a.add_argument("--rooms", type=int, default=1)
    a.add_argument("--clients", type=int, default=100)
    a.add_argument("--movers", type=int, default=10, help="clients per room that change their state")
    a.add_argument("--interval", type=float, default=50.0, help="ms between two changes of one mover")
    a.add_argument("--duration", type=float, default=10.0)
    a.add_argument("--drain", type=float, default=3.0)


async def _scenario(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest import scenarios as sc

    common = dict(
        protocol=args.protocol,
        server_pid=args.server_pid,
        query=args.query,
        allow_remote=args.allow_remote,
        progress=not args.quiet,
    )
    if args.command == "join":
        res = await sc.run_join(args.url, args.updates, args.keys, args.joins, **common)
        sc.print_join(res)
    elif args.command == "connections":
        res = await sc.run_connections(
            args.url, args.connections, args.per_room, awareness=args.awareness, settle=args.settle, **common
        )
        sc.print_connections(res)
    else:
        res = await sc.run_awareness(
            args.url, args.rooms, args.clients, args.movers, args.interval, args.duration, args.drain, **common
        )
        sc.print_awareness(res)
    return {"scenario": args.command, "result": res.to_dict()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_args(sub.add_parser("fanout", help="R rooms x C clients, W writers each"), sweep=False)
    _add_run_args(sub.add_parser("sweep", help="shrink the write interval until saturation"), sweep=True)
    _add_scenario_args(sub)
    sub.add_parser("locks", help="lock acquire/release under contention (args: see locks --help)", add_help=False)
    sub.add_parser("textfuzz", help="stock clients vs the server with Yjs as oracle, many seeds", add_help=False)
    sub.add_parser("roompath", help="the accepted-edit path without sockets: CPU per write", add_help=False)
    sub.add_parser(
        "compare", help="ours vs Hocuspocus vs the reference server (args: see compare --help)", add_help=False
    )
    serve = sub.add_parser("serve", help="start our server pinned to a core")
    serve.add_argument("--cpu", type=int, default=0, help="core (-1: not pinned)")
    serve.add_argument("--data-dir", help="data directory (default: a temp dir, removed afterwards)")
    serve.add_argument("--port", type=int, default=0)
    return parser


def environment() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("pycrdt", "uvicorn", "starlette", "websockets", "uvloop")},
    }


def _params(args: argparse.Namespace, interval: float) -> FanoutParams:
    return FanoutParams(
        url=args.url,
        rooms=args.rooms,
        clients=args.clients,
        writers=args.writers,
        interval_ms=interval,
        duration=args.duration,
        drain=args.drain,
        warmup=args.warmup,
        server_pid=args.server_pid,
        query=args.query,
        progress=not args.quiet,
        map_name=getattr(args, "map", "config"),
    )


async def _fanout(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest.protocols import fanout_protocol

    with fanout_protocol(getattr(args, "protocol", "y-websocket")):
        res = await run_fanout(_params(args, args.interval), allow_remote=args.allow_remote)
    print_table([res])
    return {"scenario": "fanout", "result": res.to_dict()}


def _good(res: FanoutResult, p99_limit: float) -> bool:
    p99 = res.latency_ms.get("p99")
    return res.lost == 0 and res.converged and p99 is not None and p99 <= p99_limit and not res.disconnects


async def _sweep(args: argparse.Namespace) -> dict[str, Any]:
    intervals = [float(x) for x in args.intervals.split(",") if x.strip()]
    base = _params(args, intervals[0])
    results: list[FanoutResult] = []
    last_good: FanoutResult | None = None
    stop_reason = "all steps passed"
    for interval in intervals:
        res = await run_fanout(replace(base, interval_ms=interval), args.allow_remote, label=f"sweep T={interval:g}ms")
        results.append(res)
        if not _good(res, args.p99_limit):
            p99 = res.latency_ms.get("p99")
            stop_reason = (
                f"T={interval:g} ms: p99 {p99} ms (limit {args.p99_limit:g}), lost {res.lost}, "
                f"converged {res.converged}, disconnects {res.disconnects or 0}"
            )
            break
        if last_good is not None and res.delivered_per_s < last_good.delivered_per_s * (1 + args.min_gain):
            stop_reason = (
                f"T={interval:g} ms: throughput stopped growing ({res.delivered_per_s:.0f}/s vs "
                f"{last_good.delivered_per_s:.0f}/s)"
            )
            break
        last_good = res
        await asyncio.sleep(1.0)
    print_table(results)
    if last_good is not None:
        print(
            f"last good step: T={last_good.params['interval_ms']:g} ms, {last_good.delivered_per_s:.0f} deliveries/s, "
            f"p99 {last_good.latency_ms['p99']} ms"
        )
    else:
        print("no step passed")
    print(f"stopped: {stop_reason}")
    if any(r.harness_saturated for r in results):
        print("note: the harness saturated in some steps; their latencies include harness queueing")
    return {
        "scenario": "sweep",
        "p99_limit_ms": args.p99_limit,
        "stop_reason": stop_reason,
        "last_good": last_good.to_dict() if last_good else None,
        "steps": [r.to_dict() for r in results],
    }


def _run(coro_fn, args: argparse.Namespace) -> dict[str, Any]:
    use_uvloop = not args.no_uvloop
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
    if use_uvloop:
        return uvloop.run(coro_fn(args))
    return asyncio.run(coro_fn(args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "plot":
        from loadtest.plot import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "textfuzz":
        from loadtest.textfuzz import main as textfuzz_main

        return textfuzz_main(argv[1:])
    if argv and argv[0] == "roompath":
        from loadtest.roompath import main as roompath_main

        return roompath_main(argv[1:])
    if argv and argv[0] in ("locks", "compare"):
        if argv[0] == "locks":
            from loadtest.locks_bench import main as locks_main

            return locks_main(argv[1:])
        from loadtest.compare import main as compare_main

        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from loadtest.serve import main as serve_main

        return serve_main(args)

    if args.harness_cpu is not None:
        os.sched_setaffinity(0, {args.harness_cpu})
    server = None
    if args.spawn_server:
        if args.url:
            print("--spawn-server and --url are exclusive", file=sys.stderr)
            return 2
        cpu = None if args.server_cpu < 0 else args.server_cpu
        if args.command in ("fanout", "sweep"):
            from loadtest.serve import PinnedServer

            server = PinnedServer(cpu=cpu, data_dir=args.data_dir).start()
        else:
            from loadtest.compare import OUR_ENV, OurServer

            server = OurServer(cpu=cpu, data_dir=args.data_dir, env=OUR_ENV).start()
        args.url = server.ws_url
        args.server_pid = server.pid
        if not args.quiet:
            print(f"spawned server pid {server.pid} on cpu {args.server_cpu}: {server.ws_url}", file=sys.stderr)
    if not args.url:
        print("--url (or --spawn-server) is required", file=sys.stderr)
        return 2
    try:
        check_target(args.url, args.allow_remote)
    except TargetError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2
    try:
        fn = {"fanout": _fanout, "sweep": _sweep}.get(args.command, _scenario)
        out = _run(fn, args)
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.stop()
    if args.json:
        out["environment"] = environment()
        out["command"] = " ".join(sys.argv)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if getattr(args, "plot", None) and out["scenario"] == "sweep":
        from loadtest.plot import draw

        draw(out, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if out["scenario"] == "fanout":
        res = out["result"]
        return 0 if res["lost"] == 0 and res["converged"] else 1
    if out["scenario"] in ("join", "awareness"):
        return 0 if out["result"]["converged"] else 1
    if out["scenario"] == "connections":
        return 0 if out["result"]["failed"] == 0 else 1
    return 0
