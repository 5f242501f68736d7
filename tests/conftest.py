from __future__ import annotations

import pytest

from tests.support import ServerProcess


@pytest.fixture
def server_factory(tmp_path):
    """Start real servers (``python -m collab serve``); all are stopped after the test."""
    started: list[ServerProcess] = []

    def make(
        env: dict[str, str] | None = None, data_dir=None, name: str = "server", args: list[str] | None = None
    ) -> ServerProcess:
        data = data_dir or tmp_path / f"{name}-data"
        srv = ServerProcess(data, tmp_path / f"{name}.log", env=env, args=args)
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def server(server_factory) -> ServerProcess:
    return server_factory()


from tests.redis_support import redis_factory, redis_server  # noqa: E402,F401  (fixtures)

# Markers from what a test module starts (read from its source once): `pytest -m unit`
# runs the tests that start no process; `make test` runs everything.
_KINDS = {
    "browser": ("playwright", "chromium"),
    "node": ("node_clients", "NODE", ".mjs"),
    "redis": ("redis_server", "redis_factory", "redis-server", "RedisProcess"),
    "server": (
        "server_factory",
        "ServerProcess",
        "(server",
        "server)",
        "spawn-server",
        "spawn_server",
        "_server(",
        "ManagedProcess(",
    ),
}
_module_kinds: dict[str, list[str]] = {}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.path)
        kinds = _module_kinds.get(path)
        if kinds is None:
            source = item.path.read_text(errors="replace")
            kinds = [kind for kind, needles in _KINDS.items() if any(n in source for n in needles)] or ["unit"]
            _module_kinds[path] = kinds
        for kind in kinds:
            item.add_marker(kind)
