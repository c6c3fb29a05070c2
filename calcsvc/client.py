"""A Calculator client whose calls go through a circuit breaker.

:class:`CalculatorClientBase` holds what this client and the asyncio one in
:mod:`calcsvc.aio` share: their settings, the breaker and its metrics, and
how a request is checked and built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import grpc

from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc
from calcsvc.breaker import Breaker, Guard, create_breaker
from calcsvc.calculator import METHODS, OPERATIONS, SERVICE_NAME
from calcsvc.errors import from_rpc_error
from calcsvc.instrumentation import (
    ClientCallMetrics,
    FailingStorage,
    PrometheusListener,
)

if TYPE_CHECKING:
    from types import TracebackType

    import pybreaker
    from prometheus_client import CollectorRegistry

    from calcsvc._generated.calc.v1.calculator_pb2_grpc import CalculatorStub
    from calcsvc.instrumentation import CallRecorder


# The path of each Calculator method, as gRPC and its metrics name it.
PATHS = {name: f"/{SERVICE_NAME}/{name}" for name in OPERATIONS}


class _NetworkCall:
    """Wraps one network call of a client, synchronous or awaited.

    It counts the call in the ``grpc_client_*`` metrics, and turns an error
    grpcio raises into a :class:`~calcsvc.errors.BackendError` or
    :class:`~calcsvc.errors.CallerError`, which the breaker tells apart.
    """

    __slots__ = ("_recorder",)

    def __init__(self, recorder: CallRecorder) -> None:
        self._recorder = recorder

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if error is None:
            self._recorder.succeeded()
            return
        self._recorder.failed(error)
        if isinstance(error, grpc.RpcError):
            raise from_rpc_error(error) from None


def channel_options(reset_timeout: float) -> list[tuple[str, int]]:
    """Channel settings that let a breaker's trial call find a server that is back.

    While a server is down, grpcio waits longer and longer between attempts
    to reconnect (up to two minutes). The breaker already waits
    ``reset_timeout`` before it tries again, so the channel's wait is capped
    below that: when the trial call comes, the channel has looked again.
    """
    cap_ms = max(100, int(reset_timeout * 1000 / 2))
    return [
        ("grpc.initial_reconnect_backoff_ms", min(cap_ms, 1000)),
        ("grpc.min_reconnect_backoff_ms", min(cap_ms, 1000)),
        ("grpc.max_reconnect_backoff_ms", cap_ms),
    ]


# The URLs ``breaker_storage`` takes, as redis-py reads them.
REDIS_URL_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_url(text: str) -> bool:
    """Whether ``text`` names a Redis server, such as ``redis://host:6379/0``."""
    if not text.startswith(REDIS_URL_SCHEMES):
        return False
    try:
        urlsplit(text).port  # noqa: B018 - reading it checks the port
    except ValueError:
        return False
    return True


def _storage(
    storage: str | pybreaker.CircuitBreakerStorage | None, name: str
) -> pybreaker.CircuitBreakerStorage | None:
    """Return the storage for breaker ``name``; open a Redis URL as one.

    Raises:
        ImportError: the redis package is not installed.
        ValueError: ``storage`` is a string but not a Redis URL.

    """
    if not isinstance(storage, str):
        return storage
    try:
        # Imported only here: Redis is an optional dependency.
        from calcsvc.storage import RedisStorage  # noqa: PLC0415
    except ImportError:
        raise ImportError(
            "a Redis breaker storage needs the redis package: "
            "pip install 'calcsvc[redis]'"
        ) from None
    return RedisStorage.from_url(storage, name)


