"""Helpers for presence tests: rosters as a client sees them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from collab.client import CollabClient


def roster_of(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]] | None:
    """Apply ``presence.snapshot``/``presence.diff`` messages in order; None before a snapshot.

    Checks what a client relies on: no diff before the snapshot and no gap in ``seq``.
    """
    roster: dict[str, dict[str, Any]] | None = None
    seq = None
    for m in messages:
        kind = m.get("type")
        if kind == "presence.snapshot":
            roster = {x["user_id"]: x for x in m["participants"]}
            seq = m["seq"]
        elif kind == "presence.diff":
            assert roster is not None, "presence.diff before presence.snapshot"
            assert m["seq"] == seq + 1, f"gap in presence seq: {seq} -> {m['seq']}"
            seq = m["seq"]
            for x in m["joins"] + m["updates"]:
                roster[x["user_id"]] = x
            for x in m["leaves"]:
                roster.pop(x["user_id"], None)
    return roster


def users(client: CollabClient) -> set[str] | None:
    roster = roster_of(client.control)
    return None if roster is None else set(roster)


def first_snapshot(client: CollabClient) -> dict[str, Any] | None:
    return next((m for m in client.control if m.get("type") == "presence.snapshot"), None)


async def person(ws_url: str, workspace: str, user: str, **kw: Any) -> CollabClient:
    """A client that says hello as ``user`` and has its presence snapshot."""
    client = CollabClient(ws_url, workspace, hello=True, query=f"user={user}&name={user.title()}", **kw)
    await client.connect()
    await client.until(lambda: first_snapshot(client) is not None, 10, f"{user}'s presence snapshot")
    return client


async def until_users(client: CollabClient, expected: set[str], timeout: float, what: str = "") -> float:
    """Wait until the client's roster is exactly ``expected``; return the seconds it took."""
    start = time.monotonic()
    await client.until(lambda: users(client) == expected, timeout, what or f"roster == {sorted(expected)}")
    return time.monotonic() - start


async def close_all(*clients: CollabClient) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
