"""Start our server pinned to one core, for benchmarks.

    python -m loadtest serve --cpu 0 --data-dir /tmp/lt-data

runs ``taskset -c 0 <venv>/bin/collab serve --port 0 --data-dir /tmp/lt-data``,
prints its PID and websocket URL, and stops it (by its PID) on Ctrl-C or
SIGTERM. The same is done by ``--spawn-server`` on the fanout/sweep
commands. The server's log goes to a file (a pipe nobody reads would stall it).
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from procs import ManagedProcess

_LISTENING = r"listening on http://[\d.]+:(?P<port>\d+)"


class PinnedServer:
    def __init__(
        self,
        cpu: int | None = 0,
        data_dir: str | Path | None = None,
        port: int = 0,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
    ) -> None:
        self.cpu = cpu
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="collab-loadtest-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path) if log_path else self.data_dir / "server.log"
        self.requested_port = port
        self.port: int | None = None
        self.env = env or {}
        self.child: ManagedProcess | None = None

    @property
    def proc(self):
        return self.child.proc if self.child is not None else None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def command(self) -> list[str]:
        collab = Path(sys.executable).parent / "collab"
        serve = [str(collab)] if collab.exists() else [sys.executable, "-m", "collab"]
        serve += ["serve", "--host", "127.0.0.1", "--port", str(self.requested_port), "--data-dir", str(self.data_dir)]
        if self.cpu is None:
            return serve
        taskset = shutil.which("taskset")
        if taskset is None:
            raise RuntimeError("taskset not found (util-linux); start the server yourself or pass --server-cpu -1")
        return [taskset, "-c", str(self.cpu), *serve]

    def start(self, timeout: float = 30.0) -> PinnedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.child = ManagedProcess(
            self.command(),
            name="server",
            log_path=self.log_path,
            env={"PYTHONUNBUFFERED": "1", **self.env},
            ready_log=_LISTENING,
        )
        self.child.start(timeout)
        self.port = self.child.port
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM our child (by PID), SIGKILL if it does not exit in time."""
        code = self.child.stop(timeout) if self.child is not None else None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        return code

    def __enter__(self) -> PinnedServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(args) -> int:
    server = PinnedServer(cpu=None if args.cpu < 0 else args.cpu, data_dir=args.data_dir, port=args.port)
    server.start()
    print(
        f"server pid {server.pid} (cpu {args.cpu if args.cpu >= 0 else 'any'}) listening on {server.ws_url}; "
        f"log {server.log_path}",
        flush=True,
    )
    print(
        f"run e.g.: taskset -c 1 {sys.executable} -m loadtest fanout --url {server.ws_url} --server-pid {server.pid}",
        flush=True,
    )
    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stopping and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.2)
    finally:
        code = server.stop()
    print(f"server stopped ({code})", flush=True)
    return 0
