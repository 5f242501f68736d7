"""The persist pipeline alone: one append per submit, acks in arrival order, compaction, failure."""

from __future__ import annotations

import asyncio

from persistence.base import StoreError
from persistence.sqlite import SQLiteDocumentStore
from rooms.persist import PersistPipeline
from tests.fakes import peer_state


class SlowFirstStore:
    """The first append waits for ``gate``; later ones go straight through."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.calls = 0

    async def append(self, workspace_id, updates, outbox=None):
        self.calls += 1
        if self.calls == 1:
            await self.gate.wait()
        return await self.inner.append(workspace_id, updates)

    async def compact(self, workspace_id, snapshot, upto):
        return await self.inner.compact(workspace_id, snapshot, upto)


def pipeline(store, **kw) -> tuple[PersistPipeline, list]:
    failures: list[str] = []
    pipe = PersistPipeline(
        "ds-p", store, snapshot=lambda: b"\x00\x00", on_persisted=lambda records: None,
        on_failed=failures.append, compact_every_updates=kw.get("every", 1000), compact_every_bytes=1 << 30,
    )  # fmt: skip
    return pipe, failures


async def test_acks_wait_for_the_earlier_append(tmp_path):
    inner = SQLiteDocumentStore(tmp_path / "p.db", synchronous="NORMAL")
    await inner.open()
    store = SlowFirstStore(inner)
    pipe, _ = pipeline(store)
    a = peer_state("a", 1)
    b = peer_state("b", 2)
    pipe.updates.append(b"\x00\x00")
    pipe.acks[a] = 1
    pipe.submit()
    pipe.updates.append(b"\x00\x00")
    pipe.acks[b] = 1
    pipe.submit()
    await asyncio.sleep(0)  # let both appends start; the second one commits first
    for _ in range(100):
        if store.calls == 2:
            break
        await asyncio.sleep(0.01)
    assert b.updates_acked == 0  # its append is done, but a's is not: no ack yet
    store.gate.set()
    await asyncio.wait_for(pipe.drain(), 10)
    assert a.updates_acked == 1 and b.updates_acked == 1
    assert pipe.durable_seq == 2 and not pipe.pending
    await inner.close()


async def test_compaction_after_the_threshold(tmp_path):
    store = SQLiteDocumentStore(tmp_path / "p.db", synchronous="NORMAL")
    await store.open()
    pipe, _ = pipeline(store, every=2)
    for _ in range(2):
        pipe.updates.append(b"\x00\x00")
        pipe.submit()
    await asyncio.wait_for(pipe.drain(), 10)
    assert pipe.snapshot_seq == 2 and pipe.tail_updates == 0
    assert (await store.load("ds-p")).snapshot == b"\x00\x00"
    await store.close()


async def test_a_store_error_fails_the_pipeline_once_and_sends_no_ack():
    class Broken:
        async def append(self, *a, **kw):
            raise StoreError("disk gone")

    pipe, failures = pipeline(Broken())
    ps = peer_state("a", 1)
    pipe.updates.append(b"\x00\x00")
    pipe.acks[ps] = 1
    pipe.submit()
    await asyncio.wait_for(pipe.drain(), 10)
    assert failures == ["storage failure: disk gone"] and pipe.failed
    assert ps.updates_acked == 0
