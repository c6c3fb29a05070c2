"""The Redis breaker storage against a real redis-server, in one process.

Two breakers with storages of their own stand for two processes of a fleet.
"""

from __future__ import annotations

import logging
import signal
import time

import grpc
import pybreaker
import pytest
import redis
from prometheus_client import CollectorRegistry

from calcsvc import BackendError, BreakerOpenError, CalculatorClient, create_breaker
from calcsvc.storage import DEFAULT_RETRY_AFTER, DEFAULT_TIMEOUT, RedisStorage
from tests.support import (
    HOST,
    BlockingAioClient,
    free_port,
    run_calcsvc,
    wait_until,
)

NAME = "shared"
STATE_KEY = f"calcsvc:breaker:{NAME}:pybreaker:state"


def fail():
    raise BackendError(grpc.StatusCode.UNAVAILABLE, "down")


def fleet(url, count=2, **options):
    return [
        create_breaker(NAME, state_storage=RedisStorage.from_url(url, NAME), **options)
        for _ in range(count)
    ]


def test_the_open_time_is_kept_to_the_millisecond(redis_server):
    (breaker,) = fleet(redis_server.url, count=1, fail_max=1)
    with pytest.raises(BackendError):
        breaker.call(fail)

    opened_at = breaker._state_storage.opened_at
    assert opened_at is not None
    assert opened_at.microsecond % 1000 == 0
    assert abs(opened_at.timestamp() - time.time()) < 5
    raw = redis.Redis.from_url(redis_server.url).get(
        f"calcsvc:breaker:{NAME}:pybreaker:opened_at"
    )
    assert raw is not None
    assert b"." in raw


def test_one_trip_opens_every_breaker_of_the_fleet(redis_server):
    first, second = fleet(redis_server.url, fail_max=2)
    with pytest.raises(BackendError):
        first.call(fail)
    with pytest.raises(BackendError):
        second.call(fail)

    for breaker in (first, second):
        with pytest.raises(BreakerOpenError):
            breaker.call(lambda: 1)


def test_noticing_another_breakers_change_keeps_the_fleets_failure_count(
    redis_server,
):
    first, second = fleet(redis_server.url, fail_max=3, reset_timeout=0.2)
    for _ in range(3):
        with pytest.raises(BackendError):
            first.call(fail)
    assert second.state.name == pybreaker.STATE_OPEN

    # The first breaker recovers and counts a failure; the second, which last
    # saw the breaker open, learns it is closed and must keep that count.
    time.sleep(0.25)
    assert first.call(lambda: 1) == 1
    with pytest.raises(BackendError):
        first.call(fail)
    assert second.state.name == pybreaker.STATE_CLOSED
    assert second.fail_counter == 1


def test_a_half_open_fleet_makes_one_trial_call(redis_server):
    first, second = fleet(redis_server.url, fail_max=1, reset_timeout=0.1)
    with pytest.raises(BackendError):
        first.call(fail)
    time.sleep(0.15)

    admission = first.admit(fail)
    assert admission.trial
    with pytest.raises(BreakerOpenError):
        second.admit(fail)
    first.record(admission)
    assert second.call(lambda: 1) == 1


def test_a_state_redis_cannot_name_is_replaced_by_the_local_one(redis_server):
    (breaker,) = fleet(redis_server.url, count=1, fail_max=1)
    with pytest.raises(BackendError):
        breaker.call(fail)
    shared = redis.Redis.from_url(redis_server.url)
    shared.set(STATE_KEY, b"melted")

    with pytest.raises(BreakerOpenError):
        breaker.call(lambda: 1)
    assert shared.get(STATE_KEY) == b"open"


