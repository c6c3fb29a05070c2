"""Many callers share one breaker, against a real server that fails on purpose.

The server's injected errors follow a seeded schedule. Whatever the threads
do at the same moment, the breaker must stay exact: one trip per outage,
transitions that form a valid path, metrics that add up to the calls made,
and every listener told of every admitted call exactly once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import pybreaker

from calcsvc import BackendError, BreakerOpenError, CalculatorClient, aio
from calcsvc.calculator import SERVICE_NAME
from tests.support import scrape

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN
EDGES = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED), (HALF_OPEN, OPEN)}
THREADS = 64
ASYNC_CALLS = 256


class Ledger(pybreaker.CircuitBreakerListener):
    """Writes down every listener call in order, with the call it belongs to.

    pybreaker calls listeners in the calling thread, so the call a listener
    call belongs to is the one the thread has said it is making.
    """

    def __init__(self):
        self.events = []
        self.calling = threading.local()
        self.opened_at = []
        self._lock = threading.Lock()

    def _add(self, kind, detail=None):
        with self._lock:
            self.events.append((getattr(self.calling, "call", None), kind, detail))

    def before_call(self, cb, func, *args, **kwargs):  # noqa: ARG002
        self._add("before_call", cb.current_state)

    def success(self, cb):  # noqa: ARG002
        self._add("success")

    def failure(self, cb, exc):  # noqa: ARG002
        self._add("failure", type(exc).__name__)

    def state_change(self, cb, old_state, new_state):
        self._add("state_change", (old_state.name, new_state.name))
        if new_state.name == OPEN:
            self.opened_at.append(cb._state_storage.opened_at)

    def transitions(self):
        return [detail for _, kind, detail in self.events if kind == "state_change"]

    def by_call(self):
        """Each call's own listener events, in order."""
        calls = defaultdict(list)
        for call, kind, _ in self.events:
            if kind != "state_change":
                calls[call].append(kind)
        return calls


def assert_valid_path(transitions):
    state = CLOSED
    for old, new in transitions:
        assert old == state, f"{old}->{new} after reaching {state}"
        assert (old, new) in EDGES
        state = new


def assert_each_call_heard_once(ledger, outcomes):
    heard = ledger.by_call()
    assert None not in heard  # no listener call outside a call
    for call, outcome in outcomes.items():
        expected = {
            "success": ["before_call", "success"],
            "failure": ["before_call", "failure"],
            "rejected": [],
        }[outcome]
        assert heard.get(call, []) == expected, f"call {call} ({outcome})"


def run_callers(client, ledger, outcomes, calls_per_thread):
    """Make THREADS threads call at once; note each call's outcome by number."""
    start_together = threading.Barrier(THREADS, timeout=30)
    deadline = time.monotonic() + 30  # bounded in time as well as in count

    def caller(first_call):
        start_together.wait()
        for call in range(first_call, first_call + calls_per_thread):
            if time.monotonic() > deadline:
                return
            ledger.calling.call = call
            try:
                client.add(call, 1)
                outcomes[call] = "success"
            except BackendError:
                outcomes[call] = "failure"
            except BreakerOpenError:
                outcomes[call] = "rejected"
                time.sleep(0.002)  # paces the callers while it is open
            ledger.calling.call = None

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        futures = [
            pool.submit(caller, thread * calls_per_thread) for thread in range(THREADS)
        ]
        for future in futures:
            future.result()


def trial_calls(ledger):
    """Count the trial calls of each half-open spell.

    With a success_threshold of 1, the first trial call to end takes the
    breaker out of that half-open state, so the count is also the most trial
    calls that were in flight at once.
    """
    trials = []
    for _, kind, detail in ledger.events:
        if kind == "state_change" and detail[1] == HALF_OPEN:
            trials.append(0)
        elif kind == "before_call" and detail == HALF_OPEN:
            trials[-1] += 1
    return trials


