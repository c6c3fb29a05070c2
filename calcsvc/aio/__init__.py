"""calcsvc on asyncio: the Calculator client and server on grpc.aio.

They behave as the threaded ones do, with the same breaker, health and
metrics; only the way they wait differs.
"""

from calcsvc.aio.client import CalculatorClient

__all__ = ["CalculatorClient"]
