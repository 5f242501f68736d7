"""Smoke tests of the load-test scenarios join, connections and awareness (tiny parameters).

The comparison with Hocuspocus and the reference server is a benchmark
(``make bench-compare``), not a test: no peer server is installed here. The
Hocuspocus dialect adapter is checked on hand-made frames.
"""

from __future__ import annotations

import pytest

from codec import protocol as p
from loadtest import scenarios as sc
from loadtest.fanout import TargetError
from loadtest.protocols import HocuspocusMixin, client_class, var_string


async def test_join_syncs_the_seeded_document(server):
    res = await sc.run_join(server.ws_url, updates=150, keys=20, joins=3, server_pid=server.proc.pid, progress=False)
    assert res.converged and res.joins_correct == 3
    assert res.join_ms["samples"] == 3 and res.join_ms["p50"] > 0
    assert res.step2_bytes > 0 and res.server_cpu_ms_per_join is not None


async def test_connections_measures_memory(server):
    res = await sc.run_connections(
        server.ws_url, connections=30, per_room=10, server_pid=server.proc.pid, settle=0.2, progress=False
    )
    assert res.connected == 30 and res.failed == 0 and res.still_open == 30
    assert res.rss_after_kib is not None and res.kib_per_connection is not None


async def test_awareness_fanout_converges(server):
    res = await sc.run_awareness(
        server.ws_url,
        rooms=1,
        clients=6,
        movers=2,
        interval_ms=50,
        duration=1.0,
        drain=2.0,
        server_pid=server.proc.pid,
        progress=False,
    )
    assert res.sent > 10 and res.delivered > 0
    assert res.converged, res
    assert res.latency_ms["p99"] is not None


async def test_scenarios_refuse_remote_targets():
    with pytest.raises(TargetError):
        await sc.run_join("ws://192.0.2.1:1/ws", updates=1, joins=1, progress=False)


def test_hocuspocus_adapter_frames():
    class Base:
        def __init__(self):
            self.sent, self.got = [], []

        def send(self, m):
            self.sent.append(m)

        def on_message(self, m):
            self.got.append(m)

    c = client_class(Base, "hocuspocus")()
    assert isinstance(c, HocuspocusMixin)
    c._hp_prefix = var_string("doc-é")
    c.send(p.encode_sync_step1(b"\x00"))
    assert c.sent == [var_string("doc-é") + p.encode_sync_step1(b"\x00")]
    pre = var_string("doc-é")
    c.on_message(pre + b"\x04\x01\x02\x00\x00")  # SyncReply step 2 -> sync step 2
    c.on_message(pre + b"\x08\x01")  # SyncStatus: dropped
    c.on_message(pre + b"\x01\x01\x00")  # awareness: kept
    c.on_message(var_string("other") + b"\x00\x02\x00")  # another document: dropped
    assert c.got == [b"\x00\x01\x02\x00\x00", b"\x01\x01\x00"]
    assert client_class(Base, "y-websocket") is Base


@pytest.mark.parametrize("command", ["join", "connections", "awareness"])
def test_cli_refuses_remote_targets(command, capsys):
    from loadtest.cli import main

    assert main([command, "--url", "ws://10.1.2.3:8765/ws", "--quiet"]) == 2
    assert "refusing" in capsys.readouterr().err
