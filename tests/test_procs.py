"""The one process helper (procs.ManagedProcess) that every spawned server, Redis and backend uses.

The children here are tiny Python scripts, so each behaviour is shown in
isolation: readiness by log line / port / URL, a bounded wait that names what
was missing and shows the child's log, stop by PID with SIGTERM then SIGKILL,
kill -9, SIGSTOP/SIGCONT, and cleanup by ``with`` and by the fixture.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from procs import ManagedProcess, ProcessFailed, free_port
from procs.managed import port_listens

# Binds a port (0: any), says so, serves HTTP until SIGTERM.
SERVE = """
import http.server, signal, sys
port = int(sys.argv[1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = {"/ready": 200, "/fail": 500}.get(self.path, 404)
        self.send_response(code); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", port), H)
def bye(*_):
    print("got SIGTERM", flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print(f"listening on http://127.0.0.1:{srv.server_address[1]}", flush=True)
srv.serve_forever()
"""
LISTENING = r"listening on http://[\d.]+:(?P<port>\d+)"


@pytest.fixture
def processes(tmp_path):
    """``make(argv, **kw)``: a ManagedProcess logging to tmp_path; all stopped (by PID) at teardown."""
    made: list[ManagedProcess] = []

    def make(argv, name="child", **kw) -> ManagedProcess:
        child = ManagedProcess(argv, name=name, log_path=tmp_path / f"{name}.log", **kw)
        made.append(child)
        return child

    yield make
    for child in made:
        child.stop(timeout=2)
    assert not any(child.running for child in made)


def py(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def state(pid: int) -> str:
    """The kernel's process state letter: S sleeping, T stopped, Z zombie..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_ready_by_log_line_reads_the_port_and_stops_with_sigterm(processes):
    child = processes(py(SERVE, "0"), ready_log=LISTENING).start(timeout=20)
    assert child.running and child.port and port_listens(child.port)
    assert child.match is not None and child.match.group("port") == str(child.port)
    assert httpx.get(f"http://127.0.0.1:{child.port}/ready", timeout=5).text == "ok"
    assert child.stop() == 0  # it exited by itself on SIGTERM
    assert "got SIGTERM" in child.log_tail()
    assert not child.running and not port_listens(child.port)


def test_ready_by_port_and_by_url(processes):
    port = free_port()
    by_port = processes(py(SERVE, str(port)), name="by-port", port=port).start(timeout=20)
    assert port_listens(port)
    by_port.stop()
    by_url = processes(py(SERVE, "0"), name="by-url", ready_log=LISTENING, ready_url="http://127.0.0.1:{port}/ready")
    by_url.start(timeout=20)
    assert httpx.get(f"http://127.0.0.1:{by_url.port}/ready", timeout=5).status_code == 200
    # A URL that answers only with server errors never makes the child ready.
    broken = processes(py(SERVE, "0"), name="broken", ready_log=LISTENING, ready_url="http://127.0.0.1:{port}/fail")
    with pytest.raises(ProcessFailed, match=r"not ready within 2s: no answer from http://127.0.0.1:\d+/fail"):
        broken.start(timeout=2)
    assert not broken.running


def test_a_child_that_exits_early_fails_fast_with_its_log(processes):
    child = processes(py("import sys; print('bad config: no port', flush=True); sys.exit(3)"), ready_log=LISTENING)
    started = time.monotonic()
    with pytest.raises(ProcessFailed) as info:
        child.start(timeout=30)
    assert time.monotonic() - started < 20  # it did not wait out the timeout
    assert "exited with 3" in str(info.value) and "bad config: no port" in str(info.value)
    assert child.returncode == 3


def test_a_silent_child_is_killed_after_the_bound_and_says_what_was_missing(processes):
    child = processes(py("import time; print('starting', flush=True); time.sleep(3600)"), ready_log=LISTENING)
    with pytest.raises(ProcessFailed) as info:
        child.start(timeout=1.0)
    message = str(info.value)
    assert "not ready within 1.0s" in message and "listening on" in message and "starting" in message
    assert child.returncode is not None and not alive(child.pid)  # killed and reaped, not left behind


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(processes):
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(3600)"
    )
    child = processes(py(code), ready_log="up").start(timeout=20)
    assert child.stop(timeout=0.5) == -signal.SIGKILL
    assert not alive(child.pid)


def test_kill_pause_and_resume(processes):
    child = processes(py(SERVE, "0"), ready_log=LISTENING).start(timeout=20)
    url = f"http://127.0.0.1:{child.port}/ready"
    child.pause()
    assert state(child.pid) == "T"
    with pytest.raises(httpx.TimeoutException):  # the socket is open, nobody answers
        httpx.get(url, timeout=0.5)
    child.resume()
    assert httpx.get(url, timeout=5).status_code == 200
    child.kill()
    assert child.returncode == -signal.SIGKILL and not alive(child.pid)
    # A new process on the port the killed one had.
    restarted = processes(py(SERVE, str(child.port)), name="again", port=child.port).start(timeout=20)
    assert httpx.get(url, timeout=5).status_code == 200
    restarted.stop()


def test_a_stopped_child_is_still_stopped_by_stop(processes):
    child = processes(py(SERVE, "0"), ready_log=LISTENING).start(timeout=20)
    child.pause()
    assert child.stop(timeout=5) == 0  # SIGCONT first, so it could act on SIGTERM
    assert "got SIGTERM" in child.log_tail()


def test_context_manager_stops_even_when_the_body_fails(tmp_path):
    child = ManagedProcess(py(SERVE, "0"), log_path=tmp_path / "ctx.log", ready_log=LISTENING)
    with pytest.raises(ZeroDivisionError):
        with child:
            pid = child.pid
            assert alive(pid)
            raise ZeroDivisionError
    assert not alive(pid) and child.returncode == 0


def test_environment_and_working_directory(processes, tmp_path):
    code = "import os; print('ready', os.environ.get('WHO'), os.getcwd(), flush=True); import time; time.sleep(60)"
    child = processes(py(code), env={"WHO": "testkit"}, cwd=tmp_path, ready_log=r"ready (\S+) (\S+)").start(20)
    assert child.match.groups() == ("testkit", str(tmp_path))
    bare = processes([sys.executable, "-c", code], name="bare", env={"PATH": os.environ["PATH"]}, inherit_env=False,
                     ready_log=r"ready (\S+)")  # fmt: skip
    os.environ["WHO"] = "leaked"
    try:
        bare.start(20)
    finally:
        del os.environ["WHO"]
    assert bare.match.group(1) == "None"
