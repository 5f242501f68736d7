"""Scenarios beside fan-out: ``join``, ``connections``, ``awareness``.

All of them drive any y-websocket server (and Hocuspocus through
``loadtest.protocols``) with the lean client, from one asyncio loop, bounded
in time and count.

join         seed a room with N updates (one client, Y.Map ``config``: key
             ``k{i % keys}`` set to a 16-character value, so most updates
             overwrite), wait until a watcher has them all, then time new
             clients: sync step 1 sent (empty state vector) -> sync step 2
             received. The seeder stays connected (the room is hot); each
             step 2 is checked off the clock (the joined document holds the
             seeder's final value).
connections  K idle clients in K/per_room rooms, each after the handshake
             (step 1 / step 2, no awareness unless asked): the server's RSS
             (VmRSS in /proc/PID/status) before and after, per connection.
awareness    R rooms x C clients, each with an awareness state; M movers per
             room change theirs every T ms (a cursor). Latency send ->
             receipt at every other client, deliveries (servers may coalesce:
             awareness keeps the newest state only), and at the end every
             client must hold each mover's final state.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import secrets
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pycrdt

from codec import protocol as p
from loadtest.fanout import Progress, check_target, proc_cpu_seconds
from loadtest.protocols import client_class
from loadtest.wsclient import LeanWebSocket

_now_ns = time.perf_counter_ns


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's open-files soft limit (to the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(hard, max(soft, want))
    if target != resource.RLIM_INFINITY and target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def summary_ms(values_ms: list[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None, "samples": 0}
    return {
        "p50": round(pct(values_ms, 0.50), 3),  # type: ignore[arg-type]
        "p95": round(pct(values_ms, 0.95), 3),  # type: ignore[arg-type]
        "p99": round(pct(values_ms, 0.99), 3),  # type: ignore[arg-type]
        "max": round(max(values_ms), 3),
        "mean": round(statistics.fmean(values_ms), 3),
        "samples": len(values_ms),
    }


class SyncClient(LeanWebSocket):
    """Answers the server's step 1 with an empty step 2; keeps step 2s and awareness frames."""

    def __init__(self) -> None:
        super().__init__()
        loop = asyncio.get_running_loop()
        self.step2: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self.updates: list[bytes] = []
        self.keep_updates = False

    def on_message(self, m: bytes) -> None:
        if m[0] != 0:
            return
        sub = m[1]
        if sub == 1:
            if not self.step2.done():
                self.step2.set_result((_now_ns(), m))
            elif self.keep_updates:
                self.updates.append(p.read_var_bytes(m, 2)[0])
        elif sub == 2:
            if self.keep_updates:
                self.updates.append(p.read_var_bytes(m, 2)[0])
        elif sub == 0:
            self.send(p.encode_sync_step2(p.EMPTY_UPDATE))

    def on_closed(self) -> None:
        if not self.step2.done():
            self.step2.set_exception(ConnectionError(f"closed before step 2 ({self.close_code} {self.close_reason})"))
            self.step2.exception()  # whoever awaits it still gets it; nobody else: no "never retrieved" noise


def _room_path(base: str, room: str, query: str) -> str:
    q = f"?{query.lstrip('?')}" if query else ""
    return f"{base}/{room}{q}"


# ---------------------------------------------------------------------- join


