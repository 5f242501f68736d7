"""The accepted-edit path without sockets: ``python -m loadtest roompath``.

R rooms x C peers, W writers per room, built as the server builds them
(``collab.app.App`` with the default extensions: validation, locks,
presence, the outbox and audit records) over a real SQLite store in a temp
dir. Each round, every writer sets its own key of a map (``config`` by
default, so every write is validated, recorded and committed) and the
update goes through ``Room.receive``; the loop then turns a few times, so
flushes, group commits and acks happen as in the server. Peers are stubs
that count frames, so the figure is the room, guard, record and store work
per write, without the websocket layer.

CPU is read per thread (``time.thread_time`` for the event loop; the rest of
the process is the store's writer thread), over several segments; the
minimum is reported, because on a shared machine a segment can only be
slowed down by others, never sped up.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
from typing import Any

import pycrdt

from codec import protocol as p


class _StubPeer:
    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames = 0

    def send(self, frame: bytes) -> None:
        self.frames += 1

    def close(self, code: int, reason: str) -> None:
        pass


async def run(rooms: int, clients: int, writers: int, rounds: int, segments: int, map_name: str, profile: bool) -> dict:
    from collab.app import App, default_extensions
    from collab.auth import Identity
    from collab.settings import Settings

    data = tempfile.TemporaryDirectory(prefix="collab-roompath-")
    settings = Settings(data_dir=data.name)
    app = App(settings, extensions=default_extensions(settings))
    await app.store.open()
    for ext in app.extensions:
        await ext.start(app)
    writing: list[tuple[Any, Any, pycrdt.Map, list[bytes], str]] = []
    keep: list[Any] = []
    for r in range(rooms):
        room = await app.rooms.open_room(f"roompath-{r}")
        states = [
            room.join(_StubPeer(), Identity(user_id=f"u{i}", name=f"U{i}", color="#000000", role="editor"))
            for i in range(clients)
        ]
        for w in range(writers):
            doc = pycrdt.Doc()
            updates: list[bytes] = []
            keep.append(doc.observe(lambda event, out=updates: out.append(event.update)))
            keep.append(doc)
            writing.append((room, states[w], doc.get(map_name, type=pycrdt.Map), updates, f"w{w}"))

    async def one_round(k: int) -> None:
        for room, state, shared, updates, key in writing:
            shared[key] = f"\x02{k}:{time.time_ns()}\x03"
            room.receive(state, p.SyncUpdate(updates.pop()))
        for _ in range(4):
            await asyncio.sleep(0)

    for k in range(20):  # warm up: every key exists, every cache is filled
        await one_round(k)
    await asyncio.sleep(0.2)
    profiler = cProfile.Profile() if profile else None
    per_segment = max(1, rounds // segments)
    results = []
    k = 1000
    for _ in range(segments):
        process0, loop0 = time.process_time(), time.thread_time()
        if profiler is not None:
            profiler.enable()
        for _ in range(per_segment):
            await one_round(k)
            k += 1
        await asyncio.sleep(0.05)
        if profiler is not None:
            profiler.disable()
        writes = per_segment * len(writing)
        loop_cpu = time.thread_time() - loop0
        other_cpu = time.process_time() - process0 - loop_cpu
        results.append((loop_cpu / writes * 1e6, other_cpu / writes * 1e6))
    for room in app.rooms.rooms.values():
        await room.drain()
    for ext in app.extensions:
        await ext.stop()
    await app.store.close()
    data.cleanup()
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    return {
        "writes_per_segment": per_segment * len(writing),
        "loop_us_per_write": [round(a, 1) for a, _ in results],
        "store_thread_us_per_write": [round(b, 1) for _, b in results],
        "min_loop_us": round(min(a for a, _ in results), 1),
        "min_store_thread_us": round(min(b for _, b in results), 1),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest roompath", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rooms", type=int, default=50)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=400, help="writes per writer, over all segments")
    ap.add_argument("--segments", type=int, default=5)
    ap.add_argument("--map", default="config", help="the Y.Map the writers edit (default %(default)s)")
    ap.add_argument("--profile", action="store_true", help="cProfile the measured rounds (slows them down)")
    ap.add_argument("--cpu", type=int, help="pin to this core")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    out = asyncio.run(
        run(args.rooms, args.clients, args.writers, args.rounds, args.segments, args.map, args.profile)
    )
    print(
        f"{args.rooms} rooms x {args.clients} peers, {args.writers} writers, map {args.map!r}: "
        f"event loop {out['min_loop_us']} us/write (segments {out['loop_us_per_write']}), "
        f"store thread {out['min_store_thread_us']} us/write (segments {out['store_thread_us_per_write']}); "
        f"load average {', '.join(f'{x:.2f}' for x in out['load_average'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
