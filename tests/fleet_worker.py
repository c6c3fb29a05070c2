"""One client process of a fleet: calls a server in a loop, one JSON line per call.

Run as ``python -m tests.fleet_worker --target HOST:PORT [options]``. It
prints ``{"ready": true}`` once its client exists, then one line per call,
``{"outcome": ..., "seconds": ..., "end": ...}`` with the outcome as the
breaker's metrics name it (success, failure, rejected), the call's duration
and the time it ended (``time.time()``), and exits when its standard
input closes, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

from prometheus_client import start_http_server

from calcsvc import BackendError, BreakerOpenError, CalculatorClient


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True)
    parser.add_argument("--breaker-storage")
    parser.add_argument("--fail-max", type=int, default=3)
    parser.add_argument("--reset-timeout", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    return parser.parse_args()


def say(line: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        level=logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.metrics_port is not None:
        start_http_server(args.metrics_port, "127.0.0.1")

    # The test closes standard input to end the loop.
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()

    client = CalculatorClient(
        args.target,
        fail_max=args.fail_max,
        reset_timeout=args.reset_timeout,
        timeout=2.0,
        breaker_storage=args.breaker_storage,
    )
    say({"ready": True})
    deadline = time.monotonic() + args.max_seconds
    with client:
        while not stop.is_set() and time.monotonic() < deadline:
            start = time.perf_counter()
            try:
                client.add(1, 2)
                outcome = "success"
            except BreakerOpenError:
                outcome = "rejected"
            except BackendError:
                outcome = "failure"
            say(
                {
                    "outcome": outcome,
                    "seconds": time.perf_counter() - start,
                    "end": time.time(),
                }
            )
            stop.wait(args.interval)


if __name__ == "__main__":
    main()
