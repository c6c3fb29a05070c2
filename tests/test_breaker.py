"""calcsvc's Breaker: pybreaker's behaviour, kept, and its lock, held briefly.

The tests of pybreaker's documented behaviour run against pybreaker's own
breaker and against calcsvc's, and expect the same events from both.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pybreaker
import pytest

from calcsvc import BreakerOpenError, Guard
from calcsvc.breaker import Breaker

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN
WAIT = 10.0  # seconds a test waits for another thread before it fails


class Boom(Exception):  # noqa: N818 - named for what it does
    pass


class Recorder(pybreaker.CircuitBreakerListener):
    """Remembers every listener call, in order."""

    def __init__(self):
        self.events = []

    def before_call(self, cb, func, *args, **kwargs):  # noqa: ARG002
        self.events.append(("before_call", *args))

    def success(self, cb):  # noqa: ARG002
        self.events.append(("success",))

    def failure(self, cb, exc):  # noqa: ARG002
        self.events.append(("failure", type(exc).__name__))

    def state_change(self, cb, old_state, new_state):  # noqa: ARG002
        self.events.append(
            ("state_change", old_state and old_state.name, new_state.name)
        )

    def states(self):
        return [event[1:] for event in self.events if event[0] == "state_change"]


@pytest.fixture(params=["pybreaker", "calcsvc"])
def make_breaker(request):
    """Build either kind of breaker, with a Recorder listening."""
    kind = {"pybreaker": pybreaker.CircuitBreaker, "calcsvc": Breaker}[request.param]

    def make(**options):
        recorder = Recorder()
        options.setdefault("reset_timeout", 60)
        breaker = kind(listeners=[recorder], **options)
        return breaker, recorder

    return make


def succeed(value=None):
    return value


def fail(*_args):
    raise Boom


def trip(breaker):
    """Fail until the breaker opens, whatever error the trip raises."""
    while breaker.current_state != OPEN:
        with pytest.raises((Boom, pybreaker.CircuitBreakerError)):
            breaker.call(fail)


def test_the_full_cycle_notifies_listeners_in_pybreakers_order(make_breaker):
    breaker, recorder = make_breaker(fail_max=2)

    assert breaker.call(succeed, 1) == 1
    with pytest.raises(Boom):
        breaker.call(fail, 2)
    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(fail, 3)  # the trip raises pybreaker's error by default
    assert breaker.current_state == OPEN
    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(succeed, 4)  # rejected: the listeners hear nothing
    breaker.reset_timeout = 0  # the reset timeout has passed
    assert breaker.call(succeed, 5) == 5

    assert breaker.current_state == CLOSED
    assert recorder.events == [
        ("before_call", 1),
        ("success",),
        ("before_call", 2),
        ("failure", "Boom"),
        ("before_call", 3),
        ("failure", "Boom"),
        ("state_change", CLOSED, OPEN),
        ("state_change", OPEN, HALF_OPEN),
        ("before_call", 5),
        ("state_change", HALF_OPEN, CLOSED),
        ("success",),
    ]


def test_a_failed_trial_call_opens_the_breaker_again(make_breaker):
    breaker, recorder = make_breaker(fail_max=1)
    trip(breaker)
    breaker.reset_timeout = 0

    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(fail, "trial")

    assert breaker.current_state == OPEN
    assert breaker.fail_counter == 2
    assert recorder.events[-4:] == [
        ("state_change", OPEN, HALF_OPEN),
        ("before_call", "trial"),
        ("failure", "Boom"),
        ("state_change", HALF_OPEN, OPEN),
    ]


def test_a_success_resets_the_count_of_consecutive_failures(make_breaker):
    breaker, _ = make_breaker(fail_max=3)
    for _ in range(2):
        with pytest.raises(Boom):
            breaker.call(fail)
    assert breaker.fail_counter == 2
    breaker.call(succeed)
    assert breaker.fail_counter == 0
    with pytest.raises(Boom):
        breaker.call(fail)
    assert breaker.current_state == CLOSED


@pytest.mark.parametrize("throw_new_error_on_trip", [True, False])
def test_throw_new_error_on_trip_decides_what_the_tripping_call_raises(
    make_breaker, throw_new_error_on_trip
):
    breaker, _ = make_breaker(
        fail_max=1, throw_new_error_on_trip=throw_new_error_on_trip
    )
    expected = pybreaker.CircuitBreakerError if throw_new_error_on_trip else Boom

    with pytest.raises(expected) as tripped:
        breaker.call(fail)
    if throw_new_error_on_trip:
        assert isinstance(tripped.value.__context__, Boom)
    breaker.reset_timeout = 0
    with pytest.raises(expected):
        breaker.call(fail)  # a failed trial call raises the same way
    assert breaker.current_state == OPEN


def test_excluded_errors_by_type_and_by_predicate_count_as_successes(make_breaker):
    def harmless(error):
        return isinstance(error, ValueError) and "harmless" in str(error)

    breaker, recorder = make_breaker(fail_max=1, exclude=[KeyError, harmless])

    def raise_(error):
        raise error

    for error in (KeyError("k"), ValueError("harmless")):
        with pytest.raises(type(error)):
            breaker.call(raise_, error)
    assert breaker.current_state == CLOSED
    assert [e[0] for e in recorder.events] == ["before_call", "success"] * 2

    with pytest.raises((ValueError, pybreaker.CircuitBreakerError)):
        breaker.call(raise_, ValueError("harmful"))
    assert breaker.current_state == OPEN

    breaker.reset_timeout = 0
    with pytest.raises(KeyError):
        breaker.call(raise_, KeyError("trial"))
    assert breaker.current_state == CLOSED  # an excluded error closes it too


def test_success_threshold_needs_that_many_trial_successes(make_breaker):
    breaker, recorder = make_breaker(fail_max=1, success_threshold=3)
    trip(breaker)
    breaker.reset_timeout = 0

    for expected in (HALF_OPEN, HALF_OPEN, CLOSED):
        breaker.call(succeed)
        assert breaker.current_state == expected
    assert recorder.states()[-2:] == [(OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]

    trip(breaker)
    breaker.call(succeed)
    breaker.call(succeed)
    with pytest.raises((Boom, pybreaker.CircuitBreakerError)):
        breaker.call(fail)  # a failure before the threshold opens it again
    assert breaker.current_state == OPEN


def test_the_decorator_form_guards_the_function(make_breaker):
    breaker, recorder = make_breaker(fail_max=1, throw_new_error_on_trip=False)

    @breaker
    def double(x):
        return 2 * x

    guarded_fail = breaker(fail)

    assert double(21) == 42
    with pytest.raises(Boom):
        guarded_fail("x")
    with pytest.raises(pybreaker.CircuitBreakerError):
        double(1)
    assert recorder.events[:2] == [("before_call", 21), ("success",)]


def test_the_calling_context_manager_guards_its_block(make_breaker):
    breaker, recorder = make_breaker(fail_max=1, throw_new_error_on_trip=False)

    with breaker.calling():
        pass
    assert recorder.events[-1] == ("success",)

    with pytest.raises(Boom), breaker.calling():
        raise Boom
    assert breaker.current_state == OPEN
    with pytest.raises(pybreaker.CircuitBreakerError), breaker.calling():
        pytest.fail("the block runs while the breaker is open")


def test_an_explicit_memory_storage_is_shared_by_breakers(make_breaker):
    storage = pybreaker.CircuitMemoryStorage(CLOSED)
    first, _ = make_breaker(fail_max=1, state_storage=storage)
    second, seen = make_breaker(fail_max=1, state_storage=storage)

    trip(first)
    assert storage.state == OPEN
    with pytest.raises(pybreaker.CircuitBreakerError):
        second.call(succeed)
    assert seen.states() == [(CLOSED, OPEN)]  # it noticed the change


def test_a_storage_that_starts_open_lets_a_trial_call_through(make_breaker):
    breaker, recorder = make_breaker(state_storage=pybreaker.CircuitMemoryStorage(OPEN))
    assert breaker.current_state == OPEN
    assert breaker.call(succeed, "trial") == "trial"  # it was never timed
    assert breaker.current_state == CLOSED
    assert recorder.states() == [(OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_manual_open_half_open_and_close(make_breaker):
    breaker, recorder = make_breaker()

    breaker.open()
    with pytest.raises(pybreaker.CircuitBreakerError):
        breaker.call(succeed)
    breaker.half_open()
    with pytest.raises((Boom, pybreaker.CircuitBreakerError)):
        breaker.call(fail)
    assert breaker.current_state == OPEN
    breaker.close()
    assert breaker.call(succeed, 7) == 7

    assert recorder.states() == [
        (CLOSED, OPEN),
        (OPEN, HALF_OPEN),
        (HALF_OPEN, OPEN),
        (OPEN, CLOSED),
    ]


# What calcsvc's breaker adds: no lock across the call, bounded half-open,
# exact accounting of results that arrive late.


def run_in_thread(func, *args):
    """Start ``func`` in a thread; the returned future gives its result."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(func, *args)
    pool.shutdown(wait=False)
    return future


