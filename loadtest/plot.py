"""Benchmark pictures: latency (p50, p99) against delivered updates per second.

``python -m loadtest sweep ... --plot sweep.png`` and ``python -m loadtest
compare ... --plot compare.png`` draw their own results; ``python -m loadtest
plot RESULTS.json --out PICTURE.png`` draws a JSON file they wrote before
(docs/bench/*.json). matplotlib (a dev dependency) is imported only here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SCENARIO_TITLES = {
    "sweep1": "1 room × 100 clients, 10 writers",
    "sweep50": "50 rooms × 10 clients, 2 writers each",
    "sweep": "sweep",
}


def _points(steps: list[dict[str, Any]]) -> list[tuple[float, float, float]]:
    """(delivered/s, p50 ms, p99 ms) of the steps that have latencies, by throughput."""
    out = []
    for step in steps:
        lat = step.get("latency_ms") or {}
        if step.get("delivered_per_s") and lat.get("p50") is not None and lat.get("p99") is not None:
            out.append((float(step["delivered_per_s"]), float(lat["p50"]), float(lat["p99"])))
    return sorted(out)


def panels_of(data: dict[str, Any]) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """scenario -> server -> points, from a sweep result or a compare result."""
    if data.get("scenario") == "sweep":
        return {"sweep": {"ours": _points(data.get("steps", []))}}
    panels: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for server, results in (data.get("results") or {}).items():
        for scenario, result in results.items():
            if isinstance(result, dict) and result.get("scenario") == "sweep":
                points = _points(result.get("steps", []))
                if points:
                    panels.setdefault(scenario, {})[server] = points
    return panels


def draw(data: dict[str, Any], out: Path, title: str | None = None) -> Path:
    """Write a PNG: one panel per sweep scenario, a colour per server, p50 dashed, p99 solid."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("loadtest: --plot needs matplotlib (pip install matplotlib; `make install` has it)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_of(data)
    if not panels:
        raise ValueError("no sweep steps with latencies in these results")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    servers = sorted({s for series in panels.values() for s in series}, key=lambda s: (s != "ours", s))
    for ax, (scenario, series) in zip(axes[0], sorted(panels.items())):
        for server in servers:
            points = series.get(server)
            if not points:
                continue
            colour = colours[servers.index(server) % len(colours)]
            x = [p[0] for p in points]
            ax.plot(x, [p[2] for p in points], "-o", color=colour, label=f"{server} p99", markersize=4)
            ax.plot(x, [p[1] for p in points], "--x", color=colour, label=f"{server} p50", alpha=0.8, markersize=4)
        limit = data.get("p99_limit_ms") or 100.0
        ax.axhline(limit, color="grey", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_xlabel("delivered updates per second")
        ax.set_ylabel("latency, ms (log)")
        ax.set_title(SCENARIO_TITLES.get(scenario, scenario))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest plot", description="draw sweep/compare results as a PNG")
    ap.add_argument("results", type=Path, help="JSON written by `sweep --json` or `compare --json`")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    try:
        draw(json.loads(args.results.read_text()), args.out, args.title)
    except (OSError, ValueError) as exc:
        print(f"loadtest plot: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