@dataclass
class JoinResult:
    params: dict[str, Any]
    seed_s: float = 0.0
    seed_updates_per_s: float = 0.0
    document_bytes: int = 0
    step2_bytes: int = 0
    join_ms: dict[str, float | None] = field(default_factory=dict)
    first_join_ms: float | None = None
    joins_correct: int = 0
    joins: int = 0
    server_cpu_ms_per_join: float | None = None
    converged: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_join(
    url: str,
    updates: int = 10_000,
    keys: int = 1000,
    joins: int = 20,
    protocol: str = "y-websocket",
    server_pid: int | None = None,
    query: str = "",
    allow_remote: bool = False,
    progress: bool = True,
    seed_timeout: float = 120.0,
) -> JoinResult:
    host, port, base = check_target(url, allow_remote)
    room = f"loadtest-join-{secrets.token_hex(4)}"
    path = _room_path(base, room, query)
    Client = client_class(SyncClient, protocol)
    prog = Progress(progress, "join")
    res = JoinResult(params={"url": url, "updates": updates, "keys": keys, "joins": joins, "protocol": protocol})

    seeder = Client()
    watcher = Client()
    watcher.keep_updates = True
    opened: list[LeanWebSocket] = [seeder, watcher]
    try:
        for c in (seeder, watcher):
            await c.open(host, port, path)
            c.send(p.encode_sync_step1(b"\x00"))
            async with asyncio.timeout(10):
                await c.step2
        doc = pycrdt.Doc()
        cfg = doc.get("config", type=pycrdt.Map)
        out: list[bytes] = []
        sub = doc.observe(lambda e: out.append(e.update))
        final = f"final-{secrets.token_hex(4)}"
        prog.message(f"seeding {updates} updates into {room} ...")
        t0 = time.monotonic()
        for i in range(updates):
            cfg[f"k{i % keys}"] = final if i == updates - 1 else f"v{i:015d}"
            seeder.send(p.encode_sync_update(out.pop()))
            if i % 200 == 199:
                await asyncio.sleep(0)  # let the transport drain
                while seeder.transport is not None and seeder.transport.get_write_buffer_size() > 1 << 20:
                    await asyncio.sleep(0.001)
        del sub
        # Wait until the watcher has seen the last update (one client's updates apply in order).
        wdoc = pycrdt.Doc()
        wmap = wdoc.get("config", type=pycrdt.Map)
        applied = 0
        last_key = f"k{(updates - 1) % keys}"
        deadline = time.monotonic() + seed_timeout
        while True:
            while applied < len(watcher.updates):
                wdoc.apply_update(watcher.updates[applied])
                applied += 1
            if wmap.get(last_key) == final:
                break
            if time.monotonic() > deadline or not watcher.is_open:
                raise TimeoutError(f"the seed did not arrive in {seed_timeout}s ({applied} frames)")
            await asyncio.sleep(0.01)
            prog.update(time.monotonic() - t0, seed_timeout, f"watcher frames {applied}")
        res.seed_s = round(time.monotonic() - t0, 3)
        res.seed_updates_per_s = round(updates / res.seed_s, 1)
        res.document_bytes = len(doc.get_update())
        await watcher.close()
        opened.remove(watcher)
        await asyncio.sleep(0.5)

        times: list[float] = []
        correct = 0
        cpu0 = proc_cpu_seconds(server_pid) if server_pid else None
        for j in range(joins):
            c = Client()
            opened.append(c)
            await c.open(host, port, path)
            await asyncio.sleep(0.05)  # the server's own step 1 / awareness go by first
            t = _now_ns()
            c.send(p.encode_sync_step1(b"\x00"))
            async with asyncio.timeout(30):
                t2, m = await c.step2
            ms = (t2 - t) / 1e6
            times.append(ms)
            if j == 0:
                res.first_join_ms = round(ms, 3)
            update = p.read_var_bytes(m, 2)[0]
            res.step2_bytes = len(update)
            jd = pycrdt.Doc()
            jd.apply_update(update)
            if jd.get("config", type=pycrdt.Map).get(last_key) == final:
                correct += 1
            await c.close()
            opened.remove(c)
            prog.update(j + 1, joins, f"join {ms:.2f} ms")
        if cpu0 is not None and server_pid:
            res.server_cpu_ms_per_join = round((proc_cpu_seconds(server_pid) - cpu0) / joins * 1000, 3)
        prog.done()
        res.joins = joins
        res.joins_correct = correct
        res.join_ms = summary_ms(times)
        res.converged = correct == joins
    finally:
        await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)
    return res


