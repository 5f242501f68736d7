"""Where events go: a Redis Stream and webhooks (the SSE endpoint reads the log itself).

A sink publishes a workspace's durable events in order from its own cursor
(``publish``) and best-effort events as they come (``publish_live``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections import deque
from typing import Any, Protocol

import httpx

from events import signing
from events.envelope import encode
from events.log import Cursor

log = logging.getLogger("collab.events")

Item = tuple[dict[str, Any], Cursor]


class Sink(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def load_cursor(self, workspace: str) -> Cursor:
        """Where this sink stands in the workspace's durable log (stored durably)."""
        ...

    async def publish(self, workspace: str, items: list[Item], reached: Cursor) -> Cursor:
        """Publish durable events in order, then store the cursor (``reached``); returns it."""
        ...

    async def publish_live(self, event: dict[str, Any]) -> None:
        """Publish a best-effort event (queued; never waits for the receiver)."""
        ...

    def stats(self) -> dict[str, Any]: ...


# ------------------------------------------------------------ Redis Stream

# The cursor and the entries move together (one script): a node that runs the
# same page again, or a second node racing it, adds nothing twice.
_PUBLISH = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local a, d, t = 0, 0, ''
if raw then
  local sep1 = string.find(raw, '|', 1, true)
  local sep2 = string.find(raw, '|', sep1 + 1, true)
  a = tonumber(string.sub(raw, 1, sep1 - 1))
  d = tonumber(string.sub(raw, sep1 + 1, sep2 - 1))
  t = string.sub(raw, sep2 + 1)
end
local n = tonumber(ARGV[3])
local pos = 4
local added = 0
for i = 1, n do
  local ea, ed, et = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]), ARGV[pos + 2]
  if ea > a or ed > d or (et ~= '' and et ~= t) then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'id', ARGV[pos + 3], 'type', ARGV[pos + 4],
      'subject', ARGV[1], 'event', ARGV[pos + 5])
    added = added + 1
  end
  if ea > a then a = ea end
  if ed > d then d = ed end
  if et ~= '' then t = et end
  pos = pos + 6
end
local fa, fd, ft = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1]), ARGV[pos + 2]
if fa > a then a = fa end
if fd > d then d = fd end
if ft ~= '' then t = ft end
redis.call('HSET', KEYS[1], ARGV[1], a .. '|' .. d .. '|' .. t)
return added
"""

# A best-effort event several nodes may see (a lock change): the first one adds it.
_PUBLISH_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'id', ARGV[3], 'type', ARGV[4], 'subject', ARGV[5],
    'event', ARGV[6])
  return 1
end
return 0
"""

SEEN_TTL_MS = 10 * 60 * 1000  # a best-effort event id is remembered this long (duplicates from other nodes)


def _position(event: dict[str, Any], cursor: Cursor) -> tuple[int, int, str]:
    """The one component of the cursor an event moves (the script compares only that one)."""
    if "/forwarded/" in event["id"]:
        return 0, cursor.delivered, ""
    if "/attempt/" in event["id"]:
        return 0, 0, cursor.attempt
    return cursor.audit, 0, ""


def _parse_cursor(raw: bytes | None) -> Cursor:
    if not raw:
        return Cursor()
    a, d, t = raw.decode().split("|", 2)
    return Cursor(int(a), int(d), t)


class RedisStreamSink:
    """XADD to ``COLLAB_EVENTS_STREAM`` (``MAXLEN ~``); consumers read it with consumer groups."""

    def __init__(self, client: Any, stream: str, maxlen: int) -> None:
        self.client = client
        self.stream = stream
        self.maxlen = maxlen
        self.name = f"stream:{stream}"
        self.cursor_key = f"collab:events:cursor:{{{stream}}}"
        self.counts = {"published": 0, "live": 0, "errors": 0}

    async def start(self) -> None:
        self._publish = self.client.register_script(_PUBLISH)
        self._publish_once = self.client.register_script(_PUBLISH_ONCE)

    async def stop(self) -> None:
        return None

    async def load_cursor(self, workspace: str) -> Cursor:
        return _parse_cursor(await self.client.hget(self.cursor_key, workspace))

    async def publish(self, workspace: str, items: list[Item], reached: Cursor) -> Cursor:
        args: list[Any] = [workspace, self.maxlen, len(items)]
        for event, cursor in items:
            args += [*_position(event, cursor), event["id"], event["type"], encode(event)]
        args += [reached.audit, reached.delivered, reached.attempt]
        added = await self._publish(keys=[self.cursor_key, self.stream], args=args)
        self.counts["published"] += int(added)
        return reached

    async def publish_live(self, event: dict[str, Any]) -> None:
        seen = f"collab:events:seen:{{{self.stream}}}:{event['id']}"
        try:
            added = await self._publish_once(
                keys=[seen, self.stream],
                args=[SEEN_TTL_MS, self.maxlen, event["id"], event["type"], event.get("subject", ""), encode(event)],
            )
            self.counts["live"] += int(added)
        except Exception as exc:  # best-effort: counted and logged, never raised into a room
            self.counts["errors"] += 1
            log.warning("event %s not added to stream %s: %s", event["id"], self.stream, exc)

    def stats(self) -> dict[str, Any]:
        return dict(self.counts)


