"""The circuit breaker that guards calcsvc calls: how it decides, is built and called.

calcsvc builds on pybreaker's state machine, storage, listeners and settings.
:class:`Breaker` keeps all of them, and holds the breaker's lock only while it
decides, never while the guarded call runs. :class:`Guard` adds what a
pybreaker listener cannot see: it tells a rejected call from a failed one and
times every call, so hooks such as the Prometheus instrumentation can record
each call's outcome and duration.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from typing import (
    TYPE_CHECKING,
    Literal,
    NamedTuple,
    ParamSpec,
    Protocol,
    TypeAlias,
    TypeVar,
    cast,
    runtime_checkable,
)

import pybreaker

from calcsvc.errors import BreakerOpenError, CallerError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Generator, Iterable, Sequence

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


@runtime_checkable
class SharedTrials(Protocol):
    """A storage that counts trial calls for every breaker that shares it.

    :class:`calcsvc.storage.RedisStorage` is one: with it, a fleet of
    processes makes ``half_open_max_calls`` trial calls in all.
    """

    def claim_trial(self, limit: int, ttl: float) -> str | None:
        """Claim one of ``limit`` trial calls, for at most ``ttl`` seconds.

        Returns the claim, or None when ``limit`` trial calls are in flight.
        """

    def release_trial(self, claim: str) -> None:
        """Give back a claim: its trial call has ended."""


class Admission(NamedTuple):
    """A breaker's leave for one call to go ahead, from :meth:`Breaker.admit`."""

    state: pybreaker.CircuitBreakerState
    """The state the call was admitted in. Every transition makes a new one."""
    trial: bool
    """Whether the call is a trial call of a half-open breaker."""
    claim: str | None = None
    """The trial call's claim on a :class:`SharedTrials` storage, if any."""


