"""A Calculator client for asyncio, whose calls go through a circuit breaker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

import grpc

from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc
from calcsvc.client import CalculatorClientBase, channel_options

if TYPE_CHECKING:
    from types import TracebackType

    from calcsvc._generated.calc.v1.calculator_pb2_grpc import CalculatorAsyncStub


class CalculatorClient(CalculatorClientBase):
    """Calls the Calculator service on grpc.aio, through a circuit breaker.

    The asyncio twin of :class:`calcsvc.CalculatorClient`: the same options,
    methods, errors, breaker and metrics, with methods to await. Create it
    inside the event loop that will use it; any number of calls may be in
    flight at once. A call whose task is cancelled counts as a failure, as
    pybreaker counts any error, and the cancellation goes on to the caller.

    With a Redis ``breaker_storage``, the breaker's two decisions per call
    talk to Redis synchronously, on the event loop: a round trip each, or
    at most the storage's timeout while Redis is unreachable.
    """

    def _connect(self, reset_timeout: float) -> None:
        options = channel_options(reset_timeout)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(self.target, options)
        else:
            self._channel = grpc.aio.secure_channel(
                self.target, self._credentials, options
            )
        self._stub: CalculatorAsyncStub = calculator_pb2_grpc.CalculatorStub(
            self._channel
        )

    async def add(self, a: float, b: float) -> float:
        """Return a + b."""
        return await self._call("Add", self._stub.Add, a, b)

    async def subtract(self, a: float, b: float) -> float:
        """Return a - b."""
        return await self._call("Subtract", self._stub.Subtract, a, b)

    async def multiply(self, a: float, b: float) -> float:
        """Return a * b."""
        return await self._call("Multiply", self._stub.Multiply, a, b)

    async def divide(self, a: float, b: float) -> float:
        """Return a / b."""
        return await self._call("Divide", self._stub.Divide, a, b)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._closed = True
        await self._channel.close(None)
        self._close_storage()

    async def __aenter__(self) -> Self:
        """Return the client itself."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the channel."""
        await self.close()

    async def _call(
        self,
        name: str,
        method: grpc.aio.UnaryUnaryMultiCallable[
            calculator_pb2.BinaryRequest, calculator_pb2.Result
        ],
        a: float,
        b: float,
    ) -> float:
        request = self._request(a, b)

        async def attempt() -> float:
            with self._network_call(name):
                reply = await method(request, timeout=self.timeout)
            return reply.value

        return await self._guard.call_async(attempt)
