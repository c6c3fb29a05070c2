"""A server failing a share of its calls: where the breaker trips, and where not.

The breaker counts failures in a row, not a rate. The server's injected
errors follow a seeded schedule, so each test knows in advance which calls
fail, and so exactly which call trips the breaker, if any does.
"""

from __future__ import annotations

import random

import pytest

from calcsvc import CalculatorClient
from calcsvc.calculator import Faults
from tests.caller import Caller, check_metrics


def predicted(rate, seed, calls, fail_max):
    """Foresee each call's outcome against a server failing ``rate`` of calls.

    The server draws for each call it receives, in order, from its seeded
    random numbers; a rejected call never reaches it, so draws nothing. The
    breaker stays open once it has opened: its reset timeout is longer
    than the run.
    """
    faults = Faults(error_rate=rate, rng=random.Random(seed))
    outcomes = []
    in_a_row = 0
    for _ in range(calls):
        if in_a_row >= fail_max:
            outcomes.append("rejected")
        elif faults.draw():
            outcomes.append("failure")
            in_a_row += 1
        else:
            outcomes.append("success")
            in_a_row = 0
    return outcomes


@pytest.mark.parametrize(
    ("rate", "fail_max", "trips_after"),
    [
        (0.1, 2, None),  # 10% of calls fail, never two in a row
        (0.5, 3, 14),  # half of them fail: three in a row come soon
        (0.5, 5, None),  # the same schedule, fail_max 5: 16 of 40 fail, no trip
    ],
)
def test_injected_errors_trip_the_breaker_only_when_fail_max_come_in_a_row(
    start_server, client_metrics, rate, fail_max, trips_after
):
    calls, seed = 40, 5
    expected = predicted(rate, seed, calls, fail_max)
    # The table above says where this seed's schedule trips the breaker.
    rejected = expected.index("rejected") if "rejected" in expected else None
    assert rejected == trips_after

    server = start_server("--inject-error-rate", str(rate), "--inject-seed", str(seed))
    registry, scrape_client = client_metrics
    with CalculatorClient(
        server.target, fail_max=fail_max, reset_timeout=60, registry=registry
    ) as client:
        caller = Caller(client, scrape_client)
        made = [caller.call(number) for number in range(1, calls + 1)]

    assert [call.outcome for call in made] == expected
    assert "failure" in expected
    assert all(call.correct for call in made if call.outcome == "success")
    check_metrics(caller.before, made)
    trips = [n + 1 for n, call in enumerate(made) if call.transitions]
    assert trips == ([] if trips_after is None else [trips_after])
