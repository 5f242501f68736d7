"""Operations: /metrics, /readyz, JSON logs, the admin API and /openapi.json.

Real server processes (``server_factory``), real clients; every wait bounded.
"""

from __future__ import annotations

import json
import logging
import sys

import httpx
import pycrdt
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from collab.client import CollabClient
from collab.metrics import Histogram
from tests.forwarding_support import FAST_FORWARDING, BackendProcess
from tests.security_support import closed_with, jwt_env, make_token
from tests.support import ServerProcess, eventually, free_port

WAIT = 10.0
METRICS_TOKEN = "scrape-me"


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory):
    """One development-mode server for the tests that don't need their own (metrics behind a token)."""
    tmp = tmp_path_factory.mktemp("ops-dev")
    srv = ServerProcess(tmp / "data", tmp / "server.log", env={"COLLAB_METRICS_TOKEN": METRICS_TOKEN}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory):
    """One jwt-mode server logging JSON lines."""
    tmp = tmp_path_factory.mktemp("ops-jwt")
    env = jwt_env(COLLAB_LOG_FORMAT="json", COLLAB_LOCK_TTL_SECONDS="30")
    srv = ServerProcess(tmp / "data", tmp / "server.log", env=env).start()
    yield srv
    srv.stop()


def scrape(server) -> dict[str, float]:
    """Every sample of /metrics: ``name{label="v",...}`` -> value (labels sorted)."""
    reply = httpx.get(f"{server.http_url}/metrics", headers=bearer(METRICS_TOKEN), timeout=5)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def text_of(client: CollabClient) -> pycrdt.Text:
    return client.doc.get("notes", type=pycrdt.Text)


def config_of(client: CollabClient) -> pycrdt.Map:
    return client.doc.get("config", type=pycrdt.Map)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ----------------------------------------------------------------- metrics


async def test_metrics_parse_and_move_with_clients_edits_and_locks(dev_server):
    server = dev_server
    before = scrape(server)
    assert before["collab_peers"] == 0
    assert "process_resident_memory_bytes" in before  # the process collector is registered too

    query = "user={}&role=editor"
    async with (
        CollabClient(server.ws_url, "ops-m", hello=True, query=query.format("ann")) as a,
        CollabClient(server.ws_url, "ops-m", hello=True, query=query.format("bob")) as b,
    ):
        text_of(a).insert(0, "hello")
        await a.wait_saved(WAIT)
        await b.until(lambda: str(text_of(b)) == "hello", WAIT, "b sees a's edit")
        granted = await a.acquire_lock("description")
        assert granted["type"] == "lock.granted", granted

        def moved():
            now = scrape(server)
            return now if now["collab_participants"] == 2 else None

        now = await eventually(moved, WAIT, what="participants in the metrics")
        assert now["collab_peers"] == 2 and now["collab_rooms"] >= 1
        assert now["collab_connections"] == 2
        assert now["collab_messages_received_total"] > before["collab_messages_received_total"]
        assert now["collab_messages_sent_total"] > before["collab_messages_sent_total"]
        assert now["collab_received_bytes_total"] > 0 and now["collab_sent_bytes_total"] > 0
        assert now["collab_updates_received_total"] >= 1
        assert now["collab_flushes_total"] >= 1
        assert now["collab_fanout_latency_seconds_count"] > before["collab_fanout_latency_seconds_count"]
        assert now['collab_fanout_latency_seconds_bucket{le="+Inf"}'] == now["collab_fanout_latency_seconds_count"]
        assert 0 < now["collab_fanout_latency_seconds_sum"] < 5
        assert now["collab_store_append_seconds_count"] >= 1
        assert now["collab_locks_held"] == 1 and now["collab_locks_held_local"] == 1
        assert now['collab_lock_events_total{event="granted"}'] >= 1
        assert now["collab_peer_queue_frames"] >= 0 and now["collab_peer_queue_limit_frames"] == 2048
        assert now["collab_outbox_pending"] >= 0  # recorded, no backend configured

        # A refused connection is counted by its close code and kind.
        async with websockets.connect(f"{server.ws_url}/ops-m?user=eve&role=superuser", open_timeout=WAIT) as bad:
            code, _ = await closed_with(bad, WAIT)
        assert code == 4401

    def closed():
        now = scrape(server)
        return now if now["collab_peers"] == 0 else None

    after = await eventually(closed, WAIT, what="peers gone from the metrics")
    unauthenticated = 'collab_connections_closed_total{code="4401",kind="unauthenticated"}'
    assert after[unauthenticated] == before.get(unauthenticated, 0) + 1
    assert (
        after['collab_errors_total{kind="unauthenticated"}']
        == before.get('collab_errors_total{kind="unauthenticated"}', 0) + 1
    )
    client_closed = 'collab_connections_closed_total{code="0",kind="client_closed"}'
    assert after[client_closed] >= before.get(client_closed, 0) + 2
    assert after["collab_locks_held_local"] == 0


