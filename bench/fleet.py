"""Count the failed calls a fleet of client processes makes when its server dies.

Run it with ``make bench-fleet`` (``make bench`` runs it too). Four client
processes (``tests/fleet_worker.py``) call one server in a loop, each call
after the last; the server is killed, and the failed network calls are
counted until every process rejects. The fleet runs once with a breaker per
process and once with one breaker shared through a real ``redis-server``,
round after round, alternating. Then, in this process, it measures what
the shared breaker adds to one client's calls: blocks of calls with the
breaker in memory, in Redis, and with a Redis that cannot be reached,
alternating, and the commands Redis runs per call. The section it writes in
``docs/benchmarks.md`` sits between two markers, which ``bench/run.py``
keeps when it rewrites the rest of the file.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import textwrap
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import (  # noqa: E402
    FLEET_BEGIN,
    FLEET_END,
    REPORT,
    fleet_section,
    free_port,
    start_server,
    timed_blocks,
)
from prometheus_client import CollectorRegistry  # noqa: E402
from redis import Redis  # noqa: E402

from calcsvc import CalculatorClient  # noqa: E402
from tests.support import (  # noqa: E402
    FleetWorker,
    RedisProcess,
    stop_all,
    wait_until,
)

WORKERS = 4
FAIL_MAX = 3
ROUNDS = 5
COST_ROUNDS = 30  # blocks of calls of each storage, alternating
COST_BLOCK = 100  # calls in one block
COUNTED_CALLS = 1000  # calls whose Redis commands are counted
STORAGES = ("memory", "redis", "unreachable")
# An unreachable Redis may slow calls by at most this much: the storage
# leaves it alone between tries.
UNREACHABLE_TARGET = 1.10


def one_round(directory: Path, storage: str | None) -> int:
    """Trip one fleet of worker processes; return its failed calls."""
    server = start_server()
    args = ["--fail-max", str(FAIL_MAX)]
    if storage is not None:
        args += ["--breaker-storage", storage]
    workers = [
        FleetWorker(server.target, *args, stderr=directory / f"worker-{n}.log")
        for n in range(WORKERS)
    ]
    try:
        for worker in workers:
            worker.ready.wait(30)
        wait_until(lambda: all(w.count("success") >= 50 for w in workers), 60)
        server.kill()
        wait_until(lambda: all(w.last("rejected") for w in workers), 30)
    finally:
        stop_all(workers)
        server.stop()
    return sum(w.count("failure") for w in workers)


def redis_commands(client: Redis) -> int:
    """Return how many commands Redis has run, this one not counted."""
    return int(client.info("stats")["total_commands_processed"]) - 1


def call_cost(redis_url: str) -> tuple[dict[str, tuple[float, float]], float]:
    """Time one client's calls with each storage; count Redis's commands per call.

    Returns, per storage, the median duration of a call and its ratio to the
    breaker in memory (the median of the blocks' ratios, each block measured
    beside the other storages'), and the commands Redis ran per call.
    """
    server = start_server()
    storage_of = {
        "memory": None,
        "redis": redis_url,
        # Nothing listens there: each command is refused at once, and the
        # storage then leaves Redis alone for a second at a time.
        "unreachable": f"redis://127.0.0.1:{free_port()}/0",
    }
    clients = {
        kind: CalculatorClient(
            server.target,
            registry=CollectorRegistry(),
            name=f"bench-{kind}",
            breaker_storage=storage,
        )
        for kind, storage in storage_of.items()
    }
    calls = {kind: partial(client.add, 5, 3) for kind, client in clients.items()}
    try:
        durations, side = timed_blocks(calls, COST_ROUNDS, COST_BLOCK)

        counter = Redis.from_url(redis_url)
        before = redis_commands(counter)
        for _ in range(COUNTED_CALLS):
            clients["redis"].add(5, 3)
        per_call = (redis_commands(counter) - before) / COUNTED_CALLS
    finally:
        for client in clients.values():
            client.close()
        server.stop()
    cost = {
        kind: (statistics.median(durations[kind]), side.ratio(kind, "memory"))
        for kind in STORAGES
    }
    return cost, per_call


def section(
    failed: dict[str, list[int]],
    cost: dict[str, tuple[float, float]],
    commands: float,
) -> str:
    """Write the fleet's section of docs/benchmarks.md."""
    local, shared = failed["local"], failed["redis"]
    memory, _ = cost["memory"]

    def cost_row(label: str, kind: str, target: str = "-") -> str:
        seconds, ratio = cost[kind]
        return (
            f"| {label} | {seconds * 1e6:,.0f} µs | {ratio:.2f}x | "
            f"{(seconds - memory) * 1e6:+,.0f} µs | {target} |"
        )

    _, unreachable = cost["unreachable"]
    verdict = "met" if unreachable <= UNREACHABLE_TARGET else "missed"

    return "\n".join(
        [
            FLEET_BEGIN,
            "## A fleet of clients when its server dies",
            "",
            textwrap.fill(
                f"{WORKERS} client processes call one server in a loop, each call "
                f"after the last, with `fail_max={FAIL_MAX}`. The server is killed; "
                "the figures are the failed network calls the whole fleet makes "
                f"before every process rejects, over {ROUNDS} rounds "
                "(`make bench-fleet`, `bench/fleet.py`)."
            ),
            "",
            "| breaker | failed calls, median | min-max | expected |",
            "| --- | --- | --- | --- |",
            (
                f"| one per process | {statistics.median(local):g} | "
                f"{min(local)}-{max(local)} | {WORKERS} x fail_max = "
                f"{WORKERS * FAIL_MAX} |"
            ),
            (
                f"| shared in Redis | {statistics.median(shared):g} | "
                f"{min(shared)}-{max(shared)} | fail_max + calls in flight <= "
                f"{FAIL_MAX + WORKERS - 1} |"
            ),
            "",
            "### What the shared breaker costs a call",
            "",
            textwrap.fill(
                "One client calls `Add` on a server on loopback, one call after "
                "the other, in blocks of "
                f"{COST_BLOCK} calls per storage that alternate, {COST_ROUNDS} "
                "blocks each; the figures are the median call. *unreachable* is "
                "a Redis URL where nothing listens."
            ),
            "",
            "| breaker's storage | median call | vs memory | added | target |",
            "| --- | --- | --- | --- | --- |",
            cost_row("memory", "memory"),
            cost_row("Redis on loopback", "redis", "reported"),
            cost_row(
                "Redis unreachable",
                "unreachable",
                f"<= {UNREACHABLE_TARGET:.2f}x: {verdict}",
            ),
            "",
            textwrap.fill(
                f"Redis ran {commands:.2f} commands per successful call: the "
                "state, read before the call and again after it, the count of "
                "consecutive failures, reset, and read for the metrics. Each is "
                "a round trip, so on a network the cost grows with the round "
                "trip time to Redis."
            ),
            FLEET_END,
        ]
    )


def write(text: str) -> None:
    """Put the section in docs/benchmarks.md, in place of the last one."""
    old = REPORT.read_text() if REPORT.exists() else "# Benchmarks\n"
    split = fleet_section(old)
    if split is None:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        before, _, after = split
        new = before + text + after
    REPORT.write_text(new)


def main() -> None:
    """Run the rounds, print the section and write it to docs/benchmarks.md."""
    logging.basicConfig(level=logging.ERROR)
    failed: dict[str, list[int]] = {"local": [], "redis": []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        redis = RedisProcess(directory)
        redis.start()
        try:
            for _ in range(ROUNDS):
                for kind, storage in (("local", None), ("redis", redis.url)):
                    # Each round starts with a closed breaker, not the last
                    # round's open one.
                    Redis.from_url(redis.url).flushall()
                    start = time.monotonic()
                    count = one_round(directory, storage)
                    failed[kind].append(count)
                    print(
                        f"{kind}: {count} failed calls "
                        f"({time.monotonic() - start:.1f} s)",
                        flush=True,
                    )
            Redis.from_url(redis.url).flushall()
            print("call cost ...", flush=True)
            cost, commands = call_cost(redis.url)
        finally:
            redis.kill()
    text = section(failed, cost, commands)
    write(text)
    print(text)
    print(f"\nwritten to {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
