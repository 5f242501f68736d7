"""scaleout/livewire.py: the relay's own RESP pub/sub connection.

The reader is checked on replies cut at every byte (a socket hands over any
split), and the connection against a real redis-server: publish, subscribe,
a password, a wrong password, a connection Redis drops.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import redis as redis_lib

from scaleout.livewire import LiveWire, Replies, WireError, command, target
from tests.redis_support import RedisProcess
from tests.support import eventually

WAIT = 10.0


def test_commands_read_back_whatever_way_the_bytes_are_cut():
    rng = random.Random(7)
    for _ in range(200):
        parts = [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))) for _ in range(rng.randrange(1, 5))]
        data = command(*parts) + b":42\r\n-ERR nope\r\n$-1\r\n+OK\r\n"
        reader, got = Replies(), []
        pos = 0
        while pos < len(data):
            step = rng.randrange(1, 7)
            reader.feed(data[pos : pos + step])
            got += reader.take()
            pos += step
        assert got[0] == parts and got[1] == 42 and got[3] is None and got[4] == b"OK"
        assert isinstance(got[2], WireError) and "nope" in str(got[2])
        assert len(got) == 5


def test_only_single_server_urls_get_a_wire():
    assert target("redis://:s3cret@10.0.0.1:6380/2") == {
        "username": None,
        "password": "s3cret",
        "host": "10.0.0.1",
        "port": 6380,
        "ssl": False,
    }
    assert target("rediss://u:p@h/0") is None  # TLS: redis-py reads its certificate options
    assert target("rediss://u:p@h/0", tls=True)["ssl"] is True
    assert target("unix:///run/redis.sock")["path"] == "/run/redis.sock"
    assert target("redis+cluster://a:1,b:2") is None
    assert target("redis+sentinel://a:1/mymaster") is None


async def test_publish_and_subscribe_with_a_password(tmp_path):
    server = RedisProcess(tmp_path / "r").start()
    try:
        with redis_lib.Redis(host="127.0.0.1", port=server.port, socket_timeout=5) as admin:
            admin.config_set("requirepass", "s3cret")
        url = f"redis://:s3cret@127.0.0.1:{server.port}/0"
        got: list[tuple[bytes, bytes]] = []
        sub = await LiveWire.open(url, WAIT, lambda channel, data: got.append((channel, data)))
        pub = await LiveWire.open(url, WAIT)
        sub.subscribe(b"a", b"b")
        await eventually(lambda: sub.subscribed == {b"a", b"b"}, WAIT, what="confirmed")
        payload = bytes(range(256)) * 40  # binary, bigger than one read
        assert await pub.publish(b"a", payload) == 1
        assert await pub.publish("b", b"x") == 1
        await eventually(lambda: len(got) == 2, WAIT, what="both messages")
        assert got == [(b"a", payload), (b"b", b"x")]
        sub.unsubscribe(b"a")
        await eventually(lambda: sub.subscribed == {b"b"}, WAIT, what="unsubscribed")
        assert await pub.publish(b"a", b"y") == 0
        # Redis drops the subscriber: its close is seen, pending replies resolve to errors.
        r = redis_lib.Redis(host="127.0.0.1", port=server.port, password="s3cret", socket_timeout=5)
        r.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        r.close()
        await asyncio.wait_for(sub.closed, WAIT)
        assert not sub.connected
        pub.close()
        await asyncio.wait_for(pub.closed, WAIT)
        assert isinstance(await pub.publish(b"a", b"z"), WireError)
        with pytest.raises(WireError, match="WRONGPASS|invalid"):
            await LiveWire.open(f"redis://:wrong@127.0.0.1:{server.port}/0", WAIT)
    finally:
        server.stop()
