"""Prometheus metrics for pybreaker circuit breakers."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, runtime_checkable

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
    storage_errors: Counter


def _create(registry: CollectorRegistry) -> _Families:
    return _Families(
        state=Gauge(
            "circuit_breaker_state",
            "1 for the breaker's current state, 0 for the other two; in "
            "multiprocess mode, 1 for each state some live process has the "
            "breaker in.",
            ("breaker", "state"),
            registry=registry,
            multiprocess_mode="livemax",
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
            "(refused while open, or half-open with its trial calls in flight).",
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
            multiprocess_mode="livemax",
        ),
        fail_max=Gauge(
            "circuit_breaker_fail_max",
            "Consecutive failures that open the breaker.",
            ("breaker",),
            registry=registry,
            multiprocess_mode="livemax",
        ),
        reset_timeout=Gauge(
            "circuit_breaker_reset_timeout_seconds",
            "How long the breaker stays open before it lets a trial call through.",
            ("breaker",),
            registry=registry,
            multiprocess_mode="livemax",
        ),
        storage_errors=Counter(
            "circuit_breaker_storage_errors_total",
            "Commands to the breaker's shared storage (Redis) that failed; "
            "meanwhile the breaker decides on its local state.",
            ("breaker",),
            registry=registry,
        ),
    )


_families = per_registry(_create)


@runtime_checkable
class FailingStorage(Protocol):
    """A breaker storage that reports its failed commands to hooks.

    :class:`calcsvc.storage.RedisStorage` is one.
    """

    breaker_name: str
    error_hooks: list[Callable[[Any, BaseException], None]]


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


class _BreakerSeries:
    """The series of one breaker, looked up once and kept.

    Looking a labelled series up costs more than updating it, and the
    listener updates a few of them on every call.
    """

    def __init__(self, families: _Families, name: str) -> None:
        self.name = name
        self._families = families
        self.state = {each: families.state.labels(name, each) for each in STATES}
        self.consecutive_failures = families.consecutive_failures.labels(name)
        # The count last published: most calls succeed and leave it at 0.
        self.published_failures: int | None = None
        self.fail_max = families.fail_max.labels(name)
        self.reset_timeout = families.reset_timeout.labels(name)
        self._calls: dict[str, Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._failures: dict[str, Counter] = {}

    def calls(self, outcome: str) -> Counter:
        """Return the series that counts calls with ``outcome``."""
        series = self._calls.get(outcome)
        if series is None:
            series = self._calls[outcome] = self._families.calls.labels(
                self.name, outcome
            )
        return series

    def duration(self, outcome: str) -> Histogram:
        """Return the histogram of durations of calls with ``outcome``."""
        series = self._durations.get(outcome)
        if series is None:
            series = self._durations[outcome] = self._families.duration.labels(
                self.name, outcome
            )
        return series

    def failures(self, error: str) -> Counter:
        """Return the series that counts failures labelled ``error``."""
        series = self._failures.get(error)
        if series is None:
            series = self._failures[error] = self._families.failures.labels(
                self.name, error
            )
        return series

    def transitions(self, old: str, new: str) -> Counter:
        """Return the series that counts transitions from ``old`` to ``new``."""
        return self._families.transitions.labels(self.name, old, new)


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
        self._series: dict[str, _BreakerSeries] = {}
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
        series = self._of(breaker)
        for outcome in OUTCOMES:
            series.calls(outcome)
        for old, new in TRANSITIONS:
            series.transitions(old, new)

    @_never_raises
    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        """Count the transition and publish the new state."""
        if old_state is not None:
            self._of(cb).transitions(
                state_label(old_state.name), state_label(new_state.name)
            ).inc()
        self._publish(cb, state_label(new_state.name))

    @_never_raises
    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        """Count a failure by its gRPC status code or exception class."""
        series = self._of(cb)
        series.failures(error_label(exc)).inc()
        self._failures_now(series, cb.fail_counter)

    @_never_raises
    def success(self, cb: pybreaker.CircuitBreaker) -> None:
        """Publish the reset count of consecutive failures."""
        self._failures_now(self._of(cb), cb.fail_counter)

    @_never_raises
    def storage_error(self, storage: FailingStorage, error: BaseException) -> None:
        """Count a command to ``storage`` that failed with ``error``."""
        del error  # the storage logs the first error of an outage
        self._metrics.storage_errors.labels(storage.breaker_name).inc()

    def watch_storage(self, storage: FailingStorage) -> None:
        """Count the failed commands of ``storage``, from zero."""
        self._metrics.storage_errors.labels(storage.breaker_name)
        storage.error_hooks.append(self.storage_error)

    @_never_raises
    def record_call(
        self, breaker: pybreaker.CircuitBreaker, outcome: Outcome, seconds: float
    ) -> None:
        """Count one call by outcome and observe its duration."""
        series = self._of(breaker)
        series.calls(outcome).inc()
        series.duration(outcome).observe(seconds)

    @staticmethod
    def _failures_now(series: _BreakerSeries, count: int) -> None:
        if count != series.published_failures:
            series.consecutive_failures.set(count)
            series.published_failures = count

    def _of(self, breaker: pybreaker.CircuitBreaker) -> _BreakerSeries:
        name = breaker_label(breaker)
        series = self._series.get(name)
        if series is None:
            # Two threads may both get here; both find the same series.
            series = self._series[name] = _BreakerSeries(self._metrics, name)
        return series

    def _publish(self, cb: pybreaker.CircuitBreaker, state: str | None = None) -> None:
        series = self._of(cb)
        current = state or state_label(cb.current_state)
        for each, gauge in series.state.items():
            gauge.set(1 if each == current else 0)
        self._failures_now(series, cb.fail_counter)
        series.fail_max.set(cb.fail_max)
        series.reset_timeout.set(cb.reset_timeout)