class Breaker(pybreaker.CircuitBreaker):
    """A pybreaker breaker that never holds its lock while the guarded call runs.

    To its callers and listeners it is a :class:`pybreaker.CircuitBreaker`:
    the same states, settings, storage, ``exclude`` rules, listeners in the
    same order, ``success_threshold``, ``throw_new_error_on_trip``, the
    decorator form and :meth:`calling`. What differs is how it serializes.
    pybreaker holds the breaker's lock for the whole guarded call, so threads
    that share a breaker take turns. This breaker takes the lock twice per
    call, each time for one short decision, and runs the call in between with
    no lock held:

    - :meth:`admit`, before the call. Closed: the call goes. Open, within the
      reset timeout: the call is rejected. Open, once the reset timeout has
      passed: the breaker turns half-open and the call goes as a trial call.
      Half-open: the call goes as a trial call while fewer than
      ``half_open_max_calls`` trial calls are in flight, else it is rejected.
      A rejected call raises :class:`~calcsvc.errors.BreakerOpenError` (a
      :class:`pybreaker.CircuitBreakerError`) at once, and the listeners hear
      nothing of it, as with pybreaker.
    - :meth:`record`, after the call: the result updates the counters and
      may trip, reopen or close the breaker, exactly as pybreaker would have.

    A result counts toward the breaker's decisions only if the breaker is
    still in the state the call was admitted in. Any other result is *late*:
    for example a failure of a call admitted while closed that ends after
    the breaker has opened, or a trial call's success after another trial
    call has already closed the breaker. A late result moves no counter and
    changes no state, so it can neither open an open breaker a second time
    nor restart its reset timeout. It is still the end of a call: listeners
    hear of it as ``success`` or ``failure`` like any other, and
    :class:`Guard` reports its outcome, so metrics count every call exactly
    once.

    Listeners are called inside the two decisions, as pybreaker calls them
    inside its lock, so every listener sees the events in the order they
    happened: keep them quick. ``half_open_max_calls`` is counted by this
    breaker object and, when its storage is :class:`SharedTrials`, also by
    the storage for every breaker that shares it.

    With a storage shared by many processes, a breaker learns of a state
    another process set when it next reads the state. Its listeners hear of
    that change as of any other, but unlike pybreaker's breaker it leaves the
    shared counters alone: they already count what the fleet did since.

    Two more differences from pybreaker: :meth:`call_async` awaits a
    coroutine function on asyncio (pybreaker's awaits Tornado), and an
    exception that is not an :class:`Exception`, such as
    :class:`asyncio.CancelledError` or :class:`KeyboardInterrupt`, is never
    replaced by the trip's :class:`pybreaker.CircuitBreakerError`.
    """

    def __init__(  # noqa: PLR0913, PLR0917 - pybreaker's options, in its order
        self,
        fail_max: int = 5,
        reset_timeout: float = 60,
        success_threshold: int = 1,
        exclude: Iterable[type[BaseException] | Callable[[BaseException], bool]]
        | None = None,
        listeners: Sequence[pybreaker.CircuitBreakerListener] | None = None,
        state_storage: pybreaker.CircuitBreakerStorage | None = None,
        name: str | None = None,
        throw_new_error_on_trip: bool = True,
        *,
        half_open_max_calls: int = 1,
    ) -> None:
        """Create a breaker: pybreaker's options, and ``half_open_max_calls``."""
        super().__init__(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            exclude=exclude,
            listeners=listeners,
            state_storage=state_storage,
            name=name,
            throw_new_error_on_trip=throw_new_error_on_trip,
        )
        self.half_open_max_calls = half_open_max_calls
        # The half-open state whose trial calls are counted, and how many of
        # them are in flight. A new half-open state starts a new count.
        self._trial_state: pybreaker.CircuitBreakerState | None = None
        self._trials = 0
        # When the reset timeout ends, as time.time(), for the opened_at and
        # reset_timeout it was worked out from: reading the clock as a
        # datetime on every rejected call would cost more than the rest of
        # the rejection.
        self._reopen: tuple[object, float, float] = (None, 0.0, 0.0)
        self._shared_trials = (
            state_storage if isinstance(state_storage, SharedTrials) else None
        )

    @property
    def state(
        self,
    ) -> (
        pybreaker.CircuitClosedState
        | pybreaker.CircuitHalfOpenState
        | pybreaker.CircuitOpenState
    ):
        """Return the current state, as the storage has it.

        A change the storage shows but this breaker did not make (another
        process made it) is taken on without resetting any counter, and
        told to the listeners.
        """
        current = self.current_state
        held = self._state
        if current != held.name:
            with self._lock:
                if self._state is held:
                    self._state = self._create_new_state(current, prev_state=held)
                    for listener in self._listeners:
                        listener.state_change(self, held, self._state)
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        """Move to ``state``, as pybreaker does: this breaker made the change."""
        with self._lock:
            self._state = self._create_new_state(
                state, prev_state=self._state, notify=True
            )

    @property
    def half_open_max_calls(self) -> int:
        """Return how many trial calls a half-open breaker lets through at once."""
        return self._half_open_max_calls

    @half_open_max_calls.setter
    def half_open_max_calls(self, number: int) -> None:
        """Set how many trial calls a half-open breaker lets through at once."""
        if number < 1:
            raise ValueError("half_open_max_calls must be at least 1")
        self._half_open_max_calls = number

    def admit(
        self,
        func: Callable[..., object],
        *args: object,
        **kwargs: object,
    ) -> Admission:
        """Decide whether a call of ``func(*args, **kwargs)`` may go ahead now.

        On admission, the listeners' ``before_call`` hears of the call; hand
        the admission to :meth:`record` once the call has ended, whatever the
        end.

        Raises:
            BreakerOpenError: the call is rejected: the breaker is open, or
                half-open with ``half_open_max_calls`` trial calls in flight.

        """
        # pybreaker adds and removes listeners under this lock, so they are
        # called under it too.
        with self._lock:
            state = self.state
            if state.name == pybreaker.STATE_OPEN:
                if not self._reset_timeout_passed():
                    raise BreakerOpenError(breaker_label(self), pybreaker.STATE_OPEN)
                self.half_open()
                state = self._state

            trial = state.name == pybreaker.STATE_HALF_OPEN
            claim = None
            if trial:
                if self._trial_state is not state:
                    self._trial_state, self._trials = state, 0
                if self._trials >= self._half_open_max_calls:
                    raise BreakerOpenError(
                        breaker_label(self), pybreaker.STATE_HALF_OPEN
                    )
                if self._shared_trials is not None:
                    claim = self._shared_trials.claim_trial(
                        self._half_open_max_calls, self._reset_timeout
                    )
                    if claim is None:
                        raise BreakerOpenError(
                            breaker_label(self), pybreaker.STATE_HALF_OPEN
                        )

            for listener in self._listeners:
                listener.before_call(self, func, *args, **kwargs)
            if trial:
                self._trials += 1
            return Admission(state, trial, claim)

    def record(self, admission: Admission, error: BaseException | None = None) -> None:
        """Record the end of an admitted call: it returned, or it raised ``error``.

        A late result (see :class:`Breaker`) only reaches the listeners.

        Raises:
            pybreaker.CircuitBreakerError: ``error`` opened the breaker, which
                was built with ``throw_new_error_on_trip``; the caller raises
                this error in place of ``error``.

        """
        with self._lock:
            try:
                self._record(admission, error)
            finally:
                # Given back only now: until the result has opened or closed
                # the breaker, no other process may start a trial call.
                if admission.claim is not None and self._shared_trials is not None:
                    self._shared_trials.release_trial(admission.claim)

    def _record(self, admission: Admission, error: BaseException | None) -> None:
        if admission.trial and admission.state is self._trial_state:
            self._trials -= 1

        failed = error is not None and self.is_system_error(error)
        state = self.state
        if state is not admission.state:
            # A late result: heard by the listeners, but it decides nothing.
            for listener in self._listeners:
                if failed and error is not None:
                    listener.failure(self, error)
                else:
                    listener.success(self)
            return

        if failed and error is not None:
            self._count_failure(state, error)
        else:
            # pybreaker counts an excluded error as a success, too.
            self._count_success(state)

    def call(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``func(*args, **kwargs)`` if the breaker lets it through.

        A generator that ``func`` returns is guarded until it is exhausted,
        as pybreaker does; :meth:`calling` relies on that.
        """
        admission = self.admit(func, *args, **kwargs)
        try:
            result = func(*args, **kwargs)
        except BaseException as error:
            self.record(admission, error)
            raise
        if isinstance(result, types.GeneratorType):
            return cast("T", self._follow(admission, result))
        self.record(admission)
        return result

    async def call_async(
        self,
        func: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Await ``func(*args, **kwargs)`` if the breaker lets it through.

        The two decisions take the lock briefly from the event loop; the
        awaited call runs with no lock held.
        """
        admission = self.admit(func, *args, **kwargs)
        try:
            result = await func(*args, **kwargs)
        except BaseException as error:
            self.record(admission, error)
            raise
        self.record(admission)
        return result

    def _count_success(self, state: pybreaker.CircuitBreakerState) -> None:
        self._state_storage.reset_counter()
        state.on_success()
        for listener in self._listeners:
            listener.success(self)

    def _count_failure(
        self, state: pybreaker.CircuitBreakerState, error: BaseException
    ) -> None:
        self._inc_counter()
        for listener in self._listeners:
            listener.failure(self, error)
        try:
            state.on_failure(error)
        except BaseException as raised:
            # pybreaker's states raise the error itself when it trips the
            # breaker, or a CircuitBreakerError in its place. The caller
            # re-raises its own error; only the replacement is raised here,
            # and never in place of a cancellation or an interrupt.
            if raised is error or not isinstance(error, Exception):
                return
            raise

    def _reset_timeout_passed(self) -> bool:
        opened_at = self._state_storage.opened_at
        if opened_at is None:
            return True
        reset_timeout = self.reset_timeout
        seen_at, seen_timeout, ends = self._reopen
        if opened_at is not seen_at or reset_timeout != seen_timeout:
            ends = opened_at.timestamp() + reset_timeout
            self._reopen = (opened_at, reset_timeout, ends)
        return time.time() >= ends

    def _follow(
        self, admission: Admission, generator: Generator[object, object, object]
    ) -> Generator[object, object, None]:
        """Pass ``generator`` through, and record its end as the call's end."""
        try:
            value = yield next(generator)
            while True:
                value = yield generator.send(value)
        except StopIteration:
            self.record(admission)
        except BaseException as error:  # noqa: BLE001 - thrown back below
            self.record(admission, error)
            generator.throw(error)


def create_breaker(  # noqa: PLR0913 - the client's breaker options
    name: str,
    *,
    fail_max: int = 2,
    reset_timeout: float = 2.0,
    half_open_max_calls: int = 1,
    listeners: Iterable[pybreaker.CircuitBreakerListener] = (),
    state_storage: pybreaker.CircuitBreakerStorage | None = None,
) -> Breaker:
    """Build the breaker a calcsvc client uses.

    It counts only the errors that say the backend is unwell: a
    :class:`~calcsvc.errors.CallerError` passes through uncounted. The call
    that trips the breaker raises its own error, not pybreaker's, so the
    caller learns why it failed; the calls after it are rejected. Its state
    lives in ``state_storage`` (default: this process's memory).
    """
    if fail_max < 1:
        raise ValueError("fail_max must be at least 1")
    if reset_timeout <= 0:
        raise ValueError("reset_timeout must be positive")
    return Breaker(
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        exclude=[CallerError],
        listeners=[LoggingListener(), *listeners],
        name=name,
        state_storage=state_storage,
        throw_new_error_on_trip=False,
        half_open_max_calls=half_open_max_calls,
    )


class Guard:
    """Runs calls through a breaker and reports what became of each one.

    :meth:`call` works with any pybreaker breaker; :meth:`call_async` needs a
    :class:`Breaker`. After every call the guard hands the breaker, the
    outcome and the duration in seconds to each hook:

    - ``success``: the call returned.
    - ``failure``: the call raised an error the breaker counts.
    - ``ignored``: the call raised an error the breaker excludes.
    - ``rejected``: the breaker refused the call; nothing was attempted, and
      the caller gets :class:`~calcsvc.errors.BreakerOpenError`.

    With a :class:`Breaker` the guard asks :meth:`Breaker.admit` and tells
    :meth:`Breaker.record` itself, as the breaker's own calls do (a generator
    that the function returns is a result like any other); with pybreaker's
    breaker it goes through :meth:`pybreaker.CircuitBreaker.call`.
    A late result (see :class:`Breaker`) is reported with its outcome like
    any other. A hook that raises is logged and otherwise ignored:
    instrumentation never changes a call's result.
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
        breaker = self.breaker
        if not isinstance(breaker, Breaker):
            return self._call_through(breaker, func, *args, **kwargs)

        start = time.perf_counter()
        admission = self._admit(breaker, func, args, kwargs, start)
        try:
            result = func(*args, **kwargs)
        except BaseException as error:
            self._record_error(breaker, admission, error, start)
            raise
        breaker.record(admission)
        self._report("success", start)
        return result

    async def call_async(
        self,
        func: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Await ``func(*args, **kwargs)`` if the breaker lets it through.

        Raises:
            TypeError: the breaker is not a :class:`Breaker`; pybreaker's own
                breaker cannot guard an asyncio call.

        """
        breaker = self.breaker
        if not isinstance(breaker, Breaker):
            raise TypeError(
                "asyncio calls need a calcsvc.breaker.Breaker, "
                f"not {type(breaker).__name__}"
            )

        start = time.perf_counter()
        admission = self._admit(breaker, func, args, kwargs, start)
        try:
            result = await func(*args, **kwargs)
        except BaseException as error:
            self._record_error(breaker, admission, error, start)
            raise
        breaker.record(admission)
        self._report("success", start)
        return result

    def _admit(
        self,
        breaker: Breaker,
        func: Callable[..., object],
        args: tuple[object, ...],
        kwargs: dict[str, object],
        start: float,
    ) -> Admission:
        try:
            return breaker.admit(func, *args, **kwargs)
        except BreakerOpenError:
            self._report("rejected", start)
            raise

    def _record_error(
        self, breaker: Breaker, admission: Admission, error: BaseException, start: float
    ) -> None:
        """Record a call that raised ``error``; raise what replaces it, if anything."""
        counted = breaker.is_system_error(error)
        try:
            breaker.record(admission, error)
        finally:
            self._report("failure" if counted else "ignored", start)

    def _call_through(
        self,
        breaker: pybreaker.CircuitBreaker,
        func: Callable[P, T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Call through pybreaker's own breaker, which shows no admission."""
        attempted = False

        def attempt() -> T:
            nonlocal attempted
            attempted = True
            return func(*args, **kwargs)

        start = time.perf_counter()
        try:
            result = breaker.call(attempt)
        except pybreaker.CircuitBreakerError:
            # Raised before the attempt, this is a rejection. Raised after it,
            # the attempt failed and tripped a breaker that was built with
            # throw_new_error_on_trip.
            if attempted:
                self._report("failure", start)
                raise
            self._report("rejected", start)
            raise BreakerOpenError(breaker_label(breaker)) from None
        except BaseException as error:
            counted = breaker.is_system_error(error)
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