# --------------------------------------------------------------- connections


@dataclass
class ConnectionsResult:
    params: dict[str, Any]
    connected: int = 0
    failed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    connect_s: float = 0.0
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None
    kib_per_connection: float | None = None
    still_open: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_connections(
    url: str,
    connections: int = 5000,
    per_room: int = 10,
    protocol: str = "y-websocket",
    server_pid: int | None = None,
    query: str = "",
    awareness: bool = False,
    settle: float = 3.0,
    concurrency: int = 100,
    allow_remote: bool = False,
    progress: bool = True,
) -> ConnectionsResult:
    host, port, base = check_target(url, allow_remote)
    limit = raise_nofile(connections + 256)
    if limit < connections + 64:
        raise RuntimeError(f"open files limit {limit} is too low for {connections} connections (ulimit -n)")
    prefix = f"loadtest-conn-{secrets.token_hex(3)}"
    Client = client_class(SyncClient, protocol)
    prog = Progress(progress, "connections")
    res = ConnectionsResult(
        params={
            "url": url,
            "connections": connections,
            "per_room": per_room,
            "protocol": protocol,
            "awareness": awareness,
            "settle_s": settle,
        }
    )
    clients: list[SyncClient] = []
    sem = asyncio.Semaphore(concurrency)
    done = [0]

    async def one(i: int) -> None:
        c = Client()
        async with sem:
            try:
                await c.open(host, port, _room_path(base, f"{prefix}-{i // per_room}", query))
                c.send(p.encode_sync_step1(b"\x00"))
                if awareness:
                    state = json.dumps({"user": {"name": f"lt{i}"}}).encode()
                    cid = 1_000_000 + i
                    c.send(
                        b"\x01"
                        + p.write_var_bytes(b"\x01" + p.write_var_uint(cid) + b"\x01" + p.write_var_bytes(state))
                    )
                async with asyncio.timeout(30):
                    await c.step2
                clients.append(c)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                res.failed += 1
                key = type(exc).__name__ + (f" {c.close_code}" if c.close_code else "")
                res.failures[key] = res.failures.get(key, 0) + 1
                if c.transport is not None:
                    c.transport.abort()
        done[0] += 1

    try:
        if server_pid:
            res.rss_before_kib = proc_rss_kib(server_pid)
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(one(i)) for i in range(connections)]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.25)
            prog.update(done[0], connections, f"open {len(clients)} failed {res.failed}")
        await asyncio.gather(*tasks)
        res.connect_s = round(time.monotonic() - t0, 3)
        res.connected = len(clients)
        await asyncio.sleep(settle)
        if server_pid:
            res.rss_after_kib = proc_rss_kib(server_pid)
            if res.connected:
                res.kib_per_connection = round((res.rss_after_kib - res.rss_before_kib) / res.connected, 2)  # type: ignore[operator]
        res.still_open = sum(1 for c in clients if c.is_open)
        prog.done()
    finally:
        await asyncio.gather(*(c.close(timeout=5) for c in clients), return_exceptions=True)
    return res


# ----------------------------------------------------------------- awareness

_AW_MARK = re.compile(rb'"m":"(\d+):(\d+):(\d+)"')


