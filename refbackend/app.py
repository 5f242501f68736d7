"""A reference data-source backend: the contract of docs/backend-contract.md.

Starlette + SQLite, small on purpose. It is what the tests and ``make run``
talk to, and a model for a real backend:

* ``GET /data-sources/{id}`` -> ``{"id", "config", "seq", "version", "updated_at"}``
  with ``ETag: "<version>"``, or 404; ``If-None-Match`` with the current
  version -> 304 (a quiet data source costs one empty answer);
* ``PUT /data-sources/{id}`` with an ``Idempotency-Key``: applies a change
  forwarded by the collaboration server, in one transaction:

  1. a key seen before replays the stored answer (``Idempotent-Replayed: true``);
  2. ``If-Match`` naming another version than the data source's (or
     ``If-None-Match: *`` while it exists) -> 412
     ``version_mismatch`` with the current ``config`` and ``version`` (not
     stored under the key: the server merges and sends again);
  3. a refusal rule that matches one of the changes -> 422 (business validation);
  4. a fence older than one already seen for a changed path -> 409 ``stale_fence``;
  5. ``seq`` not above the data source's sequence -> 200 ``stale`` (already in
     effect, not applied again);
  6. otherwise the configuration is replaced by the request's ``config``, the
     data source's sequence becomes ``seq`` and its version goes up by one
     -> 200 ``applied``.
* ``PATCH /data-sources/{id}``: the platform's own API (JSON Merge Patch,
  optional ``If-Match``); every change it makes goes up one version and is
  announced to the collaboration server by the *change hook*.

The change hook (``--notify-url``, or ``PUT /admin/notify``): after each
change made by the backend's own API (``PATCH``, ``/admin/data-sources``),
a notification is written in the same transaction and delivered in the
background as ``POST {notify-url}/api/workspaces/{id}/backend-changes``
``{"config", "version"}`` (``Authorization: Bearer <notify-token>``), retried
with backoff until it gets a 2xx -- a restart of either side loses nothing.
Changes forwarded by the server (``PUT``) are not announced back.

``/admin/...`` routes exist for tests and demos (set a data source, add a
refusal rule, slow requests down, hold answers back after applying, read the
log of applied changes). They are not part of the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SCHEMA = """
CREATE TABLE IF NOT EXISTS data_sources (
    id         TEXT PRIMARY KEY,
    config     TEXT NOT NULL,
    seq        INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fences (
    id    TEXT NOT NULL,
    path  TEXT NOT NULL,
    fence INTEGER NOT NULL,
    PRIMARY KEY (id, path)
);
CREATE TABLE IF NOT EXISTS idempotency (
    key    TEXT PRIMARY KEY,
    id     TEXT NOT NULL,
    status INTEGER NOT NULL,
    body   TEXT NOT NULL,
    at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS applied (
    n          INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT NOT NULL,
    key        TEXT NOT NULL,
    first_seq  INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    changes    TEXT NOT NULL,
    author     TEXT,
    fence      INTEGER,
    gap        INTEGER NOT NULL DEFAULT 0,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    n       INTEGER PRIMARY KEY AUTOINCREMENT,
    method  TEXT NOT NULL,
    id      TEXT NOT NULL,
    key     TEXT,
    first_seq INTEGER,
    seq     INTEGER,
    status  INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    config  TEXT,
    at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS notifications (
    id      TEXT PRIMARY KEY,   -- one pending notification per data source (the newest state wins)
    version INTEGER NOT NULL,
    at      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rules (
    n      INTEGER PRIMARY KEY AUTOINCREMENT,
    id     TEXT NOT NULL,     -- a data source id or '*'
    path   TEXT NOT NULL,
    value  TEXT NOT NULL,     -- JSON
    status INTEGER NOT NULL
);
"""


_UPSERT_DATA_SOURCE = (
    "INSERT INTO data_sources (id, config, seq, updated_at, version) VALUES (?, ?, ?, ?, 1) "
    "ON CONFLICT(id) DO UPDATE "
    "SET config=excluded.config, seq=excluded.seq, updated_at=excluded.updated_at, version=version+1"
)


def parse_version(header: str | None) -> int | None:
    """``"3"``, ``W/"3"`` or ``3`` -> 3; None if absent or not ours (never matches)."""
    if header is None:
        return None
    text = header.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    try:
        return int(text)
    except ValueError:
        return -1


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class Backend:
    """The SQLite state; every method runs in one transaction under one lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # survives a crash of this process
        self.db.executescript(SCHEMA)
        columns = [r[1] for r in self.db.execute("PRAGMA table_info(data_sources)")]
        if "version" not in columns:  # a database of an older reference backend
            self.db.execute("ALTER TABLE data_sources ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
        self.lock = threading.Lock()
        self.delay = 0.0
        self.hold_from_seq: int | None = None  # answers to PUTs from this seq on wait for /admin/release
        self.released: asyncio.Event | None = None
        self.hold_left: int | None = None  # how many more answers to hold (None: every one from hold_from_seq)
        self.held = 0  # answers being held right now
        self.notify_wake = None  # set by the notifier: a change waits to be announced

    def close(self) -> None:
        self.db.close()

    def _tx(self, fn):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return result

    # ------------------------------------------------------------ contract

    def get(self, ds: str, if_none_match: int | None = None) -> dict[str, Any] | None:
        """The data source, None if unknown, ``{"not_modified": version}`` if ``if_none_match`` is current."""

        def run(db: sqlite3.Connection):
            row = db.execute("SELECT config, seq, updated_at, version FROM data_sources WHERE id=?", (ds,)).fetchone()
            unchanged = row is not None and if_none_match is not None and row[3] == if_none_match
            status, outcome = (304, "not_modified") if unchanged else (200, "found") if row else (404, "not_found")
            db.execute(
                "INSERT INTO requests (method, id, status, outcome, at) VALUES ('GET', ?, ?, ?, ?)",
                (ds, status, outcome, time.time()),
            )
            if row is None:
                return None
            if unchanged:
                return {"not_modified": row[3]}
            return {"id": ds, "config": json.loads(row[0]), "seq": row[1], "version": row[3], "updated_at": row[2]}

        return self._tx(run)

    def patch(self, ds: str, patch: dict[str, Any], if_match: int | None) -> tuple[int, dict[str, Any]]:
        """The platform's own API: merge ``patch`` into the configuration; the change hook is told."""

        def run(db: sqlite3.Connection):
            row = db.execute("SELECT config, version, seq FROM data_sources WHERE id=?", (ds,)).fetchone()
            config, version, seq = (json.loads(row[0]), row[1], row[2]) if row else ({}, 0, 0)
            status = 412 if if_match is not None and if_match != version else 200
            db.execute(
                "INSERT INTO requests (method, id, status, outcome, config, at) VALUES ('PATCH', ?, ?, ?, ?, ?)",
                (ds, status, "version_mismatch" if status == 412 else "patched", _dumps(patch), time.time()),
            )
            if status == 412:
                return 412, {"error": "version_mismatch", "version": version, "config": config}
            new = merge_patch(config, patch)
            db.execute(_UPSERT_DATA_SOURCE, (ds, _dumps(new), seq, time.time()))
            version = db.execute("SELECT version FROM data_sources WHERE id=?", (ds,)).fetchone()[0]
            self._queue_notification(db, ds, version)
            return 200, {"id": ds, "config": new, "version": version}

        return self._tx(run)

    def _queue_notification(self, db: sqlite3.Connection, ds: str, version: int) -> None:
        db.execute(
            "INSERT INTO notifications (id, version, at) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET version=excluded.version, at=excluded.at",
            (ds, version, time.time()),
        )
        if self.notify_wake is not None:
            self.notify_wake()

    # ------------------------------------------------------- change hook

    def setting(self, name: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def set_setting(self, name: str, value: str | None) -> None:
        def run(db: sqlite3.Connection):
            if value is None:
                db.execute("DELETE FROM settings WHERE name=?", (name,))
            else:
                db.execute(
                    "INSERT INTO settings (name, value) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value=excluded.value",
                    (name, value),
                )

        self._tx(run)

    def pending_notifications(self) -> list[tuple[str, int, dict[str, Any]]]:
        """(data source, version, config) of every change not yet announced."""

        def run(db: sqlite3.Connection):
            return [
                (r[0], r[1], json.loads(r[2]))
                for r in db.execute(
                    "SELECT n.id, d.version, d.config FROM notifications n JOIN data_sources d ON d.id=n.id "
                    "ORDER BY n.at"
                )
            ]

        return self._tx(run)

    def notified(self, ds: str, version: int) -> None:
        """Announced up to ``version`` (a newer change keeps its notification)."""
        self._tx(lambda db: db.execute("DELETE FROM notifications WHERE id=? AND version<=?", (ds, version)))

    def put(
        self, ds: str, key: str, body: dict[str, Any], if_match: int | None = None, create_only: bool = False
    ) -> tuple[int, dict[str, Any], bool]:
        """Apply one forwarded change: (status, answer, replayed)."""
        seq, first_seq = body["seq"], body["first_seq"]
        changes = body.get("changes") or []
        fence = body.get("fence")

        def log(db, status: int, outcome: str) -> None:
            db.execute(
                "INSERT INTO requests (method, id, key, first_seq, seq, status, outcome, config, at) "
                "VALUES ('PUT', ?, ?, ?, ?, ?, ?, ?, ?)",
                (ds, key, first_seq, seq, status, outcome, _dumps(body.get("config")), time.time()),
            )

        def answer(db, status: int, outcome: str, payload: dict[str, Any]):
            db.execute(
                "INSERT INTO idempotency (key, id, status, body, at) VALUES (?, ?, ?, ?, ?)",
                (key, ds, status, _dumps(payload), time.time()),
            )
            log(db, status, outcome)
            return status, payload, False

        def run(db: sqlite3.Connection):
            replay = db.execute("SELECT id, status, body FROM idempotency WHERE key=?", (key,)).fetchone()
            if replay is not None:
                if replay[0] != ds:
                    log(db, 422, "key_reused")
                    return 422, {"error": "idempotency_key_reused", "detail": "key used for another data source"}, False
                log(db, replay[1], "replayed")
                return replay[1], json.loads(replay[2]), True
            row = db.execute("SELECT seq, version, config FROM data_sources WHERE id=?", (ds,)).fetchone()
            current, version = (row[0], row[1]) if row else (0, 0)
            if (if_match is not None and if_match != version) or (create_only and row is not None):
                # Not stored under the key: the same request, merged, comes again.
                log(db, 412, "version_mismatch")
                config = json.loads(row[2]) if row else {}
                return 412, {"error": "version_mismatch", "version": version, "config": config}, False
            # Business rules (the tests' way of making the backend refuse a change).
            for change in changes:
                if change.get("op", "set") != "set":
                    continue
                rule = db.execute(
                    "SELECT status FROM rules WHERE id IN (?, '*') AND path=? AND value=? LIMIT 1",
                    (ds, change.get("path"), _dumps(change.get("new"))),
                ).fetchone()
                if rule is not None:
                    return answer(
                        db,
                        rule[0],
                        "refused",
                        {"error": "refused", "detail": f"{change.get('path')} may not be {change.get('new')!r}"},
                    )
            # Fencing: a change made under a lock older than one already seen for that path is stale.
            if fence is not None:
                for change in changes:
                    row = db.execute(
                        "SELECT fence FROM fences WHERE id=? AND path=?", (ds, change.get("path"))
                    ).fetchone()
                    if row is not None and row[0] > fence:
                        return answer(
                            db,
                            409,
                            "stale_fence",
                            {"error": "stale_fence", "path": change.get("path"), "fence": fence, "current": row[0]},
                        )
                db.executemany(
                    "INSERT INTO fences (id, path, fence) VALUES (?, ?, ?) "
                    "ON CONFLICT(id, path) DO UPDATE SET fence=MAX(fence, excluded.fence)",
                    [(ds, change.get("path"), fence) for change in changes],
                )
            if seq <= current:
                return answer(
                    db, 200, "stale", {"status": "stale", "applied": False, "seq": current, "version": version}
                )
            now = time.time()
            db.execute(
                _UPSERT_DATA_SOURCE,
                (ds, _dumps(body["config"]), seq, now),
            )
            db.execute(
                "INSERT INTO applied (id, key, first_seq, seq, changes, author, fence, gap, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ds,
                    key,
                    first_seq,
                    seq,
                    _dumps(changes),
                    _dumps(body.get("author")),
                    fence,
                    int(first_seq > current + 1),
                    now,
                ),
            )
            return answer(
                db, 200, "applied", {"status": "applied", "applied": True, "seq": seq, "version": version + 1}
            )

        return self._tx(run)

    # --------------------------------------------------------------- admin

    def admin_set(self, ds: str, config: dict[str, Any], seq: int) -> int:
        """Set a data source as a direct change at the backend would (the change hook is told)."""

        def run(db: sqlite3.Connection) -> int:
            db.execute(_UPSERT_DATA_SOURCE, (ds, _dumps(config), seq, time.time()))
            version = db.execute("SELECT version FROM data_sources WHERE id=?", (ds,)).fetchone()[0]
            self._queue_notification(db, ds, version)
            return version

        return self._tx(run)

    def admin_rule(self, ds: str, path: str, value: Any, status: int) -> None:
        self._tx(
            lambda db: db.execute(
                "INSERT INTO rules (id, path, value, status) VALUES (?, ?, ?, ?)", (ds, path, _dumps(value), status)
            )
        )

    def admin_log(self, ds: str) -> dict[str, Any]:
        def run(db: sqlite3.Connection):
            applied = [
                {
                    "key": r[0],
                    "first_seq": r[1],
                    "seq": r[2],
                    "changes": json.loads(r[3]),
                    "author": json.loads(r[4]) if r[4] else None,
                    "fence": r[5],
                    "gap": bool(r[6]),
                    "received_at": r[7],
                }
                for r in db.execute(
                    "SELECT key, first_seq, seq, changes, author, fence, gap, received_at FROM applied "
                    "WHERE id=? ORDER BY n",
                    (ds,),
                )
            ]
            requests = [
                {
                    "method": r[0],
                    "key": r[1],
                    "first_seq": r[2],
                    "seq": r[3],
                    "status": r[4],
                    "outcome": r[5],
                    "config": json.loads(r[6]) if r[6] else None,
                    "at": r[7],
                }
                for r in db.execute(
                    "SELECT method, key, first_seq, seq, status, outcome, config, at FROM requests "
                    "WHERE id=? ORDER BY n",
                    (ds,),
                )
            ]
            return {"id": ds, "applied": applied, "requests": requests}

        return self._tx(run)

    def admin_stats(self) -> dict[str, Any]:
        def run(db: sqlite3.Connection):
            outcomes = dict(db.execute("SELECT outcome, COUNT(*) FROM requests GROUP BY outcome"))
            return {
                "requests": sum(outcomes.values()),
                "outcomes": outcomes,
                "data_sources": db.execute("SELECT COUNT(*) FROM data_sources").fetchone()[0],
                "applied": db.execute("SELECT COUNT(*) FROM applied").fetchone()[0],
            }

        return self._tx(run)


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def _etag(version: int) -> dict[str, str]:
    return {"ETag": f'"{version}"'}


def create_app(db_path: str | Path, notify_url: str | None = None, notify_token: str | None = None) -> Starlette:
    backend = Backend(db_path)
    if notify_url is not None:
        backend.set_setting("notify_url", notify_url.rstrip("/"))
    if notify_token is not None:
        backend.set_setting("notify_token", notify_token)
    notifier = Notifier(backend)

    async def get_data_source(request: Request) -> Response:
        await _delay()
        found = backend.get(request.path_params["id"], parse_version(request.headers.get("If-None-Match")))
        if found is None:
            return _error(404, "not_found", "no such data source")
        if "not_modified" in found:
            return Response(status_code=304, headers=_etag(found["not_modified"]))
        return JSONResponse(found, headers=_etag(found["version"]))

    async def patch_data_source(request: Request) -> JSONResponse:
        await _delay()
        try:
            patch = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not JSON")
        if not isinstance(patch, dict):
            return _error(400, "invalid_body", "a JSON Merge Patch of the configuration (an object)")
        status, body = backend.patch(request.path_params["id"], patch, parse_version(request.headers.get("If-Match")))
        return JSONResponse(body, status_code=status, headers=_etag(body["version"]))

    async def put_data_source(request: Request) -> JSONResponse:
        await _delay()
        ds = request.path_params["id"]
        key = request.headers.get("Idempotency-Key")
        if not key or len(key) > 200:
            return _error(400, "idempotency_key_required", "send an Idempotency-Key header (at most 200 characters)")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not JSON")
        problem = _check_body(body)
        if problem:
            return _error(400, "invalid_body", problem)
        status, payload, replayed = backend.put(
            ds,
            key,
            body,
            parse_version(request.headers.get("If-Match")),
            create_only=request.headers.get("If-None-Match", "").strip() == "*",
        )
        if (
            backend.hold_from_seq is not None
            and body["seq"] >= backend.hold_from_seq
            and backend.released
            and backend.hold_left != 0
        ):
            # Applied, but the answer is held back: the caller cannot know it is in effect.
            if backend.hold_left is not None:
                backend.hold_left -= 1
            backend.held += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(backend.released.wait(), 60)
            finally:
                backend.held -= 1
        headers = {"Idempotent-Replayed": "true"} if replayed else {}
        if isinstance(payload.get("version"), int):
            headers.update(_etag(payload["version"]))
        return JSONResponse(payload, status_code=status, headers=headers)

    async def _delay() -> None:
        if backend.delay > 0:
            await asyncio.sleep(backend.delay)

    async def admin_set(request: Request) -> JSONResponse:
        body = await request.json()
        version = backend.admin_set(request.path_params["id"], body.get("config") or {}, int(body.get("seq", 0)))
        return JSONResponse({"ok": True, "version": version})

    async def admin_notify(request: Request) -> JSONResponse:
        """Where the change hook calls (the collaboration server's URL), and with which token."""
        body = await request.json()
        url = body.get("url")
        backend.set_setting("notify_url", url.rstrip("/") if url else None)
        backend.set_setting("notify_token", body.get("token"))
        notifier.wake()
        return JSONResponse({"ok": True})

    async def admin_notifications(request: Request) -> JSONResponse:
        pending = [{"id": ds, "version": v} for ds, v, _ in backend.pending_notifications()]
        return JSONResponse({"pending": pending, "sent": notifier.sent, "failures": notifier.failures})

    async def admin_log(request: Request) -> JSONResponse:
        return JSONResponse(backend.admin_log(request.path_params["id"]))

    async def admin_rule(request: Request) -> JSONResponse:
        body = await request.json()
        backend.admin_rule(body.get("data_source", "*"), body["path"], body.get("value"), int(body.get("status", 422)))
        return JSONResponse({"ok": True})

    async def admin_delay(request: Request) -> JSONResponse:
        body = await request.json()
        backend.delay = max(0.0, float(body.get("ms", 0)) / 1000.0)
        return JSONResponse({"ok": True, "delay_ms": backend.delay * 1000})

    async def admin_hold(request: Request) -> JSONResponse:
        body = await request.json()
        backend.hold_from_seq = int(body["from_seq"])
        count = body.get("count")  # hold only the first `count` answers (a retry then gets through)
        backend.hold_left = None if count is None else max(0, int(count))
        backend.released = asyncio.Event()
        return JSONResponse({"ok": True})

    async def admin_release(request: Request) -> JSONResponse:
        if backend.released is not None:
            backend.released.set()
        backend.hold_from_seq = None
        backend.hold_left = None
        return JSONResponse({"ok": True})

    async def admin_stats(request: Request) -> JSONResponse:
        return JSONResponse({**backend.admin_stats(), "held": backend.held})

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/data-sources/{id}", get_data_source, methods=["GET"]),
            Route("/data-sources/{id}", put_data_source, methods=["PUT"]),
            Route("/data-sources/{id}", patch_data_source, methods=["PATCH"]),
            Route("/admin/notify", admin_notify, methods=["PUT"]),
            Route("/admin/notifications", admin_notifications, methods=["GET"]),
            Route("/admin/data-sources/{id}", admin_set, methods=["PUT"]),
            Route("/admin/data-sources/{id}/log", admin_log, methods=["GET"]),
            Route("/admin/rules", admin_rule, methods=["POST"]),
            Route("/admin/delay", admin_delay, methods=["POST"]),
            Route("/admin/hold", admin_hold, methods=["POST"]),
            Route("/admin/release", admin_release, methods=["POST"]),
            Route("/admin/stats", admin_stats, methods=["GET"]),
        ],
        lifespan=_lifespan(backend, notifier),
    )
    app.state.backend = backend
    return app


def _lifespan(backend: Backend, notifier: Notifier):
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await notifier.start()
        try:
            yield
        finally:
            await notifier.stop()
            backend.close()

    return lifespan


class Notifier:
    """The change hook: announces changes made through the backend's own API, until each is taken.

    Notifications are rows written with the change (one per data source, the
    newest version wins), so a crash or a restart of either side loses none.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.event = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.client: Any = None
        self.sent = 0
        self.failures = 0

    def wake(self) -> None:
        self.event.set()

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(timeout=5.0)
        self.backend.notify_wake = self.wake
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.client is not None:
            await self.client.aclose()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            self.event.clear()
            url = self.backend.setting("notify_url")
            pending = self.backend.pending_notifications() if url else []
            failed = False
            for ds, version, config in pending:
                if not await self._send(url, ds, version, config):
                    failed = True
                    break
            if failed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.event.wait(), delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), 5.0)

    async def _send(self, url: str, ds: str, version: int, config: dict[str, Any]) -> bool:
        import httpx

        token = self.backend.setting("notify_token")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = await self.client.post(
                f"{url}/api/workspaces/{ds}/backend-changes",
                json={"config": config, "version": version},
                headers=headers,
            )
        except httpx.HTTPError:
            self.failures += 1
            return False
        if 200 <= response.status_code < 300:
            self.backend.notified(ds, version)
            self.sent += 1
            return True
        self.failures += 1
        return False


def _check_body(body: Any) -> str | None:
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    seq, first = body.get("seq"), body.get("first_seq", body.get("seq"))
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "seq must be a positive integer"
    if not isinstance(first, int) or isinstance(first, bool) or not 1 <= first <= seq:
        return "first_seq must be an integer between 1 and seq"
    body["first_seq"] = first
    if not isinstance(body.get("config"), dict):
        return "config must be an object (the whole configuration)"
    if not isinstance(body.get("changes", []), list):
        return "changes must be a list"
    fence = body.get("fence")
    if fence is not None and (not isinstance(fence, int) or isinstance(fence, bool)):
        return "fence must be an integer or null"
    return None
