"""The breaker on every kind of bad day, against real server processes.

Each row of FAULTS is one bad day: the server it starts with, how the fault
begins (or None: it is there from the start) and how the backend heals. One
caller (``tests/caller.py``) calls through a real client the whole time, and
one body checks every row the same way: the breaker opens after ``fail_max``
failures in a row, no call waits past its deadline (plus a margin), the
breaker closes within ``reset_timeout`` and one call of the backend healing,
and the client's metrics move by exactly one call at every call.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from prometheus_client import CollectorRegistry

from calcsvc import CalculatorClient
from tests.caller import (
    Caller,
    check_metrics,
    check_outage,
    opened,
    successes_since,
)
from tests.load import Load
from tests.support import HOST, free_port, wait_until

if TYPE_CHECKING:
    from collections.abc import Callable

    from calcsvc.process import ServerProcess

FAIL_MAX = 2
TIMEOUT = 0.5
RESET_TIMEOUT = 0.5


class Backend:
    """The servers behind one port, started, signalled and killed for real."""

    def __init__(self, start_server):
        self._start_server = start_server
        self.port = free_port()
        self.target = f"{HOST}:{self.port}"
        self.server: ServerProcess | None = None

    def start(self, *flags):
        self.server = self._start_server(*flags, port=self.port)

    def stop(self):
        assert self.server is not None
        self.server.stop()

    def kill(self):
        assert self.server is not None
        self.server.kill()

    def replace(self, *flags):
        """Kill the server, and start one with ``flags`` on the same port."""
        self.kill()
        self.start(*flags)

    def signal(self, signum):
        assert self.server is not None
        self.server.signal(signum)


@pytest.fixture
def backend(start_server):
    backend = Backend(start_server)
    yield backend
    # A stopped server would hold up the teardown until its SIGTERM times out.
    if backend.server is not None and backend.server.running:
        backend.signal(signal.SIGCONT)


@dataclass(frozen=True)
class Fault:
    """One bad day: how it begins, and how the backend heals."""

    name: str
    flags: tuple[str, ...] | None
    """The first server's flags; None: nothing listens at first."""
    begin: Callable[[Backend], None] | None
    """None: the fault is there from the first call."""
    heal: Callable[[Backend], None]
    """Returns once the backend is healthy."""
    codes: set[str]
    """The status codes of the calls that trip the breaker."""
    others_calling: bool = False
    """Whether other clients call the same server all along."""


SLOW = ("--inject-latency-ms", "100")

FAULTS = [
    Fault(
        "sigkill-mid-load",
        SLOW,
        Backend.kill,
        lambda backend: backend.start(*SLOW),
        {"UNAVAILABLE"},
        others_calling=True,
    ),
    Fault(
        "sigstop-then-sigcont",
        (),
        lambda backend: backend.signal(signal.SIGSTOP),
        lambda backend: backend.signal(signal.SIGCONT),
        {"DEADLINE_EXCEEDED"},
    ),
    Fault(
        "slower-than-the-deadline",
        ("--inject-latency-ms", str(int(TIMEOUT * 1000 * 2))),
        None,
        Backend.replace,
        {"DEADLINE_EXCEEDED"},
    ),
    Fault(
        "every-call-unavailable",
        ("--inject-error-rate", "1"),
        None,
        Backend.replace,
        {"UNAVAILABLE"},
    ),
    Fault("nothing-listening", None, None, Backend.start, {"UNAVAILABLE"}),
    Fault("restart-on-the-same-port", (), Backend.stop, Backend.start, {"UNAVAILABLE"}),
]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_the_breaker_rides_out_the_fault(fault, backend, client_metrics):
    registry, scrape_client = client_metrics
    if fault.flags is not None:
        backend.start(*fault.flags)

    with CalculatorClient(
        backend.target,
        fail_max=FAIL_MAX,
        reset_timeout=RESET_TIMEOUT,
        timeout=TIMEOUT,
        registry=registry,
    ) as client:
        caller = Caller(client, scrape_client)
        # Other clients, with breakers and metrics of their own.
        others = Load(backend.target, CollectorRegistry(), clients=8, rate=20)
        fault_at = time.monotonic()
        caller.start()
        if fault.others_calling:
            others.start()
        try:
            if fault.begin is not None:
                wait_until(lambda: successes_since(caller.calls, fault_at) >= 3)
                fault_at = time.monotonic()
                fault.begin(backend)
            wait_until(lambda: opened(caller.calls))
            heal_began = time.monotonic()
            fault.heal(backend)
            healed_at = time.monotonic()
            wait_until(lambda: successes_since(caller.calls, healed_at) >= 3)
        finally:
            calls = caller.stop()
            outcomes = others.stop()

    check_metrics(caller.before, calls)
    check_outage(
        calls,
        fail_max=FAIL_MAX,
        timeout=TIMEOUT,
        reset_timeout=RESET_TIMEOUT,
        fault_at=fault_at,
        heal_began=heal_began,
        healed_at=healed_at,
        codes=fault.codes,
    )
    if fault.others_calling:
        assert not others.wrong
        assert outcomes["success"] > 0
        assert outcomes["failure"] > 0
