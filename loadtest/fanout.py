"""The fan-out scenario: R rooms x C clients, W writers per room.

Each writer sets its own key of a Y.Map (``config`` unless ``map_name`` says
otherwise: writes outside ``config`` skip validation, audit and outbox) every ``interval`` ms
to a string marker ``\\x02<writer>:<seq>:<send time in us>\\x03``. Yjs
encodes string values verbatim in v1 updates (also in the updates the server
merges per flush), so a receiving client finds every update delivered to it
with one regex over the frame -- no CRDT decoding on the hot path. The
marker carries its send time (same process, same clock), so latency needs no
lookup; a per-(receiver, writer) bitmap catches duplicates and, at the end,
losses.

Convergence is checked after the run, off the measured path: every client
records the ids of the update frames it received (frames are interned per
room: the server encodes each merged broadcast once, so all peers get the
same bytes), and each client's document is rebuilt with pycrdt from exactly
those payloads (plus a writer's own updates). Clients that received the
same sequence share one rebuild. Every rebuilt ``config`` map must equal the
state a fresh client syncs from the server, and both must hold each
writer's last value.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import re
import secrets
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pycrdt

from codec import protocol as p
from loadtest.wsclient import LeanWebSocket

MARKER = re.compile(rb"\x02(\d+):(\d+):(\d+)\x03")
_find = MARKER.findall
_now_ns = time.perf_counter_ns

SETUP, SENDING, DRAINING, DONE = range(4)

# Latency histogram: 10 us buckets up to 2 s, exact values beyond.
BUCKET_US = 10
BUCKETS = 200_000
HIST_LIMIT = BUCKET_US * BUCKETS


class TargetError(ValueError):
    pass


@dataclass
class FanoutParams:
    url: str
    rooms: int = 1
    clients: int = 100
    writers: int = 10
    interval_ms: float = 10.0
    duration: float = 20.0
    drain: float = 5.0
    warmup: float = 1.0
    server_pid: int | None = None
    connect_concurrency: int = 50
    setup_timeout: float = 60.0
    room_prefix: str = ""
    query: str = ""  # appended to every room URL, e.g. identity parameters
    progress: bool = True
    map_name: str = "config"  # the Y.Map the writers edit ("config": validated, audited, outboxed)

    def validate(self) -> None:
        if self.rooms < 1 or self.clients < 2:
            raise ValueError("need at least 1 room and 2 clients per room")
        if not 1 <= self.writers <= self.clients:
            raise ValueError("writers must be between 1 and clients")
        if self.interval_ms <= 0 or self.duration <= 0 or self.drain < 0:
            raise ValueError("interval and duration must be positive, drain non-negative")


def check_target(url: str, allow_remote: bool = False) -> tuple[str, int, str]:
    """(host, port, base path) of a ws:// URL; loopback only unless allowed."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise TargetError(f"only ws:// URLs are supported (got {parts.scheme!r})")
    host = parts.hostname
    if not host:
        raise TargetError(f"no host in {url!r}")
    if not allow_remote and not _is_loopback(host):
        raise TargetError(
            f"refusing to load {host}: only 127.0.0.0/8, localhost or ::1 unless --allow-remote is given"
        )
    port = parts.port or 80
    return host, port, parts.path.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------- run state


class RunState:
    """Counters shared by every client of one run (one process, one loop)."""

    def __init__(self, rooms: int) -> None:
        self.t0 = _now_ns()
        self.phase = SETUP
        self.hist = array("q", bytes(8 * BUCKETS))
        self.overflow: list[int] = []
        self.negative = 0
        self.delivered = 0  # markers seen at non-senders (exact uniqueness is checked after the run)
        self.delivered_in_window = 0
        self.frames_in_window = 0
        # Per room: frame bytes -> frame id, and per frame id its markers
        # (writer ids, sequence numbers, send times), parsed once per room.
        self.frames: list[dict[bytes, int]] = [{} for _ in range(rooms)]
        self.markers: list[list[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]] = [
            [] for _ in range(rooms)
        ]
        self.disconnects: dict[int, int] = {}

    def now_us(self) -> int:
        return (_now_ns() - self.t0) // 1000


