"""One caller that calls a Calculator over and over and writes down every call.

The fault tests read its log: when each call started and ended, how it ended,
the breaker's state after it, the transitions it caused, and the client's
metrics scraped from real ``/metrics`` right after it. The scrape also paces
the calls, so a rejected call is not followed by thousands more.

``python -m tests.caller TARGET`` runs a caller in a process of its own and
prints each call as a JSON line, for a client that lives in another network
namespace; it stops when its standard input closes. Times are
``time.monotonic()``, which every process on a Linux machine shares.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from dataclasses import dataclass, field

import pybreaker
from prometheus_client import CollectorRegistry, start_http_server

from calcsvc import BackendError, BreakerOpenError, CalculatorClient, CallerError
from calcsvc.breaker import state_label
from tests.support import HOST, Metrics, free_port, scrape

# The client's series that change call by call; the others are settings.
COUNTED = (
    "circuit_breaker_calls_total",
    "circuit_breaker_failures_total",
    "circuit_breaker_transitions_total",
    "circuit_breaker_state",
    "grpc_client_started_total",
    "grpc_client_handled_total",
)
# Labels that are the same on every series of one client.
CONSTANT_LABELS = {"breaker", "grpc_type", "grpc_service", "grpc_method"}


def counted(metrics: Metrics) -> dict[str, float]:
    """Return the client's call-by-call series that are not zero, by series."""
    values: dict[str, float] = {}
    for sample in metrics.samples:
        if sample.name in COUNTED and sample.value:
            labels = ",".join(
                f"{name}={value}"
                for name, value in sorted(sample.labels.items())
                if name not in CONSTANT_LABELS
            )
            key = f"{sample.name}{{{labels}}}"
            values[key] = values.get(key, 0) + sample.value
    return values


@dataclass
class Call:
    """One call as the caller saw it."""

    start: float
    end: float
    outcome: str
    """success, failure, ignored or rejected, as the metrics name them."""
    code: str | None
    """The gRPC status code's name of a call that reached the network."""
    correct: bool
    """Whether a successful call's result was the right one."""
    state: str
    """The breaker's state once the call had ended, as metrics spell it."""
    transitions: list[tuple[str, str]]
    """The breaker's state changes during the call, in order."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The client's counted series, scraped once the call had ended."""


def successes_since(calls: list[Call], moment: float) -> int:
    """Count the successful calls that started at ``moment`` or later."""
    return sum(1 for c in list(calls) if c.start >= moment and c.outcome == "success")


def opened(calls: list[Call]) -> bool:
    """Return whether the breaker has opened during any of ``calls``."""
    return any(("closed", "open") in call.transitions for call in list(calls))


class Transitions(pybreaker.CircuitBreakerListener):
    """Writes down the breaker's state changes."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def state_change(self, cb, old_state, new_state) -> None:  # noqa: ARG002
        self.seen.append((state_label(old_state.name), state_label(new_state.name)))


class Caller:
    """Calls ``client.add`` one call at a time from its own thread until stopped."""

    def __init__(self, client: CalculatorClient, scrape_client) -> None:
        self.client = client
        self.calls: list[Call] = []
        self._scrape = scrape_client
        self.before = counted(scrape_client())
        self._transitions = Transitions()
        client.breaker.add_listener(self._transitions)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.run, name="caller", daemon=True)

    def start(self) -> None:
        """Start calling in the background."""
        self._thread.start()

    def stop(self) -> list[Call]:
        """Stop calling, and return every call made."""
        self._stop.set()
        if self._thread.ident is not None:  # it was started
            self._thread.join(timeout=30)
            assert not self._thread.is_alive()
        return self.calls

    def run(self, report=None) -> None:
        """Call until stopped; hand each call to ``report`` as well, if given."""
        number = 0
        while not self._stop.is_set():
            number += 1
            call = self.call(number)
            self.calls.append(call)
            if report is not None:
                report(call)

    def call(self, number: int) -> Call:
        """Make one call and describe it."""
        seen = len(self._transitions.seen)
        code = None
        correct = False
        start = time.monotonic()
        try:
            correct = self.client.add(number, 1) == number + 1
            outcome, code = "success", "OK"
        except BackendError as error:
            outcome, code = "failure", error.code().name
        except CallerError as error:
            outcome, code = "ignored", error.code().name
        except BreakerOpenError:
            outcome = "rejected"
        end = time.monotonic()
        return Call(
            start=start,
            end=end,
            outcome=outcome,
            code=code,
            correct=correct,
            state=state_label(self.client.breaker.current_state),
            transitions=self._transitions.seen[seen:],
            metrics=counted(self._scrape()),
        )


# Seconds a call or a recovery may take beyond its bound, on a loaded machine.
MARGIN = 2.0


def expected_after(before: dict[str, float], call: Call) -> dict[str, float]:
    """Return the counted series that ``call`` should leave behind after ``before``."""
    after = {
        k: v for k, v in before.items() if not k.startswith("circuit_breaker_state")
    }

    def count(key: str) -> None:
        after[key] = after.get(key, 0) + 1

    count(f"circuit_breaker_calls_total{{outcome={call.outcome}}}")
    if call.outcome != "rejected":
        count("grpc_client_started_total{}")
        count(f"grpc_client_handled_total{{grpc_code={call.code}}}")
    if call.outcome == "failure":
        count(f"circuit_breaker_failures_total{{error={call.code}}}")
    for old, new in call.transitions:
        count(f"circuit_breaker_transitions_total{{from_state={old},to_state={new}}}")
    after[f"circuit_breaker_state{{state={call.state}}}"] = 1
    return after


def check_metrics(before: dict[str, float], calls: list[Call]) -> None:
    """Check that each call moved the client's metrics by exactly itself."""
    previous = before
    for number, call in enumerate(calls):
        assert call.metrics == expected_after(previous, call), f"call {number}"
        previous = call.metrics


