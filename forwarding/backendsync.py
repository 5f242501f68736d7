"""Changes made at the backend flow into the document (push, pull, 412 merges, reverts).

The server keeps, per workspace, the *known backend state*: the data
source's configuration and ``version`` as the backend last showed them (after
seeding, after each accepted forward, after each change it announced or that
a pull found). It is the base of every three-way merge:

* the backend changed path P when P differs between the known state and the
  backend's new state;
* the server applies exactly those paths to the document, as **one** server
  change (``room.change_config``), authored ``backend`` with the backend's
  version: broadcast to every peer, stored, audited, events emitted;
* that change is an outbox row like any other (so it sits in order among the
  session's changes), but the forwarder never sends it back: a request is
  computed as *known state + the session's own changes*, and a backend row
  later in the outbox overrides the session's earlier changes of its paths
  (the backend is the system of record);
* paths under a lock are overwritten too, and the lock holder is told
  (``lock.overridden``); every opted-in peer gets ``backend.changed``.

The known state is stored with the workspace's metadata (``backend_state``),
written only after the document change is durable, so a crash in between
re-applies the same difference (which then changes nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from persistence.base import StoreError
from persistence.outbox import OutboxRow
from rooms.config import MISSING, diff, get_path, overlaps, restore

if TYPE_CHECKING:
    from forwarding.extension import ForwardingExtension
    from rooms.room import Room

log = logging.getLogger("collab.backendsync")

META_KEY = "backend_state"
STALE = object()  # apply(): the backend's answer predates the known state (read it again)
NO_BASE = object()  # apply() of a state pushed by the backend: not read against a known state
STALE_READS = 3  # reads of the backend's state while the known state keeps moving
BACKEND_AUTHOR = {"id": "backend", "name": "data-source backend", "kind": "backend"}


def is_backend_author(author: dict[str, Any] | None) -> bool:
    """A change that came from the backend (users cannot set ``kind``: it is not an identity field)."""
    return isinstance(author, dict) and author.get("kind") == "backend"


@dataclass(slots=True)
class KnownState:
    config: dict[str, Any]
    version: str | None
    absent: bool = False  # the backend answered 404: a forward creates it (If-None-Match: *)
    raw: bytes | None = field(default=None, compare=False)  # as stored (compare-and-set across nodes)


def version_text(value: Any) -> str | None:
    """A version from a body field or an ETag header, as an opaque string (quotes and W/ dropped)."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    return text or None


def older(a: str | None, b: str | None) -> bool:
    """``a`` is an older version than ``b`` (only integer versions are ordered; opaque ones never are)."""
    try:
        return a is not None and b is not None and int(a) < int(b)
    except ValueError:
        return False


