"""A small asyncio client for the collaboration protocol (pycrdt + websockets).

Used by the tests and the load-test harness, and a reference for anyone
writing a client: it does the y-websocket handshake, keeps a pycrdt document
in sync, relays awareness, and (with ``hello=True``) speaks the control
channel, counting ``saved`` acks.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import quote

import pycrdt
import websockets

from codec import protocol as p


class CollabClient:
    def __init__(
        self,
        base_url: str,
        workspace: str,
        *,
        doc: pycrdt.Doc | None = None,
        hello: bool = False,
        client_id: int | None = None,
        query: str = "",
        token: str | None = None,
        token_via: Literal["header", "query", "message"] = "header",
        refresh_token: Callable[[], Awaitable[str]] | None = None,
        origin: str | None = None,
    ) -> None:
        """``token`` authenticates (``token_via`` says how); ``refresh_token``
        is awaited for a fresh one when the server sends ``auth.expiring``
        (needs ``hello=True``: only opted-in clients get control messages)."""
        if token is not None and token_via == "query":
            query = "&".join(x for x in (query, f"token={quote(token, safe='')}") if x)
        self.url = f"{base_url.rstrip('/')}/{workspace}" + (f"?{query}" if query else "")
        self.token = token
        self.token_via = token_via
        self.refresh_token = refresh_token
        self.origin = origin
        self.workspace = workspace
        self.doc = doc or pycrdt.Doc(client_id=client_id if client_id is not None else random.getrandbits(31))
        self.hello = hello
        self.ws: Any = None
        self.synced = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason: str = ""
        self.awareness: dict[int, tuple[int, Any]] = {}  # client id -> (clock, state or None)
        self.awareness_clock = 0
        self.control: list[dict[str, Any]] = []
        self.updates_sent = 0
        self.updates_saved = 0
        self.saved_seq = 0
        self.received_frames = 0
        self.on_update: Callable[[bytes], None] | None = None
        self._changed = asyncio.Event()
        self._applying_remote = False
        self._outbox: list[bytes] = []
        self._tasks: list[asyncio.Task] = []
        self._waiters: list[asyncio.Future] = []
        self._sub = self.doc.observe(self._on_local_update)

    @property
    def client_id(self) -> int:
        return self.doc.client_id

    # ----------------------------------------------------------- lifecycle

    async def connect(self, timeout: float = 10.0, wait_synced: bool = True) -> CollabClient:
        headers = {}
        if self.token is not None and self.token_via == "header":
            headers["Authorization"] = f"Bearer {self.token}"
        self.ws = await websockets.connect(
            self.url,
            max_size=None,
            compression=None,
            open_timeout=timeout,
            additional_headers=headers or None,
            origin=self.origin,
        )
        self.synced.clear()
        self.closed.clear()
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._sender())]
        if self.token is not None and self.token_via == "message":
            await self.ws.send(p.encode_control({"type": "auth", "token": self.token}))
        if self.hello:
            await self.ws.send(p.encode_control({"type": "hello", "protocol": p.PROTOCOL_VERSION}))
        # y-websocket order: our step 1, then our awareness (if any).
        await self.ws.send(p.encode_sync_step1(self.doc.get_state()))
        if self.awareness_clock:
            await self._send_awareness()
        if wait_synced:
            await self.until(self.synced.is_set, timeout, "sync")
        return self

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self._stop_tasks()

    async def abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        if self.ws is not None:
            self.ws.transport.abort()
        await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.closed.set()

    async def __aenter__(self) -> CollabClient:
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -------------------------------------------------------------- editing

    def _on_local_update(self, event: pycrdt.TransactionEvent) -> None:
        if self._applying_remote:
            return
        self._outbox.append(event.update)
        self._changed.set()

    async def _sender(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            while self._outbox:
                update = self._outbox.pop(0)
                await self.ws.send(p.encode_sync_update(update))
                self.updates_sent += 1

    async def flush(self) -> None:
        """Send local updates now instead of waiting for the sender task."""
        while self._outbox:
            update = self._outbox.pop(0)
            await self.ws.send(p.encode_sync_update(update))
            self.updates_sent += 1

    async def send_raw(self, frame: bytes | str) -> None:
        await self.ws.send(frame)

    # ------------------------------------------------------------ awareness

    async def set_awareness(self, state: Any) -> None:
        self.awareness_clock += 1
        self.awareness[self.client_id] = (self.awareness_clock, state)
        if self.ws is not None:
            await self._send_awareness()

    async def _send_awareness(self) -> None:
        clock, state = self.awareness[self.client_id]
        text = "null" if state is None else json.dumps(state)
        await self.ws.send(p.encode_awareness([p.AwarenessEntry(self.client_id, clock, text)]))

    def peer_states(self) -> dict[int, Any]:
        """Live awareness states of everyone but us."""
        return {
            cid: state for cid, (clock, state) in self.awareness.items() if state is not None and cid != self.client_id
        }

    # -------------------------------------------------------------- reading

    async def _reader(self) -> None:
        try:
            async for frame in self.ws:
                self.received_frames += 1
                self._handle(p.decode_message(frame))
        except websockets.ConnectionClosed:
            pass
        finally:
            if self.ws.close_code is not None or self.ws.state.name == "CLOSED":
                self.close_code = self.ws.close_code
                self.close_reason = self.ws.close_reason or ""
            self.closed.set()
            self._changed_remote()

    def _handle(self, msg: p.Message) -> None:
        if isinstance(msg, p.SyncStep1):
            # The server counts a step 2 like an update in its `saved` acks.
            self.updates_sent += 1
            asyncio.ensure_future(self.ws.send(p.encode_sync_step2(self.doc.get_update(msg.state_vector))))
        elif isinstance(msg, p.SyncStep2 | p.SyncUpdate):
            self._applying_remote = True
            try:
                self.doc.apply_update(msg.update)
            finally:
                self._applying_remote = False
            if self.on_update is not None:
                self.on_update(msg.update)
            if isinstance(msg, p.SyncStep2):
                self.synced.set()
        elif isinstance(msg, p.AwarenessMessage):
            for entry in msg.entries:
                current = self.awareness.get(entry.client_id)
                if current is None or entry.clock > current[0] or (
                    entry.clock == current[0] and entry.state is None
                ):
                    state = None if entry.state is None else json.loads(entry.state)
                    self.awareness[entry.client_id] = (entry.clock, state)
        elif isinstance(msg, p.Control):
            self.control.append(msg.body)
            if msg.type == "saved":
                self.updates_saved = max(self.updates_saved, msg.body["updates"])
                self.saved_seq = max(self.saved_seq, msg.body["seq"])
            elif msg.type == "auth.expiring" and self.refresh_token is not None:
                self._tasks.append(asyncio.create_task(self._refresh()))
        self._changed_remote()

    async def _refresh(self) -> None:
        token = await self.refresh_token()
        self.token = token
        await self.ws.send(p.encode_control({"type": "auth", "token": token}))

    # ---------------------------------------------------------------- waits

    def _changed_remote(self) -> None:
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        """Wait (bounded) until ``predicate()`` holds; re-checked on every message."""

        async def loop() -> None:
            while not predicate():
                if self.closed.is_set() and not predicate():
                    raise ConnectionError(
                        f"connection closed ({self.close_code} {self.close_reason}) waiting for {what}"
                    )
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut

        await self.wait(loop(), timeout, what)

    async def wait_saved(self, timeout: float = 10.0) -> None:
        """Wait until the server acked every update we sent as durable."""
        await self.flush()
        await self.until(lambda: self.updates_saved >= self.updates_sent, timeout, "saved ack")

    async def wait_closed(self, timeout: float = 10.0) -> None:
        await self.wait(self.closed.wait(), timeout, "close")

    @staticmethod
    async def wait(aw, timeout: float, what: str) -> Any:
        try:
            return await asyncio.wait_for(aw, timeout)
        except TimeoutError:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}") from None

    # ------------------------------------------------- control requests (locks)

    async def request(self, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send a control request with a fresh ``id``; return the reply carrying it."""
        self._request_ids = getattr(self, "_request_ids", 0) + 1
        rid = self._request_ids
        start = len(self.control)
        await self.ws.send(p.encode_control({**body, "id": rid}))
        reply: dict[str, Any] = {}

        def answered() -> bool:
            for message in self.control[start:]:
                if message.get("id") == rid:
                    reply.update(message)
                    return True
            return False

        await self.until(answered, timeout, f"reply to {body.get('type')}")
        return reply

    async def acquire_lock(
        self, path: str, ttl: float | None = None, wait: float | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """``lock.acquire``: returns lock.granted, lock.conflict or lock.error."""
        body: dict[str, Any] = {"type": "lock.acquire", "path": path}
        if ttl is not None:
            body["ttl"] = ttl
        if wait is not None:
            body["wait"] = wait
        return await self.request(body, timeout if timeout is not None else (wait or 0) + 10.0)

    async def release_lock(self, path: str, timeout: float = 10.0) -> dict[str, Any]:
        """``lock.release``: returns lock.release.ok or lock.error."""
        return await self.request({"type": "lock.release", "path": path}, timeout)

    def keepalive(self, interval: float) -> None:
        """Send a ``ping`` every ``interval`` seconds: lock holders must show they
        are alive at least once per lease TTL (the server renews only then)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                await self.ws.send(p.encode_control({"type": "ping"}))

        self._tasks.append(asyncio.create_task(loop()))
