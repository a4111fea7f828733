"""Fixtures shared by all tests: real redis-server and real ``hub serve`` processes on free
loopback ports (the helpers they use are in tests/helpers.py), and the kind markers.

Nothing here touches a Redis on 6379 or any non-loopback address. Every process a fixture
starts is killed at teardown.

Each test is marked with its kind, from the folder it is in: ``unit`` (tests/unit/: no
sockets, no subprocesses, no Redis), ``integration`` (tests/integration/: an in-process hub or
node, a real redis-server) or ``system`` (tests/system/: real processes, proxies, clusters, the
bench); ``pytest -m unit`` runs one kind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import REDIS_SERVER, Cluster, HubProcess, RedisServer

KINDS = ("unit", "integration", "system")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with the kind of the folder it is in (tests/KIND/...)."""
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(TESTS).parts
        if len(parts) > 1 and parts[0] in KINDS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def _redis(workdir: Path, extra: tuple[str, ...] = ()) -> RedisServer:
    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed (bash .ci/run installs it)")
    return RedisServer(workdir, extra=extra)


@pytest.fixture
def redis_server(tmp_path):
    server = _redis(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def redis_factory(tmp_path):
    """Start more redis-servers: ``redis_factory(extra_args=())``."""
    servers: list[RedisServer] = []

    def make(extra: tuple[str, ...] = ()) -> RedisServer:
        server = _redis(tmp_path / f"redis{len(servers)}", extra)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def hub_factory(tmp_path):
    """Start hubs: ``hub_factory(*args, redis=None, env=None, wait_ready=True, port=None)``."""
    hubs: list[HubProcess] = []

    def make(*args: str, redis: RedisServer | None = None, env: dict | None = None,
             wait_ready: bool = True, port: int | None = None) -> HubProcess:
        hub = HubProcess(tuple(args), tmp_path, redis, env, port)
        hubs.append(hub)
        if wait_ready:
            hub.wait_ready()
        return hub

    yield make
    for hub in hubs:
        hub.terminate()
    for hub in hubs:
        try:
            hub.wait(15)
        except subprocess.TimeoutExpired:
            hub.kill()


@pytest.fixture
def cluster(tmp_path):
    """A real three-master Redis Cluster (:class:`tests.helpers.Cluster`), killed at
    teardown; tests using it are marked ``cluster``."""
    nodes = Cluster(tmp_path / "cluster")
    try:
        nodes.create()
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
def replicated_cluster(tmp_path):
    """:func:`cluster` with one replica per master."""
    nodes = Cluster(tmp_path / "cluster", replicas=1)
    try:
        nodes.create()
        yield nodes
    finally:
        nodes.close()