def set_plain(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``config`` with ``path`` set to ``value`` (MISSING: removed); parents created."""
    out = copy.deepcopy(config)
    parts = path.split(".")
    node = out
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    if value is MISSING:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = copy.deepcopy(value)
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch on plain data (``null`` removes a member)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def write_paths(room: Room, target: dict[str, Any], paths: list[str]) -> None:
    """Inside ``room.change_config``: make ``paths`` of the document equal to ``target``'s."""
    for path in paths:
        restore(room.doc, path, target)


def in_flight(rows: list[OutboxRow]) -> list[tuple[str, dict[str, Any]]]:
    """(path, configuration sent) for each change bound to a request (claimed, answer not yet in).

    A request sets each path its batch changed to the value in the batch's
    last row; the backend may already hold it while the answer is on its way.
    """
    last: dict[str, OutboxRow] = {}
    for row in rows:
        if row.batch is not None:
            last[row.batch] = row
    return [
        (c["path"], last[row.batch].config)
        for row in rows
        if row.batch is not None and not is_backend_author(row.author)
        for c in row.changes
    ]


def echoes(path: str, config: dict[str, Any], sent: list[tuple[str, dict[str, Any]]]) -> bool:
    """The backend's value at ``path`` is one a request in flight carried there."""
    value = get_path(config, path)
    return any(overlaps(path, q) and get_path(cfg, path) == value for q, cfg in sent)


class BackendSync:
    """Applies backend states to documents; keeps the known backend state per workspace."""

    def __init__(self, ext: ForwardingExtension) -> None:
        self.ext = ext
        self.states: dict[str, KnownState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._puller: asyncio.Task | None = None
        self._merges: dict[str, int] = {}  # backend changes merged per workspace (the forwarder re-reads on news)
        self.stats = {"pulls": 0, "not_modified": 0, "applied": 0, "conflicts": 0, "reverts": 0}

    # ------------------------------------------------------------ state

    def lock(self, workspace: str) -> asyncio.Lock:
        """One change of a workspace by the server at a time (backend merges, HTTP edits)."""
        lock = self._locks.get(workspace)
        if lock is None:
            lock = self._locks[workspace] = asyncio.Lock()
        return lock

    def merges(self, workspace: str) -> int:
        return self._merges.get(workspace, 0)

    async def known(self, workspace: str) -> KnownState | None:
        state = self.states.get(workspace)
        # Several nodes share the store (Redis): another node may have moved it on; read it each time.
        if state is not None and not callable(getattr(self.ext.store, "forward_lease", None)):
            return state
        raw = await self.ext.store.get_meta(workspace, META_KEY)
        if raw is None:
            return None
        data = json.loads(raw)
        state = KnownState(data.get("config") or {}, data.get("version"), bool(data.get("absent")), bytes(raw))
        self.states[workspace] = state
        return state

    async def remember(
        self,
        workspace: str,
        config: dict[str, Any],
        version: str | None,
        absent: bool = False,
        lease_owner: str | None = None,
        expect: Any = NO_BASE,
    ) -> bool:
        """Store the known backend state; with ``lease_owner``, only while it holds the forwarding lease.

        Returns False (nothing written) when the lease was lost: a forwarder
        that froze mid-request must not overwrite what the new holder wrote.
        With ``expect`` (the known state a merge compared with, or None), only
        if the known state is still that one: a forward that finished
        meanwhile, here or on another node, wrote a newer one.
        """
        body = {"config": config, "version": version, "absent": absent}
        raw = json.dumps(body, separators=(",", ":")).encode()
        state = KnownState(copy.deepcopy(config), version, absent, raw)
        fenced = getattr(self.ext.store, "put_meta_leased", None)
        shared = getattr(self.ext.store, "put_meta_if", None)
        if lease_owner is not None and callable(fenced):
            if not await fenced(workspace, META_KEY, raw, lease_owner):
                return False
        elif expect is not NO_BASE and callable(shared):
            if not await shared(workspace, META_KEY, expect.raw if expect is not None else None, raw):
                return False
        elif expect is not NO_BASE:
            if self.states.get(workspace) != expect:  # one node: the state in memory is the known one
                return False
            self.states[workspace] = state  # before the write's await: a forward's remember lands after it
            await self.ext.store.put_meta(workspace, META_KEY, raw)
            return True
        else:
            await self.ext.store.put_meta(workspace, META_KEY, raw)
        self.states[workspace] = state
        return True

    # ------------------------------------------------------------ rooms

    async def open(self, workspace: str) -> Room:
        return await self.ext.app.rooms.open_room(workspace)

    def release(self, room: Room) -> None:
        """A room opened only for a server change is evicted after the usual grace."""
        if room.is_idle:
            self.ext.app.rooms.room_left(room)

    # ------------------------------------------------------------ merging

    async def apply(
        self,
        workspace: str,
        config: dict[str, Any],
        version: str | None,
        reason: str,
        revert_paths: list[str] | None = None,
        details: dict[str, Any] | None = None,
        absent: bool = False,
        base: Any = NO_BASE,
    ) -> Any:
        """Merge the backend's state into the document; the paths changed (None: an older version, ignored).

        ``base``: the known state when this state was read from the backend; if
        the known state moved since, nothing is merged and STALE is returned.
        """
        async with self.lock(workspace):
            room = await self.open(workspace)
            try:
                for _ in range(STALE_READS):
                    paths = await self._apply(
                        room, config, version, reason, revert_paths or [], details or {}, absent, base
                    )
                    if paths is not STALE or base is not NO_BASE:
                        return paths
                    # A pushed state: compared again with the known state a forward just wrote.
                raise StoreError(f"the known backend state of {workspace} kept moving; send it again")
            finally:
                self.release(room)

    async def _apply(
        self,
        room: Room,
        config: dict[str, Any],
        version: str | None,
        reason: str,
        revert_paths: list[str],
        details: dict[str, Any],
        absent: bool = False,
        base: Any = NO_BASE,
    ) -> Any:
        from forwarding.extension import jsonable

        workspace = room.workspace_id
        # The outbox before the known state: the forwarder remembers a delivered state
        # before its rows leave the outbox, so one of the two always shows a forward.
        pending = await self.ext.store.outbox_pending(workspace, 10_000)
        known = await self.known(workspace)
        if base is not NO_BASE and known != base and not older(known.version if known else None, version):
            # Read against an older known state, and not provably newer than the current one.
            return STALE
        if known is not None and older(version, known.version):
            log.info("ignoring version %s of %s: %s is known already", version, workspace, known.version)
            return None
        doc = jsonable(room.config_view)
        if known is None:
            # No base to compare with: whatever differs, except what the session has still to send.
            mine = {c["path"] for row in pending if not is_backend_author(row.author) for c in row.changes}
            changed = [p for p in diff(doc, config) if not any(overlaps(p, q) for q in mine)]
        else:
            # What a request in flight carried is the backend's echo of the session, not a backend change.
            sent = in_flight(pending)
            changed = [p for p in diff(known.config, config) if not echoes(p, config, sent)]
        changed += [p for p in revert_paths if p not in changed]
        paths = sorted(p for p in changed if get_path(doc, p) != get_path(config, p))
        if paths:
            author = {**BACKEND_AUTHOR, "version": version}
            record_details = {"source": "backend", "reason": reason, "version": version, **details}
            with self.ext.authoring(room, author, record_details):
                room.change_config(lambda _map: write_paths(room, config, paths))
            self._tell(room, paths, version, reason, details)
            await room.drain()
            if room.failed:
                raise StoreError(f"could not store the backend's change of {workspace}: {room.failed}")
            self.stats["applied"] += 1
            self._merges[workspace] = self._merges.get(workspace, 0) + 1
            log.info("backend change of %s (%s, version %s): %s", workspace, reason, version, paths)
        if not await self.remember(workspace, config, version, absent, expect=known):
            # A forward moved the known state on while this merged: compare again with it.
            return STALE
        return paths

    def _tell(self, room: Room, paths: list[str], version: str | None, reason: str, details: dict) -> None:
        kind = "forward.reverted" if reason == "revert" else "backend.changed"
        body = {"type": kind, "paths": paths, "version": version, "reason": reason}
        if reason == "revert":
            body.update({k: details[k] for k in ("seq", "first_seq", "status") if k in details})
        for ps in list(room.peers.values()):
            ps.control(body)
        locks = self.ext.lock_extension()
        if locks is None:
            return
        for lease in locks.locks(room.workspace_id):
            hit = [p for p in paths if overlaps(lease["path"], p)]
            if not hit:
                continue
            for ps in list(room.peers.values()):
                if locks.connection_id(ps) == lease["holder"]:
                    ps.control(
                        {
                            "type": "lock.overridden",
                            "path": lease["path"],
                            "paths": hit,
                            "by": "backend",
                            "version": version,
                            "reason": reason,
                        }
                    )

    # ------------------------------------------------------------ reading the backend

    async def fetch(
        self, workspace: str, known: KnownState | None = None
    ) -> tuple[int, dict[str, Any] | None, str | None]:
        """GET the data source (``If-None-Match`` with ``known``'s version): (status, config, version)."""
        etag = known.version if known is not None else None
        return await self.ext.forwarder.fetch_state(workspace, etag)

    async def refresh(
        self,
        workspace: str,
        reason: str = "pull",
        conditional: bool = True,
        revert_paths: list[str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> list[str] | None:
        """Read the backend's state and merge it (a 304 costs nothing more).

        An answer is compared with the known state of when it was asked for: a
        forward that finished meanwhile moved the known state on, and an answer
        older than it (a 404 from before the forward created the data source,
        a version from before it) would look like the backend undoing the
        session's changes. Such an answer is dropped and the backend asked again.
        """
        for _ in range(STALE_READS):
            self.stats["pulls"] += 1
            base = await self.known(workspace)
            status, config, version = await self.fetch(workspace, base if conditional else None)
            if status == 304:
                self.stats["not_modified"] += 1
                return []
            if status == 404:
                config = {}
            elif status != 200 or config is None:
                raise RuntimeError(f"GET data source {workspace}: HTTP {status}")
            paths = await self.apply(
                workspace,
                config,
                version,
                reason,
                revert_paths=revert_paths,
                details=details,
                absent=status == 404,
                base=base,
            )
            if paths is not STALE:
                return paths
            self.stats["stale_reads"] = self.stats.get("stale_reads", 0) + 1
        log.info("backend state of %s kept moving while it was read (%s); the next read merges it", workspace, reason)
        return []

    async def on_conflict(self, workspace: str) -> None:
        """A forward was answered 412: merge the backend's current state, then it is sent again."""
        self.stats["conflicts"] += 1
        await self.refresh(workspace, "conflict", conditional=False)

    async def revert(self, workspace: str, paths: list[str], details: dict[str, Any]) -> list[str]:
        """The backend refused a change: put ``paths`` back to the backend's state in the document."""
        self.stats["reverts"] += 1
        return await self.refresh(workspace, "revert", conditional=False, revert_paths=paths, details=details) or []

    # ------------------------------------------------------------ background work

    def spawn(self, coro, what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s failed: %s", what, exc)

        task = asyncio.get_running_loop().create_task(run(), name=what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self, pull_seconds: float) -> None:
        if pull_seconds > 0:
            self._puller = asyncio.get_running_loop().create_task(self._pull_loop(pull_seconds), name="backend pull")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._puller] if self._puller else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _pull_loop(self, seconds: float) -> None:
        """Open workspaces ask the backend on an interval (a quiet backend answers 304)."""
        limit = asyncio.Semaphore(8)

        async def one(workspace: str) -> None:
            async with limit:
                try:
                    await self.refresh(workspace, "pull")
                except Exception as exc:
                    log.debug("pull of %s failed: %s", workspace, exc)

        while True:
            await asyncio.sleep(seconds)
            # Rooms with peers only: asking for an idle one would keep it from being evicted.
            rooms = list(self.ext.app.rooms.rooms.items())
            workspaces = [ws for ws, room in rooms if room.loaded and not room.is_idle]
            if workspaces:
                await asyncio.gather(*(one(ws) for ws in workspaces))