def blocked_call(breaker, outcome=None):
    """Start a call that stays in flight until the returned event is set.

    The returned future gives the call's result, or raises its error.
    """
    started = threading.Event()
    release = threading.Event()

    def func():
        started.set()
        assert release.wait(WAIT)
        if outcome is not None:
            raise outcome
        return "late"

    future = run_in_thread(breaker.call, func)
    assert started.wait(WAIT)
    return release, future


def test_calls_through_one_breaker_run_side_by_side():
    breaker = Breaker()
    both_inside = threading.Barrier(2, timeout=WAIT)

    def meet():
        both_inside.wait()  # a lock held across calls would break this
        return True

    other = run_in_thread(breaker.call, meet)
    assert breaker.call(meet)
    assert other.result(WAIT)


def test_half_open_rejects_other_callers_at_once_while_the_trial_is_in_flight():
    recorder = Recorder()
    breaker = Breaker(fail_max=1, reset_timeout=60, listeners=[recorder])
    trip(breaker)
    breaker.reset_timeout = 0

    release, trial = blocked_call(breaker)
    assert breaker.current_state == HALF_OPEN
    for _ in range(3):
        with pytest.raises(BreakerOpenError) as rejected:
            breaker.call(succeed)
        assert rejected.value.state == HALF_OPEN
        assert "trial calls are in flight" in str(rejected.value)

    release.set()
    assert trial.result(WAIT) == "late"
    assert breaker.current_state == CLOSED
    assert [e[0] for e in recorder.events].count("before_call") == 2


