"""Real redis-server processes for tests: free loopback ports, owned by PID.

Never touches the machine's own Redis on 6379: every instance gets its own
port and directory, and is ended by its PID only.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis

from procs import ManagedProcess, free_port

REDIS_SERVER = shutil.which("redis-server")


def _pings(child: ManagedProcess) -> bool:
    client = redis.Redis(host="127.0.0.1", port=child.port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False  # not listening yet, or still loading its data
    finally:
        client.close()


class RedisProcess:
    """One redis-server on its own port and directory (a procs.ManagedProcess); logs to ``workdir/redis.log``."""

    def __init__(
        self, workdir: Path, appendonly: bool = False, port: int | None = None, extra_args: list[str] | None = None
    ) -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.extra_args = list(extra_args or [])  # more redis-server options, e.g. ["--replicaof", ...]
        self.child: ManagedProcess | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def proc(self):
        return self.child.proc if self.child is not None else None

    @proc.setter
    def proc(self, popen) -> None:
        """A subclass that starts the process itself hands over its Popen: still stopped (by PID) like ours."""
        self.child = None if popen is None else ManagedProcess.adopt(popen, name="redis-server", log_path=self.log_path)

    @property
    def pid(self) -> int:
        assert self.child is not None, "redis-server not started"
        return self.child.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def args(self) -> list[str]:
        """The redis-server command line (subclasses add to it)."""
        return [
            REDIS_SERVER or "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",  # stdout, which the ManagedProcess writes to redis.log
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisProcess:
        """Start and wait until it answers PING (bounded); fails the test with its log if not."""
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        self.child = ManagedProcess(
            self.args(), name="redis-server", log_path=self.log_path, port=self.port, ready=_pings
        )
        self.child.start(timeout)
        return self

    def log(self) -> str:
        return self.child.log_tail(4000) if self.child is not None else ""

    def kill(self) -> None:
        """kill -9: whatever was not written to the AOF is gone."""
        if self.child is not None:
            self.child.kill()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(10)

    def wipe(self) -> None:
        """Delete the data directory's contents (restart then starts empty)."""
        for item in self.workdir.iterdir():
            if item.name != "redis.log":
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()

    def pause(self) -> None:
        """SIGSTOP: Redis hangs with its sockets open."""
        self.child.pause()

    def resume(self) -> None:
        if self.child is not None:
            self.child.resume()


@pytest.fixture
def redis_factory(tmp_path):
    started: list[RedisProcess] = []

    def make(appendonly: bool = False, name: str = "redis") -> RedisProcess:
        proc = RedisProcess(tmp_path / name, appendonly=appendonly).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        try:
            proc.resume()
        except Exception:
            pass
        proc.stop()


@pytest.fixture
def redis_server(redis_factory) -> RedisProcess:
    return redis_factory()
