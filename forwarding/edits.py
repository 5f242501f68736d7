"""Edits by non-CRDT callers: ``PATCH /api/workspaces/{id}/config`` and bulk jobs (``/api/bulk``).

An HTTP edit is a JSON Merge Patch (RFC 7396) of the configuration, applied
as one server change under the rules of a websocket edit: the editor role,
locks (409 naming the holder unless the caller presents the lock's token in
``X-Lock-Token``), validation (422 with the ``rejected`` shape), an audit
entry with the caller as author, forwarding, broadcast. ``If-Match: <seq>``
(the workspace's change sequence number, also its ``ETag``) makes it
conditional (412 when the workspace moved on). A workspace that is not open
is opened for the edit and evicted after the usual grace.

Bulk jobs (:class:`BulkJobs`) apply one patch to many workspaces, as the
platform's ``bulkUpdate`` does; see the class.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from collab.auth import AuthError
from collab.gate import WORKSPACE_ID, GatedRoute, GateError, server_role, workspace_role
from forwarding.backendsync import merge_patch, set_plain, write_paths
from persistence.base import StoreError
from rooms.config import MISSING, diff, get_path, overlaps
from rooms.manager import RoomLimitReached

if TYPE_CHECKING:
    from forwarding.extension import ForwardingExtension

log = logging.getLogger("collab.edits")

MERGE_PATCH = "application/merge-patch+json"


class EditRefused(Exception):
    """An edit that does not stand: HTTP status and answer body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error", "refused"))
        self.status = status
        self.body = body


def parse_seq(header: str | None) -> int | None:
    """``If-Match: "12"`` (or ``12``, ``W/"12"``) -> 12; something else never matches (-1)."""
    if header is None:
        return None
    text = header.strip().removeprefix("W/").strip('"')
    try:
        return int(text)
    except ValueError:
        return -1


def caller(identity: Any, via: str) -> dict[str, Any]:
    return {
        "id": getattr(identity, "user_id", None),
        "name": getattr(identity, "name", None),
        "role": getattr(identity, "role", None),
        "via": via,
    }


