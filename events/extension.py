"""The events feature as an app extension (docs/events.md).

* durable events (configuration updated, change rejected, forwarding
  outcomes) are read from the audit trail the forwarding outbox writes in
  the same transaction as each change, and published to each sink from a
  cursor of its own (events/publisher.py);
* best-effort events (participants, locks, workspace lifecycle) come from a
  room listener (events/live.py) and go out at once;
* sinks: a Redis Stream (``COLLAB_EVENTS_STREAM``), webhooks
  (``COLLAB_EVENTS_WEBHOOK_URLS``), and ``GET /api/events`` (SSE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, Metric

from collab.extensions import Extension
from collab.gate import workspace_role
from collab.metrics import gauge
from collab.settings import Settings
from events.log import LogReader
from events.publisher import Leases, Publisher, new_owner
from events.sinks import RedisStreamSink, Sink, WebhookSink
from events.sse import EventStreams, WorkspaceQueryRoute
from persistence.outbox import ChangeLog

if TYPE_CHECKING:
    from collab.extensions import Host

log = logging.getLogger("collab.events")


class _Hooks:
    """Room listener: best-effort facts, and a nudge to the publisher when changes are committed."""

    def __init__(self, ext: EventsExtension) -> None:
        self.ext = ext

    def on_outbox_persisted(self, room: Any, records: list) -> None:
        self.ext.committed(room.workspace_id)


class EventsExtension(Extension):
    name = "events"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.source = settings.events_source
        self.host: Host | None = None
        self.redis: Any = None
        self.sinks: list[Sink] = []
        self.publisher: Publisher | None = None
        self.streams: EventStreams | None = None
        self.live = None
        self._live_queue: asyncio.Queue | None = None
        self._live_task: asyncio.Task | None = None
        from events.live import LiveEvents

        self.live = LiveEvents(self._emit, self.source, settings.node_id)
        self.hooks = _Hooks(self)

    def listeners(self) -> list:
        return [self.hooks, self.live]

    def routes(self) -> list:
        return [
            WorkspaceQueryRoute("/api/events", self._sse, methods=["GET"], requires=workspace_role("viewer")),
            WorkspaceQueryRoute(
                "/api/events/dead-letters", self._dead_letters, methods=["GET"], requires=workspace_role("editor")
            ),
        ]

    async def _dead_letters(self, request):
        """Events a webhook gave up on (newest kept per workspace and URL), for an operator to look at."""
        from starlette.responses import JSONResponse

        workspace = request.state.workspace_id
        out = {}
        for sink in self.sinks:
            letters = getattr(sink, "dead_letters", None)
            if letters is not None:
                out[getattr(sink, "url", sink.name)] = await letters(workspace)
        return JSONResponse({"workspace": workspace, "dead_letters": out})

    async def _sse(self, request):
        if self.streams is None:
            from starlette.responses import JSONResponse

            return JSONResponse({"error": "this store keeps no change log"}, status_code=501)
        return await self.streams.endpoint(request)

    async def start(self, app: Host) -> None:
        self.host = app
        s = self.settings
        store = app.store
        if not isinstance(store, ChangeLog):
            log.warning("the store %s keeps no change log: durable events are off", type(store).__name__)
            store = None
        reader = LogReader(store, self.source, s.events_batch) if store is not None else None
        redis_url = s.events_redis_url or s.redis_url
        if redis_url and (s.events_stream or s.uses_redis_store):
            from persistence.redisconn import connect

            # Through the one factory: redis://, redis+cluster:// and redis+sentinel:// alike.
            self.redis = connect(redis_url, timeout=s.redis_timeout_seconds)
        if s.events_stream:
            if self.redis is None:
                raise RuntimeError("COLLAB_EVENTS_STREAM needs COLLAB_EVENTS_REDIS_URL or COLLAB_REDIS_URL")
            self.sinks.append(RedisStreamSink(self.redis, s.events_stream, s.events_stream_maxlen))
        if s.events_webhook_urls:
            if s.events_webhook_secret is None:
                raise RuntimeError("COLLAB_EVENTS_WEBHOOK_URLS needs COLLAB_EVENTS_WEBHOOK_SECRET (whsec_...)")
            for url in s.events_webhook_urls:
                self.sinks.append(
                    WebhookSink(
                        url,
                        s.events_webhook_secret.get_secret_value(),
                        app.store,
                        timeout=s.events_webhook_timeout_seconds,
                        backoff_initial=s.events_webhook_backoff_initial_ms / 1000.0,
                        backoff_max=s.events_webhook_backoff_max_ms / 1000.0,
                        dead_letter_after=s.events_webhook_dead_letter_seconds,
                        live_queue=s.events_live_queue,
                        claim=self._claim if (self.redis is not None and s.uses_redis_store) else None,
                        batch_max=s.events_webhook_batch_max,
                    )
                )
        for sink in self.sinks:
            await sink.start()
        if reader is not None:
            self.streams = EventStreams(reader, s.events_poll_seconds, s.events_sse_heartbeat_seconds)
            if self.sinks:
                leases = None
                if s.uses_redis_store and self.redis is not None:
                    leases = Leases(self.redis, new_owner(s.node_id), s.events_lease_ms)
                self.publisher = Publisher(
                    reader, self.sinks, poll=s.events_poll_seconds, forwarding=self._forwarding(app), leases=leases
                )
                await self.publisher.start()
        self._live_queue = asyncio.Queue(s.events_live_queue)
        self._live_task = asyncio.get_running_loop().create_task(self._live_loop())
        self.live.watch_evictions(lambda: app.rooms.rooms)
        for ext in app.extensions:
            manager = getattr(ext, "manager", None)
            if ext is not self and manager is not None and callable(getattr(manager, "subscribe", None)):
                manager.subscribe(self.live.on_lock_event)
        log.info(
            "events: %s",
            ", ".join(sink.name for sink in self.sinks) or "no sinks configured (GET /api/events only)",
        )

    @staticmethod
    def _forwarding(app: Host) -> bool:
        """Whether a forwarder runs (then delivered changes and failed attempts become events too)."""
        return any(getattr(ext, "forwarder", None) is not None for ext in app.extensions)

    def closing(self) -> None:
        if self.streams is not None:
            self.streams.close()

    async def stop(self) -> None:
        self.live.stop()
        if self.publisher is not None:
            await self.publisher.stop()
        if self._live_task is not None:
            self._live_task.cancel()
            with contextlib.suppress(BaseException):
                await self._live_task
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await sink.stop()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    def admin_summary(self) -> dict[str, Any]:
        return {"events": self.stats()}

    def metrics(self) -> Iterable[Metric]:
        published = CounterMetricFamily(
            "collab_events_published", "Events published by this node, per sink and kind", labels=["sink", "kind"]
        )
        for sink in self.sinks:
            for kind, count in sorted(sink.stats().items()):
                if kind != "live_queued":
                    published.add_metric([sink.name, kind], count)
        yield published
        if self.publisher is not None:
            running = sum(1 for lane in self.publisher.lanes.values() if lane.task and not lane.task.done())
            yield gauge("collab_events_lanes", "Workspace x sink publishing lanes running on this node", running)

    def error_counts(self) -> dict[str, int]:
        return {"events_publish": self.publisher.counts["errors"]} if self.publisher is not None else {}

    # ------------------------------------------------------------- plumbing

    def committed(self, workspace: str) -> None:
        if self.publisher is not None:
            self.publisher.kick(workspace)
        if self.streams is not None:
            self.streams.kick(workspace)

    def _emit(self, event: dict[str, Any]) -> None:
        """A best-effort event: to SSE streams now, to the sinks through one ordered queue."""
        if self.streams is not None:
            self.streams.live(event)
        if self._live_queue is not None and self.sinks:
            try:
                self._live_queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("events: best-effort queue full; %s dropped", event["type"])

    async def _live_loop(self) -> None:
        assert self._live_queue is not None
        while True:
            event = await self._live_queue.get()
            for sink in self.sinks:
                try:
                    await sink.publish_live(event)
                except Exception as exc:
                    log.warning("events: %s not published to %s: %s", event["id"], sink.name, exc)

    async def _claim(self, sink: str, event_id: str) -> bool:
        """First node to publish a best-effort event to a sink (several nodes see a lock change)."""
        try:
            return bool(await self.redis.set(f"collab:events:seen:{sink}:{event_id}", "1", nx=True, px=600_000))
        except Exception:
            return True  # rather twice (same id) than never

    def stats(self) -> dict[str, Any]:
        return {
            "sinks": {sink.name: sink.stats() for sink in self.sinks},
            "publisher": dict(self.publisher.counts) if self.publisher is not None else None,
        }
