"""Prometheus metrics for gRPC calls, named like go-grpc-prometheus.

Existing gRPC dashboards and alerts read ``grpc_server_*`` and
``grpc_client_*`` series with the labels ``grpc_type``, ``grpc_service``,
``grpc_method`` and ``grpc_code``; these interceptors write the same ones.
Only unary calls are counted: the Calculator has no streaming methods, and
leaving the health service's Watch stream and server reflection out keeps
them from holding a metric open for the life of a stream.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc
from prometheus_client import Counter, Gauge, Histogram

from calcsvc.instrumentation._registry import LATENCY_BUCKETS, per_registry

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

# grpc-stubs declares these classes generic in the request and response
# types; grpcio's own classes are not subscriptable at run time.
if TYPE_CHECKING:
    _ServerInterceptor = grpc.ServerInterceptor[object, object]
    _ClientInterceptor = grpc.UnaryUnaryClientInterceptor[object, object]
    _AioServerInterceptor = grpc.aio.ServerInterceptor[object, object]
    _AioClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor[object, object]
    _Handler = grpc.RpcMethodHandler[object, object]
    _AioCall = grpc.aio.UnaryUnaryCall[object, object]
else:
    _ServerInterceptor = grpc.ServerInterceptor
    _ClientInterceptor = grpc.UnaryUnaryClientInterceptor
    _AioServerInterceptor = grpc.aio.ServerInterceptor
    _AioClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor

_LABELS = ("grpc_type", "grpc_service", "grpc_method")


@dataclass(frozen=True)
class _RpcFamilies:
    started: Counter
    handled: Counter
    handling: Histogram


def _rpc_families(side: str) -> Callable[[CollectorRegistry | None], _RpcFamilies]:
    def create(registry: CollectorRegistry) -> _RpcFamilies:
        return _RpcFamilies(
            started=Counter(
                f"grpc_{side}_started_total",
                f"RPCs started on the {side}.",
                _LABELS,
                registry=registry,
            ),
            handled=Counter(
                f"grpc_{side}_handled_total",
                f"RPCs completed on the {side}, by gRPC status code.",
                (*_LABELS, "grpc_code"),
                registry=registry,
            ),
            handling=Histogram(
                f"grpc_{side}_handling_seconds",
                f"Time the {side} spent on an RPC until its status was known.",
                _LABELS,
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
        )

    return per_registry(create)


_server_families = _rpc_families("server")
_client_families = _rpc_families("client")

serving_gauge = per_registry(
    lambda registry: Gauge(
        "calcsvc_server_serving",
        "1 while the health service reports SERVING for the service, else 0; "
        "in multiprocess mode, the lowest value of the live processes.",
        ("service",),
        registry=registry,
        multiprocess_mode="livemin",
    )
)


def split_method(full_method: str | bytes) -> tuple[str, str]:
    """Split ``/calc.v1.Calculator/Add`` into its service and method names.

    grpc.aio hands a client interceptor the method as bytes; they are split
    the same way.
    """
    if isinstance(full_method, bytes):
        full_method = full_method.decode("utf-8", "replace")
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service or "unknown", method or "unknown"


def _status(
    context: grpc.ServicerContext | grpc.aio.ServicerContext[object, object],
) -> object:
    """Return the code a handler set or aborted with, None if it set none."""
    return context.code()  # type: ignore[union-attr]  # grpc-stubs lacks code()


def _code_name(code: object, default: grpc.StatusCode) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else default.name


class _MethodSeries:
    """The series of one method, looked up once and kept.

    Looking a labelled series up costs more than updating it, and every
    call of a method updates the same few series.
    """

    def __init__(self, families: _RpcFamilies, service: str, method: str) -> None:
        self._labels = ("unary", service, method)
        self._families = families
        self.started = families.started.labels(*self._labels)
        self.handling = families.handling.labels(*self._labels)
        self._handled: dict[str, Counter] = {}

    def handled(self, code: str) -> Counter:
        """Return the series that counts calls ended with ``code``."""
        series = self._handled.get(code)
        if series is None:
            series = self._families.handled.labels(*self._labels, code)
            self._handled[code] = series
        return series


class _Series:
    """Finds the series of a called method, and creates known ones at zero."""

    def __init__(
        self, families: _RpcFamilies, methods: Iterable[tuple[str, str]]
    ) -> None:
        self._families = families
        self._by_method: dict[str | bytes, _MethodSeries] = {}
        # Known methods exist at zero, with every code, as go-grpc-prometheus
        # creates them: rates and ratios then exist before the first call and
        # after a restart.
        for service, method in methods:
            series = self.of(f"/{service}/{method}")
            for code in grpc.StatusCode:
                series.handled(code.name)

    def of(self, full_method: str | bytes) -> _MethodSeries:
        """Return the series of ``full_method``, such as ``/calc.v1.Calculator/Add``."""
        series = self._by_method.get(full_method)
        if series is None:
            series = _MethodSeries(self._families, *split_method(full_method))
            self._by_method[full_method] = series
        return series


class CallRecorder:
    """Counts one RPC's start, and its end, code and duration."""

    __slots__ = ("_series", "_start")

    def __init__(self, series: _MethodSeries) -> None:
        """Count the call as started, now."""
        self._series = series
        self._start = time.perf_counter()
        series.started.inc()

    def done(self, code: str) -> None:
        """Count the call as ended with ``code`` (a status code's name)."""
        elapsed = time.perf_counter() - self._start
        self._series.handled(code).inc()
        self._series.handling.observe(elapsed)

    def succeeded(self) -> None:
        """Count the call as ended with OK."""
        self.done("OK")

    def failed(self, error: BaseException) -> None:
        """Count the call as ended by ``error``, with its code if it has one."""
        if isinstance(error, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED.name
        elif isinstance(error, grpc.RpcError):
            code = _code_name(error.code(), grpc.StatusCode.UNKNOWN)
        else:
            code = grpc.StatusCode.UNKNOWN.name
        self.done(code)


class ClientCallMetrics:
    """Records ``grpc_client_*`` metrics for calls a client times itself.

    calcsvc's clients use it around each call instead of an interceptor: the
    metrics are the same, and a grpcio interceptor costs more per call than
    the metrics themselves (grpc.aio even starts a task for it).
    ``benchmarks.md`` in ``docs/`` has the figures.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        methods: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record into ``registry``, with the series of ``methods`` at zero."""
        self._series = _Series(_client_families(registry), methods)

    def start(self, full_method: str) -> CallRecorder:
        """Count a call of ``full_method`` (``/service/Method``) as started."""
        return CallRecorder(self._series.of(full_method))


class _Handlers:
    """The instrumented handler of each method, made once and kept.

    A server asks its interceptors for a handler on every call, and the
    registered handler of a method is the same object each time, so its
    instrumented twin need not be made again.
    """

    def __init__(
        self,
        series: _Series,
        instrument: Callable[[_Handler, _MethodSeries], _Handler],
    ) -> None:
        self._series = series
        self._instrument = instrument
        self._made: dict[str, tuple[_Handler, _Handler]] = {}

    def instrumented(self, method: str, handler: _Handler) -> _Handler:
        """Return ``handler`` of ``method``, recording its calls."""
        made = self._made.get(method)
        if made is None or made[0] is not handler:
            made = (handler, self._instrument(handler, self._series.of(method)))
            self._made[method] = made
        return made[1]


def _instrument(handler: _Handler, series: _MethodSeries) -> _Handler:
    behavior = cast(
        "Callable[[object, grpc.ServicerContext], object]", handler.unary_unary
    )

    def instrumented(request: object, context: grpc.ServicerContext) -> object:
        recorder = CallRecorder(series)
        try:
            response = behavior(request, context)
        except BaseException:
            recorder.done(_code_name(_status(context), grpc.StatusCode.UNKNOWN))
            raise
        recorder.done(_code_name(_status(context), grpc.StatusCode.OK))
        return response

    return grpc.unary_unary_rpc_method_handler(
        instrumented,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _instrument_aio(handler: _Handler, series: _MethodSeries) -> _Handler:
    behavior = cast("Callable[..., object]", handler.unary_unary)

    async def instrumented(
        request: object, context: grpc.aio.ServicerContext[object, object]
    ) -> object:
        recorder = CallRecorder(series)
        try:
            response = behavior(request, context)
            if inspect.isawaitable(response):
                response = await response
        except asyncio.CancelledError:
            # The call ended before its handler did: its client went away, or
            # a draining server's grace ran out.
            recorder.done(grpc.StatusCode.CANCELLED.name)
            raise
        except BaseException:
            recorder.done(_code_name(_status(context), grpc.StatusCode.UNKNOWN))
            raise
        recorder.done(_code_name(_status(context), grpc.StatusCode.OK))
        return response

    return grpc.unary_unary_rpc_method_handler(
        instrumented,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ServerMetricsInterceptor(_ServerInterceptor):
    """Records ``grpc_server_*`` metrics for every unary call the server handles.

    Calls to methods the server does not have are answered UNIMPLEMENTED by
    grpcio and recorded nowhere, so whatever a client sends, the label values
    stay those of the registered methods.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        methods: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record into ``registry``, with the series of ``methods`` at zero."""
        self._handlers = _Handlers(
            _Series(_server_families(registry), methods), _instrument
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], _Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        """Wrap the unary handler of the called method, if it has one."""
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return self._handlers.instrumented(handler_call_details.method, handler)


class AioServerMetricsInterceptor(_AioServerInterceptor):
    """Records the same ``grpc_server_*`` metrics on a grpc.aio server."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        methods: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record into ``registry``, with the series of ``methods`` at zero."""
        self._handlers = _Handlers(
            _Series(_server_families(registry), methods), _instrument_aio
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        """Wrap the unary handler of the called method, if it has one."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return self._handlers.instrumented(handler_call_details.method, handler)


class ClientMetricsInterceptor(_ClientInterceptor):
    """Records ``grpc_client_*`` metrics for every unary call on a channel.

    A call counts as started when it reaches the channel: calls a breaker
    rejects never do, which is how the metrics show that a rejected call
    made no network attempt.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        methods: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record into ``registry``, with the series of ``methods`` at zero."""
        self._series = _Series(_client_families(registry), methods)

    def intercept_unary_unary(
        self,
        continuation: Callable[
            [grpc.ClientCallDetails, object], grpc.CallFuture[object]
        ],
        client_call_details: grpc.ClientCallDetails,
        request: object,
    ) -> grpc.CallFuture[object]:
        """Count the call, and record its code and duration when it ends."""
        recorder = CallRecorder(self._series.of(client_call_details.method))
        outcome = continuation(client_call_details, request)

        def done(future: grpc.Future[object]) -> None:
            # grpcio hands back an object that is both a Future and a Call.
            code = future.code() if isinstance(future, grpc.Call) else None
            try:
                recorder.done(_code_name(code, grpc.StatusCode.UNKNOWN))
            except Exception:
                log.exception("client metrics failed")

        outcome.add_done_callback(done)
        return outcome


class AioClientMetricsInterceptor(_AioClientInterceptor):
    """Records the same ``grpc_client_*`` metrics on a grpc.aio channel."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        methods: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record into ``registry``, with the series of ``methods`` at zero."""
        self._series = _Series(_client_families(registry), methods)

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, object], _AioCall],
        client_call_details: grpc.aio.ClientCallDetails,
        request: object,
    ) -> object:
        """Count the call, wait for its end, and record its code and duration."""
        recorder = CallRecorder(self._series.of(client_call_details.method))
        # grpc-stubs says the continuation returns the call; grpcio's is a
        # coroutine function that does.
        call = await cast(
            "Awaitable[_AioCall]", continuation(client_call_details, request)
        )
        # A grpc.aio call tells its code only to a coroutine, so the call is
        # awaited here; the caller's own await then finds it finished.
        code = grpc.StatusCode.OK
        try:
            await call
        except grpc.aio.AioRpcError as error:
            code = error.code()
        except asyncio.CancelledError:
            recorder.done(grpc.StatusCode.CANCELLED.name)
            raise
        recorder.done(code.name)
        return call
