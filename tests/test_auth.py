"""Authentication and authorization against a real server in jwt mode."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import subprocess
import sys
import time

import httpx
import jwt
import pycrdt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from codec import protocol as p
from collab.auth import AuthError, JWTAuthenticator, role_in
from collab.client import CollabClient
from collab.settings import Settings
from tests.security_support import ORIGIN, SECRET, closed_with, handshake_status, jwt_env, make_token
from tests.support import ROOT, ServerProcess


@pytest.fixture(scope="module")
def jwt_server(tmp_path_factory):
    """One jwt-mode server for the tests of this module that don't restart it."""
    tmp = tmp_path_factory.mktemp("jwt")
    env = jwt_env(COLLAB_TOKEN_REFRESH_WINDOW="2", COLLAB_TOKEN_EXPIRY_GRACE="0.5")
    srv = ServerProcess(tmp / "data", tmp / "server.log", env=env).start()
    yield srv
    srv.stop()


def text_of(client: CollabClient) -> str:
    return str(client.doc.get("notes", type=pycrdt.Text))


def config_of(client: CollabClient) -> dict:
    return client.doc.get("config", type=pycrdt.Map).to_py() or {}


# ------------------------------------------------------------------ start-up


def test_production_mode_refuses_to_start_without_a_key(tmp_path):
    env = {**os.environ, "COLLAB_AUTH_MODE": "jwt"}
    env.pop("COLLAB_JWT_SECRET", None)
    run = subprocess.run(
        [sys.executable, "-m", "collab", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2
    assert "refuses to start without COLLAB_JWT_SECRET" in run.stderr
    # A too-short secret is refused too, and the message never echoes it.
    env["COLLAB_JWT_SECRET"] = "short-s3cret"
    run = subprocess.run(
        [sys.executable, "-m", "collab", "serve", "--port", "0", "--data-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "at least 32 bytes" in run.stderr
    assert "short-s3cret" not in run.stderr + run.stdout


def test_settings_refuse_mixed_or_unknown_algorithms():
    with pytest.raises(ValueError, match="needs COLLAB_JWT_PUBLIC_KEY"):
        Settings(auth_mode="jwt", jwt_secret=SECRET, jwt_algorithms=["RS256"])
    with pytest.raises(ValueError, match="not accepted"):
        Settings(auth_mode="jwt", jwt_secret=SECRET, jwt_algorithms=["none"])
    with pytest.raises(ValueError, match="not both"):
        Settings(auth_mode="jwt", jwt_secret=SECRET, jwt_public_key="-----BEGIN PUBLIC KEY-----")
    assert Settings(auth_mode="jwt", jwt_public_key="k").jwt_algorithms == ["RS256", "ES256"]


def test_development_mode_says_so_loudly(server):
    assert "DEVELOPMENT MODE: NO AUTHENTICATION" in server.log()


# ------------------------------------------------------------ the three forms


@pytest.mark.parametrize("via", ["header", "query", "message"])
async def test_each_token_form_authenticates(jwt_server, via):
    token = make_token("alice", {"ds-forms": "editor"})
    a = await CollabClient(jwt_server.ws_url, "ds-forms", hello=True, token=token, token_via=via).connect()
    a.doc.get("config", type=pycrdt.Map)["via"] = via
    await a.wait_saved()
    ok = next(m for m in a.control if m["type"] == "auth.ok")
    assert ok["user"]["id"] == "alice" and ok["user"]["role"] == "editor" and ok["expires_at"] > time.time()
    await a.close()


async def test_query_token_is_never_logged(jwt_server):
    token = make_token("logged-user", {"ds-log": "editor"})
    c = await CollabClient(jwt_server.ws_url, "ds-log", token=token, token_via="query").connect()
    await c.close()
    bad = "not.a.jwt"
    async with websockets.connect(f"{jwt_server.ws_url}/ds-log?token={bad}&x=1") as ws:
        assert (await closed_with(ws))[0] == 4401
    log = jwt_server.log_path.read_text()
    assert "ds-log?token=[redacted]" in log  # uvicorn's access line, redacted
    assert token not in log and token.split(".")[2] not in log and bad not in log


async def test_missing_bad_expired_and_foreign_tokens_are_refused(jwt_server):
    url = f"{jwt_server.ws_url}/ds-refuse"
    def bearer(token: str) -> dict:
        return {"additional_headers": {"Authorization": f"Bearer {token}"}}

    unsigned = jwt.encode({"sub": "eve", "workspaces": {"*": "admin"}, "exp": int(time.time()) + 60}, None, "none")
    no_exp = jwt.encode({"sub": "eve", "workspaces": {"*": "admin"}}, SECRET, "HS256")
    cases = [
        ({}, 4401, "authentication timeout"),
        (bearer("garbage"), 4401, "invalid token"),
        ({"additional_headers": {"Authorization": "Basic dXNlcjpwYXNz"}}, 4401, "Bearer"),
        (bearer(make_token(ttl=-30)), 4401, "token expired"),
        (bearer(make_token(secret="x" * 40)), 4401, "invalid token"),
        (bearer(make_token(workspaces={"ds-other": "admin"})), 4403, "no access"),
        (bearer(make_token(workspaces={"ds-refuse": "owner"})), 4403, "no access"),
        (bearer(unsigned), 4401, "invalid token"),
        (bearer(no_exp), 4401, "invalid token"),
    ]

    async def probe(kwargs, code, reason):
        async with websockets.connect(url, **kwargs) as ws:
            got = await closed_with(ws)
        assert got[0] == code and reason in got[1], (kwargs, got)

    started = time.monotonic()
    await asyncio.gather(*(probe(*case) for case in cases))
    assert time.monotonic() - started < 4  # the pre-auth deadline is 1 s here


async def test_first_message_auth_and_what_comes_before_it(jwt_server):
    url = f"{jwt_server.ws_url}/ds-first"
    token = make_token("bob", {"ds-first": "editor"})
    # What a stock client sends on open comes before the auth message: it is
    # kept and answered once the client is authenticated.
    async with websockets.connect(url) as ws:
        await ws.send(p.encode_sync_step1(b"\x00"))
        await ws.send(p.encode_awareness([p.AwarenessEntry(77, 1, '{"user":"bob"}')]))
        await ws.send(p.encode_control({"type": "auth", "token": token}))
        kinds = set()
        async with asyncio.timeout(5):
            while not {"step1", "step2", "awareness"} <= kinds:
                msg = p.decode_message(await ws.recv())
                kinds.add(
                    {p.SyncStep1: "step1", p.SyncStep2: "step2", p.AwarenessMessage: "awareness"}.get(type(msg), "?")
                )
    # Any other control message first: refused.
    async with websockets.connect(url) as ws:
        await ws.send(p.encode_control({"type": "hello", "protocol": 1}))
        assert await closed_with(ws) == (4401, "authentication required: send auth first")
    # More than the pre-auth buffer allows: refused.
    async with websockets.connect(url) as ws:
        for _ in range(40):
            await ws.send(p.encode_query_awareness())
        assert await closed_with(ws) == (1008, "too much data before authentication")
    async with websockets.connect(url) as ws:
        await ws.send(b"\x00\x00" + p.write_var_bytes(b"\x00" * 70_000))
        assert (await closed_with(ws))[0] == 1009
    async with websockets.connect(url) as ws:
        await ws.send(p.encode_control({"type": "auth", "token": 42}))
        assert (await closed_with(ws))[0] == 4401


async def test_origin_allowlist_is_checked_before_the_handshake(jwt_server):
    token = make_token("carol", {"ds-origin": "editor"})
    url = f"{jwt_server.ws_url}/ds-origin?token={token}"
    assert await handshake_status(url, origin="https://evil.example") == 403
    assert await handshake_status(url, origin="https://app.example.com.evil.example") == 403
    assert await handshake_status(url, origin="null") == 403
    assert await handshake_status(url, origin=ORIGIN) == 101
    assert await handshake_status(url) == 101  # no Origin header: not a browser


async def test_token_refresh_keeps_the_session_and_expiry_closes_it(jwt_server):
    # Tokens valid for 3 s; auth.expiring comes 2 s before, the close 0.5 s after.
    fresh_tokens = 0

    async def refresh() -> str:
        nonlocal fresh_tokens
        fresh_tokens += 1
        return make_token("dave", {"ds-exp": "editor"}, ttl=60)

    keeper = CollabClient(
        jwt_server.ws_url, "ds-exp", hello=True, token=make_token("dave", {"ds-exp": "editor"}, ttl=3),
        refresh_token=refresh,
    )
    lapsed = CollabClient(
        jwt_server.ws_url, "ds-exp", hello=True, token=make_token("erin", {"ds-exp": "editor"}, ttl=3)
    )
    stock = CollabClient(jwt_server.ws_url, "ds-exp", token=make_token("fay", {"ds-exp": "editor"}, ttl=3))
    for c in (keeper, lapsed, stock):
        await c.connect()
    await lapsed.wait_closed(8)
    assert (lapsed.close_code, lapsed.close_reason) == (4401, "token expired")
    assert any(m["type"] == "auth.expiring" for m in lapsed.control)
    await stock.wait_closed(2)
    assert stock.close_code == 4401 and stock.control == []  # never opted in: no control messages
    assert fresh_tokens == 1 and not keeper.closed.is_set()
    assert [m for m in keeper.control if m["type"] == "auth.ok"][-1]["expires_at"] > time.time() + 30
    keeper.doc.get("config", type=pycrdt.Map)["still"] = "here"
    await keeper.wait_saved()
    # A refresh with another user's token is refused.
    await keeper.ws.send(p.encode_control({"type": "auth", "token": make_token("mallory", {"ds-exp": "editor"})}))
    await keeper.wait_closed(5)
    assert keeper.close_code == 4403


# --------------------------------------------------------------------- roles


async def test_viewer_sees_everything_but_its_edits_are_reverted(jwt_server):
    editor = CollabClient(jwt_server.ws_url, "ds-roles", hello=True, token=make_token("ed", {"ds-roles": "editor"}))
    await editor.set_awareness({"user": "ed"})
    await editor.connect()
    editor.doc.get("notes", type=pycrdt.Text).insert(0, "hello")
    editor.doc.get("config", type=pycrdt.Map)["host"] = "db"
    await editor.wait_saved()
    viewer = await CollabClient(
        jwt_server.ws_url, "ds-roles", hello=True, token=make_token("vi", {"ds-roles": "viewer", "*": "admin"})
    ).connect()
    assert text_of(viewer) == "hello" and config_of(viewer) == {"host": "db"}
    await viewer.until(lambda: editor.client_id in viewer.peer_states(), 5, "presence at the viewer")

    seen_by_editor: list[bytes] = []
    editor.on_update = seen_by_editor.append
    viewer.doc.get("notes", type=pycrdt.Text).insert(5, " SECRET")
    viewer.doc.get("config", type=pycrdt.Map)["host"] = "evil"
    await viewer.until(lambda: text_of(viewer) == "hello" and config_of(viewer) == {"host": "db"}, 5, "revert")
    rejected = [m for m in viewer.control if m["type"] == "rejected"]
    assert {m["reason"] for m in rejected} == {"read-only"} and ["host"] in [m["paths"] for m in rejected]
    await viewer.wait_saved()
    # The editor keeps working, the viewer keeps receiving, and the refused
    # content never reached the editor, not even as bytes.
    editor.doc.get("notes", type=pycrdt.Text).insert(0, ">")
    await viewer.until(lambda: text_of(viewer) == ">hello", 5, "editor's edit at the viewer")
    assert text_of(editor) == ">hello" and config_of(editor) == {"host": "db"}
    assert all(b"SECRET" not in u and b"evil" not in u for u in seen_by_editor)
    assert not viewer.closed.is_set()
    for c in (editor, viewer):
        await c.close()


async def test_lock_requests_need_the_editor_role_and_force_release_admin(jwt_server):
    async def answer(role: str, body: dict) -> dict:
        c = await CollabClient(
            jwt_server.ws_url, "ds-locks", hello=True, token=make_token(f"u-{role}", {"ds-locks": role})
        ).connect()
        await c.send_raw(p.encode_control({**body, "id": 9}))
        await c.until(lambda: any(m.get("id") == 9 for m in c.control), 5, "answer")
        await c.close()
        return next(m for m in c.control if m.get("id") == 9)

    acquire = {"type": "lock.acquire", "path": "connection.host"}
    assert (await answer("viewer", acquire))["code"] == "forbidden"
    assert (await answer("editor", acquire)).get("code") != "forbidden"  # up to the lock handler
    force = {"type": "lock.force_release", "path": "connection.host"}
    assert (await answer("editor", force))["code"] == "forbidden"
    assert (await answer("admin", force)).get("code") != "forbidden"


async def test_admin_endpoint_needs_the_admin_role(jwt_server):
    url = f"{jwt_server.http_url}/admin/stats"
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(url)).status_code == 401
        assert (await http.get(url, headers={"Authorization": "Bearer junk"})).status_code == 401
        editor = make_token("ed", {"*": "editor"})
        assert (await http.get(url, headers={"Authorization": f"Bearer {editor}"})).status_code == 403
        # Admin of one workspace is not admin of the server.
        ws_admin = make_token("wa", {"ds-1": "admin"})
        assert (await http.get(url, headers={"Authorization": f"Bearer {ws_admin}"})).status_code == 403
        admin = make_token("root", {"*": "admin"})
        reply = await http.get(url, headers={"Authorization": f"Bearer {admin}"})
        assert reply.status_code == 200 and "connections" in reply.json()


# ------------------------------------------------------ algorithms (no server)


def _pem_public(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_public_key_algorithms(tmp_path, algorithm):
    key = rsa.generate_private_key(65537, 2048) if algorithm == "RS256" else ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "key.pem").write_text(_pem_public(key))
    settings = Settings(auth_mode="jwt", jwt_public_key_file=tmp_path / "key.pem", jwt_audience="collab")
    auth = JWTAuthenticator.from_settings(settings)
    good = make_token("kim", {"ds-1": "viewer"}, secret=key, algorithm=algorithm, aud="collab")
    identity = await auth.authenticate_token(good, "ds-1")
    assert (identity.user_id, identity.role, identity.name) == ("kim", "viewer", "Kim")
    with pytest.raises(AuthError) as err:
        await auth.authenticate_token(make_token("kim", secret=key, algorithm=algorithm, aud="other"), "ds-1")
    assert err.value.code == 4401
    # Algorithm confusion: an HMAC token keyed with the (public) key text.
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = (
        b64(b'{"alg":"HS256","typ":"JWT"}')
        + b"."
        + b64(b'{"sub":"eve","exp":9999999999,"aud":"collab","workspaces":{"*":"admin"}}')
    )
    mac = hmac.new(_pem_public(key).encode(), signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + b64(mac)).decode()
    with pytest.raises(AuthError) as err:
        await auth.authenticate_token(forged, "ds-1")
    assert err.value.code == 4401


def test_workspace_grants():
    assert role_in({"ds-1": "editor", "*": "viewer"}, "ds-1") == "editor"
    assert role_in({"ds-1": "editor", "*": "viewer"}, "ds-2") == "viewer"
    assert role_in([{"id": "ds-1", "role": "admin"}], "ds-1") == "admin"
    assert role_in({"ds-1": "editor"}, "ds-10") is None
    assert role_in({"ds-1": "superuser"}, "ds-1") is None
    assert role_in({"ds-1": "admin"}, None) is None and role_in({"*": "admin"}, None) == "admin"
    assert role_in("ds-1", "ds-1") is None
