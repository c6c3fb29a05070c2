"""The arithmetic behind the Calculator service, and its gRPC servicers."""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import Callable

    _AioContext = grpc.aio.ServicerContext[
        calculator_pb2.BinaryRequest, calculator_pb2.Result
    ]

log = logging.getLogger(__name__)


_Message = TypeVar("_Message", bound=Message)


class UnparsedRequest:
    """Stands for request bytes that are not the message they should be.

    grpcio takes a deserializer's None for its own failure, so a request that
    did not parse needs an object of its own.
    """


UNPARSED = UnparsedRequest()

# A request as the servicers receive it.
_Request = calculator_pb2.BinaryRequest | UnparsedRequest

SERVICE_NAME = calculator_pb2.DESCRIPTOR.services_by_name["Calculator"].full_name

# What an injected error says, so that it is told apart from a real one.
INJECTED_FAULT = "injected fault"

OPERATIONS: dict[str, Callable[[float, float], float]] = {
    "Add": operator.add,
    "Subtract": operator.sub,
    "Multiply": operator.mul,
    "Divide": operator.truediv,
}


# The Calculator's methods as (service, method) pairs, for their metrics.
METHODS = tuple((SERVICE_NAME, method) for method in OPERATIONS)


class OperationRefusedError(Exception):
    """An operation the contract refuses to answer with a number."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        """Create a refusal that the server answers with ``code``."""
        super().__init__(message)
        self.code = code
        self.message = message


def evaluate(method: str, a: float, b: float) -> float:
    """Answer ``a <method> b`` under the rules of ``calculator.proto``.

    Raises:
        OperationRefusedError: an operand is not finite, the divisor is zero, or
            the result overflows a double.

    """
    for name, value in (("a", a), ("b", b)):
        if not math.isfinite(value):
            raise OperationRefusedError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"operand {name} must be a finite number, got {value!r}",
            )
    if method == "Divide" and b == 0:
        raise OperationRefusedError(
            grpc.StatusCode.INVALID_ARGUMENT, "operand b must not be zero for Divide"
        )

    try:
        result = OPERATIONS[method](a, b)
    except OverflowError:
        result = math.inf
    if math.isinf(result):
        raise OperationRefusedError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"{method} of {a!r} and {b!r} overflows a double",
        )
    return result


@dataclass
class Faults:
    """Faults injected into calculator calls, for demos, tests and benchmarks.

    Health checks are never affected: only the Calculator methods are. Each
    call draws from ``rng`` when it arrives, so a seeded ``rng`` fails the
    same calls, counted in the order they arrive, on every run.
    """

    latency: float = 0.0
    error_rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        """Check that the fault settings make sense."""
        if self.latency < 0:
            raise ValueError("injected latency must not be negative")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("injected error rate must be between 0 and 1")

    def draw(self) -> bool:
        """Decide whether the call that just arrived fails."""
        return bool(self.error_rate) and self.rng.random() < self.error_rate

    def apply(self, context: grpc.ServicerContext) -> None:
        """Delay the call, or end it with UNAVAILABLE, as configured."""
        failing = self.draw()
        if self.latency:
            time.sleep(self.latency)
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, INJECTED_FAULT)

    async def apply_async(self, context: _AioContext) -> None:
        """Delay the call, or end it with UNAVAILABLE, without blocking the loop."""
        failing = self.draw()
        if self.latency:
            await asyncio.sleep(self.latency)
        if failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, INJECTED_FAULT)


def parse(message_type: type[_Message], data: bytes) -> _Message | UnparsedRequest:
    """Parse ``data`` as a ``message_type``; :data:`UNPARSED` when it is not one.

    grpcio answers bytes its deserializer cannot parse itself, differently
    on each server (INTERNAL on the threaded one, UNKNOWN with the
    exception's text on grpc.aio) and with an ERROR and a traceback in the
    log each time. Parsed here, they get the same INVALID_ARGUMENT on both.
    """
    try:
        return message_type.FromString(data)
    except DecodeError:
        return UNPARSED


def not_a(message_type: type[Message]) -> str:
    """Return what a request that is not a ``message_type`` is told."""
    return f"the request is not a valid {message_type.DESCRIPTOR.full_name}"


NOT_A_REQUEST = not_a(calculator_pb2.BinaryRequest)


def parse_request(data: bytes) -> _Request:
    """Parse a Calculator request; :data:`UNPARSED` when it is no ``BinaryRequest``."""
    return parse(calculator_pb2.BinaryRequest, data)


def add_calculator(
    servicer: calculator_pb2_grpc.CalculatorServicer,
    server: grpc.Server | grpc.aio.Server,
) -> None:
    """Add the Calculator to ``server``, as the generated code does.

    The difference: requests are parsed by :func:`parse_request`, so that
    bytes that do not parse reach the servicer as :data:`UNPARSED`.
    """
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=parse_request,
            response_serializer=calculator_pb2.Result.SerializeToString,
        )
        for name in OPERATIONS
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
    )
    # grpc-stubs predates the registered handlers that grpcio's own
    # generated code adds, and that spare a lookup on every call.
    server.add_registered_method_handlers(  # type: ignore[union-attr]
        SERVICE_NAME, handlers
    )


def answer(method: str, request: _Request) -> calculator_pb2.Result:
    """Answer ``request`` to ``method``, or say why not.

    Raises:
        OperationRefusedError: the request did not parse or the contract
            refuses it, or answering failed unexpectedly (``INTERNAL``; the
            error is logged here).

    """
    if isinstance(request, UnparsedRequest):
        raise OperationRefusedError(grpc.StatusCode.INVALID_ARGUMENT, NOT_A_REQUEST)
    try:
        value = evaluate(method, request.a, request.b)
    except OperationRefusedError:
        raise
    except Exception:
        # grpcio would send the exception's text to the caller; keep
        # internals in the server's log and send a plain status instead.
        log.exception("unexpected error method=%s", method)
        raise OperationRefusedError(
            grpc.StatusCode.INTERNAL, "internal error"
        ) from None
    return calculator_pb2.Result(value=value)


class CalculatorServicer(calculator_pb2_grpc.CalculatorServicer):
    """Serves the four operations, answering refusals with their status code."""

    def __init__(self, faults: Faults | None = None) -> None:
        """Create the servicer, with ``faults`` injected into every call."""
        self._faults = faults or Faults()

    def Add(  # noqa: N802 - the method names are the RPC names
        self, request: _Request, context: grpc.ServicerContext
    ) -> calculator_pb2.Result:
        """Answer a + b."""
        return self._answer("Add", request, context)

    def Subtract(  # noqa: N802
        self, request: _Request, context: grpc.ServicerContext
    ) -> calculator_pb2.Result:
        """Answer a - b."""
        return self._answer("Subtract", request, context)

    def Multiply(  # noqa: N802
        self, request: _Request, context: grpc.ServicerContext
    ) -> calculator_pb2.Result:
        """Answer a * b."""
        return self._answer("Multiply", request, context)

    def Divide(  # noqa: N802
        self, request: _Request, context: grpc.ServicerContext
    ) -> calculator_pb2.Result:
        """Answer a / b."""
        return self._answer("Divide", request, context)

    def _answer(
        self,
        method: str,
        request: _Request,
        context: grpc.ServicerContext,
    ) -> calculator_pb2.Result:
        self._faults.apply(context)
        try:
            return answer(method, request)
        except OperationRefusedError as refusal:
            context.abort(refusal.code, refusal.message)


class AioCalculatorServicer(calculator_pb2_grpc.CalculatorServicer):
    """Serves the four operations on grpc.aio, as :class:`CalculatorServicer` does."""

    def __init__(self, faults: Faults | None = None) -> None:
        """Create the servicer, with ``faults`` injected into every call."""
        self._faults = faults or Faults()

    async def Add(  # noqa: N802 - the method names are the RPC names
        self, request: _Request, context: _AioContext
    ) -> calculator_pb2.Result:
        """Answer a + b."""
        return await self._answer("Add", request, context)

    async def Subtract(  # noqa: N802
        self, request: _Request, context: _AioContext
    ) -> calculator_pb2.Result:
        """Answer a - b."""
        return await self._answer("Subtract", request, context)

    async def Multiply(  # noqa: N802
        self, request: _Request, context: _AioContext
    ) -> calculator_pb2.Result:
        """Answer a * b."""
        return await self._answer("Multiply", request, context)

    async def Divide(  # noqa: N802
        self, request: _Request, context: _AioContext
    ) -> calculator_pb2.Result:
        """Answer a / b."""
        return await self._answer("Divide", request, context)

    async def _answer(
        self,
        method: str,
        request: _Request,
        context: _AioContext,
    ) -> calculator_pb2.Result:
        await self._faults.apply_async(context)
        try:
            return answer(method, request)
        except OperationRefusedError as refusal:
            await context.abort(refusal.code, refusal.message)
