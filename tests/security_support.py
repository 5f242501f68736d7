"""Helpers for the security tests: tokens, servers in jwt mode, handshake probes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jwt
import websockets

SECRET = "test-secret-that-is-long-enough-0123456789"
ORIGIN = "https://app.example.com"


def make_token(
    user: str = "alice",
    workspaces: dict | list | None = None,
    *,
    ttl: float = 300.0,
    secret: str = SECRET,
    algorithm: str = "HS256",
    name: str | None = None,
    **claims,
) -> str:
    body = {
        "sub": user,
        "name": name or user.title(),
        "workspaces": workspaces if workspaces is not None else {"*": "editor"},
        "exp": int(time.time() + ttl),
        **claims,
    }
    return jwt.encode(body, secret, algorithm=algorithm)


def jwt_env(**extra: str) -> dict[str, str]:
    env = {
        "COLLAB_AUTH_MODE": "jwt",
        "COLLAB_JWT_SECRET": SECRET,
        "COLLAB_ALLOWED_ORIGINS": ORIGIN,
        "COLLAB_PREAUTH_TIMEOUT": "1",
    }
    env.update(extra)
    return env


async def handshake_status(url: str, **kwargs) -> int:
    """The HTTP status of a websocket handshake (101 when it opens)."""
    try:
        async with websockets.connect(url, open_timeout=5, **kwargs):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


async def closed_with(ws, timeout: float = 5.0) -> tuple[int | None, str]:
    """Read until the server closes; its close code and reason."""
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    except websockets.ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason or ""


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)