class AwarenessClient(SyncClient):
    def __init__(self, run: AwarenessRun, room: int, wid: int) -> None:
        super().__init__()
        self.run = run
        self.room = room
        self.wid = wid  # -1: not a mover
        self.client_id = 2_000_000 + run.next_id()
        self.clock = 0
        self.seq = -1
        self.last_seen: dict[int, int] = {}

    def set_state(self, state: dict[str, Any]) -> None:
        self.clock += 1
        body = json.dumps(state, separators=(",", ":")).encode()
        entry = b"\x01" + p.write_var_uint(self.client_id) + p.write_var_uint(self.clock) + p.write_var_bytes(body)
        self.send(b"\x01" + p.write_var_bytes(entry))

    def move(self) -> None:
        self.seq += 1
        self.set_state(
            {"user": {"name": f"m{self.wid}"}, "m": f"{self.wid}:{self.seq}:{(_now_ns() - self.run.t0) // 1000}"}
        )

    def on_message(self, m: bytes) -> None:
        if m[0] != 1:
            super().on_message(m)
            return
        run = self.run
        found = _AW_MARK.findall(m)
        if not found:
            return
        now = (_now_ns() - run.t0) // 1000
        last = self.last_seen
        for w, s, ts in found:
            wid = int(w)
            if wid == self.wid:
                continue
            seq = int(s)
            if seq > last.get(wid, -1):
                last[wid] = seq
            run.latencies_us.append(now - int(ts))
            run.delivered += 1


class AwarenessRun:
    def __init__(self) -> None:
        self.t0 = _now_ns()
        self.latencies_us: list[int] = []
        self.delivered = 0
        self.measuring = False
        self._ids = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids


@dataclass
class AwarenessResult:
    params: dict[str, Any]
    sent: int = 0
    delivered: int = 0
    max_deliveries: int = 0
    delivered_per_s: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    stale_final: int = 0
    converged: bool = False
    server_cpu_util: float | None = None
    server_us_per_delivery: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_awareness(
    url: str,
    rooms: int = 1,
    clients: int = 100,
    movers: int = 10,
    interval_ms: float = 50.0,
    duration: float = 10.0,
    drain: float = 3.0,
    protocol: str = "y-websocket",
    server_pid: int | None = None,
    query: str = "",
    allow_remote: bool = False,
    progress: bool = True,
) -> AwarenessResult:
    host, port, base = check_target(url, allow_remote)
    if not 1 <= movers <= clients:
        raise ValueError("movers must be between 1 and clients")
    raise_nofile(rooms * clients + 256)
    prefix = f"loadtest-aw-{secrets.token_hex(3)}"
    Client = client_class(AwarenessClient, protocol)
    prog = Progress(progress, "awareness")
    res = AwarenessResult(
        params={
            "url": url,
            "rooms": rooms,
            "clients": clients,
            "movers": movers,
            "interval_ms": interval_ms,
            "duration": duration,
            "protocol": protocol,
        }
    )
    run = AwarenessRun()
    members: list[list[AwarenessClient]] = []
    wid = 0
    for _r in range(rooms):
        row = []
        for i in range(clients):
            if i < movers:
                row.append(Client(run, _r, wid))
                wid += 1
            else:
                row.append(Client(run, _r, -1))
        members.append(row)
    everyone = [c for row in members for c in row]
    sem = asyncio.Semaphore(50)

    async def connect(c: AwarenessClient) -> None:
        async with sem:
            await c.open(host, port, _room_path(base, f"{prefix}-{c.room}", query))
            c.send(p.encode_sync_step1(b"\x00"))
            c.set_state({"user": {"name": f"c{c.client_id}"}})
            async with asyncio.timeout(30):
                await c.step2

    try:
        prog.message(f"connecting {len(everyone)} clients ...")
        await asyncio.gather(*(connect(c) for c in everyone))
        await asyncio.sleep(1.0)
        run.latencies_us.clear()
        run.delivered = 0
        loop = asyncio.get_running_loop()
        interval = interval_ms / 1000
        movers_all = [c for c in everyone if c.wid >= 0]
        start = loop.time() + 0.05
        end = start + duration

        async def mover(c: AwarenessClient, offset: float) -> None:
            t = start + offset
            while t < end:
                delay = t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                c.move()
                t += interval

        cpu0 = proc_cpu_seconds(server_pid) if server_pid else None
        w0 = time.monotonic()
        run.measuring = True
        tasks = [asyncio.ensure_future(mover(c, interval * i / len(movers_all))) for i, c in enumerate(movers_all)]
        while loop.time() < end:
            await asyncio.sleep(0.5)
            prog.update(min(duration, loop.time() - start), duration, f"delivered {run.delivered}")
        await asyncio.gather(*tasks)
        deadline = loop.time() + drain

        def stale() -> int:
            n = 0
            for row in members:
                finals = {c.wid: c.seq for c in row if c.wid >= 0}
                for c in row:
                    for w, s in finals.items():
                        if w != c.wid and c.last_seen.get(w, -1) != s:
                            n += 1
            return n

        while stale() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        wall = time.monotonic() - w0
        run.measuring = False
        prog.done()
        if cpu0 is not None and server_pid:
            cpu = proc_cpu_seconds(server_pid) - cpu0
            res.server_cpu_util = round(cpu / wall, 3)
            res.server_us_per_delivery = round(cpu / run.delivered * 1e6, 3) if run.delivered else None
        res.sent = sum(c.seq + 1 for c in movers_all)
        res.delivered = run.delivered
        res.max_deliveries = res.sent * (clients - 1)
        res.delivered_per_s = round(run.delivered / duration, 1)
        res.latency_ms = summary_ms([u / 1000 for u in run.latencies_us])
        res.stale_final = stale()
        res.converged = res.stale_final == 0
    finally:
        await asyncio.gather(*(c.close() for c in everyone), return_exceptions=True)
    return res


