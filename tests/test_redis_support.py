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


def test_a_subclass_that_starts_redis_itself_is_still_stopped_by_pid(tmp_path):
    """Helpers built on RedisProcess (tests/redis_topologies.py) may Popen redis-server themselves."""
    import os
    import subprocess

    from tests.redis_support import REDIS_SERVER, RedisProcess

    class OwnStart(RedisProcess):
        def start(self, timeout: float = 10.0) -> "OwnStart":
            self.proc = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return self

    r = OwnStart(tmp_path / "own").start()
    pid = r.proc.pid
    r.pause()
    r.stop()  # resumed first, then SIGTERM: gone, by its PID
    assert r.proc.poll() is not None
    try:
        os.kill(pid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    assert not alive