# ----------------------------------------------------------------- webhooks


class WebhookSink:
    """POSTs each event to one URL, signed per Standard Webhooks; retried with backoff, then dead-lettered.

    Durable events go in order per workspace from a cursor kept in the
    document store (``events:cursor:<sink>``): the next one waits until this
    one is delivered or dead-lettered (``events:dead:<sink>``, newest
    ``DEAD_KEPT`` kept). Best-effort events have a queue of their own.
    """

    DEAD_KEPT = 1000
    SAVE_EVERY = 50  # durable events delivered between cursor writes (a crash repeats at most these)

    def __init__(
        self,
        url: str,
        secret: str,
        store: Any,
        *,
        timeout: float,
        backoff_initial: float,
        backoff_max: float,
        dead_letter_after: float,
        live_queue: int,
        claim: Any = None,
    ) -> None:
        self.url = url
        self.key = signing.secret_key(secret)
        self.store = store
        self.timeout = timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.dead_letter_after = dead_letter_after
        self.name = "webhook:" + hashlib.sha256(url.encode()).hexdigest()[:12]
        self.claim = claim  # async (sink name, event id) -> bool: first node to see a best-effort event
        self.http: httpx.AsyncClient | None = None
        self.live: deque[dict[str, Any]] = deque(maxlen=live_queue)
        self._live_wake = asyncio.Event()
        self._live_task: asyncio.Task | None = None
        self.counts = {"delivered": 0, "attempts_failed": 0, "dead_lettered": 0, "live_dropped": 0}

    async def start(self) -> None:
        self.http = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        self._live_task = asyncio.get_running_loop().create_task(self._live_loop())

    async def stop(self) -> None:
        if self._live_task is not None:
            self._live_task.cancel()
            with contextlib.suppress(BaseException):
                await self._live_task
        if self.http is not None:
            await self.http.aclose()

    async def load_cursor(self, workspace: str) -> Cursor:
        return Cursor.loads(await self.store.get_meta(workspace, f"events:cursor:{self.name}"))

    async def _save(self, workspace: str, cursor: Cursor) -> None:
        await self.store.put_meta(workspace, f"events:cursor:{self.name}", cursor.dumps())

    async def publish(self, workspace: str, items: list[Item], reached: Cursor) -> Cursor:
        for n, (event, cursor) in enumerate(items, 1):
            if not await self.deliver(event):
                await self._dead_letter(workspace, event)
            if n % self.SAVE_EVERY == 0:
                await self._save(workspace, cursor)
        await self._save(workspace, reached)
        return reached

    async def deliver(self, event: dict[str, Any]) -> bool:
        """POST until a 2xx (True) or past the dead-letter time (False)."""
        assert self.http is not None
        body = encode(event)
        first = time.monotonic()
        failures = 0
        while True:
            timestamp = int(time.time())
            try:
                response = await self.http.post(
                    self.url, content=body, headers=signing.headers(self.key, event["id"], timestamp, body)
                )
                if 200 <= response.status_code < 300:
                    self.counts["delivered"] += 1
                    return True
                error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            failures += 1
            self.counts["attempts_failed"] += 1
            if failures == 1 or failures % 20 == 0:
                log.warning("webhook %s: event %s not delivered (%s); retrying", self.url, event["id"], error)
            if time.monotonic() - first >= self.dead_letter_after:
                log.error(
                    "webhook %s: event %s dead-lettered after %d attempts: %s", self.url, event["id"], failures, error
                )
                return False
            delay = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _dead_letter(self, workspace: str, event: dict[str, Any]) -> None:
        self.counts["dead_lettered"] += 1
        key = f"events:dead:{self.name}"
        raw = await self.store.get_meta(workspace, key)
        dead = json.loads(raw) if raw else []
        dead.append({"at": time.time(), "event": event})
        await self.store.put_meta(workspace, key, json.dumps(dead[-self.DEAD_KEPT :]).encode())

    async def dead_letters(self, workspace: str) -> list[dict[str, Any]]:
        raw = await self.store.get_meta(workspace, f"events:dead:{self.name}")
        return json.loads(raw) if raw else []

    async def publish_live(self, event: dict[str, Any]) -> None:
        if len(self.live) == self.live.maxlen:
            self.counts["live_dropped"] += 1
        self.live.append(event)
        self._live_wake.set()

    async def _live_loop(self) -> None:
        while True:
            await self._live_wake.wait()
            self._live_wake.clear()
            while self.live:
                event = self.live.popleft()
                if self.claim is not None and not await self.claim(self.name, event["id"]):
                    continue
                if not await self.deliver(event):
                    self.counts["dead_lettered"] += 1

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "live_queued": len(self.live)}
