"""Both Calculator clients against a real server that stops and comes back.

Every test runs against the threaded client and the asyncio one.
"""

from __future__ import annotations

import math
import time

import grpc
import pybreaker
import pytest

from calcsvc import BackendError, BreakerOpenError, CalculatorClient, CallerError
from tests.support import BlockingAioClient, free_port

BREAKER = "calculator"


@pytest.fixture(params=["threaded", "asyncio"])
def make_client(request):
    """Build clients of the kind under test; all are closed at the end."""
    made = []

    def make(target, **options):
        kind = CalculatorClient if request.param == "threaded" else BlockingAioClient
        client = kind(target, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        if isinstance(client, BlockingAioClient):
            client.shut_down()
        else:
            client.close()


def breaker_metrics(scrape):
    """Read the metrics the classic scenario is about, from a real scrape."""
    metrics = scrape()

    def value(name, **labels):
        return metrics.value_or_zero(name, **labels)

    return {
        "success": value("circuit_breaker_calls_total", outcome="success"),
        "failure": value("circuit_breaker_calls_total", outcome="failure"),
        "ignored": value("circuit_breaker_calls_total", outcome="ignored"),
        "rejected": value("circuit_breaker_calls_total", outcome="rejected"),
        "closed": value("circuit_breaker_state", state="closed"),
        "open": value("circuit_breaker_state", state="open"),
        "half_open": value("circuit_breaker_state", state="half_open"),
        "closed->open": value(
            "circuit_breaker_transitions_total", from_state="closed", to_state="open"
        ),
        "open->half_open": value(
            "circuit_breaker_transitions_total",
            from_state="open",
            to_state="half_open",
        ),
        "half_open->closed": value(
            "circuit_breaker_transitions_total",
            from_state="half_open",
            to_state="closed",
        ),
        "half_open->open": value(
            "circuit_breaker_transitions_total",
            from_state="half_open",
            to_state="open",
        ),
        "consecutive": value("circuit_breaker_consecutive_failures"),
        "network": value("grpc_client_started_total"),
    }


def test_the_classic_scenario(make_client, server, client_metrics):
    registry, scrape = client_metrics
    with make_client(server.target, registry=registry) as client:
        assert (client.breaker.fail_max, client.breaker.reset_timeout) == (2, 2.0)
        metrics = scrape()
        assert metrics.value("circuit_breaker_fail_max", breaker=BREAKER) == 2
        assert metrics.value("circuit_breaker_reset_timeout_seconds") == 2.0

        # Test 1: the server is up.
        assert client.add(5, 3) == 8
        assert breaker_metrics(scrape) == {
            **dict.fromkeys(breaker_metrics(scrape), 0.0),
            "success": 1,
            "closed": 1,
            "network": 1,
        }

        # Test 2: the server stops.
        server.stop()
        with pytest.raises(BackendError) as first:
            client.add(5, 3)
        assert first.value.code() is grpc.StatusCode.UNAVAILABLE
        assert client.breaker.current_state == pybreaker.STATE_CLOSED
        with pytest.raises(BackendError):
            client.add(5, 3)
        assert client.breaker.current_state == pybreaker.STATE_OPEN
        opened = time.monotonic()
        with pytest.raises(BreakerOpenError):
            client.add(5, 3)
        after_outage = breaker_metrics(scrape)
        assert after_outage == {
            **after_outage,
            "success": 1,
            "failure": 2,
            "rejected": 1,
            "closed": 0,
            "open": 1,
            "half_open": 0,
            "closed->open": 1,
            "consecutive": 2,
            "network": 3,  # the rejected call made no network attempt
        }
        failures = scrape().value("circuit_breaker_failures_total", error="UNAVAILABLE")
        assert failures == 2

        # Test 3: the server comes back; the reset timeout passes.
        # Rejected before the server is back: starting it can take longer
        # than the reset timeout on a busy machine.
        with pytest.raises(BreakerOpenError):
            client.add(5, 3)  # still inside the reset timeout
        server.start()
        back = time.monotonic()
        # The trial call waits for the reset timeout, and for the channel to
        # have tried again since the server came back: it tries at least
        # every reset_timeout / 2, give or take grpcio's 20% jitter.
        time.sleep(max(0.0, opened + 2.0, back + 1.5) - time.monotonic())
        assert client.add(5, 3) == 8
        assert breaker_metrics(scrape) == {
            **after_outage,
            "success": 2,
            "rejected": 2,
            "closed": 1,
            "open": 0,
            "open->half_open": 1,
            "half_open->closed": 1,
            "consecutive": 0,
            "network": 4,
        }


def test_caller_errors_pass_through_without_moving_the_breaker(
    make_client, shared_server, client_metrics
):
    registry, scrape = client_metrics
    with make_client(shared_server.target, registry=registry) as client:
        for _ in range(5):
            with pytest.raises(CallerError) as refused:
                client.divide(1, 0)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "zero" in refused.value.details()
        with pytest.raises(CallerError) as overflow:
            client.multiply(1e308, 10)
        assert overflow.value.code() is grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(CallerError, match="operand a"):
            client.add(math.nan, 1)

        assert client.breaker.current_state == pybreaker.STATE_CLOSED
        assert client.breaker.fail_counter == 0
        metrics = breaker_metrics(scrape)
        assert metrics["ignored"] == 7
        assert metrics["failure"] == 0
        assert metrics["closed"] == 1
        assert client.subtract(5, 3) == 2


def test_every_operation(make_client, shared_server, client_metrics):
    registry, _ = client_metrics
    with make_client(shared_server.target, registry=registry) as client:
        assert client.add(0.1, 0.2) == 0.1 + 0.2
        assert client.subtract(-1, 1) == -2
        assert client.multiply(1.5, -2) == -3
        assert client.divide(1, 3) == 1 / 3


def test_deadlines_count_as_failures(make_client, start_server, client_metrics):
    registry, scrape = client_metrics
    server = start_server("--inject-latency-ms", "1000")
    with make_client(server.target, timeout=0.05, registry=registry) as client:
        for _ in range(2):
            with pytest.raises(BackendError) as late:
                client.add(1, 1)
            assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert client.breaker.current_state == pybreaker.STATE_OPEN
    metrics = scrape()
    assert (
        metrics.value("circuit_breaker_failures_total", error="DEADLINE_EXCEEDED") == 2
    )


def test_a_failed_trial_call_opens_the_breaker_again(make_client, client_metrics):
    registry, scrape = client_metrics
    nothing_there = f"127.0.0.1:{free_port()}"
    with make_client(nothing_there, reset_timeout=0.2, registry=registry) as client:
        for _ in range(2):
            with pytest.raises(BackendError):
                client.add(1, 1)
        time.sleep(0.25)  # the reset timeout is what is under test
        with pytest.raises(BackendError):
            client.add(1, 1)  # the trial call
        assert client.breaker.current_state == pybreaker.STATE_OPEN

    metrics = breaker_metrics(scrape)
    assert metrics["open->half_open"] == 1
    assert metrics["half_open->open"] == 1
    assert metrics["open"] == 1
    assert metrics["failure"] == 3


def test_a_server_that_was_never_there_fails_fast(make_client, client_metrics):
    registry, _ = client_metrics
    nothing_there = f"127.0.0.1:{free_port()}"
    with make_client(nothing_there, registry=registry) as client:
        with pytest.raises(BackendError) as refused:
            client.add(1, 1)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE


def test_operands_of_the_wrong_type_do_not_touch_the_breaker(
    make_client, shared_server, client_metrics
):
    registry, scrape = client_metrics
    with make_client(shared_server.target, registry=registry) as client:
        with pytest.raises(TypeError):
            client.add("5", 3)
        assert client.breaker.fail_counter == 0
    assert sum(breaker_metrics(scrape)[o] for o in ("success", "failure")) == 0


def test_a_closed_client_refuses_calls(make_client, shared_server, client_metrics):
    registry, _ = client_metrics
    client = make_client(shared_server.target, registry=registry)
    client.close()
    with pytest.raises(ValueError, match="closed"):
        client.add(1, 1)
    assert client.breaker.fail_counter == 0


def test_clients_in_one_registry_are_told_apart_by_name(
    make_client, shared_server, client_metrics
):
    registry, scrape = client_metrics
    with (
        make_client(shared_server.target, registry=registry, name="a") as a,
        make_client(shared_server.target, registry=registry, name="b") as b,
    ):
        a.add(1, 1)
        a.add(1, 1)
        b.add(1, 1)
    metrics = scrape()
    assert (
        metrics.value("circuit_breaker_calls_total", breaker="a", outcome="success")
        == 2
    )
    assert (
        metrics.value("circuit_breaker_calls_total", breaker="b", outcome="success")
        == 1
    )


@pytest.mark.parametrize(
    "options",
    [{"fail_max": 0}, {"reset_timeout": 0}, {"timeout": -1}],
)
def test_settings_that_cannot_work_are_refused(make_client, options):
    with pytest.raises(ValueError, match="must be"):
        make_client("127.0.0.1:1", **options)
