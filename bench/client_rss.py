"""Print the peak memory of a client process that calls for a few seconds.

``python bench/client_rss.py bare|guarded TARGET SECONDS`` calls ``Add`` from
16 threads, through a bare stub or through calcsvc's client, then prints its
own peak resident memory in MiB. ``bench/run.py`` runs it once per variant,
each in a process of its own, so that each figure is that variant's alone.
"""

from __future__ import annotations

import sys

import grpc
from harness import peak_rss_mib, run_threads

from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc

THREADS = 16


def main() -> None:
    """Call as the arguments say, then print the peak RSS in MiB."""
    variant, target, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if variant == "bare":
        channel = grpc.insecure_channel(target)
        stub = calculator_pb2_grpc.CalculatorStub(channel)
        request = calculator_pb2.BinaryRequest(a=5, b=3)
        run = run_threads(lambda: stub.Add(request, timeout=1), THREADS, seconds)
        channel.close()
    else:
        from calcsvc import CalculatorClient  # noqa: PLC0415 - its memory is measured

        with CalculatorClient(target) as client:
            run = run_threads(lambda: client.add(5, 3), THREADS, seconds)
    print(f"{peak_rss_mib():.1f} {run.calls} {run.errors}")


if __name__ == "__main__":
    main()
