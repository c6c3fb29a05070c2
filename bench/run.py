"""Measure what the breaker, the asyncio client and the metrics cost.

Run it with ``make bench``. Every row compares two variants measured side by
side in the same run: their runs alternate, round after round, on the same
servers, and the table shows medians. It prints the table and writes it to
``docs/benchmarks.md`` with the machine it ran on. Servers are real
``calcsvc serve`` processes on loopback; every run is bounded in time.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pybreaker
from harness import (
    REPORT,
    SideBySide,
    cpu_seconds,
    fleet_section,
    peak_rss_mib,
    run_tasks,
    run_threads,
    start_server,
    timed_blocks,
    timed_calls,
)
from prometheus_client import CollectorRegistry

from calcsvc import BreakerOpenError, CalculatorClient, aio
from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent

ROUNDS = 7  # runs of each variant, alternating
SECONDS = 1.5  # length of one throughput run
LATENCY_ROUNDS = 40  # blocks of calls of each variant, alternating
LATENCY_BLOCK = 100  # calls in one block
THREADS = 16
ASYNC_CONCURRENCY = 256
SERVER_LOAD_CONCURRENCY = 64
LATENCY_MS = "5"

# The targets.
RATIO_TARGET = 0.9  # throughput, against the baseline
OVERHEAD_TARGET = 0.10  # added to a bare call's median latency
REJECTED_TARGET = 20e-6  # seconds, the median rejected call
NO_WAIT = 0.01  # seconds: a rejection slower than this waited for something
REQUEST = calculator_pb2.BinaryRequest(a=5, b=3)


@dataclass
class Row:
    """One line of the table: a baseline, a measured variant and the target."""

    benchmark: str
    baseline: str
    measured: str
    ratio: str
    target: str
    met: bool | None
    why: str = ""
    """What the shortfall comes from, shown when the target is missed."""

    @property
    def verdict(self) -> str:
        """Say whether the target was met."""
        if self.met is None:
            return "-"
        return "met" if self.met else "**missed**"


def say(text: str) -> None:
    """Show progress, so a long run is not silent."""
    print(text, file=sys.stderr, flush=True)


def per_second(value: float) -> str:
    """Format a rate of calls."""
    return f"{value:,.0f} calls/s"


def micros(seconds: float) -> str:
    """Format a duration in microseconds."""
    return f"{seconds * 1e6:,.1f} µs"


def bare_stub(target: str) -> tuple[grpc.Channel, calculator_pb2_grpc.CalculatorStub]:
    """Open a channel with nothing on it but grpcio, and its stub."""
    channel = grpc.insecure_channel(target)
    return channel, calculator_pb2_grpc.CalculatorStub(channel)


def threads_against_a_slow_server() -> list[Row]:
    """16 threads share one client; the server takes 5 ms per call."""
    say(f"{THREADS} threads, server +{LATENCY_MS} ms ...")
    server = start_server("--inject-latency-ms", LATENCY_MS, "--workers", "32")
    channel, stub = bare_stub(server.target)
    client = CalculatorClient(server.target, registry=CollectorRegistry())
    plain = pybreaker.CircuitBreaker(fail_max=2, reset_timeout=2, name="plain")
    variants: dict[str, Callable[[], object]] = {
        "bare": lambda: stub.Add(REQUEST, timeout=1),
        "guarded": lambda: client.add(5, 3),
        "pybreaker": lambda: plain.call(stub.Add, REQUEST, timeout=1),
    }
    side = SideBySide(list(variants))
    cpu = SideBySide(list(variants))
    try:
        for call in variants.values():
            run_threads(call, THREADS, 0.3)  # warm up
        for order in side.rounds(ROUNDS):
            for name in order:
                run = run_threads(variants[name], THREADS, SECONDS)
                side.add(name, run.rate)
                cpu.add(name, run.cpu_per_call)
                side.errors += run.errors
    finally:
        client.close()
        channel.close()
        server.stop()

    guarded = side.ratio("guarded", "bare")
    plain_ratio = side.ratio("pybreaker", "bare")
    check_errors(side)
    return [
        Row(
            f"{THREADS} threads, server +{LATENCY_MS} ms: throughput "
            "(client CPU per call)",
            f"bare stub {per_second(side.median('bare'))} "
            f"({micros(cpu.median('bare'))})",
            f"calcsvc client {per_second(side.median('guarded'))} "
            f"({micros(cpu.median('guarded'))})",
            f"{guarded:.2f}x ({cpu.ratio('guarded', 'bare'):.2f}x)",
            f">= {RATIO_TARGET}x",
            guarded >= RATIO_TARGET,
            f"Each guarded call cost the client {cpu.ratio('guarded', 'bare'):.2f}x "
            "the CPU of a bare one (the breaker's two decisions, its listeners "
            "and the call and gRPC metrics, all in Python). The client shares "
            "the two cores with the server, so that CPU is taken from the calls.",
        ),
        Row(
            f"{THREADS} threads, server +{LATENCY_MS} ms: for contrast",
            f"bare stub {per_second(side.median('bare'))}",
            f"`pybreaker.CircuitBreaker.call` {per_second(side.median('pybreaker'))}",
            f"{plain_ratio:.2f}x",
            "-",
            None,
        ),
    ]


def one_thread_latency(server_target: str) -> tuple[Row, float]:
    """One thread, no injected latency: the median latency of a call."""
    say("1 thread, median latency ...")
    channel, stub = bare_stub(server_target)
    client = CalculatorClient(server_target, registry=CollectorRegistry())
    variants: dict[str, Callable[[], object]] = {
        "bare": lambda: stub.Add(REQUEST, timeout=1),
        "guarded": lambda: client.add(5, 3),
    }
    try:
        durations, side = timed_blocks(variants, LATENCY_ROUNDS, LATENCY_BLOCK)
    finally:
        client.close()
        channel.close()

    bare = statistics.median(durations["bare"])
    guarded = statistics.median(durations["guarded"])
    ratio = side.ratio("guarded", "bare")
    row = Row(
        "1 thread, no injected latency: median latency",
        f"bare stub {micros(bare)}",
        f"calcsvc client {micros(guarded)}",
        f"{ratio:.2f}x ({ratio - 1:+.1%})",
        f"<= +{OVERHEAD_TARGET:.0%}",
        ratio - 1 <= OVERHEAD_TARGET,
        f"The breaker's two decisions, its listeners and the call and gRPC "
        f"metrics run in Python on every call: {micros(guarded - bare)} here, "
        f"against a bare call of {micros(bare)} to a Python server on the same "
        "two cores. The faster the server, the larger their share.",
    )
    return row, bare


def rejected_calls(server_target: str, bare_latency: float) -> list[Row]:
    """Time rejected calls, open and half-open, and pybreaker's caller's wait."""
    say("rejected calls ...")
    rows = []
    with CalculatorClient(
        server_target, reset_timeout=3600, registry=CollectorRegistry()
    ) as client:
        client.breaker.open()

        def rejected() -> None:
            try:
                client.add(5, 3)
            except BreakerOpenError:
                return
            raise AssertionError("the open breaker let a call through")

        timed_calls(rejected, 2000)  # warm up
        durations = timed_calls(rejected, 20000)
    median = statistics.median(durations)
    rows.append(
        Row(
            "rejected call, breaker open: median (max)",
            f"bare call {micros(bare_latency)}",
            f"rejected {micros(median)} (max {micros(max(durations))})",
            f"{median / bare_latency:.3f}x",
            f"<= {REJECTED_TARGET * 1e6:.0f} µs, no wait",
            median <= REJECTED_TARGET and max(durations) < NO_WAIT,
            "A rejection runs the breaker's decision, raises BreakerOpenError "
            "and records the call's outcome and duration, all in Python. The "
            "slowest rejection includes any time the process was not running.",
        )
    )

    # A trial call that takes 300 ms: calcsvc rejects the others at once,
    # pybreaker makes them wait for the trial call.
    slow = start_server("--inject-latency-ms", "300")
    try:
        half_open, held = half_open_rejections(slow.target)
        pybreaker_wait = pybreaker_half_open_wait(slow.target)
    finally:
        slow.stop()
    median = statistics.median(half_open)
    rows.append(
        Row(
            "rejected call, half-open, 300 ms trial call in flight: median (max)",
            f"`pybreaker` caller waits {pybreaker_wait * 1000:,.0f} ms",
            f"rejected {micros(median)} (max {micros(max(half_open))})",
            f"{median / pybreaker_wait:.5f}x",
            f"<= {REJECTED_TARGET * 1e6:.0f} µs, no wait",
            held and median <= REJECTED_TARGET and max(half_open) < NO_WAIT,
            "The rejections ran while the trial call's thread was also "
            "running; the slowest includes any time the process was not "
            "running."
            if held
            else "The trial call ended before the rejections were timed, so "
            "the row measured something else: rerun it.",
        )
    )
    return rows


def half_open_rejections(target: str) -> tuple[list[float], bool]:
    """Time rejections while one slow trial call is in flight.

    Also return whether the trial call was in flight all that time and then
    closed the breaker, as the figures assume.
    """
    with CalculatorClient(
        target, reset_timeout=0.05, timeout=5, registry=CollectorRegistry()
    ) as client:
        client.breaker.open()
        time.sleep(0.06)  # the reset timeout passes
        trial = threading.Thread(target=client.add, args=(5, 3))
        trial.start()
        while client.breaker.current_state != pybreaker.STATE_HALF_OPEN:
            time.sleep(0.001)

        def rejected() -> None:
            try:
                client.add(5, 3)
            except BreakerOpenError:
                return
            raise AssertionError("a second trial call went through")

        durations = timed_calls(rejected, 2000)
        in_flight = trial.is_alive()
        trial.join()
        closed = client.breaker.current_state == pybreaker.STATE_CLOSED
    return durations, in_flight and closed


def pybreaker_half_open_wait(target: str) -> float:
    """Time one caller of pybreaker's breaker while its trial call is in flight."""
    channel, stub = bare_stub(target)
    plain = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=0.05)
    plain.open()
    time.sleep(0.06)
    trial = threading.Thread(target=plain.call, args=(stub.Add, REQUEST))
    trial.start()
    while plain.current_state != pybreaker.STATE_HALF_OPEN:
        time.sleep(0.001)
    start = time.perf_counter()
    plain.call(stub.Add, REQUEST, timeout=5)
    waited = time.perf_counter() - start
    trial.join()
    channel.close()
    return waited


