"""The authorization gate: every route of the app x every kind of caller, in jwt mode.

The routes are read from the app's router (not listed by hand): a route added
later is walked too, and one added without a declared requirement fails the
build of the app (and so this suite).
"""

from __future__ import annotations

import asyncio
import os
from unittest import mock

import httpx
import pytest
import websockets
from starlette.routing import Route

from codec import protocol as p
from collab.app import create_app
from collab.auth import ROLE_RANK
from collab.extensions import Extension
from collab.gate import Requirement, UngatedRoute, route_table
from collab.settings import Settings
from tests.security_support import closed_with, jwt_env, make_token
from tests.support import ServerProcess

WORKSPACE = "ws-gate"
METRICS_TOKEN = "scrape-me-please"
PATH_VALUES = {
    "workspace_id": WORKSPACE,
    "key": "no-such-key",
    "path": "connection.host",
    "name": "operations.md",
    "job": "0123456789abcdef",
}

# Who calls: the token it presents and what that token grants. Made at import
# (collection), so they must outlive a whole suite run on a slow machine.
DAY = 86400.0
CALLERS: dict[str, dict] = {
    "no token": {"token": None},
    "junk token": {"token": "not-a-jwt"},
    "expired token": {"token": make_token("late", {"*": "admin"}, ttl=-120)},
    "other workspace": {
        "token": make_token("stranger", {"elsewhere": "admin"}, ttl=DAY),
        "grants": {"elsewhere": "admin"},
    },
    "viewer": {"token": make_token("vic", {WORKSPACE: "viewer"}, ttl=DAY), "grants": {WORKSPACE: "viewer"}},
    "editor": {"token": make_token("eddie", {WORKSPACE: "editor"}, ttl=DAY), "grants": {WORKSPACE: "editor"}},
    "admin": {"token": make_token("ada", {WORKSPACE: "admin"}, ttl=DAY), "grants": {WORKSPACE: "admin"}},
    "server admin": {"token": make_token("root", {"*": "admin"}, ttl=DAY), "grants": {"*": "admin"}},
    "metrics service": {"token": METRICS_TOKEN, "service": "metrics"},
}


def expected(requires: Requirement, caller: dict) -> int | None:
    """What the gate must answer: 401, 403, or None (let through), computed from the declaration."""
    if requires.public:
        return None
    if requires.role == "service" and caller.get("service") == requires.service:
        return None
    grants = caller.get("grants")
    if grants is None:  # no token, junk, expired, or a service token that is not a JWT
        return 401
    if requires.scope == "workspace":
        role = grants.get(WORKSPACE, grants.get("*"))
    else:  # server-wide (services accept a server admin): only the "*" grant counts
        role = grants.get("*")
    if role is None:
        return 403
    needed = "admin" if requires.role == "service" else requires.role
    return None if ROLE_RANK[role] >= ROLE_RANK[needed] else 403


