"""``calcsvc demo``: outages and recoveries, replayed against a real server.

The demo runs a server as a child process and a client in this process. By
default it walks the breaker through its whole cycle once:

- Test 1, normal: 5 + 3 = 8, the breaker stays closed.
- Test 2, outage: the server stops. Call 1 fails and the breaker stays
  closed; call 2 fails and opens it; call 3 is rejected at once, with no
  network attempt.
- Test 3, recovery: the server comes back. Once the reset timeout has passed,
  the next call is the half-open trial; it succeeds and closes the breaker.

It prints one line per call and the client's metrics at the end, and exits 0
only if every call behaved as described.

With ``loop`` it calls steadily instead and stops the server again and again,
so a dashboard shows repeated outages and recoveries; it prints one line per
breaker transition and a summary per cycle. Given a ``target``, the loop
calls a server it does not own, and the outages are whatever happens to that
server: stop it yourself to see one. Either way the client's
``/metrics`` is served the whole time, and the recorded timeline can be drawn
(:mod:`calcsvc.report`).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pybreaker
from prometheus_client import REGISTRY, start_http_server

from calcsvc.breaker import state_label
from calcsvc.client import CalculatorClient
from calcsvc.errors import BreakerOpenError, CallError
from calcsvc.process import ServerProcess
from calcsvc.server import ServerStartError, format_address

if TYPE_CHECKING:
    from pathlib import Path

    from prometheus_client import CollectorRegistry

NAME = "calculator"

# How long the loop waits, past the reset timeout, for the breaker to close
# after the server is back, before it calls the recovery a failure.
RECOVERY_MARGIN = 10.0


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo's server and metrics listen, and how the loop runs."""

    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int = 9465
    server_metrics_port: int = 9464
    loop: bool = False
    target: str | None = None
    """A server to call instead of the demo's own (loop only)."""
    cycles: int | None = None
    """Outages the loop makes before it ends; None: until it is stopped."""
    period: float = 10.0
    """Seconds of normal operation before each outage in the loop."""
    outage: float = 5.0
    """Seconds the server stays down in each outage of the loop."""
    rate: float = 10.0
    """Calls per second in the loop."""
    inject_latency_ms: float = 0.0
    inject_error_rate: float = 0.0
    report: Path | None = None
    """Where to draw the timeline as a PNG picture, if anywhere."""
    breaker_storage: str | None = None
    """A Redis URL where the breaker keeps its state, shared with other clients."""

    def __post_init__(self) -> None:
        """Refuse loop settings that cannot work."""
        if self.cycles is not None and self.cycles < 1:
            raise ValueError("cycles must be at least 1")
        if self.period <= 0 or self.outage <= 0 or self.rate <= 0:
            raise ValueError("period, outage and rate must be positive")
        if not self.loop and (self.inject_latency_ms or self.inject_error_rate):
            raise ValueError("injected faults need the loop")
        if self.target is not None and not self.loop:
            raise ValueError("a target needs the loop")
        if self.target is not None and (
            self.cycles or self.inject_latency_ms or self.inject_error_rate
        ):
            raise ValueError("cycles and injected faults need the demo's own server")


@dataclass
class Timeline:
    """What happened during a demo, in seconds since it began."""

    calls: list[tuple[float, str]] = field(default_factory=list)
    """Each call's time and outcome."""
    states: list[tuple[float, str]] = field(default_factory=list)
    """Each state the breaker entered, and when."""
    server: list[tuple[float, bool]] = field(default_factory=list)
    """Each time the server came up (True) or went down (False)."""
    end: float = 0.0


@dataclass
class Step:
    """One call of the scenario: what was expected and what happened."""

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
            f"  +{self.offset:7.3f}s  {self.operation:<10} {self.outcome:<9} "
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
    """Remembers each state the breaker enters, and when."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.states: list[tuple[float, str]] = [(0.0, "closed")]
        self.opened_at = 0.0

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,  # noqa: ARG002 - pybreaker's signature
        old_state: pybreaker.CircuitBreakerState | None,  # noqa: ARG002
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        now = time.monotonic()
        self.states.append((now - self.start, state_label(new_state.name)))
        if new_state.name == pybreaker.STATE_OPEN:
            self.opened_at = now

    def since(self, count: int) -> list[str]:
        """Return the states entered after the first ``count``."""
        return [state for _, state in self.states[count:]]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As servers do: a port whose last connections linger in TIME_WAIT
        # is free, one that something listens on is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            reason = (
                "is already in use"
                if error.errno == errno.EADDRINUSE
                else f"cannot be used: {error.strerror}"
            )
            raise ServerStartError(f"port {port} on {host} {reason}") from None


def _reachable(host: str) -> str:
    """Return an address a client can connect to for a server on ``host``."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


