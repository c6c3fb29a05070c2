"""Steady load from many clients, and what a process holds while it lasts.

Each client of a :class:`Load` is a :class:`calcsvc.CalculatorClient` with
its own channel and breaker, calling from its own thread at a steady pace
and checking every answer against Python's own arithmetic. All clients
record into one registry, under their own breaker names.
"""

from __future__ import annotations

import operator
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calcsvc import BackendError, BreakerOpenError, CalculatorClient, CallerError
from calcsvc.calculator import SERVICE_NAME

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tests.support import Metrics

# Each client's calls go round these, with operands that always have an answer.
OPERATIONS = (
    ("add", operator.add),
    ("subtract", operator.sub),
    ("multiply", operator.mul),
    ("divide", operator.truediv),
)


@dataclass(frozen=True)
class Usage:
    """What a process holds at one moment."""

    threads: int
    fds: int
    rss_kib: int


def usage(pid: int) -> Usage:
    """Read the threads, open file descriptors and resident memory of ``pid``."""
    process = Path(f"/proc/{pid}")
    fields = {}
    for line in (process / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.split()
    return Usage(
        threads=int(fields["Threads"][0]),
        fds=sum(1 for _ in (process / "fd").iterdir()),
        rss_kib=int(fields["VmRSS"][0]),
    )


class Load:
    """``clients`` clients calling ``target``, each ``rate`` calls a second."""

    def __init__(
        self, target: str, registry: CollectorRegistry, clients: int, rate: float
    ) -> None:
        self.outcomes: Counter[str] = Counter()
        self.wrong: list[tuple[str, float, float, float]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clients = [
            CalculatorClient(target, registry=registry, name=f"load-{n}", timeout=5)
            for n in range(clients)
        ]
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(n, client, 1 / rate, n / rate / clients),
                name=f"load-{n}",
            )
            for n, client in enumerate(self._clients)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> Counter[str]:
        """Stop every client, close its channel, and return the outcomes."""
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:  # it was started
                thread.join(timeout=30)
                assert not thread.is_alive()
        for client in self._clients:
            client.close()
        return self.outcomes

    def _run(
        self, number: int, client: CalculatorClient, interval: float, offset: float
    ) -> None:
        call = 0
        # Each client starts at its own moment of the interval.
        while not self._stop.wait(interval if call else offset):
            call += 1
            name, expected = OPERATIONS[call % len(OPERATIONS)]
            a, b = float(call), float(number + 1)
            outcome = "success"
            try:
                value = getattr(client, name)(a, b)
            except BackendError:
                outcome = "failure"
            except CallerError:
                outcome = "ignored"
            except BreakerOpenError:
                outcome = "rejected"
            with self._lock:
                self.outcomes[outcome] += 1
                if outcome == "success" and value != expected(a, b):
                    self.wrong.append((name, a, b, value))


def check_counters(
    outcomes: Counter[str], client: Metrics, server: Metrics, clients: int
) -> None:
    """Check that every call of ``clients`` clients succeeded, counted once a side."""
    calls = outcomes["success"]
    assert outcomes == Counter(success=calls)
    breakers = client.label_values("circuit_breaker_calls_total", "breaker")
    assert len(breakers) == clients
    for breaker in breakers:  # every client called
        assert client.value("circuit_breaker_calls_total", breaker=breaker) > 0
    for outcome in ("failure", "ignored", "rejected"):
        assert client.value("circuit_breaker_calls_total", outcome=outcome) == 0
    assert client.value("circuit_breaker_calls_total", outcome="success") == calls
    assert client.value("grpc_client_started_total") == calls
    assert client.value("grpc_client_handled_total", grpc_code="OK") == calls
    assert client.value("grpc_client_handled_total") == calls
    assert client.value("circuit_breaker_state", state="closed") == clients
    calculator = {"grpc_service": SERVICE_NAME}
    assert server.value("grpc_server_started_total", **calculator) == calls
    assert server.value("grpc_server_handled_total", **calculator) == calls
    assert (
        server.value("grpc_server_handled_total", **calculator, grpc_code="OK") == calls
    )
