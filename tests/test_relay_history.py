"""A failover that renumbers history under a reading node (scaleout/relay.py, the append chain).

Redis Cluster and Sentinel promote a replica that may miss the newest stream
entries (not acknowledged, since replica acks wait for them, but possibly read
by another node's relay already). New appends then take the lost entries'
numbers. A relay that only compared numbers would read on past them and its
room would never see those new entries. Each entry names the entry before it,
so the relay notices, writes its room's state back (the lost entries' content
included) and rereads the document.

The failover is played on a real redis-server by removing the newest entries
the way a promoted replica would not have them: deterministic, no cluster.
"""

from __future__ import annotations

import pycrdt
import redis as redis_lib

from persistence.redis import tag
from tests.fakes import FakePeer
from tests.support import eventually
from tests.test_relay_live import WAIT, Node, edit, items


def forget_newest(r: redis_lib.Redis, ws: str, n: int) -> None:
    """Make Redis look like a promoted replica that never got the newest ``n`` entries."""
    t = tag(ws)
    last = int(r.hget(t + ":doc", "last_seq"))
    kept = r.xrange(t + ":updates", "-", f"0-{last - n}")
    r.delete(t + ":updates")  # a replica's stream never had the newest ids (XDEL would keep them as its top)
    for stream_id, fields in kept:
        r.xadd(t + ":updates", fields, id=stream_id)
    r.hset(t + ":doc", mapping={"last_seq": last - n, "tip": kept[-1][1][b"at"]})


async def test_a_relay_that_read_entries_a_failover_lost_sees_the_new_ones_under_their_numbers(redis_server):
    a = await Node(redis_server.url, "a", live=False).start()
    b = await Node(redis_server.url, "b", live=False).start()  # the stream is all b has
    c = await Node(redis_server.url, "c", live=False).start()
    r = redis_lib.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    ws = "ds-renumbered"
    try:
        room_a, _ = await a.open(ws)
        room_b, _ = await b.open(ws)
        ps_a = room_a.join(FakePeer("writer-a"))
        writer_a = pycrdt.Doc()
        for i in range(5):
            edit(room_a, ps_a, writer_a, f"k{i}", i)
            await room_a.drain()
        await eventually(lambda: len(items(room_b)) == 5, WAIT, what="b read k0..k4")
        await a.stop()  # a's appends of k3, k4 are "lost" with the old primary
        forget_newest(r, ws, 2)
        # c opens the workspace on the promoted replica: its appends take numbers 4, 5, 6.
        room_c, _ = await c.open(ws)
        assert set(items(room_c)) == {"k0", "k1", "k2"}
        ps_c = room_c.join(FakePeer("writer-c"))
        writer_c = pycrdt.Doc()
        for i in (10, 11, 12):
            edit(room_c, ps_c, writer_c, f"k{i}", i)
            await room_c.drain()
        assert room_c.durable_seq == 6
        # b had read up to 5: without the chain it would apply only entry 6 (k12).
        await eventually(lambda: {"k10", "k11", "k12"} <= set(items(room_b)), WAIT, what="b has c's entries 4..6")
        assert b.relay.stats["history_changes"] == 1
        # b wrote back what it held of the lost entries: the store has everything again, and c gets it.
        everything = {f"k{i}" for i in (0, 1, 2, 3, 4, 10, 11, 12)}
        await eventually(lambda: set(items(room_c)) == everything, WAIT, what="c gets k3, k4 back from b")
        assert set(items(room_b)) == everything
        fresh = pycrdt.Doc()
        stored = await c.store.load(ws)
        for update in [stored.snapshot, *stored.updates]:
            if update:
                fresh.apply_update(update)
        assert set(fresh.get("items", type=pycrdt.Map).to_py()) == everything
    finally:
        r.close()
        await b.stop()
        await c.stop()