class FanoutClient(LeanWebSocket):
    """A receiving client: answers the handshake, records deliveries.

    The server encodes each broadcast once and every peer gets the same bytes,
    so a frame is parsed once per room: the other clients only look it up
    (one hash of the frame) and add one latency sample per marker.
    """

    wid = -1

    def __init__(self, run: RunState, room: int) -> None:
        super().__init__()
        self.run = run
        self.room = room
        self.frame_ids: list[int] = []
        self._frames = run.frames[room]
        self._markers = run.markers[room]
        self.synced: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def step1(self) -> bytes:
        return p.encode_sync_step1(b"\x00")  # empty state vector

    def step2_for(self, state_vector: bytes) -> bytes:
        return p.encode_sync_step2(p.EMPTY_UPDATE)

    def on_message(self, m: bytes) -> None:
        if m[0] != 0:  # awareness, control: not measured
            return
        sub = m[1]
        if sub == 2 or sub == 1:
            run = self.run
            fid = self._frames.get(m)
            if fid is None:
                fid = self._frames[m] = len(self._markers)
                found = _find(m)
                self._markers.append(
                    (
                        tuple(int(f[0]) for f in found),
                        tuple(int(f[1]) for f in found),
                        tuple(int(f[2]) for f in found),
                    )
                )
            self.frame_ids.append(fid)
            writers, _, sent = self._markers[fid]
            if sent:
                now = (_now_ns() - run.t0) // 1000
                hist = run.hist
                wid = self.wid
                n = 0
                for i, ts in enumerate(sent):
                    if writers[i] == wid:  # our own echo
                        continue
                    n += 1
                    d = now - ts
                    if 0 <= d < HIST_LIMIT:
                        hist[d // BUCKET_US] += 1
                    elif d < 0:
                        run.negative += 1
                    else:
                        run.overflow.append(d)
                run.delivered += n
                if run.phase == SENDING:
                    run.delivered_in_window += n
            if run.phase == SENDING:
                run.frames_in_window += 1
            if sub == 1 and not self.synced.done():
                self.synced.set_result(None)
        elif sub == 0:
            state_vector, _ = p.read_var_bytes(m, 2)
            self.send(self.step2_for(state_vector))

    def on_closed(self) -> None:
        if self.run.phase in (SETUP, SENDING, DRAINING) and self.close_code is not None:
            self.run.disconnects[self.close_code] = self.run.disconnects.get(self.close_code, 0) + 1
        if not self.synced.done():
            self.synced.set_exception(ConnectionError(f"closed before sync ({self.close_code} {self.close_reason})"))

    def count_received(self, sent_by: dict[int, int]) -> tuple[int, int, int]:
        """(distinct updates of other writers received, duplicates, unknown markers).

        ``sent_by`` maps the writers of this room to how many updates each sent.
        """
        seen = {w: bytearray(n) for w, n in sent_by.items() if w != self.wid}
        markers = self._markers
        dups = unknown = 0
        for fid in self.frame_ids:
            writers, seqs, _ = markers[fid]
            for w, s in zip(writers, seqs):
                if w == self.wid:
                    continue
                bitmap = seen.get(w)
                if bitmap is None or s >= len(bitmap):
                    unknown += 1
                elif bitmap[s]:
                    dups += 1
                else:
                    bitmap[s] = 1
        return sum(b.count(1) for b in seen.values()), dups, unknown


class FanoutWriter(FanoutClient):
    """A client that also writes: owns a pycrdt Doc and its key in the benchmark's map."""

    def __init__(self, run: RunState, room: int, wid: int, map_name: str = "config") -> None:
        self.wid = wid
        super().__init__(run, room)
        self.doc = pycrdt.Doc()
        self.map = self.doc.get(map_name, type=pycrdt.Map)
        self.key = f"w{wid}"
        self.seq = 0
        self.last_value: str | None = None
        self._updates: list[bytes] = []
        self._sub = self.doc.observe(lambda event: self._updates.append(event.update))

    def step1(self) -> bytes:
        return p.encode_sync_step1(self.doc.get_state())

    def step2_for(self, state_vector: bytes) -> bytes:
        return p.encode_sync_step2(self.doc.get_update(state_vector))

    def write(self) -> None:
        seq = self.seq
        self.seq = seq + 1
        value = f"\x02{self.wid}:{seq}:{(_now_ns() - self.run.t0) // 1000}\x03"
        self.map[self.key] = value
        self.last_value = value
        update = self._updates.pop()
        self.send(b"\x00\x02" + p.write_var_uint(len(update)) + update)


# ------------------------------------------------------------------- results


@dataclass
class FanoutResult:
    params: dict[str, Any]
    sent_updates: int = 0
    expected_deliveries: int = 0
    delivered: int = 0
    delivered_in_window: int = 0
    lost: int = 0
    duplicates: int = 0
    unknown_markers: int = 0  # markers of writers not in the receiver's room or never sent (should be 0)
    offered_per_s: float = 0.0
    delivered_per_s: float = 0.0
    frames_per_s: float = 0.0
    deliveries_per_frame: float = 0.0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    converged: bool = False
    convergence: dict[str, Any] = field(default_factory=dict)
    server_cpu_s: float | None = None
    server_cpu_util: float | None = None
    server_us_per_delivery: float | None = None
    server_us_per_write: float | None = None  # server CPU per accepted (sent) write
    server_rss_mib: float | None = None
    harness_cpu_s: float = 0.0
    harness_cpu_util: float = 0.0
    harness_loop_lag_ms: dict[str, float] = field(default_factory=dict)
    missed_ticks: int = 0
    harness_saturated: bool = False
    disconnects: dict[str, int] = field(default_factory=dict)
    # Busy share of each core during the run, and the core-share used by
    # everything but the harness and the server (other processes, softirq).
    machine_busy: dict[str, float] = field(default_factory=dict)
    irq_cpu_util: float | None = None  # irq + softirq (loopback network receive), all cores
    other_cpu_util: float | None = None  # other processes (known only with --server-pid)
    measured_s: float = 0.0
    drain_s: float = 0.0
    affinity: dict[str, list[int] | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentiles(run: RunState, total: int) -> dict[str, float | None]:
    if total == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None, "samples": 0}
    targets = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
    ranks = {name: max(1, math.ceil(q * total)) for name, q in targets.items()}
    out: dict[str, float | None] = {}
    hist = run.hist
    overflow = sorted(run.overflow)
    in_hist = total - len(overflow)
    cumulative = 0
    weighted = 0
    top = 0
    pending = dict(ranks)
    for i, count in enumerate(hist):
        if not count:
            continue
        cumulative += count
        weighted += count * (i * BUCKET_US + BUCKET_US // 2)
        top = i
        for name, rank in list(pending.items()):
            if cumulative >= rank:
                out[name] = (i + 1) * BUCKET_US / 1000.0  # upper edge of the bucket
                del pending[name]
    for name, rank in pending.items():
        out[name] = overflow[rank - in_hist - 1] / 1000.0
    weighted += sum(overflow)
    out["max"] = overflow[-1] / 1000.0 if overflow else (top + 1) * BUCKET_US / 1000.0
    out["mean"] = round(weighted / total / 1000.0, 3)
    out["samples"] = total
    return out


# ------------------------------------------------------------------ /proc


def proc_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def proc_stat_cores() -> dict[str, tuple[float, float, float]]:
    """Per-core (task busy, irq+softirq, total) seconds from /proc/stat.

    Task busy is user+nice+system+steal; interrupt time is reported apart
    because on loopback the kernel's network receive work runs as softirq and
    is charged to no process.
    """
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, float, float]] = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *vals = line.split()
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in vals[:8])
                total = user + nice + system + idle + iowait + irq + softirq + steal
                out[name] = ((user + nice + system + steal) / tick, (irq + softirq) / tick, total / tick)
    except OSError:
        pass
    return out


