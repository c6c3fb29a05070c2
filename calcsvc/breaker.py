"""The circuit breaker that guards calcsvc calls: how it is built and called.

calcsvc builds on pybreaker's state machine. This module adds two things a
pybreaker listener cannot do on its own: it tells a rejected call from a
failed one, and it times every call, so hooks such as the Prometheus
instrumentation can record each call's outcome and duration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, ParamSpec, TypeAlias, TypeVar

import pybreaker

from calcsvc.errors import BreakerOpenError, CallerError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

Outcome = Literal["success", "failure", "ignored", "rejected"]
OUTCOMES: tuple[Outcome, ...] = ("success", "failure", "ignored", "rejected")

# The three states, spelled as metric label values (pybreaker says "half-open").
STATES = ("closed", "open", "half_open")

# Called after every guarded call with the breaker, the outcome and the
# call's duration in seconds.
CallHook: TypeAlias = Callable[[pybreaker.CircuitBreaker, Outcome, float], None]


def state_label(state: str) -> str:
    """Spell a pybreaker state name the way metrics and logs spell it."""
    return state.replace("-", "_")


def breaker_label(breaker: pybreaker.CircuitBreaker) -> str:
    """Name a breaker in metrics and logs, also when it was given no name."""
    return breaker.name or "unnamed"


class LoggingListener(pybreaker.CircuitBreakerListener):
    """Logs one line per state change: WARNING when a breaker opens, else INFO."""

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        """Log the breaker's new state and its count of consecutive failures."""
        level = (
            logging.WARNING if new_state.name == pybreaker.STATE_OPEN else logging.INFO
        )
        log.log(
            level,
            "breaker=%s state=%s previous=%s failures=%d",
            breaker_label(cb),
            state_label(new_state.name),
            state_label(old_state.name) if old_state else "none",
            cb.fail_counter,
        )


def create_breaker(
    name: str,
    *,
    fail_max: int = 2,
    reset_timeout: float = 2.0,
    listeners: Iterable[pybreaker.CircuitBreakerListener] = (),
) -> pybreaker.CircuitBreaker:
    """Build the breaker a calcsvc client uses.

    It counts only the errors that say the backend is unwell: a
    :class:`~calcsvc.errors.CallerError` passes through uncounted. The call
    that trips the breaker raises its own error, not pybreaker's, so the
    caller learns why it failed; the calls after it are rejected.
    """
    if fail_max < 1:
        raise ValueError("fail_max must be at least 1")
    if reset_timeout <= 0:
        raise ValueError("reset_timeout must be positive")
    return pybreaker.CircuitBreaker(
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        exclude=[CallerError],
        listeners=[LoggingListener(), *listeners],
        name=name,
        throw_new_error_on_trip=False,
    )


class Guard:
    """Runs calls through a breaker and reports what became of each one.

    The guard works with any pybreaker breaker. After every call it hands the
    breaker, the outcome and the duration in seconds to each hook:

    - ``success``: the call returned.
    - ``failure``: the call raised an error the breaker counts.
    - ``ignored``: the call raised an error the breaker excludes.
    - ``rejected``: the breaker refused the call; nothing was attempted, and
      the caller gets :class:`~calcsvc.errors.BreakerOpenError`.

    A hook that raises is logged and otherwise ignored: instrumentation never
    changes a call's result.
    """

    def __init__(
        self,
        breaker: pybreaker.CircuitBreaker,
        *,
        hooks: Sequence[CallHook] = (),
    ) -> None:
        """Guard calls with ``breaker`` and report them to ``hooks``."""
        self.breaker = breaker
        self._hooks = tuple(hooks)

    def call(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``func(*args, **kwargs)`` if the breaker lets it through."""
        attempted = False

        def attempt() -> T:
            nonlocal attempted
            attempted = True
            return func(*args, **kwargs)

        start = time.perf_counter()
        try:
            result = self.breaker.call(attempt)
        except pybreaker.CircuitBreakerError:
            # Raised before the attempt, this is a rejection. Raised after it,
            # the attempt failed and tripped a breaker that was built with
            # throw_new_error_on_trip.
            if attempted:
                self._report("failure", start)
                raise
            self._report("rejected", start)
            raise BreakerOpenError(breaker_label(self.breaker)) from None
        except BaseException as error:
            counted = self.breaker.is_system_error(error)
            self._report("failure" if counted else "ignored", start)
            raise
        self._report("success", start)
        return result

    def _report(self, outcome: Outcome, start: float) -> None:
        elapsed = time.perf_counter() - start
        for hook in self._hooks:
            try:
                hook(self.breaker, outcome, elapsed)
            except Exception:
                log.exception(
                    "call hook failed breaker=%s hook=%r",
                    breaker_label(self.breaker),
                    hook,
                )
