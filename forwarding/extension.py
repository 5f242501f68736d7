"""The forwarding feature as an app extension.

* guard: :class:`forwarding.validation.ValidationGuard` (``COLLAB_CONFIG_MODEL``);
* room hooks: every accepted configuration change becomes a
  :class:`~persistence.outbox.ChangeRecord` staged with the room's next
  append (outbox + audit, same transaction as the update); every rejected
  one becomes an audit record; a new workspace is seeded once from the
  backend before anyone joins;
* the forwarder (when ``COLLAB_BACKEND_URL`` is set) delivers the outbox;
* HTTP: ``/api/workspaces/{id}/history``, ``/forwarding``, ``/dead-letters``,
  ``/backend-changes`` (the backend's change hook), ``/config`` (GET, and
  PATCH: JSON Merge Patch edits by non-CRDT callers), ``/api/bulk``;
* two-way sync (forwarding/backendsync.py): changes made at the backend are
  merged into the document (pushed, pulled on open and on an interval, or
  found by a 412), refused changes are reverted;
* control: ``forward.status``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pycrdt
from prometheus_client.core import Metric
from starlette.requests import Request
from starlette.responses import JSONResponse

from collab.extensions import ControlRoute, Extension
from collab.gate import GatedRoute, service, workspace_role
from collab.metrics import gauge
from forwarding.backendsync import BackendSync, version_text
from forwarding.forwarder import Forwarder, SeedError
from forwarding.model import SECRET_KEYS
from forwarding.settings import ForwardingSettings
from forwarding.validation import ConfigValidator, ValidationGuard, load_model
from persistence.base import StoreError
from persistence.outbox import ACCEPTED, REJECTED, SEEDED, ChangeRecord, OutboxStore
from rooms.config import MISSING, Changes, SectionCache, diff, to_prelim

if TYPE_CHECKING:
    from collab.extensions import Host
    from rooms.room import PeerState, Room

log = logging.getLogger("collab.forwarding")

MAX_HISTORY_PAGE = 500
SEED_CLAIM_MARGIN = 5.0  # seconds a seeding claim outlives the seed timeout
SEED_CLAIM_POLL = 0.05  # seconds between looks at another node's seeding


def jsonable(value: Any) -> Any:
    """Plain JSON data: numbers that are whole come back as ints (pycrdt reads every number as a float)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    return value