def pid_note(pid: int | None) -> str:
    return "" if pid else " (no --server-pid: server CPU and memory not measured)"


def print_join(res: JoinResult) -> None:
    j = res.join_ms
    print(
        f"join: {res.params['updates']} updates ({res.document_bytes} B document, step 2 {res.step2_bytes} B), "
        f"seeded in {res.seed_s} s ({res.seed_updates_per_s:.0f}/s)"
    )
    print(f"{'joins':>5} {'first':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} {'ok':>5} {'srv ms/join':>11}")
    print(
        f"{res.joins:>5} {res.first_join_ms:>8} {j['p50']:>8} {j['p95']:>8} {j['p99']:>8} {j['max']:>8} "
        f"{res.joins_correct:>5} {res.server_cpu_ms_per_join if res.server_cpu_ms_per_join is not None else '-':>11}"
    )


def print_connections(res: ConnectionsResult) -> None:
    print(
        f"connections: {res.connected} open ({res.failed} failed {res.failures or ''}) in "
        f"{res.params['connections'] // max(1, res.params['per_room'])} rooms, connected in {res.connect_s} s, "
        f"{res.still_open} still open after {res.params['settle_s']} s"
    )
    if res.kib_per_connection is not None:
        print(
            f"server RSS {res.rss_before_kib} KiB -> {res.rss_after_kib} KiB: "
            f"{res.kib_per_connection} KiB per connection"
        )


def print_awareness(res: AwarenessResult) -> None:
    lat = res.latency_ms
    print(
        f"awareness: {res.params['rooms']} x {res.params['clients']} clients, {res.params['movers']} movers "
        f"every {res.params['interval_ms']:g} ms"
    )
    print(
        f"{'sent':>7} {'delivered':>10} {'of max':>7} {'dlv/s':>9} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7} "
        f"{'stale':>6} {'srv cpu':>7} {'us/dlv':>7}"
    )
    share = f"{res.delivered / res.max_deliveries * 100:.0f}%" if res.max_deliveries else "-"
    srv = "-" if res.server_cpu_util is None else f"{res.server_cpu_util * 100:.0f}%"
    per = "-" if res.server_us_per_delivery is None else f"{res.server_us_per_delivery:.2f}"
    print(
        f"{res.sent:>7} {res.delivered:>10} {share:>7} {res.delivered_per_s:>9.0f} {lat['p50']!s:>7} "
        f"{lat['p95']!s:>7} {lat['p99']!s:>7} {lat['max']!s:>7} {res.stale_final:>6} {srv:>7} {per:>7}"
    )


def env_fds() -> dict[str, Any]:
    return {"nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "pid": os.getpid()}
