"""Child processes that tests and benchmarks start: one way to start, wait for, and stop them.

Every redis-server, uvicorn server, reference backend and peer server the test
suite or ``loadtest/`` spawns is a :class:`ManagedProcess`. Imports nothing of
the project.
"""

from procs.managed import ManagedProcess, ProcessFailed, free_port

__all__ = ["ManagedProcess", "ProcessFailed", "free_port"]