def mask_secrets(value: Any) -> Any:
    """Values under secret-looking keys become "***" (a refused secret must not land in the audit trail)."""
    if isinstance(value, dict):
        return {
            k: "***" if SECRET_KEYS.match(str(k)) and v not in (None, "") else mask_secrets(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_secrets(v) for v in value]
    return value


def change_list(changes: Changes, paths: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for path in sorted(changes if paths is None else paths):
        if path not in changes:
            continue
        old, new = changes[path]
        secret = any(SECRET_KEYS.match(part) for part in path.split("."))
        entry: dict[str, Any] = {"path": path}
        if old is not MISSING:
            entry["old"] = "***" if secret and old not in (None, "") else mask_secrets(jsonable(old))
        if new is not MISSING:
            entry["new"] = "***" if secret and new not in (None, "") else mask_secrets(jsonable(new))
        out.append(entry)
    return out


def author_of(ps: PeerState | None) -> dict[str, Any] | None:
    identity = getattr(ps, "identity", None)
    if identity is None:
        return None
    return {"id": identity.user_id, "name": identity.name, "role": getattr(identity, "role", None)}


class ForwardingExtension(Extension):
    name = "forwarding"

    def __init__(self, settings: ForwardingSettings | None = None) -> None:
        self.settings = settings or ForwardingSettings()
        model = load_model(self.settings.config_model)
        self.validator = ConfigValidator(model) if model is not None else None
        self.app: Host | None = None
        self.store: Any = None
        self.recording = False  # the store keeps an outbox and an audit trail
        self.forwarder: Forwarder | None = None
        self._fence_for = None
        self._seeding: set[int] = set()  # id() of rooms writing their initial state
        self._authoring: dict[int, dict[str, Any]] = {}  # id() of rooms making a server change -> its author
        self.hooks = _RoomHooks(self)
        self.sync = BackendSync(self)
        self.seqs: dict[str, int] = {}  # last change sequence number stored per workspace (HTTP ETags)
        from forwarding.edits import BulkJobs, ConfigEdits

        self.edits = ConfigEdits(self)
        self.bulk = BulkJobs(self)

    # ------------------------------------------------------------ extension

    def guards(self) -> list:
        return [ValidationGuard(self.validator, self.settings.max_config_fields)] if self.validator is not None else []

    def listeners(self) -> list:
        return [self.hooks]

    def control_routes(self) -> list[ControlRoute]:
        return [ControlRoute("forward.status", self._control_status)]

    def routes(self) -> list:
        base = "/api/workspaces/{workspace_id}"
        viewer, editor = workspace_role("viewer"), workspace_role("editor")
        return [
            GatedRoute(f"{base}/history", self._api_history, methods=["GET"], requires=viewer),
            GatedRoute(f"{base}/forwarding", self._api_status, methods=["GET"], requires=viewer),
            GatedRoute(f"{base}/dead-letters", self._api_dead_letters, methods=["GET"], requires=viewer),
            GatedRoute(
                f"{base}/dead-letters/{{key}}/retry", self._api_dead_letter_retry, methods=["POST"], requires=editor
            ),
            GatedRoute(
                f"{base}/dead-letters/{{key}}", self._api_dead_letter_discard, methods=["DELETE"], requires=editor
            ),
            GatedRoute(
                f"{base}/backend-changes", self._api_backend_changes, methods=["POST"], requires=service("backend")
            ),
            *self.edits.routes(),
            *self.bulk.routes(),
        ]

    async def start(self, app: Host) -> None:
        self.app = app
        self.store = app.store
        gate = getattr(app, "gate", None)
        if gate is not None and self.settings.backend_token:
            gate.service_tokens["backend"] = self.settings.backend_token  # the change hook's credential
        self.recording = isinstance(self.store, OutboxStore)
        for ext in app.extensions:
            if ext is not self and callable(getattr(ext, "fence_for", None)):
                self._fence_for = ext.fence_for
                break
        if self.validator is not None:
            log.info("validating configurations with %s", self.validator.name)
        else:
            log.warning("configuration validation is off (COLLAB_CONFIG_MODEL is empty)")
        if not self.recording:
            log.warning("the store %s keeps no outbox: changes are neither recorded nor forwarded", type(self.store))
            return
        if self.settings.backend_url is None:
            log.warning(
                "forwarding is OFF: COLLAB_BACKEND_URL is not set; accepted changes are recorded in the outbox "
                "and will be delivered once a backend is configured"
            )
            await self.bulk.start()
            return
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self.forwarder = Forwarder(self.settings, self.store, self._report)
        counters = getattr(app, "counters", None)
        if counters is not None:
            self.forwarder.on_request = counters.observe_forward
        self.forwarder.sync = self.sync
        await self.forwarder.start()
        self.sync.start(self.settings.backend_pull_seconds)
        await self.bulk.start()  # unfinished jobs resume (after the forwarder: new workspaces are seeded)
        log.info(
            "forwarding accepted changes to %s (debounce %.0f ms, at most %.0f ms)",
            self.settings.backend_url,
            self.settings.forward_debounce_ms,
            self.settings.forward_max_delay_ms,
        )

    def closing(self) -> None:
        self.bulk.closing()

    async def stop(self) -> None:
        await self.bulk.stop()
        await self.sync.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()

    # ------------------------------------------------------ server changes

    @contextlib.contextmanager
    def authoring(self, room: Room, author: dict[str, Any], details: dict[str, Any] | None = None, fence=None):
        """Within: a server change of ``room`` is recorded with this author (not the server's).

        Yields a dict whose ``"record"`` is then the ChangeRecord staged (its
        ``seq`` is set once it is stored).
        """
        override = {"author": author, "details": details, "fence": fence, "record": None}
        self._authoring[id(room)] = override
        try:
            yield override
        finally:
            self._authoring.pop(id(room), None)

    def lock_extension(self) -> Any:
        """The lock feature, if the server runs it (for lock holders and tokens)."""
        for ext in self.app.extensions if self.app is not None else []:
            if (
                ext is not self
                and callable(getattr(ext, "locks", None))
                and callable(getattr(ext, "connection_id", None))
            ):
                return ext
        return None

    async def last_seq(self, workspace: str) -> int:
        """The workspace's last change sequence number (stored changes only)."""
        if workspace not in self.seqs:
            status = await self.store.forward_status(workspace)
            self.seqs[workspace] = max(self.seqs.get(workspace, 0), status["recorded_seq"])
        return self.seqs[workspace]

    def admin_summary(self) -> dict[str, Any]:
        return {"forwarding": self.forwarder.summary()} if self.forwarder is not None else {}

    def metrics(self) -> Iterable[Metric]:
        if self.forwarder is None:
            return
        summary = self.forwarder.summary()
        yield gauge("collab_forward_lanes", "Workspaces with changes being delivered", summary["lanes"])
        yield gauge("collab_forward_lanes_retrying", "Workspaces whose delivery is being retried",
                    summary["lanes_retrying"])  # fmt: skip
        yield gauge("collab_forward_backend_down", "1 while the backend is unreachable (circuit open)",
                    int(summary["backend_down"]))  # fmt: skip

    def error_counts(self) -> dict[str, int]:
        if self.forwarder is None:
            return {}
        stats = self.forwarder.stats
        return {
            "forward_failed": stats.get("failures", 0),
            "forward_refused": stats.get("refused", 0),
            "forward_dead_letter": stats.get("dead", 0),
        }

    async def check(self) -> str | None:
        """Readiness: the data-source backend answers (when forwarding is on).

        Raises while it is unreachable if COLLAB_READY_REQUIRES_BACKEND (the
        default); otherwise only reports it.
        """
        if self.forwarder is None:
            return None if self.settings.backend_url is None or not self.recording else "ok (forwarding not started)"
        error = await self.forwarder.probe()
        if error is None:
            return None
        message = f"backend {self.settings.backend_url} unreachable ({error})"
        if self.settings.ready_requires_backend:
            raise RuntimeError(message)
        return f"ok; {message}, not required"

    # ---------------------------------------------------------- room events

    def _report(self, workspace: str, body: dict[str, Any]) -> None:
        """A forwarding event for the peers of a loaded room (those that opted in)."""
        room = self.app.rooms.rooms.get(workspace) if self.app is not None else None
        if room is None:
            return
        for ps in list(room.peers.values()):
            ps.control(body)

    def fence(self, room: Room, ps: PeerState | None, paths: list[str]) -> int | None:
        if self._fence_for is None:
            return None
        try:
            fence = self._fence_for(room, ps, paths)
        except Exception:
            log.exception("fence_for failed in %s", room.workspace_id)
            return None
        return fence if isinstance(fence, int) else None

    async def seed(self, room: Room) -> None:
        """A new workspace starts from the backend's data source: once, before anyone joins."""
        if not (room.is_new and self.recording and self.forwarder is not None):
            return
        workspace = room.workspace_id
        owner = await self._claim_seed(room)
        if owner is None:
            return  # seeded before, or by another node meanwhile (the room has its result)
        try:
            await self._seed(room, workspace)
        finally:
            await self.store.release_seed(workspace, owner)

    async def _claim_seed(self, room: Room) -> str | None:
        """Wait for the one seeding claim of a new workspace (across nodes); None if it is seeded already.

        Two nodes opening a never-seen workspace at once both find it unseeded;
        only the one that claims it reads the backend. The other waits for the
        seed to land, then loads it, so its peers too start from the seeded
        document.
        """
        assert self.forwarder is not None
        workspace = room.workspace_id
        node = self.app.settings.node_id if self.app is not None else "node"
        owner = f"{node}/{secrets.token_hex(6)}"
        patience = self.settings.seed_timeout_seconds + SEED_CLAIM_MARGIN
        ttl_ms = int(patience * 1000)
        deadline = time.monotonic() + patience
        while True:
            claim = await self.store.claim_seed(workspace, owner, ttl_ms)
            if claim == "claimed":
                return owner
            if claim == "seeded":
                await self._catch_up(room)
                return None
            if time.monotonic() > deadline:
                raise SeedError(f"{workspace} is being seeded by another node; gave up waiting")
            await asyncio.sleep(SEED_CLAIM_POLL)

    async def _catch_up(self, room: Room) -> None:
        """Bring a room loaded empty up to what was stored since (another node's seed)."""
        stored = await self.store.load(room.workspace_id)
        if stored.last_seq <= room.durable_seq:
            return
        if stored.snapshot is not None:
            room.apply_remote(stored.snapshot)
        for update in stored.updates:
            room.apply_remote(update)
        room.durable_seq = max(room.durable_seq, stored.last_seq)

    async def _seed(self, room: Room, workspace: str) -> None:
        assert self.forwarder is not None
        try:
            status, config, seq, version = await self.forwarder.fetch_initial(workspace)
        except SeedError as exc:
            log.warning("%s", exc)
            raise
        record = ChangeRecord(
            kind=SEEDED,
            author={"id": "backend", "name": "data-source backend"},
            changes=[],
            reason="found" if config else "not_found" if status == 404 else "empty",
            seed_seq=seq,
            details={"status": status, "backend_seq": seq},
        )
        if config:
            if self.validator is not None:
                errors = self.validator.errors(jsonable(config))
                if errors:
                    log.warning("the backend's configuration of %s is not valid here: %s", workspace, errors)
                    record.details["errors"] = errors

            def write(config_map: pycrdt.Map) -> None:
                for key, value in config.items():
                    config_map[str(key)] = to_prelim(value)

            self._seeding.add(id(room))
            try:
                room.change_config(write)
            finally:
                self._seeding.discard(id(room))
            record.changes = change_list(diff({}, room.config_view))
            record.config = jsonable(room.config_view)
        record.details["version"] = version
        room.stage_outbox(record)
        await room.drain()
        if room.failed:
            raise StoreError(f"could not store the initial state of {workspace}: {room.failed}")
        await self.sync.remember(workspace, jsonable(config or {}), version, absent=status == 404)
        log.info("seeded %s from the backend (%s, %d fields)", workspace, record.reason, len(record.changes))

    # -------------------------------------------------------------- control

    def _control_status(self, room: Room, ps: PeerState, message) -> None:
        ref = {"id": message.body["id"]} if "id" in message.body else {}

        async def answer() -> None:
            try:
                status = await self.status(room.workspace_id)
            except StoreError as exc:
                ps.control({"type": "error", "code": "storage_failure", "message": str(exc), **ref})
                return
            ps.control({"type": "forward.status", **status, **ref})

        asyncio.get_running_loop().create_task(answer())

    async def status(self, workspace: str) -> dict[str, Any]:
        status: dict[str, Any] = {"workspace": workspace, "recording": self.recording}
        status["forwarding"] = self.forwarder is not None
        status["backend"] = self.settings.backend_url
        if self.recording:
            status.update(await self.store.forward_status(workspace))
        if self.forwarder is not None:
            status["lane"] = self.forwarder.lane_state(workspace)
        return status

    # ------------------------------------------------------------------ API

    def _workspace(self, request: Request) -> str | JSONResponse:
        """The workspace the gate let this request into, if this store records changes."""
        if not self.recording:
            return JSONResponse({"error": "this store keeps no outbox or audit trail"}, status_code=501)
        return request.state.workspace_id

    async def _api_history(self, request: Request) -> JSONResponse:
        workspace = self._workspace(request)
        if isinstance(workspace, JSONResponse):
            return workspace
        try:
            limit = min(max(int(request.query_params.get("limit", 50)), 1), MAX_HISTORY_PAGE)
            before_text = request.query_params.get("before")
            before = int(before_text) if before_text else None
        except ValueError:
            return JSONResponse({"error": "before and limit must be integers"}, status_code=400)
        entries = await self.store.history(workspace, before, limit)
        next_before = entries[-1]["id"] if len(entries) == limit else None
        return JSONResponse({"workspace": workspace, "entries": entries, "next_before": next_before})

    async def _api_status(self, request: Request) -> JSONResponse:
        workspace = self._workspace(request)
        if isinstance(workspace, JSONResponse):
            return workspace
        return JSONResponse(await self.status(workspace))

    async def _api_dead_letters(self, request: Request) -> JSONResponse:
        workspace = self._workspace(request)
        if isinstance(workspace, JSONResponse):
            return workspace
        return JSONResponse({"workspace": workspace, "dead_letters": await self.store.dead_letters(workspace)})

    async def _api_dead_letter_retry(self, request: Request) -> JSONResponse:
        workspace = self._workspace(request)
        if isinstance(workspace, JSONResponse):
            return workspace
        count = await self.store.dead_letter_retry(workspace, request.path_params["key"])
        if not count:
            return JSONResponse({"error": "no such dead letter"}, status_code=404)
        if self.forwarder is not None:
            self.forwarder.wake(workspace)
        return JSONResponse({"requeued": count})

    async def _api_backend_changes(self, request: Request) -> JSONResponse:
        """The backend's change hook: a data source changed outside the server; merge it into the document.

        The gate let the backend in (``service("backend")``: COLLAB_BACKEND_TOKEN, a
        service-role JWT, or a server admin).
        """
        workspace = self._workspace(request)
        if isinstance(workspace, JSONResponse):
            return workspace
        try:
            body = await request.json()
        except Exception:  # not JSON, or the caller went away
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict) or not isinstance(body.get("config"), dict):
            return JSONResponse({"error": "send {config: {...}, version}"}, status_code=400)
        version = version_text(body.get("version"))
        try:
            paths = await self.sync.apply(workspace, jsonable(body["config"]), version, "push")
        except Exception as exc:  # store, room limit, a new workspace that cannot be seeded now
            log.warning("backend change of %s not applied: %s", workspace, exc)
            return JSONResponse({"error": f"cannot apply it now: {exc}"}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse(
            {"workspace": workspace, "version": version, "applied": paths is not None, "paths": paths or []}
        )

    async def _api_dead_letter_discard(self, request: Request) -> JSONResponse:
        workspace = self._workspace(request)
        if isinstance(workspace, JSONResponse):
            return workspace
        count = await self.store.dead_letter_discard(workspace, request.path_params["key"], time.time())
        if not count:
            return JSONResponse({"error": "no such dead letter"}, status_code=404)
        return JSONResponse({"discarded": count})


class ConfigEncoder:
    """A room's configuration as plain JSON data and JSON text, re-encoded only where a change touched it.

    Every accepted change records the whole configuration after it (the
    forwarder sends the last one of a batch); encoding all of it per change
    would cost the size of the configuration each time. Each top-level
    section's plain value and JSON text are kept until that section changes.
    """

    def __init__(self) -> None:
        self._sections = SectionCache(self._section)

    @staticmethod
    def _section(key: str, value: Any) -> tuple[Any, str]:
        plain = jsonable(value)
        return plain, _encode_json(str(key)) + ":" + _encode_json(plain)

    def encode(self, config: dict[str, Any]) -> tuple[dict[str, Any], str]:
        plain: dict[str, Any] = {}
        parts: list[str] = []
        for key, (value, text) in self._sections.items(config):
            plain[str(key)] = value
            parts.append(text)
        return plain, "{" + ",".join(parts) + "}"


def _encode_json(value: Any) -> str:
    return _JSON.encode(value)


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


class _RoomHooks:
    """The room listener of the extension (see rooms.room.RoomListener)."""

    def __init__(self, ext: ForwardingExtension) -> None:
        self.ext = ext
        self._encoders: weakref.WeakKeyDictionary[Room, ConfigEncoder] = weakref.WeakKeyDictionary()

    def _encoder(self, room: Room) -> ConfigEncoder:
        encoder = self._encoders.get(room)
        if encoder is None:
            encoder = self._encoders[room] = ConfigEncoder()
        return encoder

    async def on_load(self, room: Room) -> None:
        ext = self.ext
        new = room.is_new
        await ext.seed(room)
        if not new and ext.forwarder is not None and ext.settings.backend_pull_on_open:
            # What changed at the backend while the workspace was closed (not awaited: the
            # room opens without waiting for the backend; the merge follows as a server change).
            workspace = room.workspace_id
            ext.sync.spawn(ext.sync.refresh(workspace, "open"), f"pull on open of {workspace}")

    def on_config_change(self, room: Room, ps: PeerState | None, changes: Changes, config: dict) -> None:
        ext = self.ext
        if not ext.recording or id(room) in ext._seeding:
            return
        paths = sorted(changes)
        override = ext._authoring.get(id(room))
        plain, text = self._encoder(room).encode(config)
        record = ChangeRecord(
            kind=ACCEPTED,
            author=override["author"] if override else author_of(ps),
            changes=change_list(changes),
            config=plain,
            config_json=text,
            fence=override["fence"] if override else ext.fence(room, ps, paths),
            details=override["details"] if override else None,
            forward=True,
        )
        if override:
            override["record"] = record
        room.stage_outbox(record)

    def on_config_rejected(self, room: Room, ps: PeerState | None, rejections: list, attempted: Changes) -> None:
        paths = sorted({path for r in rejections for path in r.paths})
        log.info(
            "refused change workspace=%s user=%s paths=%s: %s",
            room.workspace_id,
            getattr(getattr(ps, "identity", None), "user_id", "-"),
            ",".join(paths),
            "; ".join(sorted({r.reason for r in rejections})),
        )
        if not self.ext.recording:
            return
        # Paths refused without their values (a viewer's update, a size cap) are listed bare.
        changes = change_list(attempted, paths) + [{"path": path} for path in paths if path not in attempted]
        room.stage_outbox(
            ChangeRecord(
                kind=REJECTED,
                author=author_of(ps),
                changes=changes,
                reason=", ".join(sorted({r.reason for r in rejections})),
                details={"rejections": [{"paths": r.paths, "reason": r.reason, **r.details} for r in rejections]},
            )
        )

    def on_outbox_persisted(self, room: Room, records: list) -> None:
        seqs = [r.seq for r in records if r.seq is not None]
        if seqs:
            ws = room.workspace_id
            self.ext.seqs[ws] = max(self.ext.seqs.get(ws, 0), *seqs)
        if self.ext.forwarder is not None:
            self.ext.forwarder.notify(room.workspace_id, records)