def asyncio_concurrency() -> Row:
    """256 concurrent calls from one event loop; the server takes 5 ms."""
    say(f"asyncio, {ASYNC_CONCURRENCY} concurrent calls ...")
    server = start_server("--aio", "--inject-latency-ms", LATENCY_MS)

    async def measure() -> tuple[SideBySide, SideBySide]:
        channel = grpc.aio.insecure_channel(server.target)
        stub = calculator_pb2_grpc.CalculatorStub(channel)
        client = aio.CalculatorClient(server.target, registry=CollectorRegistry())
        variants = {
            "bare": lambda: stub.Add(REQUEST, timeout=5),
            "guarded": lambda: client.add(5, 3),
        }
        side = SideBySide(list(variants))
        cpu = SideBySide(list(variants))
        for call in variants.values():
            await run_tasks(call, ASYNC_CONCURRENCY, 0.3)  # warm up
        for order in side.rounds(ROUNDS):
            for name in order:
                run = await run_tasks(variants[name], ASYNC_CONCURRENCY, SECONDS)
                side.add(name, run.rate)
                cpu.add(name, run.cpu_per_call)
                side.errors += run.errors
        await client.close()
        await channel.close()
        return side, cpu

    try:
        side, cpu = asyncio.run(measure())
    finally:
        server.stop()
    check_errors(side)
    ratio = side.ratio("guarded", "bare")
    return Row(
        f"asyncio, {ASYNC_CONCURRENCY} concurrent calls, server +{LATENCY_MS} ms: "
        "throughput (client CPU per call)",
        f"bare grpc.aio stub {per_second(side.median('bare'))} "
        f"({micros(cpu.median('bare'))})",
        f"calcsvc.aio client {per_second(side.median('guarded'))} "
        f"({micros(cpu.median('guarded'))})",
        f"{ratio:.2f}x ({cpu.ratio('guarded', 'bare'):.2f}x)",
        f">= {RATIO_TARGET}x",
        ratio >= RATIO_TARGET,
        "The client and the server share the two cores. Each guarded call "
        f"cost the client {cpu.ratio('guarded', 'bare'):.2f}x the CPU of a bare "
        "one (one more coroutine, the breaker's two decisions and the call "
        "and gRPC metrics), CPU that the server, the busier of the two, then "
        "lacks.",
    )


