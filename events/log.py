"""Durable events: read from the workspace's audit trail and forward state.

The audit trail is written in the same transaction as the change it
describes (persistence/outbox.py), so an event derived from it is as durable
as the change. Its id is deterministic (``<workspace>/<audit id>``): reading
the same entry again, on any node, after any crash, gives the same event.

A reader keeps a :class:`Cursor` (the last audit id published, the last
delivered change seq announced, the last failed attempt announced) and asks
for what follows.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from events import types as t
from events.envelope import cloud_event
from persistence.outbox import ACCEPTED, BACKEND_REFUSED, DEAD_LETTERED, REJECTED, SEEDED


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a sink stands in a workspace's durable log."""

    audit: int = 0  # last audit id published
    delivered: int = 0  # last change seq announced as delivered to the backend
    attempt: str = ""  # "<batch>:<attempts>" of the last failed forwarding attempt announced

    def dumps(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def loads(cls, raw: bytes | str | None) -> Cursor:
        if not raw:
            return cls()
        body = json.loads(raw)
        return cls(int(body.get("audit", 0)), int(body.get("delivered", 0)), str(body.get("attempt", "")))


def update_source(entry: dict[str, Any]) -> str:
    """Where an accepted change came from: session, rest, bulk, backend or server."""
    details = entry.get("details") or {}
    author = entry.get("author") or {}
    if details.get("source") == "backend":
        return "backend"
    if "bulk_job" in details:
        return "bulk"
    if author.get("via") == "http":
        return "rest"
    if author.get("id") is None:
        return "server"
    return "session"


def audit_id_of(event_id: str, workspace: str) -> int | None:
    """The audit id a durable event id names (``<workspace>/<n>``), or None."""
    prefix = workspace + "/"
    if not event_id.startswith(prefix) or not event_id[len(prefix) :].isdigit():
        return None
    return int(event_id[len(prefix) :])


def from_audit(workspace: str, entry: dict[str, Any], source: str) -> dict[str, Any] | None:
    """The event of one audit entry (None for kinds that are not events)."""
    kind = entry["kind"]
    details = entry.get("details") or {}
    paths = entry.get("paths") or [c["path"] for c in entry.get("changes") or []]
    if kind == ACCEPTED:
        event_type = t.UPDATED
        data = {
            "seq": entry.get("seq"),
            "changes": entry.get("changes") or [],
            "paths": paths,
            "author": entry.get("author"),
            "fence": entry.get("fence"),
            "source": update_source(entry),
        }
    elif kind == REJECTED:
        event_type = t.REJECTED
        data = {
            "paths": paths,
            "reasons": details.get("rejections") or [{"paths": paths, "reason": entry.get("reason")}],
            "changes": entry.get("changes") or [],
            "author": entry.get("author"),
        }
    elif kind == SEEDED:
        event_type = t.SEEDED
        data = {"result": entry.get("reason"), "changes": entry.get("changes") or [], "details": details}
    elif kind == BACKEND_REFUSED:
        event_type = t.FORWARD_FAILED
        data = {
            "seq": details.get("seq", entry.get("seq")),
            "first_seq": details.get("first_seq"),
            "paths": paths,
            "status": details.get("status"),
            "error": details.get("response"),
            "retrying": False,
        }
    elif kind == DEAD_LETTERED:
        event_type = t.FORWARD_DEAD
        data = {
            "seq": details.get("seq", entry.get("seq")),
            "first_seq": details.get("first_seq"),
            "paths": paths,
            "key": details.get("key"),
            "attempts": details.get("attempts"),
            "error": entry.get("reason"),
        }
    else:
        return None
    data["position"] = entry["id"]
    return cloud_event(
        event_type, workspace, data, event_id=f"{workspace}/{entry['id']}", at=entry["at"], source=source
    )


PAGES_KEPT = 10_000  # workspaces whose last page and forward state are kept
STATUS_SECONDS = 0.1
TAIL_PAGE = 1000
BUFFER_ITEMS = 500  # newest events kept per workspace; a sink further behind reads the store


@dataclass(slots=True)
class _Buffer:
    start: int  # every entry of the workspace with an id above this is in ``items``
    items: list[tuple[int, dict[str, Any] | None]]


@dataclass(slots=True)
class _Page:
    after: int
    hi: int
    items: list[tuple[int, dict[str, Any] | None]]
    full: bool
    gen: int


class LogReader:
    """Turns a workspace's durable log into events after a cursor."""

    def __init__(self, store: Any, source: str, batch: int = 200) -> None:
        self.store = store  # a ChangeLog + OutboxStore
        self.source = source
        self.batch = batch
        # Every sink reads the same new entries right after a commit: the last page read
        # per workspace is kept, valid until the next commit there (``touch``).
        self._gen: dict[str, int] = {}
        self._pages: dict[str, _Page] = {}
        self._status: dict[str, tuple[float, dict[str, Any]]] = {}
        # A store whose audit ids are global (SQLite) is tailed with one query for every
        # workspace after each commit, instead of one query per workspace and sink.
        self._tail = callable(getattr(store, "changes_after", None))
        self._tail_at: int | None = None
        self._touches = 1  # commits told of (touch); a tail read covers those before it started
        self._tail_read = 0
        self._tail_lock = asyncio.Lock()
        self._buffers: dict[str, _Buffer] = {}
        self._tail_heads: dict[str, int] = {}  # workspaces seen in the tail since the last poll_tail

    @property
    def tails(self) -> bool:
        """The store is read as one log of every workspace (SQLite: global audit ids)."""
        return self._tail

    async def poll_tail(self) -> dict[str, int]:
        """Read the tail now; the newest audit id of each workspace seen in it since the last call."""
        self._touches += 1
        await self._refresh_tail()
        heads, self._tail_heads = self._tail_heads, {}
        return heads

    def touch(self, workspace: str) -> None:
        """Something was committed in ``workspace``: what was read of it may be incomplete."""
        self._gen[workspace] = self._gen.get(workspace, 0) + 1
        self._touches += 1

    async def _refresh_tail(self) -> None:
        """Read what every workspace committed since the last look (one query; one reader at a time).

        A caller needs a read that started after the commits it was told of:
        callers waiting behind a read that started later return with it
        (twenty lanes woken by one commit cost one query, not twenty).
        """
        wanted = self._touches
        async with self._tail_lock:
            if self._tail_read >= wanted:
                return
            self._tail_read = self._touches
            if self._tail_at is None:
                self._tail_at, _ = await self.store.changes_after(None, 0)
            while True:
                start = self._tail_at
                self._tail_at, rows = await self.store.changes_after(start, TAIL_PAGE)
                for workspace, entry in rows:
                    buffer = self._buffers.get(workspace)
                    if buffer is None:
                        if len(self._buffers) >= PAGES_KEPT:
                            self._buffers.pop(next(iter(self._buffers)))
                        buffer = self._buffers[workspace] = _Buffer(start, [])
                    buffer.items.append((entry["id"], from_audit(workspace, entry, self.source)))
                    self._tail_heads[workspace] = entry["id"]
                    if len(buffer.items) > BUFFER_ITEMS:
                        dropped = buffer.items[: len(buffer.items) - BUFFER_ITEMS]
                        del buffer.items[: len(dropped)]
                        buffer.start = dropped[-1][0]
                if len(rows) < TAIL_PAGE:
                    return

    async def _events(self, workspace: str, after: int) -> tuple[list[tuple[int, dict[str, Any] | None]], bool]:
        """(audit id, event or None) after ``after``, and whether there may be more."""
        if self._tail:
            await self._refresh_tail()
            buffer = self._buffers.get(workspace)
            if buffer is not None and buffer.start <= after:
                first = bisect.bisect_right(buffer.items, after, key=lambda item: item[0])
                got = buffer.items[first : first + self.batch + 1]
                return got[: self.batch], len(got) > self.batch
        gen = self._gen.get(workspace, 0)
        page = self._pages.get(workspace)
        if page is not None and page.gen == gen and page.after <= after <= page.hi:
            got = [item for item in page.items if item[0] > after]
            if got or not page.full:
                return got, page.full
        entries = await self.store.changes_since(workspace, after, self.batch)
        items = [(entry["id"], from_audit(workspace, entry, self.source)) for entry in entries]
        full = len(entries) >= self.batch
        if len(self._pages) >= PAGES_KEPT and workspace not in self._pages:
            self._pages.pop(next(iter(self._pages)))
        self._pages[workspace] = _Page(after, items[-1][0] if items else after, items, full, gen)
        return items, full

    async def _progress(self, workspace: str) -> dict[str, Any]:
        """Forwarding progress (delivered seq, pending, first pending row), read at most every STATUS_SECONDS."""
        now = time.monotonic()
        cached = self._status.get(workspace)
        if cached is not None and now - cached[0] < STATUS_SECONDS:
            return cached[1]
        read = getattr(self.store, "forward_progress", None)
        if read is not None:
            progress = await read(workspace)
        else:
            status = await self.store.forward_status(workspace)
            rows = await self.store.outbox_pending(workspace, 1) if status.get("pending") else []
            progress = {
                "delivered_seq": status.get("delivered_seq") or 0,
                "pending": status.get("pending") or 0,
                "head": rows[0] if rows else None,
            }
        if len(self._status) >= PAGES_KEPT and workspace not in self._status:
            self._status.pop(next(iter(self._status)))
        self._status[workspace] = (now, progress)
        return progress

    async def read(
        self, workspace: str, cursor: Cursor, forwarding: bool = True
    ) -> tuple[list[tuple[dict[str, Any], Cursor]], Cursor, bool]:
        """Events after ``cursor``, each with the cursor reached once it is published.

        Also returns the cursor reached if all are published, and whether the
        reader should look again soon (a full page, or changes waiting to be
        forwarded).
        """
        out: list[tuple[dict[str, Any], Cursor]] = []
        items, more = await self._events(workspace, cursor.audit)
        for audit_id, event in items:
            cursor = Cursor(audit_id, cursor.delivered, cursor.attempt)
            if event is not None:
                out.append((event, cursor))
        if forwarding and not more:
            progress = await self._progress(workspace)
            delivered = int(progress["delivered_seq"] or 0)
            if delivered > cursor.delivered:
                first = cursor.delivered + 1
                cursor = Cursor(cursor.audit, delivered, cursor.attempt)
                event = cloud_event(
                    t.FORWARDED,
                    workspace,
                    {"seq": delivered, "first_seq": first},
                    event_id=f"{workspace}/forwarded/{delivered}",
                    at=time.time(),
                    source=self.source,
                )
                out.append((event, cursor))
            if progress["pending"]:
                more = True
                failed = self._failed_attempt(workspace, cursor, progress["head"])
                if failed is not None:
                    out.append(failed)
                    cursor = failed[1]
        return out, cursor, more

    def _failed_attempt(self, workspace: str, cursor: Cursor, row: Any) -> tuple[dict[str, Any], Cursor] | None:
        """A forwarding attempt that failed and will be retried (seen on the outbox's first row)."""
        if row is None or not row.attempts or row.batch is None:
            return None
        mark = f"{row.batch}:{row.attempts}"
        if mark == cursor.attempt:
            return None
        data = {
            "seq": row.seq,
            "key": row.batch,
            "attempts": row.attempts,
            "error": row.last_error,
            "paths": [c["path"] for c in row.changes],
            "retrying": True,
        }
        event = cloud_event(
            t.FORWARD_FAILED,
            workspace,
            data,
            event_id=f"{workspace}/attempt/{mark}",
            at=time.time(),
            source=self.source,
        )
        return event, Cursor(cursor.audit, cursor.delivered, mark)