def concrete(path: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    assert "{" not in path, f"no test value for a parameter of {path}"
    return path


@pytest.fixture(scope="module")
def gate_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    env = jwt_env(COLLAB_METRICS_TOKEN=METRICS_TOKEN)
    with mock.patch.dict(os.environ, env):
        app = create_app(Settings(data_dir=tmp / "unused"))  # same settings, same routes as the server
    srv = ServerProcess(tmp / "data", tmp / "server.log", env=env).start()
    yield srv, route_table(list(app.routes))
    srv.stop()


def test_the_walk_covers_the_known_routes(gate_server):
    _, table = gate_server
    walked = {(path, method) for path, method, _ in table}
    for must in [
        ("/api/workspaces/{workspace_id}/history", "GET"),
        ("/api/workspaces/{workspace_id}/participants", "GET"),
        ("/api/workspaces/{workspace_id}/participants/events", "GET"),
        ("/api/workspaces/{workspace_id}/forwarding", "GET"),
        ("/api/workspaces/{workspace_id}/dead-letters", "GET"),
        ("/api/workspaces/{workspace_id}/dead-letters/{key}/retry", "POST"),
        ("/api/workspaces/{workspace_id}/dead-letters/{key}", "DELETE"),
        ("/api/admin/rooms/{workspace_id}/close", "POST"),
        ("/metrics", "GET"),
        ("/ws/{workspace_id}", "WEBSOCKET"),
    ]:
        assert must in walked


async def _http(http: httpx.AsyncClient, url: str, method: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.stream(method, url, headers=headers) as reply:
        if reply.headers.get("content-type", "").startswith("text/event-stream"):
            return reply  # an event stream: status and headers are the answer; don't wait for events
        await reply.aread()
        return reply


async def test_every_http_route_answers_as_declared(gate_server):
    server, table = gate_server
    checked = 0
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
        for path, method, requires in table:
            if method == "WEBSOCKET":
                continue
            url = concrete(path.replace("{path}", "panel.js") if path.startswith("/presence/") else path, PATH_VALUES)
            for who, caller in CALLERS.items():
                reply = await _http(http, url, method, caller["token"])
                want = expected(requires, caller)
                what = f"{method} {path} as {who} (requires {requires.describe()})"
                if want is None:
                    assert reply.status_code not in (401, 403) and reply.status_code < 500, (
                        f"{what}: {reply.status_code} {reply.text[:200]}"
                    )
                else:
                    assert reply.status_code == want, f"{what}: {reply.status_code} {reply.text[:200]}"
                    assert reply.headers["content-type"] == "application/json", what
                    assert set(reply.json()) == {"error"}, what
                    if want == 401:
                        assert reply.headers.get("www-authenticate") == "Bearer", what
                checked += 1
            if "{workspace_id}" in path:  # the one workspace-id check: 404, whoever asks
                bad = concrete(path, {**PATH_VALUES, "workspace_id": "-not-an-id"})
                for token in (None, CALLERS["server admin"]["token"]):
                    reply = await _http(http, bad, method, token)
                    assert reply.status_code == 404, f"{method} {path} with a malformed workspace id"
                    assert reply.json() == {"error": "invalid workspace id"}
    assert checked >= 20 * len(CALLERS)


async def _websocket_answer(url: str, token: str | None) -> int | None:
    """The close code the server gives this caller, or None if it was let into the room."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
        try:
            async with asyncio.timeout(5):
                first = await ws.recv()
        except websockets.ConnectionClosed:
            return ws.close_code
        assert isinstance(first, bytes) and first[0] == p.MSG_SYNC  # the server's sync step 1
        return None


async def test_the_websocket_answers_as_declared(gate_server):
    server, table = gate_server
    (requires,) = [req for path, method, req in table if method == "WEBSOCKET"]
    url = f"{server.ws_url}/{WORKSPACE}"
    for who, caller in CALLERS.items():
        want = expected(requires, caller)
        code = await _websocket_answer(url, caller["token"])
        assert code == {None: None, 401: 4401, 403: 4403}[want], f"websocket as {who}: {code}"
    # A malformed workspace id is refused before the handshake, like on every HTTP route.
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{server.ws_url}/-not-an-id", open_timeout=5):
            pass
    assert refused.value.response.status_code == 404
    assert refused.value.response.body == b'{"error":"invalid workspace id"}'
    # The token in the query string (what browsers use) passes the same gate.
    token = CALLERS["other workspace"]["token"]
    async with websockets.connect(f"{url}?token={token}", open_timeout=5) as ws:
        assert (await closed_with(ws))[0] == 4403


class _Careless(Extension):
    name = "careless"

    def routes(self):
        return [Route("/api/workspaces/{workspace_id}/secrets", lambda request: None)]


def test_a_route_without_a_requirement_is_refused(tmp_path):
    with pytest.raises(UngatedRoute, match="secrets"):
        create_app(Settings(data_dir=tmp_path), extensions=[_Careless()])


def test_requirements_are_typed():
    from collab.gate import GatedRoute

    async def endpoint(request):
        return None

    with pytest.raises(TypeError):
        GatedRoute("/x", endpoint)  # requires is a required keyword
    with pytest.raises(UngatedRoute):
        GatedRoute("/x", endpoint, requires="admin")
    with pytest.raises(ValueError):
        Requirement("superuser", "workspace")


# What may be public, and what changes state: a wrong declaration fails here.
PUBLIC_ROUTES = {
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/workspaces/{workspace_id}",
    "/presence/static/{path}",
    "/",
    "/docs/{name}",
}  # the landing page (names no workspace or user) and the repository's docs


def test_declarations_are_safe(gate_server):
    _, table = gate_server
    for path, method, requires in table:
        if requires.public:
            assert path in PUBLIC_ROUTES, f"{method} {path} is public"
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            # A service credential counts as a server admin (the backend's change hook writes).
            assert not requires.public and requires.role in ("editor", "admin", "service"), (
                f"{method} {path}: {requires}"
            )
        if path.startswith("/api/admin/") or path.startswith("/admin/"):
            assert requires.role == "admin", f"{method} {path}: {requires}"


def test_the_route_table_in_docs_security_is_the_gates(gate_server):
    from collab.security_doc import DOC, default_routes, render, with_table

    _, table = gate_server
    routes = default_routes()
    assert route_table(routes) == table  # the documented server is the one walked above
    document = DOC.read_text()
    assert with_table(document, render(routes)) == document, "run: python -m collab.security_doc"
    for path, _method, requires in table:
        assert f"| `{path}` |" in document and requires.describe() in document


def test_openapi_states_each_routes_requirement(gate_server):
    from collab.openapi import build

    _, table = gate_server
    with mock.patch.dict(os.environ, jwt_env()):
        app = create_app(Settings())
    spec = build(list(app.routes), "test")
    for path, method, requires in table:
        if method == "WEBSOCKET":
            continue
        operation = spec["paths"][path][method.lower()]
        assert operation["x-requires"] == requires.describe()
        if not requires.public:
            assert {"401", "403"} <= set(operation["responses"]), f"{method} {path}"
        if "{workspace_id}" in path:
            assert "404" in operation["responses"], f"{method} {path}"


def test_metrics_in_jwt_mode_without_a_metrics_token_needs_a_server_admin(server_factory):
    server = server_factory(env=jwt_env())
    url = f"{server.http_url}/metrics"
    assert httpx.get(url, timeout=5).status_code == 401
    editor = make_token("eddie", {"*": "editor"})
    assert httpx.get(url, headers={"Authorization": f"Bearer {editor}"}, timeout=5).status_code == 403
    root = make_token("root", {"*": "admin"}, ttl=DAY)
    reply = httpx.get(url, headers={"Authorization": f"Bearer {root}"}, timeout=5)
    assert reply.status_code == 200 and "collab_" in reply.text
    # /openapi.json stays public (it describes the API, nothing about this deployment).
    assert httpx.get(f"{server.http_url}/openapi.json", timeout=5).status_code == 200
