"""Test helpers for forwarding: the reference backend as a real process, and API helpers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from procs import ManagedProcess
from tests.support import LISTENING, ROOT, ServerProcess

# Short delivery timings for tests (the defaults are 500 ms / 5 s / 0.5 s..30 s).
FAST_FORWARDING = {
    "COLLAB_FORWARD_DEBOUNCE_MS": "50",
    "COLLAB_FORWARD_MAX_DELAY_MS": "500",
    "COLLAB_FORWARD_BACKOFF_INITIAL_MS": "100",
    "COLLAB_FORWARD_BACKOFF_MAX_MS": "1000",
    "COLLAB_BACKEND_TIMEOUT_SECONDS": "5",
    "COLLAB_SEED_TIMEOUT_SECONDS": "5",
}


class BackendProcess:
    """``python -m refbackend`` in a child process we own (a procs.ManagedProcess)."""

    def __init__(self, db: Path, log_path: Path, port: int = 0) -> None:
        self.db = db
        self.log_path = log_path
        self.port = port
        self.child: ManagedProcess | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.child.proc if self.child is not None else None

    @proc.setter
    def proc(self, popen) -> None:
        """A subclass that starts the process itself hands over its Popen: still stopped (by PID) like ours."""
        self.child = None if popen is None else ManagedProcess.adopt(popen, name="refbackend", log_path=self.log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> BackendProcess:
        self.child = ManagedProcess(
            [sys.executable, "-m", "refbackend", "--port", str(self.port), "--db", str(self.db)],
            name="refbackend",
            log_path=self.log_path,
            env={"PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
            ready_log=LISTENING,
        )
        self.child.start(timeout)
        self.port = self.child.port
        return self

    def restart(self) -> BackendProcess:
        """Start again on the same port and database (after ``stop`` or ``kill``)."""
        return self.start()

    def log(self) -> str:
        return self.child.log_tail(4000) if self.child is not None else ""

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def pause(self) -> None:
        """SIGSTOP: a backend that accepts connections and never answers."""
        if self.child is not None:
            self.child.pause()

    def resume(self) -> None:
        if self.child is not None:
            self.child.resume()

    def stop(self, timeout: float = 10.0) -> None:
        if self.child is not None:
            self.child.stop(timeout)

    # ------------------------------------------------------------ admin API

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=5)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any], method: str = "POST") -> Any:
        response = httpx.request(method, f"{self.url}{path}", json=body, timeout=5)
        response.raise_for_status()
        return response.json()

    def log_of(self, ds: str) -> dict[str, Any]:
        return self.get(f"/admin/data-sources/{ds}/log")

    def data_source(self, ds: str) -> dict[str, Any] | None:
        response = httpx.get(f"{self.url}/data-sources/{ds}", timeout=5)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def set_data_source(self, ds: str, config: dict[str, Any], seq: int = 0) -> None:
        self.post(f"/admin/data-sources/{ds}", {"config": config, "seq": seq}, method="PUT")


def api(server: ServerProcess, path: str, method: str = "GET", **kw: Any) -> Any:
    response = httpx.request(method, f"{server.http_url}{path}", timeout=5, **kw)
    response.raise_for_status()
    return response.json()


def forward_status(server: ServerProcess, workspace: str) -> dict[str, Any]:
    return api(server, f"/api/workspaces/{workspace}/forwarding")


def history(server: ServerProcess, workspace: str, limit: int = 500, token: str | None = None) -> list[dict[str, Any]]:
    """Every audit entry of a workspace, oldest first (follows the pages)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    entries: list[dict[str, Any]] = []
    before = None
    while True:
        query = f"?limit={limit}" + (f"&before={before}" if before else "")
        page = api(server, f"/api/workspaces/{workspace}/history{query}", headers=headers)
        entries.extend(page["entries"])
        before = page["next_before"]
        if before is None:
            return list(reversed(entries))


def applied_ranges_cover(applied: list[dict[str, Any]], last_seq: int) -> None:
    """The backend applied changes 1..last_seq exactly once each, in order."""
    expected = 1
    for entry in applied:
        assert entry["first_seq"] <= expected, f"change {expected} never applied (next request {entry})"
        assert entry["first_seq"] >= expected, f"changes {entry['first_seq']}..{expected - 1} applied twice"
        assert entry["seq"] >= entry["first_seq"]
        expected = entry["seq"] + 1
    assert expected == last_seq + 1, f"applied up to {expected - 1}, recorded {last_seq}"
