"""Real redis-server processes for tests: free loopback ports, owned by PID.

Never touches the machine's own Redis on 6379: every instance gets its own
port and directory, and is ended by its PID only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.support import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisProcess:
    def __init__(self, workdir: Path, appendonly: bool = False, port: int | None = None) -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        if REDIS_SERVER is None:
            pytest.fail("redis-server is not installed (make test installs it)")
        args = [
            REDIS_SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited: {self.log()}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.02)
            raise RuntimeError(f"redis-server did not answer within {timeout}s")
        finally:
            client.close()

    def log(self) -> str:
        try:
            return (self.workdir / "redis.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: whatever was not written to the AOF is gone."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def wipe(self) -> None:
        """Delete the data directory's contents (restart then starts empty)."""
        for item in self.workdir.iterdir():
            if item.name != "redis.log":
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)


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