class CalculatorClientBase:
    """Settings, breaker, metrics and requests of a Calculator client.

    Every call has a deadline of ``timeout`` seconds. After ``fail_max``
    consecutive calls fail because the backend is unwell
    (:data:`calcsvc.errors.BACKEND_FAILURE_CODES`) the breaker opens, and for
    ``reset_timeout`` seconds calls are rejected at once with
    :class:`~calcsvc.errors.BreakerOpenError`, without a network attempt.
    Then up to ``half_open_max_calls`` trial calls go through at once while
    later callers are rejected: if a trial call succeeds the breaker closes,
    if it fails the breaker opens again.

    A request the server refuses on its merits (a NaN operand, division by
    zero, an overflow) raises :class:`~calcsvc.errors.CallerError` and does
    not move the breaker. A failed call raises
    :class:`~calcsvc.errors.BackendError`. Both carry the gRPC ``code()``
    and ``details()``.

    The breaker and the gRPC calls are measured in ``registry`` (default:
    prometheus_client's global one), under the breaker label ``name``. Two
    clients in one registry need two names.

    With ``credentials`` (for example from
    :meth:`calcsvc.tls.ClientTls.grpc_credentials`) the channel uses TLS;
    without them it is plain text. A server that refuses the client's
    certificate, or whose own certificate the client does not trust, fails
    every call with UNAVAILABLE, as a server that is down does.

    ``breaker_storage`` is where the breaker keeps its state: this process's
    memory (the default), a Redis URL such as ``redis://host:6379/0``, which
    every client process with the same ``name`` shares (see
    :mod:`calcsvc.storage`; needs ``pip install 'calcsvc[redis]'``), or a
    pybreaker storage object. Failed commands to a
    :class:`~calcsvc.storage.RedisStorage` are counted in
    ``circuit_breaker_storage_errors_total``.
    """

    def __init__(  # noqa: PLR0913 - the client's documented options
        self,
        target: str,
        *,
        fail_max: int = 2,
        reset_timeout: float = 2.0,
        half_open_max_calls: int = 1,
        timeout: float = 1.0,
        registry: CollectorRegistry | None = None,
        name: str = "calculator",
        credentials: grpc.ChannelCredentials | None = None,
        breaker_storage: str | pybreaker.CircuitBreakerStorage | None = None,
    ) -> None:
        """Create a client of the server at ``target`` (``host:port``)."""
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.target = target
        self.timeout = timeout
        self._credentials = credentials

        listener = PrometheusListener(registry)
        storage = _storage(breaker_storage, name)
        if isinstance(storage, FailingStorage):
            listener.watch_storage(storage)
        self.breaker: Breaker = create_breaker(
            name,
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            half_open_max_calls=half_open_max_calls,
            state_storage=storage,
        )
        listener.watch(self.breaker)
        self._guard = Guard(self.breaker, hooks=[listener.record_call])
        self._calls = ClientCallMetrics(registry, METHODS)
        self._closed = False
        # A storage the client opened from a URL is the client's to close.
        self._own_storage = storage if isinstance(breaker_storage, str) else None
        self._connect(reset_timeout)

    def _connect(self, reset_timeout: float) -> None:
        """Open the channel."""
        raise NotImplementedError

    def _close_storage(self) -> None:
        """Close the connections of a breaker storage this client opened."""
        close = getattr(self._own_storage, "close", None)
        if close is not None:
            close()

    def _request(self, a: float, b: float) -> calculator_pb2.BinaryRequest:
        """Build the request for ``a`` and ``b``, before the breaker is asked.

        These checks are the caller's mistakes, and must not count as
        failures of the backend.

        Raises:
            ValueError: the client is closed.
            TypeError: an operand is not a number.

        """
        if self._closed:
            raise ValueError("the client is closed")
        return calculator_pb2.BinaryRequest(a=a, b=b)

    def _network_call(self, name: str) -> _NetworkCall:
        """Start measuring a network call of method ``name``."""
        return _NetworkCall(self._calls.start(PATHS[name]))


class CalculatorClient(CalculatorClientBase):
    """Calls the Calculator service through a circuit breaker, from any thread.

    Threads may share one client: their calls run side by side, and one
    breaker decides for all of them.
    """

    def _connect(self, reset_timeout: float) -> None:
        options = channel_options(reset_timeout)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options)
        else:
            self._channel = grpc.secure_channel(self.target, self._credentials, options)
        self._stub: CalculatorStub = calculator_pb2_grpc.CalculatorStub(self._channel)

    def add(self, a: float, b: float) -> float:
        """Return a + b."""
        return self._call("Add", self._stub.Add, a, b)

    def subtract(self, a: float, b: float) -> float:
        """Return a - b."""
        return self._call("Subtract", self._stub.Subtract, a, b)

    def multiply(self, a: float, b: float) -> float:
        """Return a * b."""
        return self._call("Multiply", self._stub.Multiply, a, b)

    def divide(self, a: float, b: float) -> float:
        """Return a / b."""
        return self._call("Divide", self._stub.Divide, a, b)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._closed = True
        self._channel.close()
        self._close_storage()

    def __enter__(self) -> Self:
        """Return the client itself."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the channel."""
        self.close()

    def _call(
        self,
        name: str,
        method: grpc.UnaryUnaryMultiCallable[
            calculator_pb2.BinaryRequest, calculator_pb2.Result
        ],
        a: float,
        b: float,
    ) -> float:
        request = self._request(a, b)

        def attempt() -> float:
            with self._network_call(name):
                reply = method(request, timeout=self.timeout)
            return reply.value

        return self._guard.call(attempt)
