"""calcsvc: a gRPC calculator, and a client that stops calling it while it is down.

The client's calls go through a pybreaker circuit breaker that lets many
calls run at once; the breaker, the client and the server are measured with
Prometheus metrics. :mod:`calcsvc.aio` has the client and server on asyncio.
"""

from calcsvc.breaker import Breaker, Guard, create_breaker
from calcsvc.client import CalculatorClient
from calcsvc.errors import (
    BACKEND_FAILURE_CODES,
    BackendError,
    BreakerOpenError,
    CallerError,
    CallError,
)
from calcsvc.instrumentation import PrometheusListener

__version__ = "0.1.0"

__all__ = [
    "BACKEND_FAILURE_CODES",
    "BackendError",
    "Breaker",
    "BreakerOpenError",
    "CalculatorClient",
    "CallError",
    "CallerError",
    "Guard",
    "PrometheusListener",
    "__version__",
    "create_breaker",
]
