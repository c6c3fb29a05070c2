"""Prometheus metrics for pybreaker circuit breakers."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
import pybreaker
from prometheus_client import Counter, Gauge, Histogram

from calcsvc.breaker import OUTCOMES, STATES, Outcome, breaker_label, state_label
from calcsvc.instrumentation._registry import LATENCY_BUCKETS, per_registry

if TYPE_CHECKING:
    from collections.abc import Callable

    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

Method = TypeVar("Method", bound="Callable[..., None]")


@dataclass(frozen=True)
class _Families:
    state: Gauge
    transitions: Counter
    calls: Counter
    failures: Counter
    duration: Histogram
    consecutive_failures: Gauge
    fail_max: Gauge
    reset_timeout: Gauge


def _create(registry: CollectorRegistry) -> _Families:
    return _Families(
        state=Gauge(
            "circuit_breaker_state",
            "1 for the breaker's current state, 0 for the other two.",
            ("breaker", "state"),
            registry=registry,
        ),
        transitions=Counter(
            "circuit_breaker_transitions_total",
            "State changes of the breaker.",
            ("breaker", "from_state", "to_state"),
            registry=registry,
        ),
        calls=Counter(
            "circuit_breaker_calls_total",
            "Calls through the breaker by outcome: success, failure (counted "
            "by the breaker), ignored (a caller error let through) or rejected "
            "(refused while open).",
            ("breaker", "outcome"),
            registry=registry,
        ),
        failures=Counter(
            "circuit_breaker_failures_total",
            "Failures the breaker counted, by gRPC status code or exception class.",
            ("breaker", "error"),
            registry=registry,
        ),
        duration=Histogram(
            "circuit_breaker_call_duration_seconds",
            "Time from asking the breaker to the call's end, by outcome.",
            ("breaker", "outcome"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        consecutive_failures=Gauge(
            "circuit_breaker_consecutive_failures",
            "Failures counted since the last success or state change.",
            ("breaker",),
            registry=registry,
        ),
        fail_max=Gauge(
            "circuit_breaker_fail_max",
            "Consecutive failures that open the breaker.",
            ("breaker",),
            registry=registry,
        ),
        reset_timeout=Gauge(
            "circuit_breaker_reset_timeout_seconds",
            "How long the breaker stays open before it lets a trial call through.",
            ("breaker",),
            registry=registry,
        ),
    )


_families = per_registry(_create)

# The transitions a breaker makes on its own, through its whole cycle.
TRANSITIONS = (
    ("closed", "open"),
    ("open", "half_open"),
    ("half_open", "closed"),
    ("half_open", "open"),
)


def error_label(error: BaseException) -> str:
    """Name an error for metrics: its gRPC status code, else its class."""
    if isinstance(error, grpc.RpcError):
        try:
            code = error.code()
        except Exception:  # noqa: BLE001 - any failure here means "no code"
            code = None
        if isinstance(code, grpc.StatusCode):
            return code.name
    return type(error).__name__


def _never_raises(method: Method) -> Method:
    """Keep a metrics error from ever reaching pybreaker.

    pybreaker calls listeners inside its own state logic, so an exception
    there would change the breaker's decision.
    """

    @functools.wraps(method)
    def wrapper(self: PrometheusListener, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        try:
            method(self, *args, **kwargs)
        except Exception:
            self.errors += 1
            if self.errors == 1:
                log.exception("breaker metrics failed; later failures are counted only")

    return cast("Method", wrapper)


class PrometheusListener(pybreaker.CircuitBreakerListener):
    """Exports what pybreaker breakers do as ``circuit_breaker_*`` metrics.

    Works with any pybreaker breaker, and one listener can watch many. It
    records state, transitions, counted failures and consecutive failures;
    :meth:`record_call`, given to a :class:`calcsvc.breaker.Guard` as a hook,
    adds the calls by outcome and their durations, which a listener cannot
    see. Its metrics live in ``registry`` (default: the global one); breakers
    are told apart by their name, so give each one in a registry its own.

    No error inside the listener ever reaches the breaker: it is logged once
    and counted in :attr:`errors`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create a listener whose metrics live in ``registry``."""
        self._metrics = _families(registry)
        self.errors = 0

    def watch(self, breaker: pybreaker.CircuitBreaker) -> None:
        """Listen to ``breaker`` and publish its current state and settings.

        pybreaker tells listeners only about changes, so a breaker that is
        watched this way shows up in the metrics before its first call. Its
        counters start at zero, so that the first trip is an increase that
        ``increase()`` and ``rate()`` can see, however short it was.
        """
        breaker.add_listener(self)
        self._publish(breaker)
        name = breaker_label(breaker)
        for outcome in OUTCOMES:
            self._metrics.calls.labels(name, outcome)
        for old, new in TRANSITIONS:
            self._metrics.transitions.labels(name, old, new)

    @_never_raises
    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        """Count the transition and publish the new state."""
        if old_state is not None:
            self._metrics.transitions.labels(
                breaker_label(cb),
                state_label(old_state.name),
                state_label(new_state.name),
            ).inc()
        self._publish(cb, state_label(new_state.name))

    @_never_raises
    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        """Count a failure by its gRPC status code or exception class."""
        name = breaker_label(cb)
        self._metrics.failures.labels(name, error_label(exc)).inc()
        self._metrics.consecutive_failures.labels(name).set(cb.fail_counter)

    @_never_raises
    def success(self, cb: pybreaker.CircuitBreaker) -> None:
        """Publish the reset count of consecutive failures."""
        self._metrics.consecutive_failures.labels(breaker_label(cb)).set(
            cb.fail_counter
        )

    @_never_raises
    def record_call(
        self, breaker: pybreaker.CircuitBreaker, outcome: Outcome, seconds: float
    ) -> None:
        """Count one call by outcome and observe its duration."""
        name = breaker_label(breaker)
        self._metrics.calls.labels(name, outcome).inc()
        self._metrics.duration.labels(name, outcome).observe(seconds)

    def _publish(self, cb: pybreaker.CircuitBreaker, state: str | None = None) -> None:
        name = breaker_label(cb)
        current = state or state_label(cb.current_state)
        for each in STATES:
            self._metrics.state.labels(name, each).set(1 if each == current else 0)
        self._metrics.consecutive_failures.labels(name).set(cb.fail_counter)
        self._metrics.fail_max.labels(name).set(cb.fail_max)
        self._metrics.reset_timeout.labels(name).set(cb.reset_timeout)
