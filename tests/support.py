"""Test helpers: real server processes on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_listening(
    argv: list[str], log_path: Path, env: dict[str, str], timeout: float, name: str
) -> tuple[subprocess.Popen, object, int]:
    """Start a child whose output goes to ``log_path``; wait for its "listening on" line.

    Returns the process, the open log file and the port it printed (so port 0
    works). Kills the child and raises with its log if it exits or stays silent.
    """
    log = open(log_path, "ab")
    offset = log.tell()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-8000:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
        match = _LISTENING.search(log_path.read_bytes()[offset:].decode(errors="replace"))
        if match:
            return proc, log, int(match.group(2))
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    raise RuntimeError(f"{name} did not start within {timeout}s:\n{log_path.read_text(errors='replace')[-8000:]}")


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
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 20.0) -> ServerProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.setdefault("COLLAB_LOG_LEVEL", "info")
        deadline = time.monotonic() + timeout
        self.proc, self._log, self.port = spawn_listening(
            [sys.executable, "-m", "collab", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)]
            + self.args,
            self.log_path,
            env,
            timeout,
            "server",
        )
        # Listening is printed after startup; /healthz must answer too.
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.http_url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"/healthz never answered:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode if self.proc else None

    def restart(self) -> ServerProcess:
        """Start again on the same port and data directory."""
        return self.start()


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    """Poll a condition with a bounded timeout (for state with no event to wait on)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
