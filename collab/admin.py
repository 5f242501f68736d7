"""The admin API (``/api/admin/...``): rooms, participants, locks, configuration.

Every endpoint declares that it needs the admin role (``collab.gate``): a
token whose ``workspaces`` claim grants ``admin`` for the workspace in the
path, or ``"*": "admin"`` for the endpoints about the whole server (the room
list). In development mode the query string gives the identity
(``?role=admin``), and only from a loopback address. Errors are JSON:
``{"error": "..."}``.

What a node answers is about itself (its rooms and connections), except
participants and locks, which come from the presence registry and the lock
backend (every node's, when they are in Redis). With Redis, answers are also
cluster-wide: every node publishes a summary of itself (scaleout/nodes.py),
and the room list (``cluster``), a room (``nodes``), its participants
(``node``/``nodes``) and its locks (``node``) say which node holds what.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from codec import protocol as p
from collab import logs
from collab.gate import GatedRoute, server_role, workspace_role
from rooms import ystructs
from rooms.config import config_snapshot
from rooms.document import replay
from rooms.room import PeerState, Room

if TYPE_CHECKING:
    from collab.app import App

log = logging.getLogger("collab.admin")

CLOSE_WAIT_SECONDS = 5.0  # for the peers of a closed room to leave before it is evicted
CLOSE_CODES = {p.CLOSE_NORMAL, p.CLOSE_GOING_AWAY, p.CLOSE_RESTART, p.CLOSE_TRY_AGAIN}


class AdminAPI:
    def __init__(self, app: App) -> None:
        self.app = app

    def routes(self) -> list[GatedRoute]:
        base = "/api/admin/rooms"
        admin = workspace_role("admin")
        return [
            GatedRoute(base, self.list_rooms, methods=["GET"], requires=server_role("admin")),
            GatedRoute(base + "/{workspace_id}", self.room, methods=["GET"], requires=admin),
            GatedRoute(base + "/{workspace_id}/config", self.config, methods=["GET"], requires=admin),
            GatedRoute(base + "/{workspace_id}/consistency", self.consistency, methods=["GET"], requires=admin),
            GatedRoute(base + "/{workspace_id}/close", self.close_room, methods=["POST"], requires=admin),
        ]

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _workspace(request: Request) -> str:
        """The workspace the gate checked; admin actions are logged with who did them."""
        workspace_id = request.state.workspace_id
        logs.bind(workspace=workspace_id, user=request.state.identity.user_id)
        return workspace_id

    def _extension(self, name: str) -> Any:
        for ext in self.app.extensions:
            if getattr(ext, "name", None) == name:
                return ext
        return None

    def _room_summary(self, room: Room) -> dict[str, Any]:
        users = {getattr(ps.identity, "user_id", None) for ps in room.peers.values()} - {None}
        features: dict[str, Any] = {"participants": None, "locks": None}
        for ext in self.app.extensions:
            features.update(ext.room_summary(room.workspace_id))
        return {
            "workspace": room.workspace_id,
            "peers": len(room.peers),
            "users": len(users),
            **features,
            "awareness_states": sum(1 for rec in room.awareness.values() if rec.state is not None),
            "loaded": room.loaded,
            "failed": room.failed,
            "idle_seconds": round(time.monotonic() - room.last_active, 3) if room.is_idle else 0.0,
            "size_bytes": room.size_bytes,
            "durable_seq": room.durable_seq,
            "held_updates": room.held_updates,
            "stats": dict(room.stats),
        }

    @staticmethod
    def _peer(ps: PeerState) -> dict[str, Any]:
        identity = ps.identity
        peer = ps.peer
        client = getattr(getattr(peer, "ws", None), "client", None)
        return {
            "user": identity.public() if hasattr(identity, "public") else None,
            "address": f"{client.host}:{client.port}" if client else None,
            "client_ids": sorted(ps.client_ids),
            "control": ps.wants_control,
            "updates_received": ps.updates_received,
            "updates_acked": ps.updates_acked,
            "queued_frames": getattr(peer, "queued", None),
            "idle_seconds": round(time.monotonic() - ps.last_seen, 3),
            "expires_at": getattr(identity, "expires_at", None),
        }

    # ---------------------------------------------------------- endpoints

    async def list_rooms(self, request: Request) -> JSONResponse:
        """``GET /api/admin/rooms``: the rooms in memory on this node, with peer counts."""
        rooms = sorted(self.app.rooms.rooms.values(), key=lambda room: room.workspace_id)
        return JSONResponse(
            {
                "node": self.app.settings.node_id,
                "rooms": [self._room_summary(room) for room in rooms],
                "loading": self.app.rooms.loading,
                "peers": len(self.app.connections),
                "features": self.node_features(),
                "cluster": await self._cluster(),
            }
        )

    async def _node_summaries(self) -> list[dict[str, Any]] | str | None:
        """Every node's published summary (the ``nodes`` feature); None without Redis; the error text if Redis fails."""
        nodes = self._extension("nodes")
        if nodes is None:
            return None
        try:
            async with asyncio.timeout(2):
                return await nodes.cluster()
        except Exception as exc:
            return f"error: {type(exc).__name__}: {exc}"

    async def _cluster(self) -> dict[str, Any] | None:
        """The rooms of every node: by node, and by room with the nodes holding it."""
        summaries = await self._node_summaries()
        if summaries is None or isinstance(summaries, str):
            return None if summaries is None else {"error": summaries}
        by_room: dict[str, list[dict[str, Any]]] = {}
        for summary in summaries:
            for room in summary["rooms"]:
                entry = {"node": summary["node"], "peers": room["peers"], "users": room["users"]}
                by_room.setdefault(room["workspace"], []).append(entry)
        return {
            "nodes": summaries,
            "rooms": [{"workspace": ws, "nodes": nodes} for ws, nodes in sorted(by_room.items())],
        }

    def node_features(self) -> dict[str, Any]:
        """What each feature reports of this node (``Extension.admin_summary``)."""
        features: dict[str, Any] = {}
        for ext in self.app.extensions:
            features.update(ext.admin_summary())
        return features

    async def room(self, request: Request) -> JSONResponse:
        """``GET /api/admin/rooms/{id}``: peers on this node, participants and locks (every node's)."""
        workspace_id = self._workspace(request)
        return JSONResponse(await self.room_report(workspace_id))

    async def room_report(self, workspace_id: str) -> dict[str, Any]:
        """One room: summary, peers on this node, participants and locks (every node's). Also for the console."""
        room = self.app.rooms.rooms.get(workspace_id)
        body: dict[str, Any] = {"workspace": workspace_id, "node": self.app.settings.node_id, "open": room is not None}
        if room is not None:
            body.update(self._room_summary(room))
            body["peers"] = [self._peer(ps) for ps in room.peers.values()]
        else:
            body["peers"] = []
        body["participants"] = None  # filled in by the presence feature when it runs
        body["locks"] = []
        for ext in self.app.extensions:
            body.update(await ext.room_report(workspace_id))
        summaries = await self._node_summaries()
        if isinstance(summaries, list):
            held_by = [(summary["node"], room) for summary in summaries for room in summary["rooms"]]
            held_by = [(node, room) for node, room in held_by if room["workspace"] == workspace_id]
            holder_node = {lock["holder"]: node for node, room in held_by for lock in room["locks"]}
            for lock in body["locks"]:
                if isinstance(lock, dict):
                    lock.setdefault("node", holder_node.get(lock.get("holder")))
            body["nodes"] = [
                {"node": node, **{k: room[k] for k in ("peers", "users", "locks")}} for node, room in held_by
            ]
        elif isinstance(summaries, str):
            body["nodes"] = {"error": summaries}
        return body

    async def config(self, request: Request) -> JSONResponse:
        """``GET /api/admin/rooms/{id}/config``: the current configuration (secrets masked).

        From the room in memory, else from the store (the room is not opened).
        """
        from forwarding.extension import jsonable, mask_secrets

        workspace_id = self._workspace(request)
        room = self.app.rooms.rooms.get(workspace_id)
        if room is not None and room.loaded:
            config, seq, source = config_snapshot(room.doc), room.durable_seq, "memory"
        else:
            stored = await self.app.store.load(workspace_id)
            if stored.is_new:
                raise HTTPException(404, f"no document stored for workspace {workspace_id!r}")
            history = stored.updates if stored.snapshot is None else [stored.snapshot, *stored.updates]
            doc = replay(history)
            config, seq, source = config_snapshot(doc), stored.last_seq, "store"
        return JSONResponse(
            {"workspace": workspace_id, "source": source, "seq": seq, "config": mask_secrets(jsonable(config))}
        )

    async def consistency(self, request: Request) -> JSONResponse:
        """``GET /api/admin/rooms/{id}/consistency``: would a Yjs client load what this room hands out?

        Walks the encoded state of the room in memory and of its stored
        history replayed (``memory`` / ``store``); each lists its problems
        (empty when well-formed). Without an open room only the store is checked.
        """
        workspace_id = self._workspace(request)
        room = self.app.rooms.rooms.get(workspace_id)
        body: dict[str, Any] = {"workspace": workspace_id, "node": self.app.settings.node_id}
        if room is not None and room.loaded:
            body["memory"] = {"problems": room.state_problems(), "bytes": len(room.doc.get_update())}
        stored = await self.app.store.load(workspace_id)
        if not stored.is_new:
            history = stored.updates if stored.snapshot is None else [stored.snapshot, *stored.updates]
            doc = replay(history)
            state = doc.get_update()
            problems = ystructs.problems(state, ystructs.state_vector(doc.get_state()))
            body["store"] = {"problems": problems, "bytes": len(state), "seq": stored.last_seq}
        elif room is None:
            raise HTTPException(404, f"no document stored for workspace {workspace_id!r}")
        body["well_formed"] = not any(part["problems"] for part in (body.get("memory"), body.get("store")) if part)
        return JSONResponse(body)

    async def close_room(self, request: Request) -> JSONResponse:
        """``POST /api/admin/rooms/{id}/close``: close every peer (1012 by default), then evict the room.

        Optional JSON body ``{"code": 1012, "reason": "..."}``; ``code`` is one
        of 1000, 1001, 1012, 1013 or 4000-4999. Clients that reconnect load
        the document afresh from the store.
        """
        workspace_id = self._workspace(request)
        code, reason = p.CLOSE_RESTART, "room closed by an administrator; reconnect"
        raw = await request.body()
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                raise HTTPException(400, "the body must be JSON") from None
            if not isinstance(body, dict):
                raise HTTPException(400, "the body must be a JSON object")
            code = body.get("code", code)
            reason = body.get("reason", reason)
            if isinstance(code, bool) or not isinstance(code, int) or not (code in CLOSE_CODES or 4000 <= code <= 4999):
                raise HTTPException(400, "code must be 1000, 1001, 1012, 1013 or 4000-4999")
            if not isinstance(reason, str):
                raise HTTPException(400, "reason must be a string")
        room = self.app.rooms.rooms.get(workspace_id)
        if room is None:
            return JSONResponse({"workspace": workspace_id, "closed": 0, "evicted": True, "open": False})
        peers = list(room.peers)
        log.warning("admin closes room %s: %d connections, code %d", workspace_id, len(peers), code)
        for peer in peers:
            peer.close(code, reason[:120])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_SECONDS
        while any(peer in room.peers for peer in peers) and loop.time() < deadline:
            await asyncio.sleep(0.01)  # peers leave once their close handshake is done
        evicted = await self.app.rooms.evict_now(workspace_id)
        return JSONResponse({"workspace": workspace_id, "closed": len(peers), "evicted": evicted, "open": True})
