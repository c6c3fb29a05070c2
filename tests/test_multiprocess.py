"""Client worker processes in prometheus_client's multiprocess mode, one /metrics.

Like the web workers of a pre-fork server, each worker writes its metrics to
files in ``PROMETHEUS_MULTIPROC_DIR``, and one endpoint serves them summed
up by a ``MultiProcessCollector``.
"""

from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from tests.support import HOST, free_port, scrape, wait_until

WORKERS = 3
FAIL_MAX = 2


@pytest.fixture
def multiprocess(tmp_path):
    """The metrics directory, and a function that scrapes it over HTTP."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    port = free_port()
    httpd, _ = start_http_server(port, HOST, registry)
    yield directory, lambda: scrape(port)
    httpd.shutdown()
    httpd.server_close()


def test_worker_metrics_add_up_behind_one_endpoint(server, start_workers, multiprocess):
    directory, metrics = multiprocess
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    workers = start_workers(
        WORKERS, server.target, "--fail-max", str(FAIL_MAX), env=env
    )
    wait_until(lambda: all(w.count("success") >= 3 for w in workers), timeout=20)

    scraped = metrics()
    assert scraped.value("circuit_breaker_state", state="closed") == 1
    assert scraped.value("circuit_breaker_state", state="open") == 0
    assert scraped.value("circuit_breaker_fail_max") == FAIL_MAX

    server.kill()
    wait_until(lambda: all(w.last("rejected") for w in workers), timeout=20)
    scraped = metrics()
    # The state gauge is the highest value among live workers: the state some
    # worker is in shows 1, and none is closed any more.
    assert scraped.value("circuit_breaker_state", state="open") == 1
    assert scraped.value("circuit_breaker_state", state="closed") == 0
    assert (
        scraped.value("circuit_breaker_calls_total", outcome="failure")
        == WORKERS * FAIL_MAX
    )
    assert (
        scraped.value("circuit_breaker_transitions_total", to_state="open") == WORKERS
    )

    # Counters outlive the workers; live gauges leave with them.
    pids = [w.process.pid for w in workers]
    for worker in workers:
        worker.stop()
    for pid in pids:
        mark_process_dead(pid, str(directory))
    scraped = metrics()
    successes = sum(w.count("success") for w in workers)
    rejected = sum(w.count("rejected") for w in workers)
    assert scraped.value("circuit_breaker_calls_total", outcome="success") == successes
    assert scraped.value("circuit_breaker_calls_total", outcome="rejected") == rejected
    assert (
        scraped.value("grpc_client_started_total", grpc_method="Add")
        == successes + WORKERS * FAIL_MAX
    )
    assert scraped.value_or_zero("circuit_breaker_state") == 0
