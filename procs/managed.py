"""ManagedProcess: start a child, wait until it is ready, keep its log, stop it by PID.

Why one helper: a test that starts a server must (1) not hang when the server
never comes up, (2) say *why* it did not come up, and (3) never leave the
server running, whatever the test did. So every child here

* writes stdout and stderr to a log file (a pipe nobody reads would stall it);
* is ready only when a bounded wait succeeds: a line in its log (which can
  name the port it bound, for ``--port 0``), a TCP port accepting connections,
  an HTTP URL answering, and/or a predicate -- otherwise it is killed and
  :class:`ProcessFailed` carries the tail of its log;
* is stopped by its PID only (SIGTERM, then SIGKILL after a bound), also by
  ``with`` and by the fixtures that made it; never by name.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

TAIL_BYTES = 8000


def free_port() -> int:
    """A loopback port free right now (the child may still lose a race for it; prefer port 0 + a log line)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessFailed(RuntimeError):
    """The child exited or was not ready in time; the message ends with its log's tail."""


def port_listens(port: int, host: str = "127.0.0.1", timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def url_answers(url: str, timeout: float = 1.0) -> bool:
    """True when a GET of ``url`` succeeds (2xx; redirects followed)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (OSError, ValueError):  # HTTPError (4xx/5xx) is an OSError too
        return False


class ManagedProcess:
    """One child process we own.

    ``argv``/``env``/``cwd`` as for ``subprocess.Popen``; ``env`` entries are
    added to (``inherit_env=True``) or replace this process's environment.
    Readiness, all optional and checked in this order within ``start``'s
    ``timeout``: ``ready_log`` (a regex searched in what the child wrote since
    this start; a group named ``port``, or else the last group, sets
    :attr:`port`), ``port`` accepting TCP connections, ``ready_url`` answering
    2xx (``{port}`` is filled in), ``ready`` returning true. With none given, the
    child is ready once started.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: str | Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        cwd: str | Path | None = None,
        port: int | None = None,
        ready_log: str | re.Pattern[str] | None = None,
        ready_url: str | None = None,
        ready: Callable[[ManagedProcess], bool] | None = None,
        stop_timeout: float = 10.0,
        stop_signal: int = signal.SIGTERM,
        cpus: set[int] | None = None,
        poll_interval: float = 0.02,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.log_path = Path(log_path)
        self.env = dict(env or {})
        self.inherit_env = inherit_env
        self.cwd = cwd
        self.port = port
        self.ready_log = re.compile(ready_log) if isinstance(ready_log, str) else ready_log
        self.ready_url = ready_url
        self.ready = ready
        self.stop_timeout = stop_timeout
        self.stop_signal = stop_signal  # nginx: SIGQUIT is its graceful stop
        self.cpus = set(cpus) if cpus else None  # pin the child (benchmarks: server on one core)
        self.poll_interval = poll_interval
        self.proc: subprocess.Popen | None = None
        self.match: re.Match[str] | None = None
        self._log: IO[bytes] | None = None
        self._offset = 0

    @classmethod
    def adopt(cls, proc: subprocess.Popen, *, log_path: str | Path, name: str | None = None) -> ManagedProcess:
        """Take charge of a child started elsewhere (already running): stop, kill, pause it by PID like ours."""
        child = cls(proc.args if isinstance(proc.args, list) else [str(proc.args)], log_path=log_path, name=name)
        child.proc = proc
        return child

    # ------------------------------------------------------------ state

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def log_text(self, since_start: bool = False) -> str:
        """What the child wrote (since the last ``start`` with ``since_start``)."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[self._offset if since_start else 0 :].decode(errors="replace")

    def log_tail(self, size: int = TAIL_BYTES) -> str:
        return self.log_text()[-size:]

    # ------------------------------------------------------- start / stop

    def start(self, timeout: float = 20.0) -> ManagedProcess:
        """Start the child and wait (at most ``timeout`` s) until it is ready; kill it and raise if not."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = open(self.log_path, "ab")
        self._offset = self._log.tell()
        env = {**os.environ, **self.env} if self.inherit_env else dict(self.env)
        self.match = None
        cpus = self.cpus
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        try:
            self._wait_ready(time.monotonic() + timeout, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        def check(what: str, condition: Callable[[], Any]) -> Any:
            while True:
                if self.proc.poll() is not None:
                    raise ProcessFailed(self._failure(f"exited with {self.proc.returncode} before {what}"))
                result = condition()
                if result:
                    return result
                if time.monotonic() > deadline:
                    raise ProcessFailed(self._failure(f"not ready within {timeout}s: no {what}"))
                time.sleep(self.poll_interval)

        if self.ready_log is not None:
            self.match = check(f"log line /{self.ready_log.pattern}/", self._search_log)
            groups = self.match.re.groupindex
            port = self.match.group("port") if "port" in groups else (self.match.groups() or (None,))[-1]
            if port is not None and str(port).isdigit():
                self.port = int(port)
        if self.port is not None and self.ready_url is None:
            check(f"listener on port {self.port}", lambda: port_listens(self.port))
        if self.ready_url is not None:
            url = self.ready_url.format(port=self.port)
            check(f"answer from {url}", lambda: url_answers(url))
        if self.ready is not None:
            check("readiness check", lambda: self.ready(self))

    def _search_log(self) -> re.Match[str] | None:
        return self.ready_log.search(self.log_text(since_start=True))

    def _failure(self, what: str) -> str:
        return (
            f"{self.name} (pid {self.proc.pid}, {' '.join(self.argv)[:300]}) {what}; log {self.log_path}:\n"
            + (self.log_text(since_start=True)[-TAIL_BYTES:])
        )

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (``stop_signal``), wait up to ``timeout`` (default ``stop_timeout``) s, then SIGKILL.

        Returns the exit code. Safe to call at any time, also twice or before ``start``.
        """
        if self.running:
            self.send_signal(signal.SIGCONT)  # a stopped child cannot act on SIGTERM
            self.send_signal(self.stop_signal)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()
        return self.returncode

    def kill(self) -> None:
        """kill -9: no shutdown hooks, no flush (what a crash looks like)."""
        if self.running:
            self.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        elif self.proc is not None:
            self.proc.poll()  # reap
        self._close_log()

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: the process is frozen, its sockets stay open (a hung node).

        Returns once the kernel reports it stopped (bounded; Linux /proc), so
        what the test does next really meets a frozen process.
        """
        self.send_signal(signal.SIGSTOP)
        stat = Path(f"/proc/{self.pid}/stat")
        deadline = time.monotonic() + timeout
        while self.running and time.monotonic() < deadline:
            try:
                if stat.read_text().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
            except OSError:  # no /proc here, or it just exited
                return
            time.sleep(0.001)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        self.send_signal(signal.SIGCONT)

    def send_signal(self, sig: int) -> None:
        """Signal our child by its PID (nothing else, never by name); a no-op once it has exited."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def cpu_seconds(self) -> float:
        """User + system CPU time of the child so far (Linux /proc; NaN when unknown)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def rss_bytes(self) -> int:
        """Resident memory of the child now (Linux /proc; 0 when unknown)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def wait(self, timeout: float) -> int:
        """Wait (bounded) for the child to exit by itself; its exit code."""
        return self.proc.wait(timeout)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ManagedProcess:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "never started" if self.proc is None else (f"pid {self.proc.pid}" if self.running else "exited")
        return f"ManagedProcess({self.name}, {state}, port={self.port})"