def server_metrics(kind: str) -> list[Row]:
    """Measure a server's calls/s and memory with its metrics on and off."""
    say(f"{kind} server, metrics on and off ...")
    flags = ["--aio"] if kind == "asyncio" else []
    servers = {
        "off": start_server(*flags),
        "on": start_server(*flags, metrics=True),
    }

    async def measure() -> tuple[SideBySide, SideBySide]:
        stubs = {}
        channels = []
        for name, server in servers.items():
            channel = grpc.aio.insecure_channel(server.target)
            channels.append(channel)
            stubs[name] = calculator_pb2_grpc.CalculatorStub(channel)
        rates = SideBySide(list(servers))
        cpu = SideBySide(list(servers))
        for stub in stubs.values():
            await run_tasks(lambda s=stub: s.Add(REQUEST, timeout=5), 16, 0.3)
        for order in rates.rounds(ROUNDS):
            for name in order:
                pid = servers[name].pid
                assert pid is not None
                used = cpu_seconds(pid)
                run = await run_tasks(
                    lambda s=stubs[name]: s.Add(REQUEST, timeout=5),
                    SERVER_LOAD_CONCURRENCY,
                    SECONDS,
                )
                rates.add(name, run.rate)
                cpu.add(name, (cpu_seconds(pid) - used) / run.calls)
                rates.errors += run.errors
        for channel in channels:
            await channel.close()
        return rates, cpu

    try:
        rates, cpu = asyncio.run(measure())
        memory = {name: peak_rss_mib(server.pid) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    check_errors(rates)
    ratio = rates.ratio("on", "off")
    return [
        Row(
            f"{kind} server: throughput (CPU per call)",
            f"metrics off {per_second(rates.median('off'))} "
            f"({micros(cpu.median('off'))})",
            f"metrics on {per_second(rates.median('on'))} ({micros(cpu.median('on'))})",
            f"{ratio:.2f}x ({cpu.ratio('on', 'off'):.2f}x)",
            f">= {RATIO_TARGET}x",
            ratio >= RATIO_TARGET,
            "The metrics interceptor runs in Python on every call, "
            f"{cpu.ratio('on', 'off'):.2f}x the server's CPU per call, and the "
            "server is CPU-bound with its load generator on the same two cores.",
        ),
        Row(
            f"{kind} server: peak RSS",
            f"metrics off {memory['off']:.1f} MiB",
            f"metrics on {memory['on']:.1f} MiB",
            f"{memory['on'] / memory['off']:.2f}x",
            "reported",
            None,
        ),
    ]


def client_memory() -> Row:
    """Peak RSS of a client process, bare and through calcsvc's client."""
    say("client peak RSS ...")
    server = start_server("--inject-latency-ms", LATENCY_MS, "--workers", "32")
    side = SideBySide(["bare", "guarded"])
    try:
        for order in side.rounds(2):
            for name in order:
                result = subprocess.run(
                    [
                        sys.executable,
                        str(Path(__file__).with_name("client_rss.py")),
                        name,
                        server.target,
                        "1.5",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=60,
                )
                rss, _, errors = result.stdout.split()
                side.add(name, float(rss))
                side.errors += int(errors)
    finally:
        server.stop()
    check_errors(side)
    return Row(
        f"client process, {THREADS} threads, server +{LATENCY_MS} ms: peak RSS",
        f"bare stub {side.median('bare'):.1f} MiB",
        f"calcsvc client {side.median('guarded'):.1f} MiB",
        f"{side.ratio('guarded', 'bare'):.2f}x",
        "reported",
        None,
    )


def check_errors(side: SideBySide) -> None:
    """Refuse figures that include failed calls: they would flatter the result."""
    if side.errors:
        raise SystemExit(f"{side.errors} calls failed during the benchmark")


def machine() -> list[str]:
    """Describe the machine and the versions the figures were measured with."""
    model = "unknown"
    with Path("/proc/cpuinfo").open() as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}"
        for name in ("grpcio", "pybreaker", "prometheus-client", "protobuf")
    )
    system = f"{platform.system()} {platform.release()}"
    return [
        f"- CPU: {os.cpu_count()} cores, {model} ({platform.machine()})",
        f"- Python {platform.python_version()}, {system}",
        f"- {versions}",
        f"- load average when the run started: {load}",
    ]


