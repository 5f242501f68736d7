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