def test_half_open_max_calls_trial_calls_go_at_once_and_the_first_result_decides():
    recorder = Recorder()
    breaker = Breaker(
        fail_max=1, reset_timeout=60, listeners=[recorder], half_open_max_calls=3
    )
    trip(breaker)
    breaker.reset_timeout = 0
    recorder.events.clear()

    trials = [blocked_call(breaker) for _ in range(3)]
    with pytest.raises(BreakerOpenError):
        breaker.call(succeed)
    for release, future in trials:
        release.set()
        assert future.result(WAIT) == "late"

    assert breaker.current_state == CLOSED
    assert recorder.states() == [(OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    # Every trial call is heard of once; the two after the first are late.
    assert [e[0] for e in recorder.events].count("before_call") == 3
    assert [e[0] for e in recorder.events].count("success") == 3


def test_a_late_failure_neither_reopens_an_open_breaker_nor_restarts_its_timer():
    recorder = Recorder()
    breaker = Breaker(fail_max=2, reset_timeout=60, listeners=[recorder])
    release, slow = blocked_call(breaker, Boom())  # admitted while closed
    trip(breaker)
    opened_at = breaker._state_storage.opened_at

    release.set()
    with pytest.raises(Boom):  # its own error, not the trip's
        slow.result(WAIT)

    assert breaker.current_state == OPEN
    assert breaker._state_storage.opened_at is opened_at
    assert breaker.fail_counter == 2
    assert recorder.states() == [(CLOSED, OPEN)]
    assert [e[0] for e in recorder.events].count("failure") == 3


def test_a_late_success_does_not_close_an_open_breaker():
    breaker = Breaker(fail_max=1, reset_timeout=60)
    release, slow = blocked_call(breaker)
    trip(breaker)
    release.set()
    assert slow.result(WAIT) == "late"
    assert breaker.current_state == OPEN
    assert breaker.fail_counter == 1


def test_a_trial_of_an_earlier_half_open_state_takes_no_place_in_the_next():
    breaker = Breaker(fail_max=1, reset_timeout=0)
    trip(breaker)
    release_first, first = blocked_call(breaker)  # trial of the first half-open
    breaker.open()
    release_second, second = blocked_call(breaker)  # trial of the second

    release_first.set()
    assert first.result(WAIT) == "late"
    assert breaker.current_state == HALF_OPEN  # the late success decided nothing
    with pytest.raises(BreakerOpenError):
        breaker.call(succeed)  # the second trial still holds the only place
    release_second.set()
    assert second.result(WAIT) == "late"
    assert breaker.current_state == CLOSED


def test_a_listener_that_fails_before_a_trial_call_gives_its_place_back():
    class Refuses(pybreaker.CircuitBreakerListener):
        def before_call(self, cb, func, *args, **kwargs):  # noqa: ARG002
            if args == ("refused",):
                raise RuntimeError("no")

    breaker = Breaker(fail_max=1, reset_timeout=0, listeners=[Refuses()])
    trip(breaker)
    with pytest.raises(RuntimeError):
        breaker.call(succeed, "refused")
    assert breaker.call(succeed, "next") == "next"
    assert breaker.current_state == CLOSED


def test_many_threads_failing_at_once_trip_the_breaker_exactly_once():
    threads = 64
    recorder = Recorder()
    breaker = Breaker(fail_max=2, reset_timeout=60, listeners=[recorder])
    all_inside = threading.Barrier(threads, timeout=WAIT)

    def fail_together():
        all_inside.wait()
        raise Boom

    def one_call():
        with pytest.raises((Boom, pybreaker.CircuitBreakerError)):
            breaker.call(fail_together)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(one_call) for _ in range(threads)]:
            future.result(WAIT)

    assert recorder.states() == [(CLOSED, OPEN)]
    assert breaker.fail_counter == 2
    kinds = [e[0] for e in recorder.events]
    assert kinds.count("before_call") == kinds.count("failure") == threads


def test_call_async_runs_calls_side_by_side_and_rejects_at_once():
    async def scenario():
        breaker = Breaker(fail_max=1, reset_timeout=60, throw_new_error_on_trip=False)
        both_inside = asyncio.Barrier(2)

        async def meet():
            await both_inside.wait()
            return True

        async with asyncio.timeout(WAIT):
            both = await asyncio.gather(
                breaker.call_async(meet), breaker.call_async(meet)
            )
        assert list(both) == [True, True]

        async def boom():
            raise Boom

        with pytest.raises(Boom):
            await breaker.call_async(boom)
        with pytest.raises(BreakerOpenError):
            await breaker.call_async(meet)

        breaker.reset_timeout = 0
        release = asyncio.Event()

        async def trial():
            await release.wait()
            return "trial"

        in_flight = asyncio.create_task(breaker.call_async(trial))
        await asyncio.sleep(0)  # let the trial call be admitted
        with pytest.raises(BreakerOpenError):
            await breaker.call_async(meet)
        release.set()
        assert await in_flight == "trial"
        assert breaker.current_state == CLOSED

    asyncio.run(scenario())


def test_a_cancelled_call_is_a_failure_and_stays_a_cancellation():
    async def scenario():
        recorder = Recorder()
        breaker = Breaker(fail_max=1, listeners=[recorder])
        task = asyncio.create_task(breaker.call_async(asyncio.sleep, WAIT))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # not replaced by the trip's CircuitBreakerError
        assert breaker.current_state == OPEN
        assert recorder.events[-2:] == [
            ("failure", "CancelledError"),
            ("state_change", CLOSED, OPEN),
        ]

    asyncio.run(scenario())


def test_the_guard_reports_a_half_open_rejection_as_rejected():
    outcomes = []
    breaker = Breaker(fail_max=1, reset_timeout=0)
    guard = Guard(breaker, hooks=[lambda _b, outcome, _s: outcomes.append(outcome)])
    trip(breaker)
    release, trial = blocked_call(breaker)
    with pytest.raises(BreakerOpenError):
        guard.call(succeed)
    release.set()
    trial.result(WAIT)
    assert outcomes == ["rejected"]


def test_the_guard_needs_a_calcsvc_breaker_for_asyncio_calls():
    guard = Guard(pybreaker.CircuitBreaker())

    async def nothing():
        return None

    with pytest.raises(TypeError, match=r"calcsvc\.breaker\.Breaker"):
        asyncio.run(guard.call_async(nothing))


def test_half_open_max_calls_must_be_at_least_one():
    with pytest.raises(ValueError, match="half_open_max_calls"):
        Breaker(half_open_max_calls=0)
