"""Publishes each workspace's durable log to every sink, once, from the sink's own cursor.

One lane per (workspace, sink): read what follows the sink's cursor, publish
it in order, store the cursor, repeat; sleep when caught up, end when idle.
Lanes are started by a local commit (``kick``) and by a sweep of every
workspace's newest audit id (changes committed by other nodes, or before a
crash). With several nodes, a lane first takes a lease in Redis
(``collab:ws:{W}:events:lease:<sink>``): one node publishes a workspace to a
sink at a time. A node that dies mid-page leaves the cursor behind what it
published; the next holder publishes those events again with the same ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from events.log import LogReader
from events.sinks import Sink
from persistence.redis import LEASE_SCRIPT

log = logging.getLogger("collab.events")

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

IDLE_ROUNDS = 3  # polls with nothing new before a lane ends (the sweep restarts it)


class Leases:
    """Per-(workspace, sink) publishing leases in Redis: one publisher across nodes."""

    def __init__(self, client: Any, owner: str, ttl_ms: int) -> None:
        self.client = client
        self.owner = owner
        self.ttl_ms = ttl_ms
        self._take = client.register_script(LEASE_SCRIPT)
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def key(workspace: str, sink: str) -> str:
        return "collab:ws:{" + workspace + "}:events:lease:" + sink

    async def take(self, workspace: str, sink: str) -> bool:
        return bool(await self._take(keys=[self.key(workspace, sink)], args=[self.owner, self.ttl_ms]))

    async def release(self, workspace: str, sink: str) -> None:
        await self._release(keys=[self.key(workspace, sink)], args=[self.owner])


@dataclass
class _Lane:
    workspace: str
    sink: Sink
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    lost: bool = False  # the lease went to another node meanwhile


class Publisher:
    def __init__(
        self,
        reader: LogReader,
        sinks: list[Sink],
        *,
        poll: float,
        forwarding: bool,
        leases: Leases | None = None,
    ) -> None:
        self.reader = reader
        self.sinks = sinks
        self.poll = poll
        self.forwarding = forwarding
        self.leases = leases
        self.lanes: dict[tuple[str, str], _Lane] = {}
        self.known: dict[tuple[str, str], int] = {}  # last audit id each lane reached
        self.counts = {"published": 0, "errors": 0}
        self._sweeper: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        self._stopping = True
        tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                await sink.checkpoint_all()

    def kick(self, workspace: str) -> None:
        """Something was committed in ``workspace``: publish it now."""
        self.reader.touch(workspace)
        for sink in self.sinks:
            self._wake(workspace, sink)

    def _wake(self, workspace: str, sink: Sink) -> None:
        if self._stopping:
            return
        lane = self.lanes.get((workspace, sink.name))
        if lane is None:
            lane = self.lanes[(workspace, sink.name)] = _Lane(workspace, sink)
        lane.wake.set()
        if lane.task is None or lane.task.done():
            lane.task = asyncio.get_running_loop().create_task(self._run(lane))

    async def _sweep(self) -> None:
        """Start lanes for what other nodes, the forwarder, or this node before a crash committed.

        The first look reads every workspace's newest audit id. After that, a
        store tailed as one log (SQLite) is simply read on: the workspaces
        that appear in it are woken (no scan of every workspace each time).
        """
        first = True
        while not self._stopping:
            try:
                if first or not self.reader.tails:
                    heads = await self.reader.store.change_heads()
                    first = False
                else:
                    heads = await self.reader.poll_tail()
                for workspace, head in heads.items():
                    for sink in self.sinks:
                        if head > self.known.get((workspace, sink.name), -1):
                            self.reader.touch(workspace)  # committed elsewhere: re-read
                            self._wake(workspace, sink)
            except Exception as exc:
                log.warning("events sweep failed: %s", exc)
            await asyncio.sleep(self.poll)

    async def _run(self, lane: _Lane) -> None:
        try:
            await self._lane(lane)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("events lane %s %s failed", lane.workspace, lane.sink.name)
            self.counts["errors"] += 1

    async def _lane(self, lane: _Lane) -> None:
        ws, sink = lane.workspace, lane.sink
        key = (ws, sink.name)
        while not self._stopping:
            lane.wake.clear()
            if self.leases is not None and not await self._leased(ws, sink):
                with contextlib.suppress(Exception):  # where the holder got to: the sweep stops waking us at the head
                    self.known[key] = (await sink.load_cursor(ws)).audit
                if not await self._wait(lane):
                    return  # another node publishes this workspace; the sweep looks again later
                continue
            lane.lost = False
            renewer = None
            if self.leases is not None:
                renewer = asyncio.get_running_loop().create_task(self._renew(lane))
            try:
                if await self._hold(lane):
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.counts["errors"] += 1
                log.warning("publishing events of %s to %s failed: %s", ws, sink.name, exc)
                await asyncio.sleep(min(self.poll, 1.0))
            finally:
                if renewer is not None:
                    renewer.cancel()
                if self.leases is not None:
                    with contextlib.suppress(Exception):
                        await self.leases.release(ws, sink.name)

    async def _hold(self, lane: _Lane) -> bool:
        """Publish while holding the lane (and its lease); True once idle, False if the lease was lost."""
        ws, sink = lane.workspace, lane.sink
        key = (ws, sink.name)
        cursor = await sink.load_cursor(ws)
        idle = 0
        while not self._stopping and not lane.lost:
            lane.wake.clear()
            while True:  # pages until caught up
                items, reached, more = await self.reader.read(ws, cursor, self.forwarding)
                if items or reached != cursor:
                    cursor = await sink.publish(ws, items, reached)
                    self.counts["published"] += len(items)
                self.known[key] = cursor.audit
                if not items or lane.lost or not (more or lane.wake.is_set()):
                    break
                lane.wake.clear()
            if await self._wait(lane):
                idle = 0
                continue
            await sink.checkpoint(ws, cursor, force=True)  # quiet: make the cursor durable now
            if more:
                continue  # changes still waiting for the backend: stay, to announce their delivery
            idle += 1
            if idle >= IDLE_ROUNDS and not lane.wake.is_set():
                return True
        await sink.checkpoint(ws, cursor, force=True)
        return False

    async def _leased(self, ws: str, sink: Sink) -> bool:
        assert self.leases is not None
        try:
            return await self.leases.take(ws, sink.name)
        except Exception as exc:
            log.warning("events lease of %s unavailable: %s", ws, exc)
            return False

    async def _renew(self, lane: _Lane) -> None:
        assert self.leases is not None
        while True:
            await asyncio.sleep(self.leases.ttl_ms / 3000.0)
            with contextlib.suppress(Exception):
                if not await self.leases.take(lane.workspace, lane.sink.name):
                    log.warning("events lease of %s for %s lost", lane.workspace, lane.sink.name)
                    lane.lost = True
                    lane.wake.set()
                    return

    async def _wait(self, lane: _Lane) -> bool:
        """Wait for a kick up to one poll interval; True if kicked."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lane.wake.wait(), self.poll)
            return True
        return False


def new_owner(node_id: str) -> str:
    return f"{node_id}/{secrets.token_hex(4)}"
