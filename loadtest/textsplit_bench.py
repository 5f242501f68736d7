"""Cost of the surrogate-pair step on the hot path (rooms/textsplit.py), per update.

    python -m loadtest.textsplit_bench [--n 20000]

Measures ``TextSplits.plan`` for typical updates: a config-map write and an
ASCII/BMP text insert into a document without pairs (the fast path), the same
into a document that holds an emoji (the walk), and an insert with an emoji.
CPU time per call (time.process_time), best of 5 rounds.
"""

from __future__ import annotations

import argparse
import time

import pycrdt

from rooms import textsplit


def updates() -> dict[str, bytes]:
    doc = pycrdt.Doc(client_id=77)
    out: list[bytes] = []
    doc.observe(lambda e: out.append(e.update))
    doc.get("config", type=pycrdt.Map)["host"] = "db.internal"
    text = doc.get("notes", type=pycrdt.Text)
    text.insert(0, "Grüße aus 日本 ")
    text.insert(0, "ok 🙂 ")
    return {"config write": out[0], "BMP text insert": out[1], "emoji text insert": out[2]}


def per_call(splits: textsplit.TextSplits, update: bytes, n: int) -> float:
    known = {77: 10}
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            splits.plan(update, lambda: known)
        best = min(best, time.process_time() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=20000)
    n = parser.parse_args().n
    ups = updates()
    holding = textsplit.TextSplits()
    holding.pairs.add((5, 3))  # the document holds an emoji somewhere
    print("| update | document without pairs | document holding a pair |")
    print("|---|---|---|")
    for name, update in ups.items():
        a = per_call(textsplit.TextSplits(), update, n)  # (after its first call, the emoji one holds a pair)
        b = per_call(holding, update, n)
        print(f"| {name} ({len(update)} B) | {a:.2f} µs | {b:.2f} µs |")


if __name__ == "__main__":
    main()