def fill(text: str) -> str:
    """Wrap a paragraph or a list item of docs/benchmarks.md."""
    indent = "  " if text.startswith("- ") else ""
    return textwrap.fill(
        text,
        width=76,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    )


def table(rows: list[Row]) -> list[str]:
    """Format the rows as a Markdown table."""
    lines = [
        "| benchmark | baseline (A) | measured (B) | B / A | target | result |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.benchmark} | {r.baseline} | {r.measured} | {r.ratio} "
        f"| {r.target} | {r.verdict} |"
        for r in rows
    ]
    return lines


def report(rows: list[Row], machine_lines: list[str], seconds: float) -> str:
    """Write the whole of docs/benchmarks.md."""
    missed = [row for row in rows if row.met is False]
    verdict = (
        ["Every target was met in this run."]
        if not missed
        else [
            f"{len(missed)} target(s) missed in this run:",
            "",
            *(
                fill(
                    f"- **{row.benchmark}**: {row.ratio} against {row.target}. "
                    f"{row.why}"
                )
                for row in missed
            ),
        ]
    )
    return "\n".join(
        [
            "# Benchmarks",
            "",
            fill(
                "What calcsvc's breaker, its asyncio client and its metrics "
                "cost, measured by `make bench` (`bench/run.py`). Each row "
                "compares two variants measured side by side in the same run: "
                "their runs alternate, round after round, against the same "
                "server processes, and the figures are medians. A ratio is the "
                "median of the rounds' ratios, each round's two results "
                f"measured moments apart. The whole run took {seconds:.0f} s."
            ),
            "",
            "## Machine",
            "",
            *machine_lines,
            "",
            "## Results",
            "",
            *table(rows),
            "",
            *verdict,
            "",
            "## What each row measures",
            "",
            *(fill(f"- {note}") for note in NOTES),
            "",
            "## Rerun",
            "",
            "```sh",
            "make bench   # prints the table and rewrites this file",
            "```",
            "",
            fill(
                "The figures move with the machine and with whatever else runs "
                "on it: compare the ratios, which are measured side by side, "
                "rather than the absolute rates. On two cores shared by client "
                "and server, a ratio moves by a few hundredths from one run to "
                "the next, so a row close to its target can land on either side "
                "of it."
            ),
            "",
        ]
    )