def check_outage(
    calls: list[Call],
    *,
    fail_max: int,
    timeout: float,
    reset_timeout: float,
    fault_at: float,
    heal_began: float,
    healed_at: float,
    codes: set[str],
) -> None:
    """Check one outage from its start to the recovery.

    The calls before ``fault_at`` succeed; ``fail_max`` consecutive failures
    with one of ``codes`` open the breaker, and the next call is rejected;
    no call waits longer than ``timeout`` (plus the margin); and once the
    backend is healthy again, which it became between ``heal_began`` and
    ``healed_at``, the breaker closes within ``reset_timeout`` and one call,
    after at most one failed trial call.
    """
    durations = [call.end - call.start for call in calls]
    assert max(durations) <= timeout + MARGIN
    assert all(call.correct for call in calls if call.outcome == "success")
    assert {call.outcome for call in calls} <= {"success", "failure", "rejected"}
    assert all(call.outcome == "success" for call in calls if call.end < fault_at)

    first = next(n for n, call in enumerate(calls) if call.outcome == "failure")
    tripping = calls[first : first + fail_max]
    assert [call.outcome for call in tripping] == ["failure"] * fail_max
    assert {call.code for call in tripping} <= codes
    assert [call.transitions for call in tripping] == [[]] * (fail_max - 1) + [
        [("closed", "open")]
    ]
    assert calls[first + fail_max].outcome == "rejected"

    # The first success once healing began closes the breaker: a trial call
    # may find the backend healthy before the test knows it is.
    healing = [call for call in calls if call.end >= heal_began]
    recovered = next(n for n, call in enumerate(healing) if call.outcome == "success")
    closing = healing[recovered]
    assert closing.transitions[-1:] == [("half_open", "closed")]
    assert closing.end - healed_at <= reset_timeout + timeout + MARGIN
    failed_after = [
        call
        for call in healing[:recovered]
        if call.start >= healed_at and call.outcome == "failure"
    ]
    assert len(failed_after) <= 1
    assert all(call.outcome == "success" for call in healing[recovered:])


def main() -> None:
    """Call the target until standard input closes; print each call as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--fail-max", type=int, default=2)
    parser.add_argument("--reset-timeout", type=float, default=2.0)
    args = parser.parse_args()

    registry = CollectorRegistry()
    port = free_port()
    httpd, _ = start_http_server(port, HOST, registry)
    with CalculatorClient(
        args.target,
        timeout=args.timeout,
        fail_max=args.fail_max,
        reset_timeout=args.reset_timeout,
        registry=registry,
    ) as client:
        caller = Caller(client, lambda: scrape(port))
        print(json.dumps({"before": caller.before}), flush=True)
        threading.Thread(target=_stop_at_eof, args=(caller,), daemon=True).start()
        caller.run(lambda call: print(json.dumps(dataclasses.asdict(call)), flush=True))
    httpd.shutdown()


def _stop_at_eof(caller: Caller) -> None:
    sys.stdin.read()
    caller.stop()


if __name__ == "__main__":
    main()
