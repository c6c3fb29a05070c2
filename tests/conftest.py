"""Fixtures that run real calcsvc servers on free loopback ports."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from calcsvc.process import ServerProcess
from tests.support import (
    HOST,
    FleetWorker,
    Metrics,
    RedisProcess,
    free_port,
    scrape,
    stop_all,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


@pytest.fixture(scope="module")
def server_flags() -> list[str]:
    """Flags that choose the kind of server: none, the threaded one.

    ``tests/test_server.py`` overrides this to run against both kinds.
    """
    return []


@pytest.fixture
def start_server(
    tmp_path: Path, server_flags: list[str]
) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers with extra ``calcsvc serve`` arguments; all stop at the end."""
    started: list[ServerProcess] = []
    logs = []

    def start(*extra_args: str, port: int | None = None) -> ServerProcess:
        log = (tmp_path / f"server-{len(started)}.log").open("wb")
        logs.append(log)
        server = ServerProcess(
            HOST,
            port or free_port(),
            metrics_port=free_port(),
            extra_args=["--grace", "1", *server_flags, *extra_args],
            stderr=log,
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
    for log in logs:
        log.close()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """A server of its own for one test."""
    return start_server()


@pytest.fixture(scope="module")
def shared_server(
    tmp_path_factory: pytest.TempPathFactory, server_flags: list[str]
) -> Iterator[ServerProcess]:
    """One server for the tests of a module that only read from it."""
    path = tmp_path_factory.mktemp("shared") / "server.log"
    with path.open("wb") as log:
        server = ServerProcess(
            HOST,
            free_port(),
            metrics_port=free_port(),
            extra_args=server_flags,
            stderr=log,
        )
        with server:
            yield server


@pytest.fixture
def client_metrics() -> Iterator[tuple[CollectorRegistry, Callable[[], Metrics]]]:
    """A fresh registry served over HTTP, and a function that scrapes it."""
    registry = CollectorRegistry()
    port = free_port()
    httpd, _ = start_http_server(port, HOST, registry)
    yield registry, lambda: scrape(port)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of its own for one test, on a free loopback port."""
    directory = tmp_path / "redis"
    directory.mkdir()
    redis = RedisProcess(directory)
    redis.start()
    yield redis
    redis.kill()


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator[Callable[..., list[FleetWorker]]]:
    """Start fleet worker processes; all are stopped at the end."""
    started: list[FleetWorker] = []

    def start(
        count: int, target: str, *args: str, env: dict[str, str] | None = None
    ) -> list[FleetWorker]:
        workers = [
            FleetWorker(
                target,
                *args,
                stderr=tmp_path / f"worker-{len(started) + n}.log",
                env=env,
            )
            for n in range(count)
        ]
        started.extend(workers)
        for worker in workers:
            assert worker.ready.wait(30), worker.log()
        return workers

    yield start
    stop_all(started)
