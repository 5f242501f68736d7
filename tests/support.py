"""Test helpers: real server processes on free loopback ports (each a procs.ManagedProcess)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
from pathlib import Path
from typing import IO

from procs import ManagedProcess, free_port  # noqa: F401  (free_port: re-exported for tests)

ROOT = Path(__file__).resolve().parent.parent
LISTENING = r"listening on http://[\d.]+:(?P<port>\d+)"


def spawn_listening(
    argv: list[str], log_path: Path, env: dict[str, str], timeout: float, name: str
) -> tuple[subprocess.Popen, IO[bytes] | None, int]:
    """Start a child whose output goes to ``log_path``; wait for its "listening on" line.

    Kept for older callers: prefer ``ManagedProcess(..., ready_log=LISTENING)``,
    which also stops the child. Returns the Popen, None and the port it printed.
    """
    child = ManagedProcess(argv, name=name, log_path=log_path, env=env, inherit_env=False, cwd=ROOT,
                           ready_log=LISTENING)  # fmt: skip
    child.start(timeout)
    return child.proc, None, child.port


class ServerProcess:
    """``python -m collab serve`` in a child process we own (and only that)."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        port: int = 0,
        args: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.env = env or {}
        self.port = port
        self.args = list(args or [])  # more `collab serve` arguments, e.g. ["--config", "x.toml"]
        self.child: ManagedProcess | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.child.proc if self.child is not None else None

    @proc.setter
    def proc(self, popen) -> None:
        """A subclass that starts the process itself hands over its Popen: still stopped (by PID) like ours."""
        self.child = None if popen is None else ManagedProcess.adopt(popen, name="server", log_path=self.log_path)

    @property
    def pid(self) -> int:
        assert self.child is not None, "server not started"
        return self.child.pid

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Start (port 0: any free port, read from its log) and wait until /healthz answers."""
        env = {"PYTHONUNBUFFERED": "1", "COLLAB_LOG_LEVEL": "info", **self.env}
        self.child = ManagedProcess(
            [sys.executable, "-m", "collab", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
            + self.args,
            name="server",
            log_path=self.log_path,
            env=env,
            cwd=ROOT,
            ready_log=LISTENING,  # printed after startup; /healthz must answer too
            ready_url="http://127.0.0.1:{port}/healthz",
        )
        self.child.start(timeout)
        self.port = self.child.port
        return self

    def log(self) -> str:
        return self.child.log_tail() if self.child is not None else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush."""
        if self.child is not None:
            self.child.kill()

    def pause(self) -> None:
        """SIGSTOP: a hung node (sockets open, nothing answers)."""
        if self.child is not None:
            self.child.pause()

    def resume(self) -> None:
        if self.child is not None:
            self.child.resume()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        return self.child.stop(timeout) if self.child is not None else None

    def restart(self) -> ServerProcess:
        """Start again on the same port and data directory."""
        return self.start()


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll a condition with a bounded timeout (for state with no event to wait on).

    ``predicate`` may be a coroutine function (e.g. a Redis query). Real time:
    for code on a ManualClock, ``await clock.advance(...)`` instead.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
