"""The deployment files, run for real.

* deploy/nginx.conf in front of two nodes and one Redis (all on loopback
  ports): the stock JS client and our Python client go through nginx, one node
  is killed (SIGKILL, by PID), both clients reconnect through nginx to the
  other node and nothing is lost.
* deploy/prometheus/alerts.yml and deploy/grafana/collab.json: promtool
  accepts the rules, and every metric they name is exported by a running
  server's /metrics.
* deploy/collab.service: the systemd unit stops with SIGTERM (close 1012) and
  waits for /readyz.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pycrdt
import pytest

from collab.client import CollabClient
from procs import ManagedProcess
from tests.support import ROOT, ServerProcess, eventually, free_port
from tests.test_js_client import NODE, NodeClient

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
DEPLOY = ROOT / "deploy"
WAIT = 20.0


class Nginx:
    """nginx (Debian's) in the foreground, with deploy/nginx.conf included; ended by its PID."""

    def __init__(self, workdir: Path, node_ports: list[int]) -> None:
        self.workdir = workdir
        self.node_ports = node_ports
        self.port = free_port()
        self.child: ManagedProcess | None = None

    def render(self) -> Path:
        site = (DEPLOY / "nginx.conf").read_text()
        swaps = [
            ("server 127.0.0.1:8765 ", f"server 127.0.0.1:{self.node_ports[0]} "),
            ("server 127.0.0.1:8775 ", f"server 127.0.0.1:{self.node_ports[1]} "),
            ("listen 80;", f"listen 127.0.0.1:{self.port};"),
            ("/var/log/nginx/", f"{self.workdir}/"),
        ]
        for old, new in swaps:
            assert site.count(old) == 1, f"deploy/nginx.conf no longer has exactly one {old!r}"
            site = site.replace(old, new)
        (self.workdir / "collab.conf").write_text(site)
        temp = "\n".join(
            f"  {kind}_temp_path {self.workdir}/{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        main = self.workdir / "nginx.conf"
        main.write_text(
            f"daemon off;\nworker_processes 1;\npid {self.workdir}/nginx.pid;\n"
            f"error_log {self.workdir}/error.log info;\n"
            + ("user root;\n" if os.geteuid() == 0 else "")
            + "events { worker_connections 512; }\n"
            f"http {{\n{temp}\n  access_log off;\n  include {self.workdir}/collab.conf;\n}}\n"
        )
        return main

    def start(self) -> Nginx:
        self.workdir.mkdir(parents=True, exist_ok=True)
        main = self.render()
        check = subprocess.run([NGINX, "-t", "-p", str(self.workdir), "-c", str(main), "-e", "stderr"],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert check.returncode == 0, check.stderr
        self.child = ManagedProcess(
            [NGINX, "-p", str(self.workdir), "-c", str(main), "-e", "stderr"],
            name="nginx",
            log_path=self.workdir / "stderr.log",
            ready_url=f"{self.url}/healthz",
            stop_signal=signal.SIGQUIT,  # graceful: the master ends its workers
        )
        self.child.start(WAIT)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(10)


def node_of(nodes: dict[str, ServerProcess], workspace: str, user: str) -> str | None:
    """Which node holds ``user``'s connection (asked of each node's admin API)."""
    for name, node in nodes.items():
        if node.proc is None or node.proc.poll() is not None:
            continue
        reply = httpx.get(f"{node.http_url}/api/admin/rooms/{workspace}?user=ops&role=admin", timeout=5).json()
        if any((p.get("user") or {}).get("id") == user for p in reply.get("peers", [])):
            return name
    return None


@pytest.mark.skipif(NGINX is None or NODE is None, reason="needs nginx and node (`make deps-test` installs them)")
async def test_nginx_in_front_of_two_nodes_survives_losing_one(tmp_path, redis_server):
    ports = [free_port(), free_port()]
    env = {"COLLAB_REDIS_URL": redis_server.url, "COLLAB_PRESENCE_TTL_SECONDS": "3",
           "COLLAB_RELAY_AWARENESS_TTL_SECONDS": "3", "COLLAB_ROOM_IDLE_SECONDS": "1"}  # fmt: skip
    nodes = {
        name: ServerProcess(tmp_path / f"{name}-data", tmp_path / f"{name}.log", {**env, "COLLAB_NODE_ID": name}, port)
        for name, port in zip(("a", "b"), ports)
    }
    nginx = Nginx(tmp_path / "nginx", ports)
    js: NodeClient | None = None
    clients: list[CollabClient] = []
    ws_url = f"ws://127.0.0.1:{nginx.port}/ws"
    room = "ds-nginx"
    try:
        for node in nodes.values():
            node.start()
        nginx.start()
        assert httpx.get(f"{nginx.url}/", timeout=5).status_code == 200  # the landing page through the proxy

        js = await NodeClient(ws_url, room + "?user=js", "js").start()  # y-websocket appends the room to the URL
        await eventually(lambda: node_of(nodes, room, "js"), WAIT, what="the JS client on a node")
        victim = node_of(nodes, room, "js")
        # Our client, through nginx too, on the same node as the JS client: least_conn
        # sends a new connection to the emptier node, so keep the misplaced ones open
        # until one lands there, then close them.
        py = None
        for attempt in range(6):
            candidate = await CollabClient(ws_url, room, query=f"user=py{attempt}", hello=True).connect(timeout=WAIT)
            clients.append(candidate)
            placed = await eventually(lambda a=attempt: node_of(nodes, room, f"py{a}"), WAIT, what="placement")
            if placed == victim:
                py = candidate
                break
        assert py is not None, "nginx never placed the Python client on the JS client's node"
        for extra in clients[:-1]:
            await extra.close()
        clients = [py]
        survivor = next(n for n in nodes if n != victim)

        # Edits from both sides, acknowledged, seen by the other.
        await js.command("set", map="config", key="js_before", value=1)
        py.doc.get("config", type=pycrdt.Map)["py_before"] = 1
        await py.wait_saved(WAIT)
        await py.until(lambda: _config(py).get("js_before") == 1, WAIT, "JS edit at the Python client")
        await js.until(lambda: js.doc["config"].get("py_before") == 1, WAIT, "Python edit at the JS client")

        nodes[victim].kill()  # SIGKILL by PID: no close frames, no flush
        # Edits made while the node is gone stay in the clients and go out on reconnect.
        await js.command("set", map="config", key="js_during", value=2)
        await py.wait_closed(WAIT)
        py.doc.get("config", type=pycrdt.Map)["py_during"] = 2
        py.updates_sent = py.updates_saved = 0
        await py.connect(timeout=WAIT)  # the same address: nginx sends it to the survivor
        await py.wait_saved(WAIT)
        want = {"js_before": 1, "py_before": 1, "js_during": 2, "py_during": 2}
        await py.until(lambda: _config(py) == want, WAIT, "everything at the Python client")
        await js.until(lambda: js.doc["config"] == want, WAIT, "everything at the JS client")
        assert any(e.get("event") == "connection-close" for e in js.events), "the JS client never lost its node"
        assert node_of(nodes, room, "js") == survivor and node_of(nodes, room, f"py{attempt}") == survivor
        async with CollabClient(ws_url, room, query="user=fresh") as fresh:
            assert _config(fresh) == want
        js.assert_clean()
    finally:
        for client in clients:
            await client.close()
        if js is not None:
            await js.cleanup()
        nginx.stop()
        for node in nodes.values():
            node.stop()


def _config(client: CollabClient) -> dict:
    return {k: (int(v) if isinstance(v, float) and v.is_integer() else v)
            for k, v in (client.doc.get("config", type=pycrdt.Map).to_py() or {}).items()}  # fmt: skip


# ------------------------------------------------------------- Prometheus, Grafana

PROMTOOL = os.environ.get("COLLAB_PROMTOOL") or shutil.which("promtool") or str(ROOT / ".venv" / "tools" / "promtool")
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "collab.json"
_METRIC = re.compile(r"\b((?:collab|process|python)_[a-z0-9_]+)\b")


def rule_exprs() -> list[str]:
    import yaml

    data = yaml.safe_load(ALERTS.read_text())
    exprs = []
    assert isinstance(data.get("groups"), list) and data["groups"]
    for group in data["groups"]:
        assert group.get("name") and isinstance(group.get("rules"), list) and group["rules"], group
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "record", "keep_firing_for"}, rule
            assert rule.get("alert") and isinstance(rule.get("expr"), str), rule
            assert rule["labels"]["severity"] in ("warning", "critical"), rule
            assert rule["annotations"]["summary"], rule
            exprs.append(rule["expr"])
    return exprs


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in data["panels"] for target in panel.get("targets", [])]


def test_alert_rules_cover_the_issue_and_are_well_formed():
    import yaml

    names = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert {"CollabForwardingStalled", "CollabDeadLetters", "CollabRedisUnavailable", "CollabSlowConsumersCut",
            "CollabAckLatencyHigh"} <= names  # fmt: skip
    assert len(rule_exprs()) == len(names)
    assert len(dashboard_exprs()) >= 10


@pytest.mark.skipif(
    not Path(PROMTOOL).is_file(),
    reason="promtool missing (`make deps-test` extracts it from Debian's prometheus package)",
)
def test_promtool_accepts_the_rules():
    done = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


async def test_every_metric_the_rules_and_dashboard_use_is_exported(server_factory, redis_server, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from tests.forwarding_support import FAST_FORWARDING, BackendProcess

    backend = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log").start()
    try:
        server = server_factory(env={"COLLAB_REDIS_URL": redis_server.url, "COLLAB_BACKEND_URL": backend.url,
                                     **FAST_FORWARDING})  # fmt: skip
        # One forwarded change and one closed connection, so labelled counters have samples.
        async with CollabClient(server.ws_url, "ds-metrics", hello=True) as client:
            client.doc.get("config", type=pycrdt.Map)["description"] = "scrape me"
            await client.wait_saved(WAIT)
            await client.until(lambda: any(m["type"] == "forwarded" for m in client.control), WAIT, "forwarded")
        text = httpx.get(f"{server.http_url}/metrics", timeout=5).text
    finally:
        backend.stop()
    exported = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    used = {name for expr in rule_exprs() + dashboard_exprs() for name in _METRIC.findall(expr)}
    assert len(used) >= 15
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    # The outbox gauges come from the Redis store here (the alerts rely on them with several nodes).
    assert values["collab_outbox_pending"] == 0 and values["collab_outbox_dead_letters"] == 0
    assert values["collab_redis_up"] == 1
    missing = sorted(used - exported)
    assert missing == [], f"used by deploy/ but not exported by the server: {missing}"


# ------------------------------------------------------------------- systemd

UNIT = DEPLOY / "collab.service"


def unit_values() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


async def test_systemd_unit_starts_ready_and_stops_gracefully(tmp_path):
    """The unit's own commands: ExecStart serves, ExecStartPost returns once ready, KillSignal closes with 1012."""
    from collab.settings import Settings

    unit = unit_values()
    assert unit["KillSignal"] == "SIGTERM" and unit["Type"] == "exec"
    assert float(unit["TimeoutStopSec"]) > Settings.model_fields["shutdown_timeout"].default + 5
    venv = "/srv/collab/.venv/bin/"
    start, ready = unit["ExecStart"], unit["ExecStartPost"]
    assert start.startswith(venv + "collab serve ") and ready.startswith(venv + "collab wait-ready ")
    port = free_port()
    toml = tmp_path / "collab.toml"
    toml.write_text(f'port = {port}\ndata_dir = "{tmp_path / "data"}"\n')
    bin_dir = str(Path(os.sys.executable).parent) + "/"

    def argv(command: str) -> list[str]:
        return command.replace(venv, bin_dir).replace("/etc/collab/collab.toml", str(toml)).split()

    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")}
    # Started as systemd would (no readiness wait here: ExecStartPost is what waits).
    unit_proc = ManagedProcess(argv(start), name="unit", log_path=tmp_path / "unit.log", env=env, inherit_env=False,
                               cwd=tmp_path).start()  # fmt: skip
    try:
        waited = await asyncio.to_thread(
            subprocess.run, argv(ready), env=env, capture_output=True, text=True, timeout=90
        )
        assert waited.returncode == 0, waited.stderr + (tmp_path / "unit.log").read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
        client = await CollabClient(f"ws://127.0.0.1:{port}/ws", "ds-unit", hello=True).connect(timeout=WAIT)
        client.doc.get("config", type=pycrdt.Map)["name"] = "kept"
        await client.wait_saved(WAIT)
        unit_proc.send_signal(getattr(signal, unit["KillSignal"]))
        await client.wait_closed(WAIT)
        assert client.close_code == 1012, (client.close_code, client.close_reason)
        # uvicorn re-raises the signal once it has shut down; systemd counts death by
        # SIGTERM as a clean stop (SuccessExitStatus includes it by default).
        assert await asyncio.to_thread(unit_proc.wait, float(unit["TimeoutStopSec"])) in (0, -signal.SIGTERM)
    finally:
        unit_proc.kill()
    # Not ready: wait-ready gives up with the reason.
    failed = subprocess.run(
        argv(ready.replace("--timeout 60", "--timeout 1")), env=env, capture_output=True, text=True, timeout=30
    )
    assert failed.returncode == 1 and "not ready" in failed.stderr
