"""What every calcsvc benchmark needs: servers, load, medians, memory.

Servers are real ``calcsvc serve`` processes on free loopback ports. Load is
bounded by time: a run calls for a fixed number of seconds, then stops.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from calcsvc.process import ServerProcess

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator, Sequence

HOST = "127.0.0.1"
REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
# bench/fleet.py writes its own section of the report between these markers;
# bench/run.py rewrites the rest and keeps it.
FLEET_BEGIN = "<!-- fleet: written by bench/fleet.py -->"
FLEET_END = "<!-- end of fleet -->"
_TICKS = os.sysconf("SC_CLK_TCK")


def fleet_section(report: str) -> tuple[str, str, str] | None:
    """Split ``report`` at the fleet's section: before it, the section, after it.

    Returns None when the report has no such section.
    """
    before, begin, rest = report.partition(FLEET_BEGIN)
    section, end, after = rest.partition(FLEET_END)
    if not begin or not end:
        return None
    return before, begin + section + end, after


def free_port() -> int:
    """Return a loopback port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(*args: str, metrics: bool = False) -> ServerProcess:
    """Start a ``calcsvc serve`` child with ``args``; metrics only if asked."""
    server = ServerProcess(
        HOST,
        free_port(),
        metrics_port=free_port() if metrics else 0,
        extra_args=["--log-level", "error", "--grace", "1", *args],
    )
    server.start()
    return server


def cpu_seconds(pid: int) -> float:
    """Return the CPU time process ``pid`` has used, user and system."""
    with open(f"/proc/{pid}/stat") as stat:  # noqa: PTH123
        fields = stat.read().rsplit(")", 1)[1].split()
    # utime and stime are the 14th and 15th fields; two come before the ")".
    return (int(fields[11]) + int(fields[12])) / _TICKS


def peak_rss_mib(pid: int | None = None) -> float:
    """Return the peak resident memory of process ``pid`` (default: this one)."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"/proc/{pid}/status") as status:  # noqa: PTH123
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def own_cpu_seconds() -> float:
    """Return the CPU time this process has used, all its threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    """How one timed run went."""

    calls: int
    seconds: float
    errors: int = 0
    cpu: float = 0.0
    """CPU seconds this process used during the run."""

    @property
    def rate(self) -> float:
        """Calls per second."""
        return self.calls / self.seconds

    @property
    def cpu_per_call(self) -> float:
        """CPU seconds this process used per call."""
        return self.cpu / self.calls


def run_threads(call: Callable[[], object], threads: int, seconds: float) -> Run:
    """Call ``call`` from ``threads`` threads at once for about ``seconds``."""
    start_together = threading.Barrier(threads + 1)
    stop = threading.Event()
    counts = [0] * threads
    errors = [0] * threads
    ended = [0.0] * threads

    def worker(index: int) -> None:
        start_together.wait()
        while not stop.is_set():
            try:
                call()
            except Exception:  # noqa: BLE001 - counted and shown in the table
                errors[index] += 1
            counts[index] += 1
        ended[index] = time.perf_counter()

    pool = [
        threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)
    ]
    for thread in pool:
        thread.start()
    start_together.wait()
    cpu = own_cpu_seconds()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    return Run(sum(counts), max(ended) - started, sum(errors), own_cpu_seconds() - cpu)


async def run_tasks(
    call: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> Run:
    """Await ``call`` from ``concurrency`` tasks of this loop for about ``seconds``."""
    calls = errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal calls, errors
        while time.perf_counter() < deadline:
            try:
                await call()
            except Exception:  # noqa: BLE001 - counted and shown in the table
                errors += 1
            calls += 1

    cpu = own_cpu_seconds()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(calls, time.perf_counter() - started, errors, own_cpu_seconds() - cpu)


def timed_calls(call: Callable[[], object], count: int) -> list[float]:
    """Return the duration of each of ``count`` calls, one after another."""
    durations = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        call()
        durations.append(clock() - start)
    return durations


def timed_blocks(
    variants: dict[str, Callable[[], object]], rounds: int, block: int
) -> tuple[dict[str, list[float]], SideBySide]:
    """Time blocks of ``block`` calls of each variant, alternating, ``rounds`` each.

    Every variant is warmed up first. Returns each variant's call durations,
    and the blocks' medians side by side, for :meth:`SideBySide.ratio`.
    """
    durations: dict[str, list[float]] = {name: [] for name in variants}
    side = SideBySide(list(variants))
    for call in variants.values():
        timed_calls(call, 300)
    for order in side.rounds(rounds):
        for name in order:
            timings = timed_calls(variants[name], block)
            durations[name] += timings
            side.add(name, statistics.median(timings))
    return durations, side


@dataclass
class SideBySide:
    """Results of variants measured in alternation, round after round."""

    names: Sequence[str]
    results: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0

    def rounds(self, count: int) -> Iterator[list[str]]:
        """Yield the variants' order for each round, rotated so none goes first."""
        names = list(self.names)
        for round_ in range(count):
            shift = round_ % len(names)
            yield names[shift:] + names[:shift]

    def add(self, name: str, value: float) -> None:
        """Keep one result of ``name``."""
        self.results.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        """Return the median of ``name``'s results."""
        return statistics.median(self.results[name])

    def ratio(self, name: str, baseline: str) -> float:
        """Return the median, over the rounds, of ``name`` over ``baseline``.

        Each round's two results were measured moments apart, so their ratio
        is spared most of what the machine's other work does to both.
        """
        pairs = zip(self.results[name], self.results[baseline], strict=True)
        return statistics.median(value / base for value, base in pairs)
