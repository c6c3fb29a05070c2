"""The Prometheus listener, the Guard with plain pybreaker breakers, gRPC metrics."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pybreaker
import pytest
from prometheus_client import CollectorRegistry

from calcsvc import BackendError, BreakerOpenError, Guard, PrometheusListener
from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc
from calcsvc.calculator import METHODS, SERVICE_NAME
from calcsvc.instrumentation import (
    AioClientMetricsInterceptor,
    ClientCallMetrics,
    ClientMetricsInterceptor,
    error_label,
)


class Boom(Exception):  # noqa: N818 - named for what it does
    pass


def fail():
    raise Boom


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def watched_breaker(registry, **options):
    breaker = pybreaker.CircuitBreaker(name="plain", **options)
    listener = PrometheusListener(registry)
    listener.watch(breaker)
    return breaker, listener, Guard(breaker, hooks=[listener.record_call])


def test_importing_and_creating_registers_nothing_until_used():
    registry = CollectorRegistry()
    assert list(registry.collect()) == []
    PrometheusListener(registry)
    PrometheusListener(registry)  # a second listener shares the families
    names = {metric.name for metric in registry.collect()}
    assert "circuit_breaker_state" in names


def test_a_watched_breaker_is_published_before_its_first_call():
    registry = CollectorRegistry()
    watched_breaker(registry, fail_max=3, reset_timeout=7)
    assert (
        value(registry, "circuit_breaker_state", breaker="plain", state="closed") == 1
    )
    assert value(registry, "circuit_breaker_state", breaker="plain", state="open") == 0
    assert value(registry, "circuit_breaker_fail_max", breaker="plain") == 3
    assert (
        value(registry, "circuit_breaker_reset_timeout_seconds", breaker="plain") == 7
    )
    zero = registry.get_sample_value(
        "circuit_breaker_transitions_total",
        {"breaker": "plain", "from_state": "closed", "to_state": "open"},
    )
    assert zero == 0.0  # exists at zero, so the first trip is an increase


def test_the_listener_follows_any_pybreaker_breaker():
    registry = CollectorRegistry()
    breaker, _, guard = watched_breaker(registry, fail_max=2, reset_timeout=60)

    assert guard.call(lambda: 42) == 42
    for _ in range(2):
        with pytest.raises((Boom, pybreaker.CircuitBreakerError)):
            guard.call(fail)
    with pytest.raises(BreakerOpenError):
        guard.call(lambda: 42)

    labels = {"breaker": "plain"}
    assert value(registry, "circuit_breaker_state", **labels, state="open") == 1
    assert (
        value(registry, "circuit_breaker_failures_total", **labels, error="Boom") == 2
    )
    assert value(registry, "circuit_breaker_consecutive_failures", **labels) == 2
    outcomes = {
        outcome: value(
            registry, "circuit_breaker_calls_total", **labels, outcome=outcome
        )
        for outcome in ("success", "failure", "ignored", "rejected")
    }
    # pybreaker raises its own error on the trip; the trip is still a failure.
    assert outcomes == {"success": 1, "failure": 2, "ignored": 0, "rejected": 1}
    assert (
        value(
            registry,
            "circuit_breaker_call_duration_seconds_count",
            **labels,
            outcome="rejected",
        )
        == 1
    )
    assert breaker.current_state == pybreaker.STATE_OPEN


def test_excluded_errors_are_ignored_calls():
    registry = CollectorRegistry()
    breaker, _, guard = watched_breaker(registry, fail_max=1, exclude=[Boom])
    with pytest.raises(Boom):
        guard.call(fail)
    assert breaker.current_state == pybreaker.STATE_CLOSED
    assert (
        value(
            registry, "circuit_breaker_calls_total", breaker="plain", outcome="ignored"
        )
        == 1
    )
    assert (
        value(registry, "circuit_breaker_failures_total", breaker="plain", error="Boom")
        == 0
    )


class _Broken:
    def __getattr__(self, name):
        raise RuntimeError(f"metrics broken: {name}")


def test_a_broken_listener_never_changes_the_breakers_decisions(caplog):
    registry = CollectorRegistry()
    breaker, listener, guard = watched_breaker(
        registry, fail_max=2, reset_timeout=60, throw_new_error_on_trip=False
    )
    listener._series = _Broken()

    with caplog.at_level(logging.ERROR):
        assert guard.call(lambda: 1) == 1
        for _ in range(2):
            with pytest.raises(Boom):
                guard.call(fail)
        with pytest.raises(BreakerOpenError):
            guard.call(lambda: 1)

    assert breaker.current_state == pybreaker.STATE_OPEN
    assert breaker.fail_counter == 2
    assert listener.errors > 0
    assert sum("breaker metrics failed" in r.message for r in caplog.records) == 1


def test_a_failing_hook_never_changes_a_calls_result(caplog):
    def broken_hook(*_):
        raise RuntimeError("hook broken")

    breaker = pybreaker.CircuitBreaker(fail_max=5)
    guard = Guard(breaker, hooks=[broken_hook])
    with caplog.at_level(logging.ERROR):
        assert guard.call(lambda: "answer") == "answer"
    assert "call hook failed" in caplog.text


@pytest.mark.parametrize(
    ("error", "label"),
    [
        (BackendError(grpc.StatusCode.UNAVAILABLE, "down"), "UNAVAILABLE"),
        (ValueError("x"), "ValueError"),
        (grpc.RpcError(), "RpcError"),  # an RpcError that has no code
    ],
)
def test_errors_are_labelled_by_code_or_class(error, label):
    assert error_label(error) == label


def call_counts(registry, method):
    labels = {"grpc_type": "unary", "grpc_service": SERVICE_NAME, "grpc_method": method}
    return (
        value(registry, "grpc_client_started_total", **labels),
        value(registry, "grpc_client_handled_total", **labels, grpc_code="OK"),
        value(
            registry,
            "grpc_client_handled_total",
            **labels,
            grpc_code="INVALID_ARGUMENT",
        ),
        value(registry, "grpc_client_handling_seconds_count", **labels),
    )


def test_the_client_interceptor_counts_calls_on_any_channel(shared_server):
    registry = CollectorRegistry()
    interceptor = ClientMetricsInterceptor(registry, METHODS)
    with grpc.insecure_channel(shared_server.target) as channel:
        stub = calculator_pb2_grpc.CalculatorStub(
            grpc.intercept_channel(channel, interceptor)
        )
        stub.Add(calculator_pb2.BinaryRequest(a=1, b=2), timeout=5)
        with pytest.raises(grpc.RpcError):
            stub.Divide(calculator_pb2.BinaryRequest(a=1, b=0), timeout=5)
    assert call_counts(registry, "Add") == (1, 1, 0, 1)
    assert call_counts(registry, "Divide") == (1, 0, 1, 1)
    assert call_counts(registry, "Multiply") == (0, 0, 0, 0)  # there at zero


def test_the_aio_client_interceptor_counts_calls_on_any_channel(shared_server):
    registry = CollectorRegistry()

    async def calls():
        interceptor = AioClientMetricsInterceptor(registry, METHODS)
        async with grpc.aio.insecure_channel(
            shared_server.target,
            interceptors=[interceptor],  # type: ignore[list-item]
        ) as channel:
            stub = calculator_pb2_grpc.CalculatorStub(channel)
            await stub.Add(calculator_pb2.BinaryRequest(a=1, b=2), timeout=5)
            with pytest.raises(grpc.RpcError):
                await stub.Divide(calculator_pb2.BinaryRequest(a=1, b=0), timeout=5)

    asyncio.run(calls())
    assert call_counts(registry, "Add") == (1, 1, 0, 1)
    assert call_counts(registry, "Divide") == (1, 0, 1, 1)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BackendError(grpc.StatusCode.UNAVAILABLE, "down"), "UNAVAILABLE"),
        (asyncio.CancelledError(), "CANCELLED"),
        (KeyboardInterrupt(), "UNKNOWN"),
    ],
)
def test_a_client_call_is_counted_with_the_code_it_ended_with(error, code):
    registry = CollectorRegistry()
    metrics = ClientCallMetrics(registry, METHODS)
    metrics.start(f"/{SERVICE_NAME}/Add").failed(error)
    labels = {"grpc_type": "unary", "grpc_service": SERVICE_NAME, "grpc_method": "Add"}
    assert value(registry, "grpc_client_handled_total", **labels, grpc_code=code) == 1
