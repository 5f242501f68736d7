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

from events import signing
from events.envelope import encode
from events.http import HTTPError, Poster
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

    async def checkpoint(self, workspace: str, cursor: Cursor, force: bool) -> None:
        """Make the cursor reached durable (now if ``force``, else when it is due)."""
        ...

    async def checkpoint_all(self) -> None:
        """Shutdown: make every cursor reached durable."""
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

    async def checkpoint(self, workspace: str, cursor: Cursor, force: bool) -> None:
        return None  # the cursor moved with the entries

    async def checkpoint_all(self) -> None:
        return None

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
    ``DEAD_KEPT`` kept). The cursor is written at most every
    ``SAVE_SECONDS`` while events flow, and at once when they stop: a crash
    repeats at most that much (same ids). Best-effort events have a queue of
    their own. With ``batch_max`` > 1, up to that many events of a workspace
    go in one request as a CloudEvents batch (a JSON array,
    ``application/cloudevents-batch+json``).
    """

    DEAD_KEPT = 1000
    SAVE_SECONDS = 0.5

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
        batch_max: int = 1,
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
        self.batch_max = max(1, batch_max)
        self._unsaved: dict[str, Cursor] = {}  # workspace -> cursor reached, not written yet
        self._saved_at: dict[str, float] = {}
        self.http = Poster(url, timeout)
        self.live: deque[dict[str, Any]] = deque(maxlen=live_queue)
        self._live_wake = asyncio.Event()
        self._live_task: asyncio.Task | None = None
        self.counts = {"delivered": 0, "attempts_failed": 0, "dead_lettered": 0, "live_dropped": 0}

    async def start(self) -> None:
        self._live_task = asyncio.get_running_loop().create_task(self._live_loop())

    async def stop(self) -> None:
        if self._live_task is not None:
            self._live_task.cancel()
            with contextlib.suppress(BaseException):
                await self._live_task
        await self.http.close()

    async def load_cursor(self, workspace: str) -> Cursor:
        saved = Cursor.loads(await self.store.get_meta(workspace, f"events:cursor:{self.name}"))
        unsaved = self._unsaved.get(workspace)  # delivered by this process, not written yet
        return unsaved if unsaved is not None and unsaved.audit >= saved.audit else saved

    async def _save(self, workspace: str, cursor: Cursor) -> None:
        await self.store.put_meta(workspace, f"events:cursor:{self.name}", cursor.dumps())

    async def publish(self, workspace: str, items: list[Item], reached: Cursor) -> Cursor:
        for start in range(0, len(items), self.batch_max):
            chunk = [event for event, _ in items[start : start + self.batch_max]]
            if not await self.deliver(chunk[0] if len(chunk) == 1 else chunk):
                for event in chunk:
                    await self._dead_letter(workspace, event)
        self._unsaved[workspace] = reached
        await self.checkpoint(workspace, reached, force=False)
        return reached

    async def checkpoint(self, workspace: str, cursor: Cursor, force: bool) -> None:
        if self._unsaved.get(workspace) is None:
            return
        now = time.monotonic()
        if force or now - self._saved_at.get(workspace, 0.0) >= self.SAVE_SECONDS:
            cursor = self._unsaved.pop(workspace)
            self._saved_at[workspace] = now
            await self._save(workspace, cursor)

    async def checkpoint_all(self) -> None:
        for workspace, cursor in list(self._unsaved.items()):
            await self.checkpoint(workspace, cursor, force=True)

    async def deliver(self, event: dict[str, Any] | list[dict[str, Any]]) -> bool:
        """POST until a 2xx (True) or past the dead-letter time (False); a list goes as one batch."""
        if isinstance(event, list):
            body = b"[" + b",".join(encode(e) for e in event) + b"]"
            msg_id = "batch_" + hashlib.sha256("\n".join(e["id"] for e in event).encode()).hexdigest()[:32]
            content_type = "application/cloudevents-batch+json"
            what = f"{len(event)} events from {event[0]['id']}"
        else:
            body, msg_id, content_type, what = encode(event), event["id"], "application/cloudevents+json", event["id"]
        first = time.monotonic()
        failures = 0
        while True:
            timestamp = int(time.time())
            try:
                headers = signing.headers(self.key, msg_id, timestamp, body)
                headers["content-type"] = content_type
                status = await self.http.post(body, headers)
                if 200 <= status < 300:
                    self.counts["delivered"] += len(event) if isinstance(event, list) else 1
                    return True
                error = f"HTTP {status}"
            except HTTPError as exc:
                error = str(exc)
            failures += 1
            self.counts["attempts_failed"] += 1
            if failures == 1 or failures % 20 == 0:
                log.warning("webhook %s: %s not delivered (%s); retrying", self.url, what, error)
            if time.monotonic() - first >= self.dead_letter_after:
                log.error("webhook %s: %s dead-lettered after %d attempts: %s", self.url, what, failures, error)
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