def test_without_redis_a_client_starts_and_calls_on_local_state(shared_server, caplog):
    registry = CollectorRegistry()
    nowhere = f"redis://{HOST}:{free_port()}/0"
    with caplog.at_level(logging.INFO, logger="calcsvc.storage"):
        client = CalculatorClient(
            shared_server.target, registry=registry, breaker_storage=nowhere
        )
        with client:
            start = time.monotonic()
            for _ in range(50):
                assert client.add(1, 2) == 3
            elapsed = time.monotonic() - start

    # Redis is tried again after a pause, not on every call.
    errors = registry.get_sample_value(
        "circuit_breaker_storage_errors_total", {"breaker": "calculator"}
    )
    assert errors is not None
    assert 1 <= errors < 10
    assert elapsed < 10
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


def test_a_frozen_redis_holds_a_call_no_longer_than_the_storage_timeout(
    shared_server, redis_server, caplog
):
    registry = CollectorRegistry()
    client = CalculatorClient(
        shared_server.target, registry=registry, breaker_storage=redis_server.url
    )
    storage = client.breaker._state_storage
    assert isinstance(storage, RedisStorage)
    with client:
        assert client.add(1, 2) == 3

        # SIGSTOP keeps the connection open, and Redis answers nothing on it.
        redis_server.process.send_signal(signal.SIGSTOP)
        durations = []
        try:
            with caplog.at_level(logging.WARNING, logger="calcsvc.storage"):
                ends = time.monotonic() + 2.5 * DEFAULT_RETRY_AFTER
                while time.monotonic() < ends:
                    start = time.monotonic()
                    assert client.add(1, 2) == 3
                    durations.append(time.monotonic() - start)
        finally:
            redis_server.process.send_signal(signal.SIGCONT)

        # redis-py's own default would wait on the socket for ever.
        assert max(durations) < DEFAULT_TIMEOUT + 0.5
        # One timeout when Redis froze, then one per try after each pause.
        errors = registry.get_sample_value(
            "circuit_breaker_storage_errors_total", {"breaker": "calculator"}
        )
        assert errors is not None
        assert 2 <= errors <= 4
        logged = [r for r in caplog.records if r.name == "calcsvc.storage"]
        assert [r.levelno for r in logged] == [logging.WARNING]

        # Thawed, Redis holds the breaker again.
        wait_until(lambda: client.add(1, 2) == 3 and storage.reachable)


def test_a_bad_storage_url_is_refused(shared_server):
    with pytest.raises(ValueError, match="not a Redis URL"):
        CalculatorClient(shared_server.target, breaker_storage="http://example/")


def test_the_cli_keeps_its_breaker_in_redis(shared_server, redis_server):
    done = run_calcsvc(
        "add",
        "1",
        "2",
        "--target",
        shared_server.target,
        "--breaker-storage",
        redis_server.url,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "3\n"
    assert (
        redis.Redis.from_url(redis_server.url).get(
            STATE_KEY.replace(NAME, "calculator")
        )
        == b"closed"
    )


@pytest.mark.parametrize("url", ["http://localhost:6379", "redis://host:port/0", ""])
def test_the_cli_refuses_a_storage_that_is_not_a_redis_url(url):
    done = run_calcsvc("add", "1", "2", "--breaker-storage", url)

    assert done.returncode == 2
    assert "--breaker-storage: must be a Redis URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_asyncio_client_shares_the_breaker_too(start_server, redis_server):
    server = start_server()
    threaded = CalculatorClient(
        server.target,
        registry=CollectorRegistry(),
        fail_max=1,
        reset_timeout=30,
        breaker_storage=redis_server.url,
    )
    asyncio_client = BlockingAioClient(
        server.target,
        registry=CollectorRegistry(),
        fail_max=1,
        reset_timeout=30,
        breaker_storage=redis_server.url,
    )
    try:
        assert asyncio_client.add(1, 2) == 3
        server.kill()
        with pytest.raises(BackendError):
            threaded.add(1, 2)
        with pytest.raises(BreakerOpenError):
            asyncio_client.add(1, 2)
    finally:
        threaded.close()
        asyncio_client.shut_down()
