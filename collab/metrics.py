"""Prometheus metrics: plain counters on the hot path, read at scrape time.

Nothing here is a module-level singleton: ``create_app`` builds one
:class:`Metrics` per ``App``, with its own ``CollectorRegistry``. The hot
paths (a message read, a frame written, a flush, a store append) only bump
plain ints on a :class:`Counters` object or call :meth:`Histogram.observe`
(a bisect and three additions, no lock: everything runs on the event loop).
A custom collector turns those numbers, and the state of the app at that
moment (rooms, peers, queues, locks, participants), into metric families
when Prometheus scrapes ``/metrics``.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from codec import protocol as p

if TYPE_CHECKING:
    from collab.app import App

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Fan-out is usually well under a millisecond; store appends are an
# fsync (a few ms); forwarding is an HTTP round trip.
FANOUT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FORWARD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Close codes the server sends, by kind. Kinds marked as errors count in
# collab_errors_total too.
CLOSE_KINDS: dict[int, str] = {
    p.CLOSE_NORMAL: "normal",
    p.CLOSE_GOING_AWAY: "going_away",
    p.CLOSE_UNSUPPORTED_DATA: "unsupported_data",
    p.CLOSE_INVALID_PAYLOAD: "invalid_data",
    p.CLOSE_POLICY: "policy",
    p.CLOSE_TOO_BIG: "too_big",
    p.CLOSE_INTERNAL_ERROR: "internal_error",
    p.CLOSE_RESTART: "restart",
    p.CLOSE_TRY_AGAIN: "try_again",
    4401: "unauthenticated",
    4403: "forbidden",
}
NOT_ERRORS = frozenset({"normal", "going_away", "restart", "client_closed"})


# Every kind of collab_errors_total, exported from the start (at 0) so that rate() works at once.
ERROR_KINDS = sorted(
    {kind for kind in CLOSE_KINDS.values() if kind not in NOT_ERRORS}
    | {"slow_consumer", "room_limit", "other", "origin_refused", "connection_limit", "storage"}
    | {"forward_failed", "forward_refused", "forward_dead_letter"}
)


def close_kind(code: int | None, overflowed: bool = False) -> str:
    if overflowed:
        return "slow_consumer"  # its outgoing queue overflowed (it stopped reading)
    if code is None:
        return "client_closed"
    return CLOSE_KINDS.get(code, "other")


class Histogram:
    """A fixed-bucket histogram in plain numbers (single-threaded: the event loop)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append((_float(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class Counters:
    """What the hot paths count (attribute increments, no labels, no locks)."""

    __slots__ = (
        "messages_in",
        "bytes_in",
        "messages_out",
        "bytes_out",
        "updates_in",
        "updates_refused",
        "surrogate_splits",
        "flushes",
        "frames_queued",
        "store_errors",
        "closes",
        "fanout",
        "store_append",
        "forward",
        "forward_results",
    )

    def __init__(self) -> None:
        self.messages_in = 0  # frames read from websockets
        self.bytes_in = 0
        self.messages_out = 0  # frames written to websockets
        self.bytes_out = 0
        self.updates_in = 0  # sync updates handed to rooms
        self.updates_refused = 0  # refused and reverted (viewer, document too large)
        self.surrogate_splits = 0  # updates that cut a surrogate pair (rooms/textsplit.py)
        self.flushes = 0
        self.frames_queued = 0  # frames handed to peers' queues by flushes
        self.store_errors = 0
        self.closes: Counter[tuple[int, str]] = Counter()  # (close code, kind) -> connections
        self.fanout = Histogram(FANOUT_BUCKETS)
        self.store_append = Histogram(STORE_BUCKETS)
        self.forward = Histogram(FORWARD_BUCKETS)
        self.forward_results: Counter[str] = Counter()  # delivered / refused / failed

    def closed(self, code: int | None, kind: str) -> None:
        self.closes[(code if code is not None else 0, kind)] += 1

    def observe_forward(self, seconds: float, status: int | None) -> None:
        """One request to the data-source backend (any outcome)."""
        self.forward.observe(seconds)
        if status is None:
            outcome = "unreachable"
        elif 200 <= status < 300:
            outcome = "2xx"
        elif 400 <= status < 500:
            outcome = "4xx"
        else:
            outcome = "5xx"
        self.forward_results[outcome] += 1


class Metrics:
    """One app's registry: its own collector plus the process/platform/GC ones."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.counters = Counters()
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = AppCollector(app, self.counters)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    async def render(self) -> bytes:
        """The exposition text; reads what needs an await (the outbox) first."""
        await self.collector.prefetch()
        return generate_latest(self.registry)


class AppCollector(Collector):
    def __init__(self, app: App, counters: Counters) -> None:
        self.app = app
        self.c = counters
        self._outbox: dict[str, Any] | None = None
        self._redis_up: int | None = None

    async def prefetch(self) -> None:
        """Numbers that need the store: the forwarding outbox (bounded wait); whether Redis answers."""
        self._outbox = None
        self._redis_up = None
        if self.app.settings.redis_url:
            try:
                await self.app.redis_check(timeout=1.0)
                self._redis_up = 1
            except Exception:
                self._redis_up = 0
        totals = getattr(self.app.store, "outbox_totals", None)
        if totals is None:
            return
        try:
            async with asyncio.timeout(1.0):
                self._outbox = await totals()
        except Exception:
            self._outbox = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        app, c = self.app, self.c
        yield gauge("collab_info", "Server version and node id", 1, {"version": _version(), "node": _node(app)})
        yield gauge(
            "collab_accepting", "1 while the server accepts connections (0 while shutting down)", int(app.accepting)
        )
        if self._redis_up is not None:
            yield gauge("collab_redis_up", "1 when the shared Redis answered a PING at this scrape (1 s bound)",
                         self._redis_up)  # fmt: skip

        # Rooms and connections.
        rooms = app.rooms.rooms
        yield gauge("collab_rooms", "Rooms (workspaces) in memory on this node", len(rooms))
        yield gauge("collab_rooms_loading", "Rooms being loaded from the store", len(app.rooms.loading))
        yield gauge("collab_peers", "Connections joined to a room", len(app.connections))
        yield gauge(
            "collab_connections", "Open websocket connections, including unauthenticated ones", app.limiter.total
        )
        awareness = sum(1 for room in rooms.values() for rec in room.awareness.values() if rec.state is not None)
        yield gauge("collab_awareness_states", "Live awareness states across rooms", awareness)

        # Messages.
        yield counter("collab_messages_received", "Websocket frames received from clients", c.messages_in)
        yield counter("collab_received_bytes", "Bytes of websocket frames received", c.bytes_in)
        yield counter("collab_messages_sent", "Websocket frames written to clients", c.messages_out)
        yield counter("collab_sent_bytes", "Bytes of websocket frames written", c.bytes_out)
        yield counter("collab_updates_received", "CRDT updates received (sync step 2 and updates)", c.updates_in)
        yield counter("collab_updates_refused", "Updates refused and reverted (viewer, document too large)",
                       c.updates_refused)  # fmt: skip
        yield counter("collab_surrogate_splits",
                       "Updates that cut a UTF-16 surrogate pair in text, integrated as Yjs does (U+FFFD)",
                       c.surrogate_splits)  # fmt: skip
        yield counter("collab_flushes", "Room flushes (one merged broadcast each)", c.flushes)
        yield counter("collab_frames_queued", "Frames handed to peers' outgoing queues by flushes", c.frames_queued)
        yield histogram(
            "collab_fanout_latency_seconds",
            "From the first update received to the end of the flush that queued it for every peer",
            c.fanout,
        )

        # Queues.
        depths = [conn.queued for conn in app.connections]
        yield gauge("collab_peer_queue_frames", "Frames waiting in peers' outgoing queues, summed", sum(depths))
        yield gauge("collab_peer_queue_frames_max", "Longest outgoing queue of a peer", max(depths, default=0))
        yield gauge("collab_peer_queue_limit_frames", "Queue length at which a peer is cut off",
                     app.settings.peer_queue_frames)  # fmt: skip
        pending_store = sum(room.pending_store_updates for room in rooms.values())
        yield gauge("collab_store_pending_updates", "Updates waiting for the next flush to the store", pending_store)

        # Store.
        yield histogram("collab_store_append_seconds", "Duration of one store append (one per flush)", c.store_append)
        yield counter("collab_store_errors", "Store appends that failed (the room was dropped)", c.store_errors)

        # Connections closed and errors.
        closes = CounterMetricFamily(
            "collab_connections_closed", "Connections closed, by close code and kind", labels=["code", "kind"]
        )
        errors: Counter[str] = Counter({kind: 0 for kind in ERROR_KINDS})  # every kind from the start
        for (code, kind), count in sorted(c.closes.items()):
            closes.add_metric([str(code), kind], count)
            if kind not in NOT_ERRORS:
                errors[kind] += count
        yield closes
        refused = app.stats
        errors["origin_refused"] += refused.get("refused_origin", 0)
        errors["connection_limit"] += refused.get("refused_limit", 0)
        errors["storage"] += c.store_errors
        for ext in app.extensions:
            for kind, count in ext.error_counts().items():
                errors[kind] += count
        family = CounterMetricFamily("collab_errors", "Errors by kind (close codes by category, refusals, "
                                     "storage and forwarding failures)", labels=["kind"])  # fmt: skip
        for kind in sorted(errors):
            family.add_metric([kind], errors[kind])
        yield family
        yield counter("collab_auth_failures", "Failed authentications", refused.get("auth_failed", 0))
        yield counter(
            "collab_rate_limited", "Connections closed for exceeding their rate", refused.get("rate_limited", 0)
        )

        # Forwarding.
        yield histogram("collab_forward_request_seconds", "Duration of one request to the data-source backend",
                         c.forward)  # fmt: skip
        results = CounterMetricFamily(
            "collab_forward_requests", "Requests to the data-source backend by outcome", labels=["outcome"]
        )
        for outcome in ("2xx", "4xx", "5xx", "unreachable"):
            results.add_metric([outcome], c.forward_results.get(outcome, 0))
        yield results
        if self._outbox is not None:
            yield gauge("collab_outbox_pending", "Changes recorded and not yet delivered to the backend",
                         self._outbox.get("pending", 0))  # fmt: skip
            yield gauge("collab_outbox_dead_letters", "Changes in the dead-letter list", self._outbox.get("dead", 0))
            oldest = self._outbox.get("oldest_pending_at")
            age = max(0.0, time.time() - oldest) if oldest else 0.0
            yield gauge("collab_outbox_oldest_pending_seconds", "Age of the oldest undelivered change (0: none)", age)

        # Features (locks, participants, forwarding...): each answers for itself.
        for ext in app.extensions:
            yield from ext.metrics()


def gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> GaugeMetricFamily:
    if labels:
        family = GaugeMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family
    return GaugeMetricFamily(name, doc, value=value)


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=hist.buckets(), sum_value=hist.sum)


def _float(value: float) -> str:
    return repr(float(value))


def _version() -> str:
    from collab import __version__

    return __version__


def _node(app: App) -> str:
    return str(getattr(app.settings, "node_id", ""))
