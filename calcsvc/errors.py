"""The exceptions a calcsvc client raises, and which gRPC codes trip a breaker."""

from __future__ import annotations

import grpc
import pybreaker

# Codes that say the backend is unwell. A call that ends with one of them is a
# failure the breaker counts; any other non-OK code is the caller's problem.
BACKEND_FAILURE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
    }
)


class CallError(grpc.RpcError):
    """A call that ended with a non-OK gRPC status.

    Like the errors grpcio raises, it answers ``code()`` and ``details()``, so
    code written against ``grpc.RpcError`` keeps working.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        """Create the error for a call that ended with ``code``."""
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        """Return the gRPC status code the call ended with."""
        return self._code

    def details(self) -> str:
        """Return the status message the call ended with."""
        return self._details


class BackendError(CallError):
    """The backend is unwell or out of reach; the breaker counts a failure."""


class CallerError(CallError):
    """The server refused the request itself; the breaker lets it through.

    Examples are an operand that is not finite (``INVALID_ARGUMENT``) or a
    result too large for a double (``OUT_OF_RANGE``). Retrying the same
    request cannot succeed, and the backend is fine.
    """


class BreakerOpenError(pybreaker.CircuitBreakerError):
    """A call rejected at once, with no network attempt.

    The breaker was open, or half-open with as many trial calls in flight as
    it lets through; ``state`` says which, as pybreaker spells it.
    """

    def __init__(self, breaker: str, state: str = pybreaker.STATE_OPEN) -> None:
        """Create the error for a call that breaker ``breaker`` rejected."""
        super().__init__(breaker, state)
        self.breaker = breaker
        self.state = state

    def __str__(self) -> str:
        """Say which breaker rejected the call, and why."""
        # Written when it is read: most rejections are never printed.
        reason = (
            "is half-open and its trial calls are in flight"
            if self.state == pybreaker.STATE_HALF_OPEN
            else "is open"
        )
        return (
            f"breaker {self.breaker!r} {reason}: "
            "call rejected without a network attempt"
        )


def from_rpc_error(error: grpc.RpcError) -> CallError:
    """Turn an error raised by a grpcio call into a BackendError or CallerError."""
    code = error.code()
    details = (
        error.details() if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
    )
    if code is None:
        # Not a finished call: grpcio raised it before any status existed.
        code = grpc.StatusCode.UNKNOWN
    cls = BackendError if code in BACKEND_FAILURE_CODES else CallerError
    return cls(code, details or code.name.lower().replace("_", " "))
