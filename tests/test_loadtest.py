"""Smoke test of the load generator against a real server (a few seconds)."""

from __future__ import annotations

import pytest

from loadtest.cli import main as loadtest_main
from loadtest.fanout import FanoutParams, TargetError, check_target, run_fanout


async def test_fanout_smoke(server):
    params = FanoutParams(
        url=server.ws_url,
        rooms=1,
        clients=3,
        writers=2,
        interval_ms=50,
        duration=2.0,
        drain=5.0,
        warmup=0.2,
        server_pid=server.proc.pid,
        progress=False,
    )
    res = await run_fanout(params)
    assert res.sent_updates >= 30  # 2 writers x ~40 ticks
    assert res.expected_deliveries == res.sent_updates * 2
    assert res.lost == 0
    assert res.delivered == res.expected_deliveries
    assert res.duplicates == 0
    assert res.converged, res.convergence
    room = res.convergence["rooms"][0]
    assert room["clients_agree"] and room["matches_server"] and room["matches_last_writes"]
    for key in ("p50", "p95", "p99", "max"):
        assert res.latency_ms[key] is not None and res.latency_ms[key] >= 0
    assert res.latency_ms["p50"] <= res.latency_ms["p99"] <= res.latency_ms["max"]
    assert res.latency_ms["samples"] == res.delivered
    assert res.server_cpu_s is not None and res.server_us_per_delivery is not None
    assert not res.disconnects


@pytest.mark.parametrize(
    "url",
    ["ws://127.0.0.1:1/ws", "ws://127.8.9.10:1/ws", "ws://localhost:1/ws", "ws://[::1]:1/ws"],
)
def test_loopback_targets_allowed(url):
    check_target(url)


@pytest.mark.parametrize("url", ["ws://10.0.0.1:8765/ws", "ws://example.com/ws", "ws://[2001:db8::1]:1/ws"])
def test_remote_targets_refused(url, capsys):
    with pytest.raises(TargetError):
        check_target(url)
    check_target(url, allow_remote=True)
    assert loadtest_main(["fanout", "--url", url, "--duration", "1", "--quiet"]) == 2
    assert "refusing" in capsys.readouterr().err


async def test_loss_and_duplicate_accounting():
    """Deliveries are counted from the markers in frames, exactly, after the run."""
    from codec import protocol as p
    from loadtest.fanout import FanoutClient, RunState

    run = RunState(1)
    receiver = FanoutClient(run, 0)

    def frame(*markers: tuple[int, int]) -> bytes:
        body = b"".join(b"\x77\x0f\x02%d:%d:%d\x03" % (w, s, run.now_us()) for w, s in markers)
        return p.encode_sync_update(b"\x01" + body)

    receiver.on_message(frame((0, 0), (1, 0)))
    receiver.on_message(frame((0, 0), (1, 0)))  # the same frame again: two duplicates
    receiver.on_message(frame((0, 2)))  # writer 0's update 1 never arrives
    receiver.on_message(frame((7, 0)))  # a writer that is not in the room
    got, dups, unknown = receiver.count_received({0: 3, 1: 1})
    assert (got, dups, unknown) == (3, 2, 1)
    assert sum(run.hist) == run.delivered == 6


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_sweep_draws_its_plot(server, tmp_path):
    """A two-step sweep against a real server, drawn: p50/p99 against deliveries per second."""
    import json
    import subprocess
    import sys

    from loadtest.plot import panels_of
    from tests.support import ROOT

    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "sweep", "--url", server.ws_url, "--clients", "4", "--writers", "2",
         "--intervals", "50,25", "--duration", "1", "--drain", "2", "--warmup", "0.2", "--quiet",
         "--min-gain", "0", "--json", str(out), "--plot", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    points = panels_of(json.loads(out.read_text()))["sweep"]["ours"]
    assert len(points) == 2 and all(p50 <= p99 for _, p50, p99 in points)
    width, height = _png_size(png)
    assert width >= 600 and height >= 400


def test_compare_results_are_drawn_one_panel_per_sweep(tmp_path):
    """The stored comparison (docs/bench) drawn as docs/benchmarks.md shows it."""
    import json

    from loadtest.cli import main
    from loadtest.plot import panels_of
    from tests.support import ROOT

    source = ROOT / "docs" / "bench" / "compare-2026-11-27-run2.json"
    panels = panels_of(json.loads(source.read_text()))
    assert set(panels) == {"sweep1", "sweep50"} and set(panels["sweep1"]) == {"ours", "hocuspocus", "reference"}
    png = tmp_path / "compare.png"
    assert main(["plot", str(source), "--out", str(png)]) == 0
    width, height = _png_size(png)
    assert width > 2 * height  # two panels side by side
    assert (ROOT / "docs" / "bench" / "compare-2026-11-27-run2.png").exists()


def test_textfuzz_soak_command_smoke(tmp_path):
    """The soak command spawns a server, runs seeds, kills it with -9, restarts it, and verifies every room."""
    import json

    out = tmp_path / "fuzz.json"
    code = loadtest_main(["textfuzz", "--spawn-server", "--seeds", "2", "--steps", "60", "--quiet", "--json", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report
    assert report["seeds"] == 2 and report["failed"] == [] and report["failed_after_restart"] == []


def test_hop_bench_smoke():
    """Two nodes and a redis-server of its own: both latency classes sampled, every update delivered."""
    import json
    import subprocess
    import sys

    from tests.support import ROOT

    done = subprocess.run(
        [sys.executable, "-m", "loadtest.hop_bench", "--clients", "4", "--writers", "2", "--rate", "20",
         "--seconds", "1", "--warmup", "0.5", "--server-cores", "0,1", "--harness-cores", "0,1"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lost"] == 0 and result["duplicates"] == 0 and result["final_value_missing"] == 0
    assert result["same_node_ms"]["samples"] > 0 and result["cross_node_ms"]["samples"] > 0