def test_threads_against_a_seeded_fault_schedule_keep_the_books_exact(
    start_server, client_metrics
):
    calls_per_thread = 40
    half_open_max_calls = 2
    server = start_server(
        "--workers", "32",
        "--inject-error-rate", "0.25",
        "--inject-seed", "20240611",
        "--inject-latency-ms", "1",
    )  # fmt: skip
    registry, scrape_client = client_metrics
    ledger = Ledger()
    outcomes: dict[int, str] = {}

    with CalculatorClient(
        server.target,
        fail_max=3,
        reset_timeout=0.02,
        half_open_max_calls=half_open_max_calls,
        timeout=5,
        registry=registry,
    ) as client:
        client.breaker.add_listener(ledger)
        run_callers(client, ledger, outcomes, calls_per_thread)

    made = THREADS * calls_per_thread
    assert len(outcomes) == made
    counted = Counter(outcomes.values())
    assert counted["failure"] > 0
    assert counted["rejected"] > 0  # the schedule did trip the breaker

    transitions = ledger.transitions()
    assert_valid_path(transitions)
    assert transitions.count((CLOSED, OPEN)) >= 1
    assert_each_call_heard_once(ledger, outcomes)

    trials = trial_calls(ledger)
    assert trials
    assert all(1 <= count <= half_open_max_calls for count in trials)

    metrics = scrape_client()
    for outcome in ("success", "failure", "ignored", "rejected"):
        assert metrics.value(
            "circuit_breaker_calls_total", outcome=outcome
        ) == counted.get(outcome, 0)
    assert metrics.value("circuit_breaker_calls_total") == made
    for (old, new), times in Counter(transitions).items():
        assert (
            metrics.value(
                "circuit_breaker_transitions_total",
                from_state=old.replace("-", "_"),
                to_state=new.replace("-", "_"),
            )
            == times
        )
    assert metrics.value("circuit_breaker_transitions_total") == len(transitions)
    assert (
        metrics.value("circuit_breaker_failures_total", error="UNAVAILABLE")
        == counted["failure"]
    )

    # Only admitted calls reached the network, and the server saw each once.
    admitted = counted["success"] + counted["failure"]
    assert metrics.value("grpc_client_started_total", grpc_method="Add") == admitted
    served = scrape(server.metrics_port)
    assert served.value("grpc_server_started_total", grpc_method="Add") == admitted
    assert (
        served.value(
            "grpc_server_handled_total", grpc_method="Add", grpc_code="UNAVAILABLE"
        )
        == counted["failure"]
    )


def test_many_threads_failing_at_the_same_moment_trip_the_breaker_once(
    start_server, client_metrics
):
    # Every call waits 200 ms and then fails: all are in flight together,
    # and their failures arrive together.
    server = start_server(
        "--aio", "--inject-error-rate", "1", "--inject-latency-ms", "200"
    )
    registry, scrape_client = client_metrics
    ledger = Ledger()
    start_together = threading.Barrier(THREADS, timeout=30)

    with CalculatorClient(
        server.target, reset_timeout=60, timeout=5, registry=registry
    ) as client:
        client.breaker.add_listener(ledger)

        def caller():
            start_together.wait()
            try:
                client.add(1, 1)
            except BackendError:
                return "failure"
            except BreakerOpenError:
                return "rejected"
            return "success"

        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            counted = Counter(pool.map(lambda _: caller(), range(THREADS)))
        opened_at = client.breaker._state_storage.opened_at

    assert ledger.transitions() == [(CLOSED, OPEN)]
    assert counted["failure"] >= 2
    assert counted["failure"] + counted["rejected"] == THREADS
    kinds = Counter(kind for _, kind, _ in ledger.events)
    assert kinds["before_call"] == kinds["failure"] == counted["failure"]

    metrics = scrape_client()
    assert metrics.value("circuit_breaker_calls_total") == THREADS
    assert (
        metrics.value("circuit_breaker_calls_total", outcome="failure")
        == (counted["failure"])
    )
    assert (
        metrics.value(
            "circuit_breaker_transitions_total", from_state="closed", to_state="open"
        )
        == 1
    )
    # The late failures did not restart the reset timeout.
    assert metrics.value("circuit_breaker_state", state="open") == 1
    assert ledger.opened_at == [opened_at]


def test_many_asyncio_calls_failing_together_trip_the_breaker_once(
    start_server, client_metrics
):
    server = start_server(
        "--aio", "--inject-error-rate", "1", "--inject-latency-ms", "200"
    )
    registry, scrape_client = client_metrics
    ledger = Ledger()

    async def scenario():
        async with aio.CalculatorClient(
            server.target, reset_timeout=60, timeout=5, registry=registry
        ) as client:
            client.breaker.add_listener(ledger)

            async def one():
                try:
                    await client.add(1, 1)
                except BackendError:
                    return "failure"
                except BreakerOpenError:
                    return "rejected"
                return "success"

            return Counter(await asyncio.gather(*(one() for _ in range(ASYNC_CALLS))))

    counted = asyncio.run(scenario())
    assert ledger.transitions() == [(CLOSED, OPEN)]
    assert counted["failure"] + counted["rejected"] == ASYNC_CALLS
    kinds = Counter(kind for _, kind, _ in ledger.events)
    assert kinds["before_call"] == kinds["failure"] == counted["failure"]
    metrics = scrape_client()
    assert metrics.value("circuit_breaker_calls_total") == ASYNC_CALLS
    assert (
        metrics.value(
            "grpc_client_started_total",
            grpc_service=SERVICE_NAME,
            grpc_method="Add",
        )
        == counted["failure"]
    )