class _Demo:
    def __init__(self, config: DemoConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.registry = registry
        extra_args = ["--log-level", "warning", "--grace", "1"]
        if config.inject_latency_ms:
            extra_args += ["--inject-latency-ms", str(config.inject_latency_ms)]
        if config.inject_error_rate:
            extra_args += ["--inject-error-rate", str(config.inject_error_rate)]
        self.server = ServerProcess(
            config.host,
            config.port,
            metrics_port=config.server_metrics_port,
            extra_args=extra_args,
        )
        target = config.target or format_address(_reachable(config.host), config.port)
        self.client = CalculatorClient(
            target,
            registry=registry,
            name=NAME,
            breaker_storage=config.breaker_storage,
        )
        self.start = time.monotonic()
        self.recorder = _StateRecorder(self.start)
        self.client.breaker.add_listener(self.recorder)
        self.timeline = Timeline(states=self.recorder.states)
        self.steps: list[Step] = []
        self.problems: list[str] = []

    def now(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str) -> None:
        print(text, flush=True)

    def start_server(self, what: str) -> None:
        self.server.start()
        self.timeline.server.append((self.now(), True))
        self.say(f"  +{self.now():7.3f}s  server {what} (pid {self.server.pid})")

    def stop_server(self) -> None:
        self.timeline.server.append((self.now(), False))
        self.say(f"  +{self.now():7.3f}s  server stopping")
        self.server.stop()

    def add(self) -> tuple[str, str]:
        """Ask for 5 + 3; return the outcome and what to print of it."""
        try:
            value = self.client.add(5, 3)
        except BreakerOpenError:
            outcome, result = "rejected", "breaker open"
        except CallError as error:
            counted = self.client.breaker.is_system_error(error)
            outcome, result = ("failure" if counted else "ignored"), error.code().name
        else:
            outcome, result = "success", f"= {value:g}"
        self.timeline.calls.append((self.now(), outcome))
        return outcome, result

    # The classic scenario.

    def step(self, *, expect: str, path: list[str]) -> None:
        """Ask for 5 + 3 and print what became of the call."""
        step = Step("add(5, 3)", expect, path, offset=self.now())
        before = state_label(self.client.breaker.current_state)
        seen = len(self.recorder.states)
        attempts = self._network_attempts()
        step.outcome, step.result = self.add()
        step.path = [before, *self.recorder.since(seen)]
        if len(step.path) == 1:  # no transition: the state stayed as it was
            step.path.append(before)
        step.network = self._network_attempts() > attempts
        self.steps.append(step)
        self.say(step.line())
        if not step.ok:
            self.problems.append(f"{step.operation} at +{step.offset:.3f}s")

    def run_once(self) -> None:
        self.say("\nTest 1: normal operation")
        self.start_server("started")
        self.step(expect="success", path=["closed", "closed"])

        self.say("\nTest 2: the server stops")
        self.stop_server()
        self.step(expect="failure", path=["closed", "closed"])
        self.step(expect="failure", path=["closed", "open"])
        self.step(expect="rejected", path=["open", "open"])

        self.say("\nTest 3: recovery")
        self.start_server("restarted")
        wait = self.recorder.opened_at + self.client.breaker.reset_timeout
        wait -= time.monotonic()
        if wait > 0:
            self.say(f"  waiting {wait:.1f}s for the reset timeout")
            # The scenario is about this wait: the breaker lets a trial
            # call through only once the reset timeout has passed.
            time.sleep(wait + 0.05)
        self.step(expect="success", path=["open", "half_open", "closed"])

    # The loop.

    def traffic(self, stop: threading.Event, outcomes: Counter[str]) -> None:
        """Call at the configured rate until ``stop``; count the outcomes.

        Runs in its own thread, so calls go on while the server stops and
        starts. Each transition is printed as it happens.
        """
        interval = 1.0 / self.config.rate
        next_call = time.monotonic()
        while not stop.is_set():
            seen = len(self.recorder.states)
            outcome, _ = self.add()
            outcomes[outcome] += 1
            for offset, state in self.recorder.states[seen:]:
                self.say(f"  +{offset:7.3f}s  breaker -> {state}")
            next_call += interval
            stop.wait(max(0.0, next_call - time.monotonic()))

    def wait_until_closed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.recorder.states[-1][1] != "closed":
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def run_loop(self) -> None:
        config = self.config
        if config.target is None:
            self.say(
                f"loop: {config.period:g}s normal, {config.outage:g}s outage, "
                f"{config.rate:g} calls/s; stop with Ctrl-C"
            )
            self.start_server("started")
        else:
            self.say(
                f"loop: {config.rate:g} calls/s to {config.target}; stop that "
                "server for an outage, and this demo with Ctrl-C"
            )
        outcomes: Counter[str] = Counter()
        stop = threading.Event()
        caller = threading.Thread(
            target=self.traffic, args=(stop, outcomes), name="calcsvc-demo-calls"
        )
        caller.start()
        try:
            if config.target is None:
                self.cycles(outcomes)
            else:
                while caller.is_alive():
                    caller.join(1.0)
        finally:
            stop.set()
            caller.join()

    def cycles(self, outcomes: Counter[str]) -> None:
        """Stop and restart the demo's server, cycle after cycle."""
        config = self.config
        recovery = self.client.breaker.reset_timeout + RECOVERY_MARGIN
        cycle = 0
        while config.cycles is None or cycle < config.cycles:
            cycle += 1
            before = outcomes.copy()
            self.say(f"\nCycle {cycle}")
            time.sleep(config.period)
            self.stop_server()
            time.sleep(config.outage)
            self.start_server("restarted")
            if not self.wait_until_closed(recovery):
                self.problems.append(f"cycle {cycle}: the breaker did not close")
            counts = outcomes - before
            summary = ", ".join(f"{name} {counts[name]}" for name in sorted(counts))
            self.say(f"  cycle {cycle}: {counts.total()} calls: {summary}")

    def close(self) -> None:
        # The timeline ends here: stopping the server now is not an outage.
        self.timeline.end = self.now()
        if self.server.running:
            self.server.stop()
        self.client.close()

    def _network_attempts(self) -> float:
        value = self.registry.get_sample_value
        return sum(
            value(
                "grpc_client_started_total",
                {
                    "grpc_type": "unary",
                    "grpc_service": "calc.v1.Calculator",
                    "grpc_method": method,
                },
            )
            or 0.0
            for method in ("Add", "Subtract", "Multiply", "Divide")
        )

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
    """Run the demo and return its exit code: 0 if every call behaved.

    In the loop, an interrupt (SIGINT, or SIGTERM through the CLI) is the
    normal way to stop, and the exit code still says whether every recovery
    worked. In the single run it ends the demo with code 130.
    """
    registry = REGISTRY if registry is None else registry
    if config.report is not None:
        try:
            from calcsvc import report  # noqa: PLC0415, F401 - matplotlib is optional
        except ImportError:
            print(
                "calcsvc demo: --report needs matplotlib: "
                "pip install 'calcsvc[report]'",
                file=sys.stderr,
            )
            return 1
    try:
        own_ports = () if config.target else (config.port, config.server_metrics_port)
        for port in (*own_ports, config.metrics_port):
            _check_port_free(config.host, port)
        metrics_server, _ = start_http_server(
            config.metrics_port, config.host, registry
        )
    except (ServerStartError, OSError) as error:
        print(f"calcsvc demo: {error}", file=sys.stderr)
        return 1

    demo = _Demo(config, registry)
    breaker = demo.client.breaker
    metrics = format_address(config.host, config.metrics_port)
    demo.say(
        f"calcsvc demo: server {config.target or demo.server.target}, "
        f"client metrics on http://{metrics}/metrics"
    )
    demo.say(
        f"breaker: fail_max={breaker.fail_max} reset_timeout={breaker.reset_timeout:g}s"
    )
    try:
        if config.loop:
            with contextlib.suppress(KeyboardInterrupt):
                demo.run_loop()
        else:
            demo.run_once()
    except ServerStartError as error:
        print(f"calcsvc demo: {error}", file=sys.stderr)
        return 1
    finally:
        demo.close()
        metrics_server.shutdown()
        metrics_server.server_close()

    demo.report()
    if config.report is not None:
        from calcsvc.report import draw  # noqa: PLC0415 - matplotlib is optional

        draw(demo.timeline, config.report)
        print(f"\nTimeline drawn in {config.report}")
    if demo.problems:
        print(
            "\ncalcsvc demo: not as expected: " + "; ".join(demo.problems),
            file=sys.stderr,
        )
        return 1
    if config.loop:
        print("\nThe breaker closed again after every outage.")
    else:
        print("\nEvery call behaved as expected.")
    return 0
