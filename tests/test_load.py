"""Many clients under steady load: a bounded run in every test run, and a soak.

The bounded run keeps 32 clients calling a real server for
``CALCSVC_LOAD_SECONDS`` (20 s): no call may fail while the server is
healthy, every answer must be right, and the client's metrics and the
server's must each count every call once. It is shorter than the soak
because it runs beside the rest of the suite on two cores; what a longer run
adds, slow leaks, is the soak's to find.

The soak (``make soak``, marker ``soak``, left out of the default run)
keeps the same load up for ``CALCSVC_SOAK_SECONDS`` (600 s), samples the
threads, open file descriptors and resident memory of the server and of the
client (this process) from ``/proc``, and checks that none of them grows
past a small bound after the warm-up (a tenth of the run, at least 30 s).
"""

from __future__ import annotations

import os
import time

import pytest

from tests.load import Load, Usage, check_counters, usage
from tests.support import scrape

CLIENTS = 32
RATE = 10  # calls a second, per client
# How far past its warm-up sample a process may go in the soak. Threads and
# file descriptors come and go a little with grpcio's own pollers and
# connections; memory may grow as Python's allocator settles, but a leak
# of even 100 bytes a call would pass these bounds in ten minutes.
THREAD_SLACK = 2
FD_SLACK = 4
RSS_SLACK_KIB = 16 * 1024


def seconds(variable, default):
    return float(os.environ.get(variable, default))


def run_load(server, client_metrics, duration, sample=None):
    """Run the load for ``duration`` seconds; check it; return the outcomes."""
    registry, scrape_client = client_metrics
    load = Load(server.target, registry, CLIENTS, RATE)
    load.start()
    started = time.monotonic()
    try:
        while (elapsed := time.monotonic() - started) < duration:
            # The run's length is what is under test: there is no event to await.
            time.sleep(min(1.0, duration - elapsed))
            if sample is not None:
                sample(time.monotonic() - started)
    finally:
        outcomes = load.stop()
    assert not load.wrong
    check_counters(outcomes, scrape_client(), scrape(server.metrics_port), CLIENTS)
    return outcomes


def test_steady_load_has_no_errors_and_the_counters_add_up(
    start_server, client_metrics
):
    server = start_server()
    run_load(server, client_metrics, seconds("CALCSVC_LOAD_SECONDS", 20))


@pytest.mark.soak
@pytest.mark.timeout(seconds("CALCSVC_SOAK_SECONDS", 600) + 120)
def test_soak_holds_threads_files_and_memory_flat(start_server, client_metrics):
    duration = seconds("CALCSVC_SOAK_SECONDS", 600)
    # Long enough for the server's pool of worker threads to fill up.
    warm_up = min(max(duration / 10, 30), duration / 2)
    every = max(1.0, duration / 60)
    server = start_server()
    pids = {"server": server.pid, "client": os.getpid()}
    samples: list[tuple[float, dict[str, Usage]]] = []

    def sample(elapsed):
        if not samples or elapsed - samples[-1][0] >= every:
            samples.append((elapsed, {name: usage(pid) for name, pid in pids.items()}))

    outcomes = run_load(server, client_metrics, duration, sample)

    warm = next(n for n, (elapsed, _) in enumerate(samples) if elapsed >= warm_up)
    print(f"\nsoak: {outcomes['success']} calls in {duration:g}s")
    for name in pids:
        first, last = samples[warm][1][name], samples[-1][1][name]
        print(
            f"{name}: threads {first.threads} -> {last.threads}, "
            f"fds {first.fds} -> {last.fds}, "
            f"RSS {first.rss_kib} KiB -> {last.rss_kib} KiB "
            f"(from {samples[warm][0]:.0f}s to {samples[-1][0]:.0f}s)"
        )
    assert len(samples) - warm >= 3
    for elapsed, later in samples[warm:]:
        for name, now in later.items():
            first = samples[warm][1][name]
            assert now.threads <= first.threads + THREAD_SLACK, (name, elapsed)
            assert now.fds <= first.fds + FD_SLACK, (name, elapsed)
            assert now.rss_kib <= first.rss_kib + RSS_SLACK_KIB, (name, elapsed)
