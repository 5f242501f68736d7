"""Who holds what across the nodes of a deployment, for the admin API.

Every node publishes a summary of itself in Redis every
``COLLAB_NODE_SUMMARY_SECONDS`` (TTL three times that): its open rooms, the
users connected to each, and the locks its connections hold.

* ``collab:node:<node id>``  the summary (JSON), with its TTL: a node that died
  disappears from the answers within three intervals;
* ``collab:nodes``           set of node ids (an index; ids whose summary
  expired are pruned when it is read).

Both are single-key commands, so they work on a Redis Cluster too. The admin
API reads them through :meth:`NodeDirectory.cluster` (collab/admin.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from collab.extensions import Extension
from persistence.redisconn import REDIS_ERRORS, connect

if TYPE_CHECKING:
    from collab.extensions import Host

log = logging.getLogger("collab.nodes")

INDEX = "collab:nodes"


def summary_key(node_id: str) -> str:
    return "collab:node:" + node_id


class NodeDirectory(Extension):
    """Publishes this node's summary; reads every node's (extension ``nodes``)."""

    name = "nodes"

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.interval = settings.node_summary_seconds
        self.client: Any = None
        self.app: Host | None = None
        self._task: asyncio.Task | None = None

    async def start(self, app: Host) -> None:
        self.app = app
        self.client = connect(self.settings.redis_url, timeout=self.settings.redis_timeout_seconds, max_connections=4)
        self._task = asyncio.get_running_loop().create_task(self._publish_loop(), name="node summaries")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            with contextlib.suppress(*REDIS_ERRORS, TimeoutError):
                async with asyncio.timeout(2):
                    await self.client.delete(summary_key(self.node_id))
                    await self.client.srem(INDEX, self.node_id)
            with contextlib.suppress(Exception):
                await self.client.aclose()
            self.client = None

    # ------------------------------------------------------------ publishing

    def summary(self) -> dict[str, Any]:
        """This node now: rooms, the users in each, the locks its connections hold."""
        assert self.app is not None
        locks_ext = next((e for e in self.app.extensions if getattr(e, "name", None) == "locks"), None)
        rooms = []
        for ws, room in sorted(self.app.rooms.rooms.items()):
            users = sorted({getattr(ps.identity, "user_id", None) for ps in room.peers.values()} - {None})
            held = []
            if locks_ext is not None:
                here = locks_ext.holders_here()
                held = [
                    {"path": lock["path"], "user_id": lock.get("user_id"), "holder": lock.get("holder")}
                    for lock in locks_ext.locks(ws)
                    if lock.get("holder") in here
                ]
            rooms.append({"workspace": ws, "peers": len(room.peers), "users": users, "locks": held})
        return {
            "node": self.node_id,
            "at": round(time.time(), 3),
            "rooms": rooms,
            "peers": sum(r["peers"] for r in rooms),
        }

    async def publish(self) -> None:
        ttl_ms = int(self.interval * 3 * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(summary_key(self.node_id), json.dumps(self.summary(), separators=(",", ":")), px=ttl_ms)
        pipe.sadd(INDEX, self.node_id)
        await pipe.execute()

    async def _publish_loop(self) -> None:
        failing = False
        while True:
            try:
                async with asyncio.timeout(self.interval * 2 + self.settings.redis_timeout_seconds):
                    await self.publish()
                failing = False
            except (*REDIS_ERRORS, TimeoutError) as exc:
                if not failing:
                    log.warning("node summary not published (Redis: %s)", exc)
                failing = True
            await asyncio.sleep(self.interval)

    # --------------------------------------------------------------- reading

    async def cluster(self) -> list[dict[str, Any]]:
        """Every live node's last summary, by node id. Raises when Redis does not answer."""
        names = sorted(m.decode() for m in await self.client.smembers(INDEX))
        if not names:
            return []
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.get(summary_key(name))
        out = []
        for name, raw in zip(names, await pipe.execute()):
            if raw is None:
                await self.client.srem(INDEX, name)  # its summary expired: the node is gone
                continue
            out.append(json.loads(raw))
        return out