async def test_metrics_registries_are_per_app(tmp_path):
    """Two apps in one process: two registries, no duplicate-timeseries error."""
    from collab.app import create_app
    from collab.settings import Settings

    one = create_app(Settings(data_dir=tmp_path / "one")).state.core
    two = create_app(Settings(data_dir=tmp_path / "two")).state.core
    assert one.metrics.registry is not two.metrics.registry
    one.counters.messages_in += 3
    text_one = (await one.metrics.render()).decode()
    text_two = (await two.metrics.render()).decode()
    assert "collab_messages_received_total 3.0" in text_one
    assert "collab_messages_received_total 0.0" in text_two


def test_histogram_buckets_are_cumulative_and_inclusive():
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        hist.observe(value)
    assert hist.buckets() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert hist.count == 5 and hist.sum == pytest.approx(8.65)


def test_metrics_token(dev_server):
    url = f"{dev_server.http_url}/metrics"
    refused = httpx.get(url, timeout=5)
    assert refused.status_code == 401 and "error" in refused.json()
    assert httpx.get(url, headers=bearer("nope"), timeout=5).status_code == 401
    assert httpx.get(url, headers=bearer(METRICS_TOKEN), timeout=5).status_code == 200


# ----------------------------------------------------------------- readiness


async def test_readyz_follows_the_backend(server_factory, tmp_path):
    backend = BackendProcess(tmp_path / "backend.sqlite3", tmp_path / "backend.log").start()
    try:
        server = server_factory(env={"COLLAB_BACKEND_URL": backend.url, **FAST_FORWARDING})
        ready = httpx.get(f"{server.http_url}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["forwarding"] == "ok"
        # A change forwarded to the backend shows in the forwarding metrics.
        async with CollabClient(server.ws_url, "ops-f", hello=True) as client:
            config_of(client)["description"] = "forward me"
            await client.wait_saved(WAIT)
            await client.until(lambda: any(m["type"] == "forwarded" for m in client.control), WAIT, "forwarded")
        samples = scrape(server)
        assert samples['collab_forward_requests_total{outcome="2xx"}'] >= 1
        assert samples["collab_forward_request_seconds_count"] >= 1
        assert samples["collab_outbox_pending"] == 0 and samples["collab_forward_backend_down"] == 0
    finally:
        backend.stop()

    def not_ready():
        reply = httpx.get(f"{server.http_url}/readyz", timeout=5)
        return reply if reply.status_code == 503 else None

    reply = await eventually(not_ready, WAIT, what="/readyz 503 once the backend is gone")
    body = reply.json()
    assert body["ready"] is False and "unreachable" in body["checks"]["forwarding"]
    assert body["checks"]["store"] == "ok"
    assert httpx.get(f"{server.http_url}/healthz", timeout=5).status_code == 200  # alive all the same


async def test_backend_readiness_required_or_only_reported():
    from forwarding.extension import ForwardingExtension
    from forwarding.forwarder import Forwarder
    from forwarding.settings import ForwardingSettings

    closed = f"http://127.0.0.1:{free_port()}"
    settings = ForwardingSettings(backend_url=closed, ready_requires_backend=False)
    ext = ForwardingExtension(settings)
    ext.recording = True
    ext.forwarder = Forwarder(settings, store=None, report=lambda *args: None)
    async with httpx.AsyncClient(base_url=closed) as client:
        ext.forwarder.client = client
        reported = await ext.check()
        assert "unreachable" in reported and "not required" in reported
        settings.ready_requires_backend = True
        ext.forwarder._probe = None  # the last probe is kept for a second
        with pytest.raises(RuntimeError, match="unreachable"):
            await ext.check()


async def test_readyz_follows_redis(server_factory, redis_factory):
    redis = redis_factory()
    server = server_factory(env={"COLLAB_REDIS_URL": redis.url})
    ready = httpx.get(f"{server.http_url}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["redis"] == "ok"
    redis.kill()

    def not_ready():
        reply = httpx.get(f"{server.http_url}/readyz", timeout=10)
        return reply if reply.status_code == 503 else None

    reply = await eventually(not_ready, WAIT, what="/readyz 503 once Redis is gone")
    assert reply.json()["checks"]["redis"].startswith("error")


# ----------------------------------------------------------------- logs


async def test_json_logs_carry_workspace_and_user_and_never_a_token(jwt_server):
    server = jwt_server
    token = make_token("alice", {"ops-log": "editor"})
    client = CollabClient(server.ws_url, "ops-log", token=token, token_via="query")
    async with client:
        await client.send_raw("a text frame")  # closed 1003, logged from the connection's task
        await client.wait_closed(WAIT)
    assert client.close_code == 1003

    def logged():
        text = server.log_path.read_text()
        return text if "text frames are not supported" in text else None

    text = await eventually(logged, WAIT, what="the close in the log")
    assert token not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= set(line), line
    closing = [line for line in lines if "text frames are not supported" in line["msg"]]
    assert closing and closing[0]["workspace"] == "ops-log" and closing[0]["user"] == "alice", closing
    assert any("token=[redacted]" in line["msg"] for line in lines)  # uvicorn's line about the handshake
    assert any("listening on" in line["msg"] for line in lines)


def test_json_formatter_unit():
    from collab import logs

    formatter = logs.JsonFormatter(node="n1")
    logs.bind(workspace="ws-1", user="u-1")
    try:
        try:
            raise ValueError("boom ?token=abc.def")
        except ValueError:
            record = logging.LogRecord("collab.x", logging.ERROR, __file__, 1, "failed %s", ("once",), sys.exc_info())
        line = json.loads(formatter.format(record))
    finally:
        logs.unbind()
    assert line["msg"] == "failed once" and line["level"] == "error" and line["node"] == "n1"
    assert line["workspace"] == "ws-1" and line["user"] == "u-1"
    assert "abc.def" not in line["exc"] and "token=[redacted]" in line["exc"]


# ----------------------------------------------------------------- admin API


def rooms_named(reply: httpx.Response, name: str) -> list[dict]:
    return [room for room in reply.json()["rooms"] if room["workspace"] == name]


async def test_admin_api_in_jwt_mode(jwt_server):
    server = jwt_server
    api = f"{server.http_url}/api/admin/rooms"
    root = bearer(make_token("root", {"*": "admin"}))
    room_admin = bearer(make_token("ra", {"ops-a": "admin"}))
    editor = bearer(make_token("ed", {"*": "editor"}))

    async with httpx.AsyncClient(timeout=5) as http:
        # Authentication and roles, JSON errors.
        missing = await http.get(api)
        assert missing.status_code == 401 and "error" in missing.json()
        assert (await http.get(api, headers=bearer("junk"))).status_code == 401
        forbidden = await http.get(api, headers=editor)
        assert forbidden.status_code == 403 and "admin" in forbidden.json()["error"]
        assert (await http.get(api, headers=room_admin)).status_code == 403  # the list is server-wide
        assert (await http.get(f"{api}/ops-a", headers=room_admin)).status_code == 200
        assert (await http.get(f"{api}/ops-b", headers=room_admin)).status_code == 403
        assert (await http.post(f"{api}/ops-a/close", headers=editor)).status_code == 403
        assert rooms_named(await http.get(api, headers=root), "ops-a") == []

        holder = CollabClient(server.ws_url, "ops-a", hello=True, token=make_token("alice", {"ops-a": "editor"}))
        other = CollabClient(server.ws_url, "ops-a", hello=True, token=make_token("bob", {"ops-a": "viewer"}))
        async with holder, other:
            config_of(holder)["description"] = "managed by ops"
            await holder.wait_saved(WAIT)
            granted = await holder.acquire_lock("connection.host")
            assert granted["type"] == "lock.granted", granted

            rooms = rooms_named(await http.get(api, headers=root), "ops-a")
            assert [(r["workspace"], r["peers"], r["users"], r["locks"]) for r in rooms] == [("ops-a", 2, 2, 1)]

            detail = (await http.get(f"{api}/ops-a", headers=room_admin)).json()
            assert detail["open"] is True
            assert sorted(peer["user"]["id"] for peer in detail["peers"]) == ["alice", "bob"]
            assert [(lock["path"], lock["user_id"]) for lock in detail["locks"]] == [("connection.host", "alice")]
            assert sorted(part["user_id"] for part in detail["participants"]) == ["alice", "bob"]

            config = (await http.get(f"{api}/ops-a/config", headers=room_admin)).json()
            assert config["source"] == "memory" and config["config"]["description"] == "managed by ops"

            # Force-release: the holder hears of it.
            released = await http.post(f"{api}/ops-a/locks/connection.host/release", headers=room_admin)
            assert released.status_code == 200, released.text
            assert released.json()["released"]["path"] == "connection.host"

            def told(message) -> bool:
                return message["type"] in ("lock.released", "lock.lost") and message.get("path") == "connection.host"

            await holder.until(lambda: any(told(m) for m in holder.control), WAIT, "lock.released at the holder")
            assert [m.get("reason") for m in holder.control if told(m)] == ["forced"]
            again = await http.post(f"{api}/ops-a/locks/connection.host/release", headers=room_admin)
            assert again.status_code == 404 and "error" in again.json()

            # Close the room: every peer is closed (1012), the room leaves memory.
            bad = await http.post(f"{api}/ops-a/close", headers=root, json={"code": 1006})
            assert bad.status_code == 400
            closed = await http.post(f"{api}/ops-a/close", headers=root)
            assert closed.status_code == 200, closed.text
            assert closed.json() == {"workspace": "ops-a", "closed": 2, "evicted": True, "open": True}
            await holder.wait_closed(WAIT)
            await other.wait_closed(WAIT)
            assert holder.close_code == 1012 and other.close_code == 1012

        assert rooms_named(await http.get(api, headers=root), "ops-a") == []
        stored = (await http.get(f"{api}/ops-a/config", headers=root)).json()
        assert stored["source"] == "store" and stored["config"]["description"] == "managed by ops"
        unknown = await http.get(f"{api}/never-opened/config", headers=root)
        assert unknown.status_code == 404
        closed_again = (await http.post(f"{api}/ops-a/close", headers=root)).json()
        assert closed_again["closed"] == 0 and closed_again["open"] is False

    # Admin actions are in the (JSON) log with who did them.
    lines = [json.loads(line) for line in server.log_path.read_text().splitlines() if line.strip()]
    actions = [(line["msg"], line.get("user")) for line in lines if line["logger"] == "collab.admin"]
    assert ("admin force-released the lock on connection.host held by alice", "ra") in actions
    assert ("admin closes room ops-a: 2 connections, code 1012", "root") in actions


def test_admin_api_in_development_mode_is_loopback_only(dev_server):
    server = dev_server
    api = f"{server.http_url}/api/admin/rooms"
    assert httpx.get(api, timeout=5).status_code == 403  # an anonymous editor
    assert httpx.get(f"{api}?user=ops&role=admin", timeout=5).status_code == 200
    # Through a trusted proxy (X-Forwarded-For from 127.0.0.1), the client is remote: refused.
    remote = httpx.get(f"{api}?user=ops&role=admin", headers={"X-Forwarded-For": "203.0.113.9"}, timeout=5)
    assert remote.status_code == 403 and "loopback" in remote.json()["error"]


# ----------------------------------------------------------------- OpenAPI


def test_openapi_describes_every_http_route(tmp_path):
    from collab.app import create_app
    from collab.openapi import OPERATIONS, build, http_operations
    from collab.settings import Settings

    app = create_app(Settings(data_dir=tmp_path))
    spec = build(list(app.routes), "test")
    routes = {(path, method) for path, method, _ in http_operations(list(app.routes))}
    assert routes, "no routes?"
    described = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert described == routes
    for path, method in routes:
        operation = spec["paths"][path][method]
        assert "x-undocumented" not in operation, f"{method.upper()} {path} has no entry in collab.openapi"
        assert operation["summary"] and operation["responses"]
        names = [param["name"] for param in operation.get("parameters", []) if param["in"] == "path"]
        assert names == [part[1:-1] for part in path.split("/") if part.startswith("{")]
    assert set(OPERATIONS) <= routes, f"described but not routed: {set(OPERATIONS) - routes}"
    for must in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/api/admin/rooms"):
        assert must in spec["paths"]


def test_openapi_is_served(dev_server):
    server = dev_server
    reply = httpx.get(f"{server.http_url}/openapi.json", timeout=5)
    assert reply.status_code == 200
    spec = reply.json()
    assert spec["openapi"].startswith("3.") and spec["info"]["title"] == "datasource-collab"
    assert "post" in spec["paths"]["/api/admin/rooms/{workspace_id}/locks/{path}/release"]
