"""Deliver the outbox to the data-source backend: ordered, at least once.

One *lane* per workspace with pending changes. A lane reads its pending
outbox rows in sequence order, waits for the changes to settle (debounce,
default 500 ms after the last change, but never more than 5 s after the
first), coalesces them into one request, binds the rows to that request's
``Idempotency-Key`` in the store (so a retry, even after a crash, sends the
very same request), and sends it. The next request of a workspace leaves
only after the previous one is finished, so per-workspace order holds.

* 2xx: delivered; the rows leave the outbox; peers get ``forwarded``.
* 412: the backend's data source moved on since the version the request was
  computed from (``If-Match``): the server reads the backend's state, merges
  it into the document (backend wins on the paths it changed) and sends the
  session's remaining changes again, computed from the new version.
* other 4xx (except 408/425/429): the backend refuses the change; not
  retried, recorded in the audit trail, reported to the room
  (``forward.failed``), and (``COLLAB_REVERT_REFUSED``) undone in the
  document by a server change back to the backend's state; later changes
  carry on.

A request carries the known backend state (forwarding/backendsync.py) with
the batch's own changes applied, never the document's whole configuration
as it was: what the backend changed meanwhile on other paths is kept. Rows
that came from the backend are never sent back.
* anything else (connection refused, timeout, 5xx, 408/425/429): retried
  with exponential backoff and jitter, honouring ``Retry-After``. When a
  request has failed for longer than ``forward_dead_letter_seconds`` its rows
  go to the dead-letter list (API: retry or discard) and the lane moves on.

Circuit breaker: when the backend is unreachable (connection error,
timeout, 502/503/504), delivery pauses for every workspace and a single lane
probes it with its request, backing off exponentially (with jitter, at most
``forward_backoff_max_ms``). As soon as the probe gets an answer, every lane
resumes, so a backlog starts draining within one backoff interval of the
backend's return, without a herd of retries while it is down. Other
failures (a 500 for one data source) back off per lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from collab import logs
from forwarding.settings import ForwardingSettings
from persistence.base import StoreError
from persistence.outbox import BACKEND_REFUSED, DEAD_LETTERED, DELIVERED, REFUSED, ChangeRecord, OutboxRow
from rooms.config import MISSING, get_path, overlaps

log = logging.getLogger("collab.forwarder")

RETRYABLE_4XX = {408, 425, 429}
CONFLICT = 412  # If-Match no longer matches: merge the backend's state and send again
MAX_CONFLICTS = 5  # in a row, before a request backs off like any other failure
UNAVAILABLE = {502, 503, 504}  # like a refused connection: the backend as a whole is not there
IDLE_LANE_SECONDS = 30.0
PROBE_CACHE_SECONDS = 1.0  # readiness probes of the backend, at most one per this
SWEEP_SECONDS = 2.0  # shared outbox: how often a node looks for rows other nodes wrote


class SeedError(Exception):
    """The backend could not say what a new workspace starts with."""


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def coalesce(rows: list[OutboxRow]) -> list[dict[str, Any]]:
    """The net change of consecutive rows, one entry per path (first old, last new)."""
    merged: dict[str, dict[str, Any]] = {}
    for row in rows:
        who = (row.author or {}).get("id")
        for change in row.changes:
            path = change["path"]
            entry = merged.get(path)
            if entry is None:
                entry = merged[path] = {"path": path}
                if "old" in change:
                    entry["old"] = change["old"]
            entry.pop("new", None)
            if "new" in change:
                entry["new"] = change["new"]
            entry["by"] = who
    out = []
    for entry in merged.values():
        if ("old" in entry) == ("new" in entry) and entry.get("old") == entry.get("new"):
            continue  # changed and changed back within the batch
        entry["op"] = "set" if "new" in entry else "unset"
        out.append(entry)
    return out


class _Lane:
    __slots__ = (
        "workspace",
        "task",
        "wake",
        "last_change_at",
        "recorded_seq",
        "retrying",
        "last_error",
        "next_try",
        "owner",
    )

    def __init__(self, workspace: str) -> None:
        self.workspace = workspace
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()
        self.last_change_at = 0.0
        self.recorded_seq = 0
        self.retrying = False
        self.last_error: str | None = None
        self.next_try: float | None = None
        self.owner: str | None = None  # the forwarding lease this lane delivers under (several nodes)


class Forwarder:
    def __init__(
        self,
        settings: ForwardingSettings,
        store: Any,
        report: Callable[[str, dict[str, Any]], None],
    ) -> None:
        assert settings.backend_url
        self.settings = settings
        self.base_url = settings.backend_url
        self.store = store
        self.report = report  # (workspace, control message) -> tell the room
        self.sync: Any = None  # forwarding.backendsync.BackendSync: known backend states, merges
        self.client: httpx.AsyncClient | None = None
        self.lanes: dict[str, _Lane] = {}
        self._limit = asyncio.Semaphore(settings.forward_concurrency)
        # Circuit breaker: while the backend is unreachable, only the prober lane sends.
        self._down = False
        self._down_reason: str | None = None
        self._down_failures = 0
        self._prober: _Lane | None = None
        self._state_changed = asyncio.Event()  # set and replaced on each change of the above
        self._stopping = False
        self.stats = {"requests": 0, "delivered": 0, "refused": 0, "failures": 0, "dead": 0}
        # Called with (seconds, HTTP status or None) after each request (metrics).
        self.on_request: Callable[[float, int | None], None] | None = None
        self._probe: tuple[float, str | None] | None = None  # (monotonic time, error or None)
        # Several nodes share the outbox (Redis store): deliveries need the workspace's lease.
        self._leased = callable(getattr(store, "forward_lease", None))
        self.node_id = getattr(store, "node_id", "local")
        self.lease_ms = settings.forward_lease_ms
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def backend_down(self) -> bool:
        """True while the backend is unreachable (the circuit is open)."""
        return self._down

    def summary(self) -> dict[str, Any]:
        """Delivery state on this node (metrics and the admin API)."""
        lanes = list(self.lanes.values())
        return {
            "lanes": sum(1 for lane in lanes if lane.task is not None and not lane.task.done()),
            "lanes_retrying": sum(1 for lane in lanes if lane.retrying),
            "backend_down": self._down,
        }

    async def start(self) -> None:
        headers = {"User-Agent": "datasource-collab"}
        if self.settings.backend_token:
            headers["Authorization"] = f"Bearer {self.settings.backend_token}"
        timeout = self.settings.backend_timeout_seconds
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(
                max_connections=self.settings.forward_concurrency,
                max_keepalive_connections=self.settings.forward_concurrency,
            ),
        )
        # Whatever a previous run left undelivered (a crash included) goes out now.
        try:
            for workspace in await self.store.outbox_workspaces():
                self.wake(workspace)
        except StoreError as exc:  # the sweep (shared store) or the next change picks them up
            log.warning("cannot read the outbox at start: %s", exc)
        if self._leased:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="outbox sweep")

    async def stop(self) -> None:
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        lanes = [lane.task for lane in self.lanes.values() if lane.task is not None]
        for task in lanes:
            task.cancel()
        await asyncio.gather(*lanes, return_exceptions=True)
        self.lanes.clear()
        if self.client is not None:
            await self.client.aclose()

    def notify(self, workspace: str, records: list[ChangeRecord]) -> None:
        """New outbox rows of ``workspace`` are durable."""
        seqs = [r.seq for r in records if r.forward and r.seq is not None]
        if not seqs:
            return
        lane = self.wake(workspace)
        lane.last_change_at = time.time()
        lane.recorded_seq = max(lane.recorded_seq, *seqs)

    def wake(self, workspace: str) -> _Lane:
        lane = self.lanes.get(workspace)
        if lane is None:
            lane = self.lanes[workspace] = _Lane(workspace)
        if (lane.task is None or lane.task.done()) and not self._stopping:
            # A context of its own: its log lines name the workspace, not the user whose change woke it.
            lane.task = asyncio.get_running_loop().create_task(
                self._run(lane), name=f"forward {workspace}", context=contextvars.Context()
            )
        lane.wake.set()
        return lane

    def lane_state(self, workspace: str) -> dict[str, Any]:
        lane = self.lanes.get(workspace)
        if lane is None:
            return {"active": False}
        return {
            "active": lane.task is not None and not lane.task.done(),
            "retrying": lane.retrying,
            "last_error": lane.last_error,
            "next_attempt_at": lane.next_try,
        }

    async def probe(self) -> str | None:
        """Whether the backend answers (for /readyz): None if it does, else why not.

        Any answer but 502/503/504 counts (a 404 on the health path too). The
        result is kept for PROBE_CACHE_SECONDS, so frequent readiness checks
        cost the backend at most one request per second.
        """
        assert self.client is not None
        now = time.monotonic()
        if self._probe is not None and now - self._probe[0] < PROBE_CACHE_SECONDS:
            return self._probe[1]
        error: str | None = None
        try:
            response = await self.client.get(
                self.settings.backend_health_path, timeout=min(1.5, self.settings.backend_timeout_seconds)
            )
            if response.status_code in UNAVAILABLE:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        self._probe = (time.monotonic(), error)
        return error

    # ---------------------------------------------------------------- seeding

    async def fetch_state(
        self, workspace: str, etag: str | None = None
    ) -> tuple[int, dict[str, Any] | None, str | None]:
        """One GET of the data source: (status, configuration or None, version); 304 if ``etag`` is current."""
        assert self.client is not None
        headers = {"If-None-Match": f'"{etag}"'} if etag is not None else {}
        response = await self.client.get(f"/data-sources/{quote(workspace, safe='')}", headers=headers)
        if response.status_code != 200:
            return response.status_code, None, etag if response.status_code == 304 else None
        body = response.json()
        config = body.get("config") if isinstance(body, dict) else None
        if config is not None and not isinstance(config, dict):
            raise ValueError(f"backend answered a non-object configuration for {workspace}")
        return 200, config or {}, version_of(body, response.headers)

    async def fetch_initial(self, workspace: str) -> tuple[int, dict[str, Any] | None, int, str | None]:
        """GET the data source: (HTTP status, its configuration or None, its sequence number, its version)."""
        assert self.client is not None
        deadline = time.monotonic() + self.settings.seed_timeout_seconds
        delay = 0.1
        last = "no answer"
        while True:
            try:
                response = await self.client.get(
                    f"/data-sources/{quote(workspace, safe='')}",
                    timeout=max(0.1, min(self.settings.backend_timeout_seconds, deadline - time.monotonic())),
                )
                if response.status_code == 404:
                    return 404, None, 0, None
                if response.status_code == 200:
                    body = response.json()
                    config = body.get("config") if isinstance(body, dict) else None
                    if config is not None and not isinstance(config, dict):
                        raise SeedError(f"backend answered a non-object configuration for {workspace}")
                    seq = body.get("seq", 0) if isinstance(body, dict) else 0
                    version = version_of(body, response.headers)
                    return 200, config or None, int(seq) if isinstance(seq, int) else 0, version
                last = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code not in RETRYABLE_4XX:
                    raise SeedError(f"backend refused GET /data-sources/{workspace}: {last}")
            except (httpx.HTTPError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + delay > deadline:
                raise SeedError(f"no initial state for {workspace} from {self.base_url}: {last}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # ------------------------------------------------------------------ lanes

    async def _run(self, lane: _Lane) -> None:
        logs.bind(workspace=lane.workspace)
        try:
            await self._lane_loop(lane)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("forwarding lane of %s failed; it restarts on the next change", lane.workspace)
            if self.lanes.get(lane.workspace) is lane:
                del self.lanes[lane.workspace]

    async def _lane_loop(self, lane: _Lane) -> None:
        s = self.settings
        debounce = s.forward_debounce_ms / 1000.0
        max_delay = s.forward_max_delay_ms / 1000.0
        while True:
            lane.wake.clear()
            merges = self.sync.merges(lane.workspace) if self.sync is not None else 0
            rows = await self._pending(lane)
            if not rows:
                try:
                    await asyncio.wait_for(lane.wake.wait(), IDLE_LANE_SECONDS)
                except TimeoutError:
                    if not lane.wake.is_set():
                        if self.lanes.get(lane.workspace) is lane:
                            del self.lanes[lane.workspace]
                        return
                continue
            lane.recorded_seq = max(lane.recorded_seq, rows[-1].seq)
            head = rows[0]
            if head.batch is None and len(rows) < s.forward_batch_max:
                # Debounce: wait for the changes to settle, without re-reading
                # the store on each new change (the lane is told of those).
                newest = max(r.created_at for r in rows)
                waited = False
                while True:
                    deadline = min(max(newest, lane.last_change_at) + debounce, head.created_at + max_delay)
                    remaining = deadline - time.time()
                    if remaining <= 0:
                        break
                    waited = True
                    lane.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lane.wake.wait(), remaining)
                if waited:
                    continue  # read again: more changes may have come
            if self._leased:
                await self._deliver_leased(lane)
                continue
            batch = self._batch(rows)
            await self._deliver(lane, batch, (rows, merges))

    async def _deliver_leased(self, lane: _Lane) -> None:
        """Several nodes share the outbox: only the holder of the workspace's lease delivers.

        The lease covers one batch (claim, send, finish) and is renewed while
        the batch is retried; a node that dies holding it loses it after
        the lease's TTL, and the next holder re-sends the claimed batch with
        the same Idempotency-Key. A holder that froze past the TTL and wakes
        up with an answer in hand drops it (``_still_leased``): the new
        holder has delivered the batch, or will, under the same key.
        """
        owner = f"{self.node_id}/{id(lane)}"
        try:
            taken = await self.store.forward_lease(lane.workspace, owner, self.lease_ms)
        except StoreError as exc:
            log.warning("forwarding lease of %s unavailable: %s", lane.workspace, exc)
            taken = False
        if not taken:
            lane.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.wake.wait(), self.lease_ms / 3000.0)
            return

        async def renew() -> None:
            # Strict renewal: once lost, the lease is never taken back by this batch.
            while True:
                await asyncio.sleep(self.lease_ms / 3000.0)
                with contextlib.suppress(StoreError):
                    if not await self.store.forward_lease_renew(lane.workspace, owner, self.lease_ms):
                        log.warning("forwarding lease of %s lost while delivering", lane.workspace)
                        return

        lane.owner = owner
        renewer = asyncio.get_running_loop().create_task(renew())
        try:
            rows = await self._pending(lane)
            if rows:
                await self._deliver(lane, self._batch(rows), None)
        finally:
            lane.owner = None
            renewer.cancel()
            with contextlib.suppress(StoreError, asyncio.CancelledError):
                await self.store.forward_lease_release(lane.workspace, owner)

    async def _sweep(self) -> None:
        """Shared outbox: wake a lane for every workspace with pending rows, whoever wrote them."""
        while not self._stopping:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                workspaces = await self.store.outbox_workspaces()
            except StoreError:
                continue
            for workspace in workspaces:
                lane = self.lanes.get(workspace)
                if lane is None or lane.task is None or lane.task.done():
                    self.wake(workspace)

    async def _still_leased(self, lane: _Lane) -> bool:
        """Whether this lane still holds its workspace's lease (always, with one node).

        Checked after every answer, before anything is written: a node frozen
        mid-request (SIGSTOP, a long GC or VM pause) past the lease's TTL has
        been replaced, and its late answer must neither finish rows, nor
        overwrite the known backend state, nor trigger retries.
        """
        if lane.owner is None:
            return True
        try:
            if await self.store.forward_lease_renew(lane.workspace, lane.owner, self.lease_ms):
                return True
        except StoreError as exc:
            log.warning("cannot check the forwarding lease of %s: %s", lane.workspace, exc)
            return False  # unsure: leave the batch to whoever holds the lease next (same key)
        self.stats["lease_lost"] = self.stats.get("lease_lost", 0) + 1
        log.warning(
            "forwarding lease of %s lost while a request was in flight: its answer is dropped, "
            "the current holder delivers that batch under the same Idempotency-Key",
            lane.workspace,
        )
        return False

    async def _pending(self, lane: _Lane) -> list[OutboxRow]:
        delay = 0.5
        while True:
            try:
                return await self.store.outbox_pending(lane.workspace, self.settings.forward_batch_max)
            except StoreError as exc:
                log.warning("cannot read the outbox of %s: %s", lane.workspace, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _batch(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        head = rows[0]
        if head.batch is not None:
            return [r for r in rows if r.batch == head.batch]
        batch = []
        for row in rows:
            # One fence per request: the backend checks it against the paths it covers.
            if row.batch is not None or (batch and row.fence != head.fence):
                break
            batch.append(row)
        return batch

    def payload(
        self, workspace: str, batch: list[OutboxRow], known: Any = None, later: list[OutboxRow] | None = None
    ) -> dict[str, Any]:
        """The request for ``batch``; with a known backend state, that state plus the batch's own changes.

        Changes that came from the backend, changes that leave a path as the
        backend has it, and changes of paths the backend changed again later
        (a backend row further on in the outbox) are not sent.
        """
        last = batch[-1]
        authors: list[dict[str, Any]] = []
        for row in batch:
            if row.author and row.author not in authors and row.author.get("kind") != "backend":
                authors.append(row.author)
        changes = coalesce(batch)
        config = last.config
        if known is not None:
            from_backend = _last_authors(batch)
            overridden = {
                c["path"] for r in later or [] if (r.author or {}).get("kind") == "backend" for c in r.changes
            }
            kept = []
            config = known.config
            for change in changes:
                path = change["path"]
                value = get_path(last.config, path)
                if from_backend.get(path) or any(overlaps(path, o) for o in overridden):
                    continue
                if _same(value, get_path(known.config, path)):
                    continue
                kept.append(change)
                config = _set(config, path, value)
            changes = kept
        return {
            "data_source": workspace,
            "workspace": workspace,
            "seq": last.seq,
            "first_seq": batch[0].seq,
            "config": config,
            "changes": changes,
            "fence": batch[0].fence,
            "author": authors[-1] if authors else last.author,
            "authors": authors,
            "changed_at": iso(last.created_at),
        }

    async def _compose(
        self, workspace: str, batch: list[OutboxRow], key: str, rows: Any = None
    ) -> tuple[dict[str, Any], dict[str, str], Any]:
        """The request of a batch, from the known backend state (read again after a 412).

        ``rows``: (pending rows, the sync's merge count when they were read), to
        spare a read of the outbox (reads split the store's group commits);
        read again if a backend change was merged since.
        """
        head, last = batch[0], batch[-1]
        known = later = None
        if self.sync is not None:
            known = await self.sync.known(workspace)
            if known is None:
                # Nothing known yet (a workspace older than versions): ask once, merge.
                with contextlib.suppress(Exception):
                    await self.sync.refresh(workspace, "establish", conditional=False)
                    known = await self.sync.known(workspace)
            if rows is None or rows[1] != self.sync.merges(workspace):
                rows = (await self._pending(self.lanes.get(workspace) or _Lane(workspace)), None)
            later = [r for r in rows[0] if r.seq > last.seq]
        payload = self.payload(workspace, batch, known, later)
        headers = {
            "Idempotency-Key": key,
            "X-Collab-Workspace": workspace,
            "X-Collab-Seq": str(last.seq),
            "X-Collab-First-Seq": str(head.seq),
        }
        if head.fence is not None:
            headers["X-Collab-Fence"] = str(head.fence)
        if known is not None and known.version is not None:
            headers["If-Match"] = f'"{known.version}"'
        elif known is not None and known.absent:
            headers["If-None-Match"] = "*"  # it did not exist: create it, or hear that someone else did
        return payload, headers, known

    async def _deliver(self, lane: _Lane, batch: list[OutboxRow], rows: Any = None) -> None:
        s = self.settings
        workspace = lane.workspace
        head, last = batch[0], batch[-1]
        key = head.batch or f"collab-{last.key}"
        first_attempt = head.first_attempt_at
        if head.batch is None or first_attempt is None:
            first_attempt = time.time()
            await self._store_retry(self.store.outbox_claim, workspace, [r.seq for r in batch], key, first_attempt)
        payload, headers, known = await self._compose(workspace, batch, key, rows)
        conflicts = 0
        if known is not None and not payload["changes"]:
            # Only the backend's own changes (or changes it has already): nothing to send back.
            await self._store_retry(self.store.outbox_finish, workspace, key, DELIVERED, time.time())
            lane.retrying, lane.last_error, lane.next_try = False, None, None
            return
        failures = head.attempts
        url = f"/data-sources/{quote(workspace, safe='')}"
        reason = "backend unreachable"
        try:
            while True:
                # While the backend is unreachable one lane probes it and the others wait
                # for the outcome (no herd of retries; all go as soon as it answers).
                while self._down and self._prober not in (None, lane):
                    if time.time() - first_attempt >= s.forward_dead_letter_seconds:
                        await self._dead_letter(lane, batch, key, payload, failures, self._down_reason or reason)
                        return
                    lane.retrying, lane.last_error = True, self._down_reason
                    changed = self._state_changed
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), 5.0)
                if self._down and self._prober is None:
                    self._prober = lane
                status, body, error, retry_after, response_headers = await self._send(url, payload, headers)
                if not await self._still_leased(lane):
                    return
                if status is not None and 200 <= status < 300:
                    self._backend_up()
                    lane.retrying, lane.last_error, lane.next_try = False, None, None
                    self.stats["delivered"] += 1
                    stale = isinstance(body, dict) and body.get("applied") is False
                    if self.sync is not None and known is not None and not stale:
                        # Before the rows leave the outbox: a crash in between re-sends the same key.
                        version = version_of(body, response_headers)
                        kept = await self._store_retry(
                            self.sync.remember, workspace, payload["config"], version, False, lane.owner
                        )
                        if not kept:  # the lease went between the check and this write: the new holder's now
                            return
                    seqs = await self._store_retry(self.store.outbox_finish, workspace, key, DELIVERED, time.time())
                    if stale and self.sync is not None:
                        with contextlib.suppress(Exception):
                            await self.sync.on_conflict(workspace)
                    log.info(
                        "forwarded workspace=%s user=%s seq %d-%d (%d changes): HTTP %d",
                        workspace,
                        ",".join(sorted({str(r.author.get("id")) for r in batch if r.author})) or "-",
                        head.seq,
                        last.seq,
                        len(batch),
                        status,
                    )
                    if isinstance(body, dict) and body.get("status") == "stale":
                        log.warning(
                            "backend already holds a newer version of %s (seq %s) than change %d: not applied",
                            workspace,
                            body.get("seq"),
                            last.seq,
                        )
                    self.report(
                        workspace,
                        {
                            "type": "forwarded",
                            "seq": last.seq,
                            "first_seq": head.seq,
                            "pending": max(0, lane.recorded_seq - last.seq),
                            "changes": len(seqs) or len(batch),
                        },
                    )
                    return
                if status == CONFLICT and self.sync is not None and known is not None and conflicts < MAX_CONFLICTS:
                    self._backend_up()
                    conflicts += 1
                    self.stats["conflicts"] = self.stats.get("conflicts", 0) + 1
                    log.info("backend's %s moved on (412): merging its state and sending again", workspace)
                    try:
                        await self.sync.on_conflict(workspace)
                    except Exception as exc:  # retried like a 5xx (the backend itself answered)
                        status, error = 500, f"merge after 412 failed: {exc}"
                    else:
                        payload, headers, known = await self._compose(workspace, batch, key)
                        if not payload["changes"]:
                            await self._store_retry(self.store.outbox_finish, workspace, key, DELIVERED, time.time())
                            return
                        continue
                if status is not None and 400 <= status < 500 and status not in RETRYABLE_4XX:
                    self._backend_up()
                    lane.retrying, lane.last_error, lane.next_try = False, None, None
                    self.stats["refused"] += 1
                    log.warning("backend refused %s seq %d-%d: HTTP %d %s", workspace, head.seq, last.seq, status, body)
                    audit = ChangeRecord(
                        kind=BACKEND_REFUSED,
                        author=None,
                        changes=payload["changes"],
                        reason=f"HTTP {status}",
                        details={
                            "status": status,
                            "response": body,
                            "first_seq": head.seq,
                            "seq": last.seq,
                            "key": key,
                        },
                        fence=head.fence,
                    )
                    audit.seq = last.seq
                    await self._store_retry(self.store.outbox_finish, workspace, key, REFUSED, time.time(), audit)
                    self.report(
                        workspace,
                        {
                            "type": "forward.failed",
                            "seq": last.seq,
                            "first_seq": head.seq,
                            "status": status,
                            "paths": [c["path"] for c in payload["changes"]],
                            "error": body,
                            "retrying": False,
                        },
                    )
                    if self.sync is not None and s.revert_refused:
                        await self._revert(workspace, batch, payload, status)
                    return
                # Transient: retry with backoff, or give up into the dead-letter list.
                failures += 1
                self.stats["failures"] += 1
                reason = error or f"HTTP {status}"
                lane.retrying, lane.last_error = True, reason
                unreachable = status is None or status in UNAVAILABLE
                if unreachable:
                    if not self._down:
                        log.warning("backend %s unreachable (%s): delivery paused, probing", self.base_url, reason)
                    self._down, self._down_reason = True, reason
                    if self._prober is None:
                        self._prober = lane
                    self._down_failures += 1
                else:
                    self._backend_up()  # it answered: the problem is this request's, not the backend's
                await self._store_retry(self.store.outbox_failed_attempt, workspace, key, reason)
                if time.time() - first_attempt >= s.forward_dead_letter_seconds:
                    await self._dead_letter(lane, batch, key, payload, failures, reason)
                    return
                n = self._down_failures if unreachable else failures
                delay = min(s.forward_backoff_max_ms, s.forward_backoff_initial_ms * 2 ** min(n - 1, 30)) / 1000.0
                delay = delay * random.uniform(0.5, 1.0)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, s.forward_backoff_max_ms / 1000.0))
                lane.next_try = time.time() + delay
                if not unreachable and (failures == 1 or failures % 10 == 0):
                    log.warning(
                        "forwarding %s seq %d-%d failed (%s); retry %d in %.1fs",
                        workspace,
                        head.seq,
                        last.seq,
                        reason,
                        failures,
                        delay,
                    )
                await asyncio.sleep(delay)
        finally:
            if self._prober is lane:
                # Hand the probe over (dead-lettered, cancelled, or done).
                self._prober = None
                self._pulse()

    async def _dead_letter(
        self, lane: _Lane, batch: list[OutboxRow], key: str, payload: dict[str, Any], failures: int, reason: str
    ) -> None:
        head, last = batch[0], batch[-1]
        self.stats["dead"] += 1
        log.error(
            "dead-lettering %s seq %d-%d after %d attempts: %s", lane.workspace, head.seq, last.seq, failures, reason
        )
        audit = ChangeRecord(
            kind=DEAD_LETTERED,
            author=None,
            changes=payload["changes"],
            reason=reason,
            details={"first_seq": head.seq, "seq": last.seq, "key": key, "attempts": failures},
            fence=head.fence,
        )
        audit.seq = last.seq
        await self._store_retry(self.store.outbox_dead, lane.workspace, key, time.time(), audit)
        lane.retrying, lane.next_try = False, None
        self.report(
            lane.workspace,
            {"type": "forward.dead", "seq": last.seq, "first_seq": head.seq, "key": key, "error": reason},
        )

    def _backend_up(self) -> None:
        if self._down:
            log.warning("backend %s answers again: delivery resumes", self.base_url)
            self._down, self._down_reason, self._down_failures, self._prober = False, None, 0, None
            self._pulse()

    def _pulse(self) -> None:
        """Wake every lane waiting for a change of the backend's state."""
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    async def _revert(self, workspace: str, batch: list[OutboxRow], payload: dict[str, Any], status: int) -> None:
        """Undo a refused change in the document: its paths go back to the backend's state.

        Paths changed again by a later change still waiting in the outbox keep
        that newer value (it is forwarded in its turn).
        """
        last = batch[-1]
        rows = await self._pending(self.lanes.get(workspace) or _Lane(workspace))
        again = {c["path"] for r in rows if r.seq > last.seq for c in r.changes}
        paths = [c["path"] for c in payload["changes"] if c["path"] not in again]
        if not paths:
            return
        details = {"seq": last.seq, "first_seq": batch[0].seq, "status": status}
        try:
            await self.sync.revert(workspace, paths, details)
        except Exception as exc:
            log.warning("could not revert the refused change %d of %s: %s", last.seq, workspace, exc)

    async def _send(
        self, url: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int | None, Any, str | None, float | None, Any]:
        """One attempt: (status or None, parsed body, transport error, Retry-After seconds, headers)."""
        assert self.client is not None
        self.stats["requests"] += 1
        async with self._limit:
            started = time.perf_counter()
            try:
                response = await self.client.put(url, json=payload, headers=headers)
            except httpx.HTTPError as exc:
                if self.on_request is not None:
                    self.on_request(time.perf_counter() - started, None)
                return None, None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, None, {}
            if self.on_request is not None:
                self.on_request(time.perf_counter() - started, response.status_code)
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text[:2000]
        retry_after = None
        header = response.headers.get("Retry-After")
        if header:
            with contextlib.suppress(ValueError):
                retry_after = max(0.0, float(header))
        return response.status_code, body, None, retry_after, response.headers

    async def _store_retry(self, fn, *args):
        """Store writes of the forwarder are retried: losing one would resend (harmless) or stall."""
        delay = 0.2
        while True:
            try:
                return await fn(*args)
            except StoreError as exc:
                log.warning("forwarder store write failed (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


def version_of(body: Any, headers: Any) -> str | None:
    """The backend's version of a data source: the body's ``version``, else the ``ETag`` header."""
    from forwarding.backendsync import version_text

    if isinstance(body, dict) and body.get("version") is not None:
        return version_text(body["version"])
    return version_text(headers.get("ETag")) if headers is not None else None


def _last_authors(batch: list[OutboxRow]) -> dict[str, bool]:
    """Per path, whether its last change in the batch came from the backend."""
    out: dict[str, bool] = {}
    for row in batch:
        backend = (row.author or {}).get("kind") == "backend"
        for change in row.changes:
            out[change["path"]] = backend
    return out


def _set(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    from forwarding.backendsync import set_plain

    return set_plain(config, path, value)


def _same(a: Any, b: Any) -> bool:
    """Two plain values (or MISSING) are the same configuration value."""
    if a is MISSING or b is MISSING:
        return a is b
    return a == b and type(a) is type(b)