class ConfigEdits:
    """Applies merge patches to workspaces as server changes (HTTP API and bulk jobs)."""

    def __init__(self, ext: ForwardingExtension) -> None:
        self.ext = ext

    def routes(self) -> list:
        path = "/api/workspaces/{workspace_id}/config"
        return [
            GatedRoute(path, self._api_get, methods=["GET"], requires=workspace_role("viewer")),
            GatedRoute(path, self._api_patch, methods=["PATCH"], requires=workspace_role("editor")),
        ]

    async def apply(
        self,
        workspace: str,
        patch: dict[str, Any],
        author: dict[str, Any],
        if_match: int | None = None,
        lock_token: str | None = None,
        details: dict[str, Any] | None = None,
        only_if: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Apply ``patch``; answers ``{seq, config, paths}`` or raises EditRefused.

        ``only_if`` (path -> value): paths changed only where they still hold
        that value (a compensating change leaves alone what others changed since).
        """
        from forwarding.extension import jsonable

        ext = self.ext
        sync = ext.sync
        async with sync.lock(workspace):
            room = await sync.open(workspace)
            try:
                if if_match is not None:
                    await room.drain()  # what was received before is counted in the seq
                    seq = await ext.last_seq(workspace)
                    if if_match != seq:
                        raise EditRefused(412, {"error": "the workspace moved on", "seq": seq})
                old = jsonable(room.config_view)
                new = merge_patch(old, patch)
                changes = diff(old, new)
                if only_if is not None:
                    keep = [p for p in changes if any(overlaps(p, q) for q in only_if)]
                    skip = {p for p in keep for q, v in only_if.items() if overlaps(p, q) and get_path(old, q) != v}
                    for path in [p for p in changes if p not in keep or p in skip]:
                        del changes[path]
                    target = old
                    for path in changes:
                        target = set_plain(target, path, get_path(new, path))
                    for path in list(changes):  # a section the patch removes goes if nothing else is left in it
                        parts = path.split(".")
                        for depth in range(1, len(parts)):
                            section = ".".join(parts[:depth])
                            if get_path(target, section) == {} and get_path(patch, section) is None:
                                target = set_plain(target, section, MISSING)
                                changes[section] = (get_path(old, section), MISSING)
                                break
                    new = target
                if not changes:
                    sync.release(room)
                    return {"seq": await ext.last_seq(workspace), "config": old, "paths": []}
                fence = await self._check_locks(workspace, list(changes), lock_token)
                # The room's update guards, as for a websocket edit (validation, and whatever
                # else the server runs; the lock guard is the check above: it needs a connection).
                for guard in room.guards:
                    rejections = guard.check(room, None, changes, new)
                    if rejections:
                        first = rejections[0]
                        raise EditRefused(
                            409 if first.reason == "locked" else 422,
                            {
                                "error": "locked" if first.reason == "locked" else "invalid configuration",
                                "type": "rejected",
                                "paths": first.paths,
                                "reason": first.reason,
                                **first.details,
                            },
                        )
                paths = sorted(changes)
                with ext.authoring(room, author, details, fence) as made:
                    room.change_config(lambda _map: write_paths(room, new, paths))
                config = jsonable(room.config_view)
            except BaseException:
                sync.release(room)
                raise
        # Durable before the answer, but outside the workspace's lock: the next edit of the
        # same workspace need not wait for this commit (edits share the store's group commit).
        try:
            await room.drain()
        finally:
            sync.release(room)
        if room.failed:
            raise EditRefused(503, {"error": f"storage failure: {room.failed}"})
        record = made["record"]
        seq = record.seq if record is not None and record.seq is not None else await ext.last_seq(workspace)
        return {"seq": seq, "config": config, "paths": paths}

    async def _check_locks(self, workspace: str, paths: list[str], token: str | None) -> int | None:
        """409 for paths under another holder's lease; the fence of the caller's own (token) lease."""
        locks = self.ext.lock_extension()
        if locks is None:
            return None
        fence = None
        for lease in await locks.current_locks(workspace):
            if lease.get("expires_at", 0) and lease["expires_at"] < time.time():
                continue
            hit = [p for p in paths if overlaps(lease["path"], p)]
            if not hit:
                continue
            if token and locks.lease_with_token(workspace, lease["path"], token) is not None:
                fence = max(fence or 0, lease["fence"])
                continue
            raise EditRefused(
                409,
                {
                    "error": "locked",
                    "paths": hit,
                    "path": lease["path"],
                    "holder": lease["holder"],
                    "user_id": lease["user_id"],
                    "name": lease["name"],
                    "expires_at": lease["expires_at"],
                },
            )
        return fence

    # ------------------------------------------------------------------ HTTP

    def _workspace(self, request: Request) -> tuple[str, Any]:
        """The workspace and the caller the gate let in."""
        if not self.ext.recording:
            raise HTTPException(501, "this store keeps no outbox or audit trail")
        return request.state.workspace_id, request.state.identity

    async def _api_get(self, request: Request) -> JSONResponse:
        """The configuration of a workspace, with its change sequence number as ETag."""
        from forwarding.extension import jsonable

        workspace, _ = self._workspace(request)
        room = await self._open(workspace)
        try:
            await room.drain()
            seq = await self.ext.last_seq(workspace)
            config = jsonable(room.config_view)
        finally:
            self.ext.sync.release(room)
        return JSONResponse({"workspace": workspace, "seq": seq, "config": config}, headers={"ETag": f'"{seq}"'})

    async def _open(self, workspace: str):
        try:
            return await self.ext.sync.open(workspace)
        except (RoomLimitReached, StoreError) as exc:
            raise HTTPException(503, f"cannot open the workspace now: {exc}", headers={"Retry-After": "1"}) from None
        except Exception as exc:  # the backend could not seed a new workspace
            raise HTTPException(503, f"cannot open the workspace now: {exc}", headers={"Retry-After": "1"}) from None

    async def _api_patch(self, request: Request) -> JSONResponse:
        """Apply a JSON Merge Patch to the configuration (RFC 7396)."""
        workspace, identity = self._workspace(request)
        kind = request.headers.get("content-type", MERGE_PATCH).split(";")[0].strip().lower()
        if kind not in (MERGE_PATCH, "application/json"):
            raise HTTPException(415, f"send {MERGE_PATCH}")
        try:
            patch = json.loads(await request.body())
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        if not isinstance(patch, dict):
            raise HTTPException(400, "a merge patch of the configuration must be a JSON object")
        await self._open(workspace)  # 503 now rather than inside the edit
        try:
            result = await self.apply(
                workspace,
                patch,
                caller(identity, "http"),
                if_match=parse_seq(request.headers.get("if-match")),
                lock_token=request.headers.get("x-lock-token"),
            )
        except EditRefused as exc:
            headers = {"ETag": f'"{exc.body["seq"]}"'} if "seq" in exc.body else None
            return JSONResponse(exc.body, status_code=exc.status, headers=headers)
        except (RoomLimitReached, StoreError) as exc:
            raise HTTPException(503, f"cannot apply it now: {exc}", headers={"Retry-After": "1"}) from None
        return JSONResponse({"workspace": workspace, **result}, headers={"ETag": f'"{result["seq"]}"'})


# --------------------------------------------------------------------- bulk

JOBS = "~bulk"  # metadata "workspace" of the jobs (not a valid workspace id: no clash)
APPLIED, REFUSED, ROLLED_BACK, SKIPPED, PENDING, APPLYING = (
    "applied",
    "refused",
    "rolled_back",
    "skipped",
    "pending",
    "applying",
)


@dataclass(slots=True)
class _Job:
    data: dict[str, Any]
    items: dict[str, dict[str, Any]]
    task: asyncio.Task | None = None
    listeners: set[asyncio.Queue] | None = None
    in_flight: int = 0

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for item in self.items.values():
            counts[item["state"]] = counts.get(item["state"], 0) + 1
        return {**self.data, "counts": counts}


class BulkJobs:
    """``POST /api/bulk``: one merge patch for many workspaces, as a stored job.

    Workspaces go in batches of ``batch_size``, at most ``parallelism`` at
    once; each item is an ordinary HTTP edit (same checks, audited with the
    caller as author and the job's id). An item refused (validation, a lock,
    a role) is reported with its reason; with ``rollback_on_failure`` the
    job stops starting new items and undoes the applied ones by
    compensating changes (audited as such; history is not rewritten).

    The job and every item's state are stored in the workspace metadata of
    the store, an item's state before and after it is applied; a job found
    unfinished at start (a crash, ``kill -9``) goes on where it was. An item
    caught between "applying" and "applied" is applied again: a merge patch
    already in effect changes nothing, so no item takes effect twice.
    """

    def __init__(self, ext: ForwardingExtension) -> None:
        self.ext = ext
        self.jobs: dict[str, _Job] = {}
        self._write = asyncio.Lock()
        self._closing = False

    def routes(self) -> list:
        return [
            # Server-wide grants (a job names many workspaces); each workspace is checked too.
            GatedRoute("/api/bulk", self._api_create, methods=["POST"], requires=server_role("editor")),
            GatedRoute("/api/bulk/{job}", self._api_get, methods=["GET"], requires=server_role("viewer")),
            GatedRoute("/api/bulk/{job}/events", self._api_events, methods=["GET"], requires=server_role("viewer")),
        ]

    # ------------------------------------------------------------ storage

    async def _save_job(self, job: _Job) -> None:
        await self.ext.store.put_meta(JOBS, f"job:{job.data['id']}", json.dumps(job.data).encode())

    async def _save_item(self, job: _Job, item: dict[str, Any]) -> None:
        key = f"item:{job.data['id']}:{item['workspace']}"
        await self.ext.store.put_meta(JOBS, key, json.dumps(item).encode())

    async def _index(self) -> list[str]:
        raw = await self.ext.store.get_meta(JOBS, "unfinished")
        return json.loads(raw) if raw else []

    async def _set_index(self, add: str | None = None, remove: str | None = None) -> None:
        async with self._write:
            ids = await self._index()
            if add and add not in ids:
                ids.append(add)
            if remove in ids:
                ids.remove(remove)
            await self.ext.store.put_meta(JOBS, "unfinished", json.dumps(ids).encode())

    async def _load(self, job_id: str) -> _Job | None:
        raw = await self.ext.store.get_meta(JOBS, f"job:{job_id}")
        if raw is None:
            return None
        data = json.loads(raw)
        items = {}
        for ws in data["workspaces"]:
            item_raw = await self.ext.store.get_meta(JOBS, f"item:{job_id}:{ws}")
            items[ws] = json.loads(item_raw) if item_raw else {"workspace": ws, "state": PENDING}
        return _Job(data, items, listeners=set())

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            for job_id in await self._index():
                job = await self._load(job_id)
                if job is None:
                    continue
                log.warning("bulk job %s was unfinished at start (%s): resuming", job_id, job.data["state"])
                job.data["resumed"] = job.data.get("resumed", 0) + 1  # stored with its next state
                self.jobs[job_id] = job
                self._run(job)
        except StoreError as exc:
            log.error("cannot read unfinished bulk jobs: %s", exc)

    def closing(self) -> None:
        self._closing = True
        for job in self.jobs.values():
            for queue in list(job.listeners or ()):
                queue.put_nowait(None)

    async def stop(self) -> None:
        tasks = [job.task for job in self.jobs.values() if job.task is not None and not job.task.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _run(self, job: _Job) -> None:
        job.task = asyncio.get_running_loop().create_task(self._execute(job), name=f"bulk {job.data['id']}")

    # ------------------------------------------------------------ running

    async def _execute(self, job: _Job) -> None:
        data = job.data
        try:
            if data["state"] in ("pending", "running"):
                await self._set_state(job, "running")
                await self._apply_all(job)
            if data["state"] == "rolling_back":
                await self._rollback(job)
            elif data["state"] == "running":
                refused = sum(1 for i in job.items.values() if i["state"] == REFUSED)
                await self._set_state(job, "completed_with_failures" if refused else "completed")
            await self._set_index(remove=data["id"])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bulk job %s failed; it resumes at the next start", data["id"])
        finally:
            self._publish(job, {"type": "job", **job.summary()}, final=data["state"] not in ("running", "rolling_back"))

    async def _apply_all(self, job: _Job) -> None:
        data = job.data
        workspaces = data["workspaces"]
        size = data["batch_size"]
        limit = asyncio.Semaphore(data["parallelism"])
        for start in range(0, len(workspaces), size):
            batch = [ws for ws in workspaces[start : start + size] if job.items[ws]["state"] in (PENDING, APPLYING)]

            async def one(ws: str) -> None:
                async with limit:
                    job.in_flight += 1
                    data["max_in_flight"] = max(data.get("max_in_flight", 0), job.in_flight)
                    try:
                        await self._apply_item(job, job.items[ws])
                    finally:
                        job.in_flight -= 1

            await asyncio.gather(*(one(ws) for ws in batch))
            failed = any(i["state"] == REFUSED for i in job.items.values())
            if failed and data["rollback_on_failure"]:
                for item in job.items.values():
                    if item["state"] == PENDING:
                        item["state"] = SKIPPED
                        await self._save_item(job, item)
                        self._publish(job, {"type": "item", **item})
                await self._set_state(job, "rolling_back")
                return

    async def _apply_item(self, job: _Job, item: dict[str, Any]) -> None:
        from forwarding.extension import jsonable

        ws = item["workspace"]
        data = job.data
        details = {"bulk_job": data["id"]}
        try:
            if item["state"] == PENDING:
                room = await self.ext.sync.open(ws)
                try:
                    item["before"] = jsonable(room.config_view)
                finally:
                    self.ext.sync.release(room)
                item["state"] = APPLYING
                await self._save_item(job, item)
            result = await self.ext.edits.apply(ws, data["patch"], data["author"], details=details)
            paths = result["paths"]
            if not paths and item.get("before") is not None:
                # Applied again after a crash: it was in effect already; what it changed still counts.
                wanted = merge_patch(item["before"], data["patch"])
                paths = sorted(
                    p for p in diff(item["before"], wanted) if get_path(result["config"], p) == get_path(wanted, p)
                )
            item.update(state=APPLIED, seq=result["seq"], paths=paths)
            item["after"] = {p: get_path(result["config"], p) for p in paths}
        except EditRefused as exc:
            item.update(state=REFUSED, status=exc.status, reason=exc.body.get("reason") or exc.body.get("error"))
            item["error"] = exc.body
        except Exception as exc:  # the workspace cannot be opened (store, backend for seeding...)
            item.update(state=REFUSED, status=503, reason=f"{type(exc).__name__}: {exc}")
        await self._save_item(job, item)
        self._publish(job, {"type": "item", **_public(item)})

    async def _rollback(self, job: _Job) -> None:
        data = job.data
        limit = asyncio.Semaphore(data["parallelism"])

        async def one(item: dict[str, Any]) -> None:
            async with limit:
                before = item.get("before") or {}
                paths = item.get("paths") or []
                patch: dict[str, Any] = {}
                for path in paths:
                    # The shallowest section the item created goes as a whole (no empty map left behind).
                    parts = path.split(".")
                    created = next(
                        (
                            ".".join(parts[:d])
                            for d in range(1, len(parts))
                            if get_path(before, ".".join(parts[:d])) is MISSING
                        ),
                        path,
                    )
                    patch = _combine(patch, _patch_for(created, get_path(before, created)))
                try:
                    await self.ext.edits.apply(
                        item["workspace"],
                        patch,
                        {**data["author"], "via": "bulk-rollback"},
                        details={"bulk_job": data["id"], "compensation": True},
                        only_if=item.get("after") or {},
                    )
                    item["state"] = ROLLED_BACK
                except EditRefused as exc:
                    item["rollback_error"] = exc.body
                    item["state"] = ROLLED_BACK if exc.status == 409 else item["state"]
                await self._save_item(job, item)
                self._publish(job, {"type": "item", **_public(item)})

        await asyncio.gather(*(one(i) for i in job.items.values() if i["state"] in (APPLIED, APPLYING)))
        await self._set_state(job, "rolled_back")

    async def _set_state(self, job: _Job, state: str) -> None:
        job.data["state"] = state
        job.data["updated_at"] = time.time()
        await self._save_job(job)
        self._publish(job, {"type": "job", **job.summary()})

    def _publish(self, job: _Job, event: dict[str, Any], final: bool = False) -> None:
        for queue in list(job.listeners or ()):
            queue.put_nowait(event)
            if final:
                queue.put_nowait(None)

    # ------------------------------------------------------------------ HTTP

    async def _api_create(self, request: Request) -> JSONResponse:
        """Create a bulk job: one merge patch for many workspaces."""
        app = self.ext.app
        if app is None:
            raise HTTPException(503, "not started")
        if not self.ext.recording:
            raise HTTPException(501, "this store keeps no outbox or audit trail")
        try:
            body = await request.json()
        except ValueError:
            raise HTTPException(400, "the body is not JSON") from None
        workspaces = body.get("workspaces") if isinstance(body, dict) else None
        patch = body.get("patch") if isinstance(body, dict) else None
        if not isinstance(workspaces, list) or not workspaces or not isinstance(patch, dict):
            raise HTTPException(400, "send {workspaces: [...], patch: {...}}")
        if len(workspaces) > self.ext.settings.bulk_max_workspaces:
            raise HTTPException(400, f"at most {self.ext.settings.bulk_max_workspaces} workspaces per job")
        if len(set(workspaces)) != len(workspaces) or not all(
            isinstance(ws, str) and WORKSPACE_ID.fullmatch(ws) for ws in workspaces
        ):
            raise HTTPException(400, "workspaces must be distinct valid workspace ids")
        try:
            batch_size = int(body.get("batch_size", 50))
            parallelism = int(body.get("parallelism", 4))
        except (TypeError, ValueError):
            raise HTTPException(400, "batch_size and parallelism are integers") from None
        if not 1 <= batch_size <= 10_000 or not 1 <= parallelism <= 64:
            raise HTTPException(400, "batch_size 1..10000, parallelism 1..64")
        identity = request.state.identity
        editor = workspace_role("editor")
        for ws in workspaces:  # the editor role in every workspace named (a grant may name one lower)
            try:
                app.gate.authorize(await app.authenticator.authenticate(request, ws), editor, request)
            except (AuthError, GateError) as exc:
                raise HTTPException(403, f"{ws}: {getattr(exc, 'reason', exc)}") from None
        job_id = secrets.token_hex(8)
        data = {
            "id": job_id,
            "state": "pending",
            "workspaces": workspaces,
            "patch": patch,
            "batch_size": batch_size,
            "parallelism": parallelism,
            "rollback_on_failure": bool(body.get("rollback_on_failure", False)),
            "author": caller(identity, "bulk"),
            "created_at": time.time(),
            "updated_at": time.time(),
        }
        job = _Job(data, {ws: {"workspace": ws, "state": PENDING} for ws in workspaces}, listeners=set())
        await self._save_job(job)
        await self._set_index(add=job_id)
        self.jobs[job_id] = job
        self._run(job)
        return JSONResponse(
            {
                "job": job_id,
                "state": data["state"],
                "status": f"/api/bulk/{job_id}",
                "events": f"/api/bulk/{job_id}/events",
            },
            status_code=202,
        )

    async def _job(self, request: Request) -> _Job:
        job_id = request.path_params["job"]
        job = self.jobs.get(job_id)
        if job is None and all(c in "0123456789abcdef" for c in job_id) and len(job_id) == 16:
            job = await self._load(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        return job

    async def _api_get(self, request: Request) -> JSONResponse:
        """A bulk job's state and every item's outcome."""
        job = await self._job(request)
        return JSONResponse({**_public_job(job), "items": [_public(i) for i in job.items.values()]})

    async def _api_events(self, request: Request) -> StreamingResponse:
        """Server-sent events: the job's items as they change, then the job's end."""
        job = await self._job(request)
        queue: asyncio.Queue = asyncio.Queue()
        if job.listeners is None:
            job.listeners = set()
        job.listeners.add(queue)
        done = job.data["state"] not in ("pending", "running", "rolling_back")

        async def stream():
            try:
                yield _sse("job", {"type": "job", **_public_job(job)})
                for item in list(job.items.values()):
                    yield _sse("item", {"type": "item", **_public(item)})
                if done or self._closing:
                    yield _sse("end", {"type": "end", "state": job.data["state"]})
                    return
                while True:
                    event = await queue.get()
                    if event is None:
                        yield _sse("end", {"type": "end", "state": job.data["state"]})
                        return
                    yield _sse(event["type"], event)
            finally:
                job.listeners.discard(queue)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _patch_for(path: str, value: Any) -> dict[str, Any]:
    parts = path.split(".")
    node: Any = None if value is MISSING else value
    for part in reversed(parts):
        node = {part: node}
    return node


def _combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two merge patches as one (unlike applying one to the other, its nulls stay)."""
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _combine(out[key], value)
        else:
            out[key] = value
    return out


def _public(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in ("before", "after")}


def _public_job(job: _Job) -> dict[str, Any]:
    summary = job.summary()
    return {k: v for k, v in summary.items() if k not in ("workspaces",)} | {"total": len(job.items)}


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
