"""``calcsvc demo``: an outage and a recovery, replayed against a real server.

The demo runs a server as a child process and a client in this process, and
walks the breaker through its whole cycle:

- Test 1, normal: 5 + 3 = 8, the breaker stays closed.
- Test 2, outage: the server stops. Call 1 fails and the breaker stays
  closed; call 2 fails and opens it; call 3 is rejected at once, with no
  network attempt.
- Test 3, recovery: the server comes back. Once the reset timeout has passed,
  the next call is the half-open trial; it succeeds and closes the breaker.

It prints one line per call and the client's metrics at the end, and exits 0
only if every call behaved as described. The client's ``/metrics`` is served
the whole time, so Prometheus can watch the breaker as it happens.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
import time
from dataclasses import dataclass, field

import pybreaker
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from calcsvc.breaker import state_label
from calcsvc.client import CalculatorClient
from calcsvc.errors import BreakerOpenError, CallError
from calcsvc.process import ServerProcess
from calcsvc.server import ServerStartError, format_address

NAME = "calculator"


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo's server and metrics listen."""

    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int = 9465
    server_metrics_port: int = 9464


@dataclass
class Step:
    """One call of the demo: what was expected and what happened."""

    operation: str
    expected_outcome: str
    expected_path: list[str]
    offset: float = 0.0
    outcome: str = ""
    result: str = ""
    path: list[str] = field(default_factory=list)
    network: bool = False

    @property
    def ok(self) -> bool:
        """Whether the call behaved as the scenario says."""
        return self.outcome == self.expected_outcome and self.path == self.expected_path

    def line(self) -> str:
        """Format the step as one timeline line."""
        text = (
            f"  +{self.offset:6.3f}s  {self.operation:<10} {self.outcome:<9} "
            f"{self.result:<13} network={'yes' if self.network else 'no ':<4} "
            f"breaker: {' -> '.join(self.path)}"
        )
        if not self.ok:
            text += (
                f"   UNEXPECTED: wanted {self.expected_outcome}, "
                f"breaker {' -> '.join(self.expected_path)}"
            )
        return text


class _StateRecorder(pybreaker.CircuitBreakerListener):
    """Remembers each state the breaker enters, and when it opened."""

    def __init__(self) -> None:
        self.states: list[str] = []
        self.opened_at = 0.0

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,  # noqa: ARG002 - pybreaker's signature
        old_state: pybreaker.CircuitBreakerState | None,  # noqa: ARG002
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self.states.append(state_label(new_state.name))
        if new_state.name == pybreaker.STATE_OPEN:
            self.opened_at = time.monotonic()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            reason = (
                "is already in use"
                if error.errno == errno.EADDRINUSE
                else f"cannot be used: {error.strerror}"
            )
            raise ServerStartError(f"port {port} on {host} {reason}") from None


class _Demo:
    def __init__(self, config: DemoConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.registry = registry
        self.server = ServerProcess(
            config.host,
            config.port,
            metrics_port=config.server_metrics_port,
            extra_args=["--log-level", "warning", "--grace", "1"],
        )
        self.client = CalculatorClient(self.server.target, registry=registry, name=NAME)
        self.recorder = _StateRecorder()
        self.client.breaker.add_listener(self.recorder)
        self.start = time.monotonic()
        self.steps: list[Step] = []

    def say(self, text: str) -> None:
        print(text, flush=True)

    def call(self, *, expect: str, path: list[str]) -> None:
        """Ask for 5 + 3 and print what became of the call."""
        step = Step("add(5, 3)", expect, path)
        step.offset = time.monotonic() - self.start
        before = state_label(self.client.breaker.current_state)
        seen = len(self.recorder.states)
        attempts = self._network_attempts()
        try:
            step.result = f"= {self.client.add(5, 3):g}"
            step.outcome = "success"
        except BreakerOpenError:
            step.outcome, step.result = "rejected", "breaker open"
        except CallError as error:
            step.outcome = (
                "failure" if self.client.breaker.is_system_error(error) else "ignored"
            )
            step.result = error.code().name
        step.path = [before, *self.recorder.states[seen:]]
        if step.path == [before]:
            step.path.append(before)
        step.network = self._network_attempts() > attempts
        self.steps.append(step)
        self.say(step.line())

    def run(self) -> None:
        metrics = format_address(self.config.host, self.config.metrics_port)
        self.say(
            f"calcsvc demo: server {self.server.target}, "
            f"client metrics on http://{metrics}/metrics"
        )
        self.say(
            f"breaker: fail_max={self.client.breaker.fail_max} "
            f"reset_timeout={self.client.breaker.reset_timeout:g}s"
        )

        self.say("\nTest 1: normal operation")
        self.server.start()
        self.say(f"  server started (pid {self.server.pid})")
        self.call(expect="success", path=["closed", "closed"])

        self.say("\nTest 2: the server stops")
        self.server.stop()
        self.say("  server stopped")
        self.call(expect="failure", path=["closed", "closed"])
        self.call(expect="failure", path=["closed", "open"])
        self.call(expect="rejected", path=["open", "open"])

        self.say("\nTest 3: recovery")
        self.server.start()
        self.say(f"  server restarted (pid {self.server.pid})")
        wait = (
            self.recorder.opened_at
            + self.client.breaker.reset_timeout
            - time.monotonic()
        )
        if wait > 0:
            self.say(f"  waiting {wait:.1f}s for the reset timeout")
            # The scenario is about this wait: the breaker lets a trial
            # call through only once the reset timeout has passed.
            time.sleep(wait + 0.05)
        self.call(expect="success", path=["open", "half_open", "closed"])

    def close(self) -> None:
        self.server.stop()
        self.client.close()

    def _network_attempts(self) -> float:
        total = 0.0
        for metric in self.registry.collect():
            if metric.name == "grpc_client_started":
                total += sum(
                    s.value for s in metric.samples if s.name.endswith("_total")
                )
        return total

    def report(self) -> None:
        self.say("\nClient metrics:")
        wanted = (
            "circuit_breaker_calls",
            "circuit_breaker_transitions",
            "circuit_breaker_failures",
            "circuit_breaker_state",
        )
        for metric in self.registry.collect():
            if metric.name not in wanted:
                continue
            for sample in metric.samples:
                if (
                    sample.name.endswith("_created")
                    or sample.labels.get("breaker") != NAME
                ):
                    continue
                if sample.value == 0 and metric.name != "circuit_breaker_state":
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                self.say(f"  {sample.name}{{{labels}}} {sample.value:g}")


def run(config: DemoConfig, registry: CollectorRegistry | None = None) -> int:
    """Run the demo and return its exit code: 0 if every call behaved."""
    registry = REGISTRY if registry is None else registry
    try:
        for port in (config.port, config.server_metrics_port, config.metrics_port):
            _check_port_free(config.host, port)
        metrics_server, _ = start_http_server(
            config.metrics_port, config.host, registry
        )
    except (ServerStartError, OSError) as error:
        print(f"calcsvc demo: {error}", file=sys.stderr)
        return 1

    demo = _Demo(config, registry)
    try:
        demo.run()
    except ServerStartError as error:
        print(f"calcsvc demo: {error}", file=sys.stderr)
        return 1
    finally:
        demo.close()
        with contextlib.suppress(Exception):
            metrics_server.shutdown()
            metrics_server.server_close()

    demo.report()
    failed = [step for step in demo.steps if not step.ok]
    if failed:
        print(
            f"\ncalcsvc demo: {len(failed)} call(s) did not behave as expected",
            file=sys.stderr,
        )
        return 1
    print("\nEvery call behaved as expected.")
    return 0
