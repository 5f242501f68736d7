import redis


def test_redis_fixture_is_ours_and_restartable(redis_factory):
    r = redis_factory(appendonly=True)
    assert r.port != 6379
    client = redis.Redis.from_url(r.url)
    client.set("k", "v")
    r.kill()
    r.start()
    assert client.get("k") == b"v"  # AOF with fsync always survives kill -9
    r.kill()
    r.wipe()
    r.start()
    assert client.get("k") is None
    client.close()
