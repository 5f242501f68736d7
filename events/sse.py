"""``GET /api/events?workspace=W``: a workspace's events as Server-Sent Events.

Durable events come from the durable log itself, from the position after
``Last-Event-ID`` (header, or ``last_event_id`` in the query for clients that
cannot set headers): a client that reconnects misses nothing the log still
holds. Without one the stream starts at the newest entry. Best-effort events
of this node follow as they happen; they carry no SSE ``id`` (the position
stays the last durable event's).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Match

from collab.gate import GatedRoute, check_workspace_id
from events.log import Cursor, LogReader, audit_id_of

QUEUE_LIMIT = 1000  # best-effort events queued per stream; past it they are dropped (and said so)


class WorkspaceQueryRoute(GatedRoute):
    """A gated route whose workspace is the ``workspace`` query parameter.

    The gate authorizes per workspace from the ``workspace_id`` path
    parameter; this route supplies it from the query string, so the usual
    per-workspace rule (and its 404 for a malformed id) applies.
    """

    def matches(self, scope: Any) -> tuple[Match, dict[str, Any]]:
        match, child = super().matches(scope)
        if match is Match.FULL:
            query = Request(scope).query_params
            child.setdefault("path_params", {})
            child["path_params"] = {**child["path_params"], "workspace_id": query.get("workspace", "")}
        return match, child


class _Stream:
    __slots__ = ("workspace", "queue", "wake", "dropped")

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_LIMIT)
        self.wake = asyncio.Event()
        self.dropped = 0


class EventStreams:
    def __init__(self, reader: LogReader, poll: float, heartbeat: float) -> None:
        self.reader = reader
        self.poll = poll
        self.heartbeat = heartbeat
        self.streams: dict[str, set[_Stream]] = {}
        self._closing = asyncio.Event()

    def kick(self, workspace: str) -> None:
        self.reader.touch(workspace)
        for stream in self.streams.get(workspace, ()):
            stream.wake.set()

    def live(self, event: dict[str, Any]) -> None:
        for stream in self.streams.get(event.get("subject", ""), ()):
            try:
                stream.queue.put_nowait(event)
            except asyncio.QueueFull:
                stream.dropped += 1
            stream.wake.set()

    def close(self) -> None:
        self._closing.set()

    async def endpoint(self, request: Request) -> Any:
        workspace = check_workspace_id(request.query_params.get("workspace", ""))
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        if last:
            position = audit_id_of(last, workspace)
            if position is None:
                return JSONResponse({"error": f"Last-Event-ID {last!r} is not an event id of {workspace}"}, 400)
        else:
            newest = await self.reader.store.history(workspace, None, 1)
            position = newest[0]["id"] if newest else 0
        stream = _Stream(workspace)
        self.streams.setdefault(workspace, set()).add(stream)
        return StreamingResponse(
            self._run(request, stream, position),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _run(self, request: Request, stream: _Stream, position: int) -> AsyncIterator[bytes]:
        cursor = Cursor(position)
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        try:
            yield b"retry: 1000\n\n"
            while not self._closing.is_set():
                stream.wake.clear()
                items, _reached, more = await self.reader.read(stream.workspace, cursor, forwarding=False)
                for event, reached in items:
                    cursor = reached
                    yield _frame(event, with_id=True)
                if _reached.audit > cursor.audit:
                    cursor = Cursor(_reached.audit)
                while not stream.queue.empty():
                    yield _frame(stream.queue.get_nowait(), with_id=False)
                if stream.dropped:
                    yield f": {stream.dropped} best-effort events dropped (slow reader)\n\n".encode()
                    stream.dropped = 0
                if items or more:
                    last_sent = loop.time()
                    continue
                if await request.is_disconnected():
                    return
                try:
                    await asyncio.wait_for(stream.wake.wait(), self.poll)
                except TimeoutError:
                    self.reader.touch(stream.workspace)  # other nodes commit without telling us: look
                if loop.time() - last_sent >= self.heartbeat:
                    last_sent = loop.time()
                    yield b": keep-alive\n\n"
        finally:
            streams = self.streams.get(stream.workspace)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self.streams[stream.workspace]


def _frame(event: dict[str, Any], with_id: bool) -> bytes:
    body = json.dumps(event, separators=(",", ":"), ensure_ascii=False, default=str)
    head = f"id: {event['id']}\n" if with_id else ""
    return f"{head}event: {event['type']}\ndata: {body}\n\n".encode()