def _affinity(pid: int) -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(pid))
    except (OSError, AttributeError):
        return None


# ------------------------------------------------------------------ progress


class Progress:
    def __init__(self, enabled: bool, label: str) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.label = label
        self._last_line = 0.0

    def update(self, elapsed: float, total: float, text: str) -> None:
        if not self.enabled:
            return
        frac = min(1.0, elapsed / total) if total > 0 else 1.0
        width = 30
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = f"{self.label} [{bar}] {elapsed:5.1f}/{total:.0f}s {text}"
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(100))
            sys.stderr.flush()
        elif time.monotonic() - self._last_line >= 5.0 or frac >= 1.0:
            self._last_line = time.monotonic()
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + " " * 100 + "\r")
        sys.stderr.write(f"{self.label} {text}\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------- the run


async def run_fanout(params: FanoutParams, allow_remote: bool = False, label: str = "fanout") -> FanoutResult:
    """One bounded run; returns the measurements. Raises on setup failure."""
    params.validate()
    host, port, base = check_target(params.url, allow_remote)
    loop = asyncio.get_running_loop()
    prefix = params.room_prefix or f"loadtest-{secrets.token_hex(4)}"
    room_names = [f"{prefix}-r{r}" for r in range(params.rooms)]
    interval = params.interval_ms / 1000.0
    progress = Progress(params.progress, label)
    query = f"?{params.query.lstrip('?')}" if params.query else ""

    run = RunState(params.rooms)
    clients: list[FanoutClient] = []
    writers: list[FanoutWriter] = []
    rooms_clients: list[list[FanoutClient]] = []
    wid = 0
    for r in range(params.rooms):
        members: list[FanoutClient] = []
        for i in range(params.clients):
            if i < params.writers:
                c: FanoutClient = FanoutWriter(run, r, wid, params.map_name)
                writers.append(c)  # type: ignore[arg-type]
                wid += 1
            else:
                c = FanoutClient(run, r)
            members.append(c)
        rooms_clients.append(members)
        clients.extend(members)

    result = FanoutResult(params={**asdict(params), "host": host, "port": port, "room_names": room_names})
    result.affinity = {"harness": _affinity(0), "server": _affinity(params.server_pid) if params.server_pid else None}

    try:
        # ---- setup: connect everyone and finish the handshake
        progress.message(f"connecting {len(clients)} clients to {params.url} ...")
        sem = asyncio.Semaphore(params.connect_concurrency)

        async def connect(c: FanoutClient) -> None:
            async with sem:
                await c.open(host, port, f"{base}/{room_names[c.room]}{query}")
                c.send(c.step1())
                await c.synced

        async with asyncio.timeout(params.setup_timeout):
            await asyncio.gather(*(connect(c) for c in clients))
        await asyncio.sleep(params.warmup)

        # ---- measured window
        lags: list[float] = []
        missed = [0]
        stop_lag = asyncio.Event()

        async def lag_monitor() -> None:
            # perf_counter: uvloop's loop.time() has millisecond resolution.
            period = 0.01
            clock = time.perf_counter
            while not stop_lag.is_set():
                t = clock()
                await asyncio.sleep(period)
                lags.append(max(0.0, clock() - t - period))

        start = loop.time() + 0.05
        end = start + params.duration

        async def writer_loop(w: FanoutWriter, offset: float) -> None:
            next_t = start + offset
            while next_t < end:
                now = loop.time()
                if next_t > now:
                    await asyncio.sleep(next_t - now)
                    now = loop.time()
                if now - next_t > 5 * interval:  # the harness fell behind: skip, don't burst
                    skipped = int((now - next_t) / interval)
                    missed[0] += skipped
                    next_t += skipped * interval
                    if next_t >= end:
                        break
                w.write()
                next_t += interval

        server_cpu0 = proc_cpu_seconds(params.server_pid) if params.server_pid else None
        harness_cpu0 = time.process_time()
        cores0 = proc_stat_cores()
        wall0 = time.monotonic()
        run.phase = SENDING
        monitor = loop.create_task(lag_monitor())
        tasks = [
            loop.create_task(writer_loop(w, interval * i / max(1, len(writers))))
            for i, w in enumerate(writers)
        ]
        members_minus_one = params.clients - 1
        while loop.time() < end:
            await asyncio.sleep(min(0.5, max(0.0, end - loop.time())))
            sent = sum(w.seq for w in writers)
            backlog = sent * members_minus_one - run.delivered
            progress.update(
                min(params.duration, loop.time() - start),
                params.duration,
                f"sent {sent} delivered {run.delivered} in flight {backlog}",
            )
        await asyncio.gather(*tasks)
        run.phase = DRAINING
        window_end = time.monotonic()
        sent = sum(w.seq for w in writers)
        expected = sent * members_minus_one
        drain_deadline = loop.time() + params.drain
        while run.delivered < expected and loop.time() < drain_deadline:
            if all(not c.is_open for c in clients):
                break
            await asyncio.sleep(0.005)
        run.phase = DONE
        drain_end = time.monotonic()
        stop_lag.set()
        await monitor
        harness_cpu = time.process_time() - harness_cpu0
        cores1 = proc_stat_cores()
        server_cpu = proc_cpu_seconds(params.server_pid) - server_cpu0 if params.server_pid else None
        progress.done()

        wall = drain_end - wall0
        result.measured_s = round(window_end - wall0, 3)
        result.drain_s = round(drain_end - window_end, 3)
        result.sent_updates = sent
        result.expected_deliveries = expected
        sent_by_room = [{w.wid: w.seq for w in writers if w.room == r} for r in range(params.rooms)]
        unknown = 0
        for c in clients:
            got, dups, unk = c.count_received(sent_by_room[c.room])
            result.delivered += got
            result.duplicates += dups
            unknown += unk
            await asyncio.sleep(0)
        result.unknown_markers = unknown
        result.delivered_in_window = run.delivered_in_window
        result.lost = expected - result.delivered
        result.offered_per_s = round(expected / params.duration, 1)
        result.delivered_per_s = round(run.delivered_in_window / params.duration, 1)
        result.frames_per_s = round(run.frames_in_window / params.duration, 1)
        result.deliveries_per_frame = round(run.delivered_in_window / max(1, run.frames_in_window), 2)
        result.latency_ms = _percentiles(run, sum(run.hist) + len(run.overflow))
        result.missed_ticks = missed[0]
        result.harness_cpu_s = round(harness_cpu, 3)
        result.harness_cpu_util = round(harness_cpu / wall, 3)
        lags.sort()
        if lags:
            result.harness_loop_lag_ms = {
                "p50": round(lags[len(lags) // 2] * 1000, 2),
                "p99": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000, 2),
                "max": round(lags[-1] * 1000, 2),
            }
        result.harness_saturated = bool(
            result.harness_cpu_util > 0.9 or missed[0] > 0 or (lags and lags[int(len(lags) * 0.99) - 1] > 0.02)
        )
        if server_cpu is not None:
            result.server_cpu_s = round(server_cpu, 3)
            result.server_cpu_util = round(server_cpu / wall, 3)
            result.server_us_per_delivery = (
                round(server_cpu / result.delivered * 1e6, 3) if result.delivered else None
            )
            result.server_us_per_write = round(server_cpu / sent * 1e6, 1) if sent else None
            result.server_rss_mib = round(proc_rss_mib(params.server_pid), 1)  # type: ignore[arg-type]
        result.machine_busy = {
            name: round((cores1[name][0] + cores1[name][1] - cores0[name][0] - cores0[name][1]) / wall, 3)
            for name in cores1
            if name in cores0 and name != "cpu"
        }
        if "cpu" in cores0 and "cpu" in cores1:
            task_busy = cores1["cpu"][0] - cores0["cpu"][0]
            result.irq_cpu_util = round((cores1["cpu"][1] - cores0["cpu"][1]) / wall, 3)
            if server_cpu is not None:
                result.other_cpu_util = round(max(0.0, task_busy - harness_cpu - server_cpu) / wall, 3)
        result.disconnects = {str(code): n for code, n in run.disconnects.items()}
    finally:
        run.phase = DONE
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    # ---- convergence, off the measured path
    result.convergence = await _check_convergence(
        run, rooms_clients, writers, host, port, base, [name + query for name in room_names], params.map_name
    )
    result.converged = result.convergence["converged"]
    return result


async def _check_convergence(
    run: RunState,
    rooms_clients: list[list[FanoutClient]],
    writers: list[FanoutWriter],
    host: str,
    port: int,
    base: str,
    room_names: list[str],
    map_name: str = "config",
) -> dict[str, Any]:
    report: dict[str, Any] = {"rooms": []}
    ok = True
    for r, members in enumerate(rooms_clients):
        by_id = {fid: frame for frame, fid in run.frames[r].items()}
        payloads = {fid: p.read_var_bytes(frame, 2)[0] for fid, frame in by_id.items()}
        groups: dict[tuple[bytes, tuple[int, ...]], list[FanoutClient]] = {}
        for c in members:
            own = c.doc.get_update() if isinstance(c, FanoutWriter) else b""
            groups.setdefault((own, tuple(c.frame_ids)), []).append(c)
        states = []
        for (own, ids), _group in groups.items():
            doc = pycrdt.Doc()
            if own:
                doc.apply_update(own)
            for fid in ids:
                doc.apply_update(payloads[fid])
            states.append(doc.get(map_name, type=pycrdt.Map).to_py())
            await asyncio.sleep(0)
        expected = {w.key: w.last_value for w in writers if w.room == r and w.last_value is not None}
        server_state = await _fresh_state(host, port, f"{base}/{room_names[r]}", map_name)
        clients_agree = all(s == states[0] for s in states)
        room_ok = clients_agree and server_state == states[0] and server_state == expected
        ok = ok and room_ok
        report["rooms"].append(
            {
                "room": room_names[r],
                "distinct_frame_sequences": len(groups),
                "clients_agree": clients_agree,
                "matches_server": server_state == states[0],
                "matches_last_writes": server_state == expected,
                "keys": len(server_state) if isinstance(server_state, dict) else None,
            }
        )
    report["converged"] = ok
    return report


async def _fresh_state(host: str, port: int, path: str, map_name: str = "config") -> Any:
    """The room's map ``map_name`` as a client joining now would see it."""
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    class Late(LeanWebSocket):
        def on_message(self, m: bytes) -> None:
            if m[0] == 0 and m[1] == 0:
                self.send(p.encode_sync_step2(p.EMPTY_UPDATE))
            elif m[0] == 0 and m[1] == 1 and not got.done():
                got.set_result(p.read_var_bytes(m, 2)[0])

    late = Late()
    await late.open(host, port, path)
    try:
        late.send(p.encode_sync_step1(b"\x00"))
        async with asyncio.timeout(10):
            update = await got
    finally:
        await late.close()
    doc = pycrdt.Doc()
    doc.apply_update(update)
    return doc.get(map_name, type=pycrdt.Map).to_py()


# ------------------------------------------------------------------ output


HEADER = (
    f"{'rooms':>5} {'cl':>4} {'wr':>3} {'T ms':>5} {'offered/s':>10} {'deliv/s':>10} {'lost':>6} "
    f"{'p50':>7} {'p95':>7} {'p99':>7} {'max':>7} {'conv':>5} {'srv cpu':>7} {'us/dlv':>6} "
    f"{'us/wr':>6} {'dlv/frm':>7} {'hrn cpu':>7}"
)


def table_row(res: FanoutResult) -> str:
    prm = res.params
    lat = res.latency_ms

    def ms(key: str) -> str:
        v = lat.get(key)
        return "-" if v is None else f"{v:.2f}"

    srv = "-" if res.server_cpu_util is None else f"{res.server_cpu_util * 100:.0f}%"
    per = "-" if res.server_us_per_delivery is None else f"{res.server_us_per_delivery:.2f}"
    per_write = "-" if res.server_us_per_write is None else f"{res.server_us_per_write:.0f}"
    return (
        f"{prm['rooms']:>5} {prm['clients']:>4} {prm['writers']:>3} {prm['interval_ms']:>5g} "
        f"{res.offered_per_s:>10.0f} {res.delivered_per_s:>10.0f} {res.lost:>6} "
        f"{ms('p50'):>7} {ms('p95'):>7} {ms('p99'):>7} {ms('max'):>7} {'yes' if res.converged else 'NO':>5} "
        f"{srv:>7} {per:>6} {per_write:>6} {res.deliveries_per_frame:>7.1f} {res.harness_cpu_util * 100:>6.0f}%"
    )


def print_table(results: list[FanoutResult], out=None) -> None:
    out = out or sys.stdout
    print("latencies in ms (send -> receipt at each other client); srv cpu = share of one core", file=out)
    print(HEADER, file=out)
    for res in results:
        print(table_row(res), file=out)
    for res in results:
        notes = []
        if res.harness_saturated:
            notes.append(
                f"harness saturated (cpu {res.harness_cpu_util * 100:.0f}%, loop lag p99 "
                f"{res.harness_loop_lag_ms.get('p99')} ms, missed ticks {res.missed_ticks}): "
                "latencies include harness queueing"
            )
        if res.other_cpu_util is not None and res.other_cpu_util > 0.05:
            notes.append(
                f"other processes used {res.other_cpu_util * 100:.0f}% of a core during the run "
                f"(per core busy {res.machine_busy}); figures are disturbed"
            )
        if res.disconnects:
            notes.append(f"disconnects by close code: {res.disconnects}")
        if res.duplicates or res.unknown_markers:
            notes.append(f"{res.duplicates} duplicate deliveries, {res.unknown_markers} unknown markers")
        if not res.converged:
            notes.append(f"NOT converged: {res.convergence}")
        for note in notes:
            print(f"  T={res.params['interval_ms']:g} ms: {note}", file=out)
