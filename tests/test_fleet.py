"""A fleet of client processes sharing one breaker through a real Redis.

Every worker is a real process (``tests/fleet_worker.py``) calling a real
server in a loop; the server is killed for real, and so is Redis.
"""

from __future__ import annotations

import itertools

import redis

from tests.support import free_port, scrape, wait_until

WORKERS = 4
FAIL_MAX = 3
RESET_TIMEOUT = 0.5
STATE = "calcsvc:breaker:calculator:pybreaker:state"


def _trip_the_fleet(server, workers):
    """Let every worker succeed, kill the server, wait until all of them reject."""
    wait_until(lambda: all(w.count("success") >= 3 for w in workers), timeout=20)
    server.kill()
    wait_until(lambda: all(w.last("rejected") for w in workers), timeout=20)
    return sum(w.count("failure") for w in workers)


def test_a_fleet_with_its_own_breaker_each_fails_fail_max_times_per_process(
    server, start_workers
):
    workers = start_workers(WORKERS, server.target, "--fail-max", str(FAIL_MAX))

    failed = _trip_the_fleet(server, workers)

    assert failed == WORKERS * FAIL_MAX


def test_a_fleet_sharing_its_breaker_stops_after_fail_max_failures(
    server, redis_server, start_workers
):
    workers = start_workers(
        WORKERS,
        server.target,
        "--fail-max",
        str(FAIL_MAX),
        "--breaker-storage",
        redis_server.url,
    )

    failed = _trip_the_fleet(server, workers)

    # Each worker calls one at a time, so besides the failures that trip the
    # breaker, the other workers have at most one call each in flight.
    assert FAIL_MAX <= failed <= FAIL_MAX + WORKERS - 1
    shared = redis.Redis.from_url(redis_server.url)
    assert shared.get(STATE) == b"open"


def test_the_fleet_recovers_through_one_trial_call(
    start_server, redis_server, start_workers
):
    server = start_server()
    workers = start_workers(
        WORKERS,
        server.target,
        "--fail-max",
        "1",
        "--reset-timeout",
        str(RESET_TIMEOUT),
        "--breaker-storage",
        redis_server.url,
    )
    wait_until(lambda: all(w.count("success") >= 3 for w in workers), timeout=20)
    server.kill()
    wait_until(lambda: all(w.last("rejected") for w in workers), timeout=20)
    failed_while_down = sum(w.count("failure") for w in workers)

    # While the server stays down, each reset timeout lets one trial call
    # through for the whole fleet, not one per worker: each failed trial call
    # opens the breaker again, so the next comes a reset timeout later.
    wait_until(
        lambda: sum(w.count("failure") for w in workers) >= failed_while_down + 4,
        timeout=20,
    )
    failures = sorted(end for w in workers for end in w.ends_of("failure"))
    trials = failures[-4:]
    gaps = [later - earlier for earlier, later in itertools.pairwise(trials)]
    assert min(gaps) >= 0.9 * RESET_TIMEOUT, gaps

    start_server(port=server.port)
    wait_until(lambda: all(w.last("success") for w in workers), timeout=20)


def test_redis_killed_and_restarted_mid_run(server, redis_server, start_workers):
    metrics_ports = []
    workers = []
    for _ in range(2):
        port = free_port()
        metrics_ports.append(port)
        workers += start_workers(
            1,
            server.target,
            "--fail-max",
            str(FAIL_MAX),
            "--breaker-storage",
            redis_server.url,
            "--metrics-port",
            str(port),
        )
    wait_until(lambda: all(w.count("success") >= 3 for w in workers), timeout=20)
    for port in metrics_ports:
        errors = scrape(port).value(
            "circuit_breaker_storage_errors_total", breaker="calculator"
        )
        assert errors == 0

    # Redis dies: calls go on, on local state, and say so once.
    redis_server.kill()
    before = [w.count("success") for w in workers]
    wait_until(
        lambda: all(
            w.count("success") >= b + 20 for w, b in zip(workers, before, strict=True)
        ),
        timeout=20,
    )
    for worker, port in zip(workers, metrics_ports, strict=True):
        assert worker.log().count("storage=redis unreachable") == 1
        errors = scrape(port).value(
            "circuit_breaker_storage_errors_total", breaker="calculator"
        )
        assert errors >= 1
        assert worker.count("failure") == 0
        # No call waits on the dead Redis for long: redis-py's own timeouts
        # (5 s) would have outlasted the call's deadline (2 s).
        assert max(worker.durations) < 2.0

    # Redis comes back empty; the workers seed it and share it again.
    redis_server.start()
    wait_until(
        lambda: all("storage=redis reachable again" in w.log() for w in workers),
        timeout=20,
    )
    shared = redis.Redis.from_url(redis_server.url)
    wait_until(lambda: shared.get(STATE) == b"closed")

    failed = _trip_the_fleet(server, workers)
    assert FAIL_MAX <= failed <= FAIL_MAX + len(workers) - 1
    assert shared.get(STATE) == b"open"