NOTES = [
    (
        f"**{THREADS} threads**: {THREADS} threads share one channel and call `Add` "
        f"for {SECONDS:g} s per run, {ROUNDS} runs per variant, against a threaded "
        f"server with `--inject-latency-ms {LATENCY_MS} --workers 32`. *calcsvc "
        "client* is `CalculatorClient` with its breaker and all its metrics; the "
        "contrast row calls the bare stub through `pybreaker.CircuitBreaker.call`, "
        "which holds the breaker's lock for the whole call. The client's CPU per "
        "call is the benchmark process's user and system time over its calls."
    ),
    (
        f"**1 thread**: one thread calls one after another, in blocks of "
        f"{LATENCY_BLOCK} calls that alternate, {LATENCY_ROUNDS} blocks per "
        "variant, against a threaded server with no injected latency. The "
        "latencies shown are the medians of every call; the ratio is the median "
        "of the blocks' ratios, each block against the one beside it."
    ),
    (
        "**rejected call, open**: `CalculatorClient.add` while its breaker is "
        "open, the `BreakerOpenError` caught, 20,000 calls timed one by one. *No "
        f"wait* means the slowest took under {NO_WAIT * 1000:g} ms, far from the "
        "1 s deadline. The baseline is the bare call of the row above."
    ),
    (
        "**rejected call, half-open**: a trial call that the server holds for "
        "300 ms is in flight; 2,000 other calls are timed meanwhile. The baseline "
        "is how long one caller of `pybreaker.CircuitBreaker` waits in the same "
        "situation: for the trial call, then for its own call."
    ),
    (
        f"**asyncio**: {ASYNC_CONCURRENCY} tasks of one event loop call for "
        f"{SECONDS:g} s per run against `calcsvc serve --aio --inject-latency-ms "
        f"{LATENCY_MS}`: the bare `grpc.aio` stub against "
        "`calcsvc.aio.CalculatorClient`. The client and the server share the two "
        "cores, so the rate depends on both; the client's CPU per call shows the "
        "client's own cost."
    ),
    (
        f"**server**: {SERVER_LOAD_CONCURRENCY} concurrent calls from a bare "
        "`grpc.aio` client in the benchmark's process, against two servers of one "
        "kind that differ only in `--metrics-port` (0 turns metrics off). The "
        "client shares the two cores with the server. CPU per call is the server "
        "process's user and system time over the calls it served; peak RSS is its "
        "`VmHWM` after the runs."
    ),
    (
        "**client process**: each variant runs in a process of its own, 16 "
        "threads for 1.5 s, and reports its peak RSS (`resource`). Both import "
        "calcsvc (the generated stubs live in it), so the difference is what the "
        "breaker and the metrics use at run time."
    ),
]


def kept_sections() -> str:
    """Return the section ``bench/fleet.py`` wrote in docs/benchmarks.md, if any."""
    split = fleet_section(REPORT.read_text()) if REPORT.exists() else None
    return "" if split is None else "\n" + split[1] + "\n"


def main() -> None:
    """Run every benchmark, print the table and write docs/benchmarks.md."""
    # The breakers this benchmark opens on purpose need not say so.
    logging.basicConfig(level=logging.ERROR)
    started = time.monotonic()
    machine_lines = machine()
    rows: list[Row] = []
    rows += threads_against_a_slow_server()
    plain = start_server()
    try:
        latency_row, bare_latency = one_thread_latency(plain.target)
        rows.append(latency_row)
        rows += rejected_calls(plain.target, bare_latency)
    finally:
        plain.stop()
    rows.append(asyncio_concurrency())
    rows += server_metrics("threaded")
    rows += server_metrics("asyncio")
    rows.append(client_memory())

    text = report(rows, machine_lines, time.monotonic() - started)
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(text + kept_sections())
    print("\n".join([*machine_lines, "", *table(rows)]))
    print(f"\nwritten to {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
