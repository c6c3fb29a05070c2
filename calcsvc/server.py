"""The calcsvc server: the Calculator with health, reflection and metrics.

One process serves gRPC on one port (the Calculator, the standard health
service and server reflection) and Prometheus metrics over HTTP on another.
On SIGTERM or SIGINT it drains: health turns NOT_SERVING first, calls in
flight get ``grace`` seconds to finish, new calls are refused with
UNAVAILABLE, the Calculator calls received and answered are logged, and the
process exits 0. A second signal stops it at once.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY

from calcsvc.calculator import (
    METHODS,
    SERVICE_NAME,
    CalculatorServicer,
    Faults,
    UnparsedRequest,
    add_calculator,
    not_a,
    parse,
)
from calcsvc.instrumentation import (
    MetricsServer,
    ServerMetricsInterceptor,
    serving_gauge,
    start_metrics_server,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

    from prometheus_client import CollectorRegistry

    from calcsvc._generated.calc.v1 import calculator_pb2_grpc
    from calcsvc.tls import ServerTls

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080
DEFAULT_METRICS_PORT = 9464

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# The services that reflection lists.
SERVICE_NAMES = (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
WHOLE_SERVER = ""
PARENT_POLL_SECONDS = 0.5
DEFAULT_HOST = "0.0.0.0"  # noqa: S104 - a server is reached from other hosts

# Limits that keep one client from taking the server for itself. A request
# is 18 bytes; 64 KiB leaves room for any health or reflection request.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_MAX_CONCURRENT_STREAMS = 100
# With calls in flight (a health Watch stream), the server pings a connection
# quiet this long, and closes it when the ping is not answered in time: a
# client that vanished does not hold its stream for hours.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
# A client may ping no more often than this while no data flows (grpcio's
# own rule without calls: once in two hours); after more than
# MAX_PING_STRIKES pings too early the server sends GOAWAY and closes the
# connection, so pings cannot be used to keep the server busy.
MIN_PING_INTERVAL_MS = 30_000
MAX_PING_STRIKES = 2


def format_address(host: str, port: int) -> str:
    """Join a host and a port, bracketing an IPv6 host."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def add_services(
    server: grpc.Server | grpc.aio.Server,
    calculator: calculator_pb2_grpc.CalculatorServicer,
    health_servicer: health_pb2_grpc.HealthServicer,
    *,
    reflection_on: bool = True,
) -> None:
    """Add the Calculator, the health service and reflection to ``server``."""
    add_calculator(calculator, server)
    add_health(health_servicer, server)
    if reflection_on:
        reflection.enable_server_reflection(SERVICE_NAMES, server)


NOT_A_HEALTH_REQUEST = not_a(health_pb2.HealthCheckRequest)


def _parse_health_request(data: bytes) -> object:
    return parse(health_pb2.HealthCheckRequest, data)


def add_health(
    servicer: health_pb2_grpc.HealthServicer, server: grpc.Server | grpc.aio.Server
) -> None:
    """Add grpcio's health ``servicer`` to ``server``, parsing its requests first.

    Requests that do not parse get INVALID_ARGUMENT, as the Calculator's do,
    rather than grpcio's own answer and a traceback in the log.
    """
    refusal = (grpc.StatusCode.INVALID_ARGUMENT, NOT_A_HEALTH_REQUEST)
    check: Callable[..., object]
    watch: Callable[..., object]
    if isinstance(server, grpc.aio.Server):

        async def check(
            request: object, context: grpc.aio.ServicerContext[object, object]
        ) -> object:
            if isinstance(request, UnparsedRequest):
                await context.abort(*refusal)
            return await servicer.Check(request, context)

        async def watch(
            request: object, context: grpc.aio.ServicerContext[object, object]
        ) -> None:
            if isinstance(request, UnparsedRequest):
                await context.abort(*refusal)
            await servicer.Watch(request, context)

    else:

        def check(request: object, context: grpc.ServicerContext) -> object:
            if isinstance(request, UnparsedRequest):
                context.abort(*refusal)
            return servicer.Check(request, context)

        def watch(request: object, context: grpc.ServicerContext) -> object:
            if isinstance(request, UnparsedRequest):
                context.abort(*refusal)
            return servicer.Watch(request, context)

    serialize = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=_parse_health_request,
            response_serializer=serialize,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            watch,
            request_deserializer=_parse_health_request,
            response_serializer=serialize,
        ),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(HEALTH_SERVICE_NAME, handlers),)
    )
    server.add_registered_method_handlers(  # type: ignore[union-attr]
        HEALTH_SERVICE_NAME, handlers
    )


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Return the gRPC options of both servers: their limits and keepalive."""
    return [
        # Without this, grpcio shares a port that another server already
        # listens on, and a second server would start without an error.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


class ServerStartError(Exception):
    """The server could not start, for example because its port is in use."""


@dataclass(frozen=True)
class ServerConfig:
    """How a calcsvc server listens, secures, limits, drains and misbehaves."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    """Port of the ``/metrics`` endpoint; 0 turns it off."""
    metrics_host: str | None = None
    """Address of the ``/metrics`` endpoint; None: the same as ``host``."""
    workers: int = 10
    """Threads that run calls; one call holds one thread until it ends."""
    grace: float = 5.0
    """Seconds calls in flight get to finish once shutdown starts."""
    drain_delay: float = 0.0
    """Seconds to keep serving, NOT_SERVING, before refusing new calls."""
    inject_latency_ms: float = 0.0
    inject_error_rate: float = 0.0
    inject_seed: int | None = None
    """Seed of the injected errors' draws: a seed fails the same calls each run."""
    parent_pid: int | None = None
    """Drain and exit once this process, the server's parent, has exited."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest request accepted; a larger one gets RESOURCE_EXHAUSTED."""
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    """Calls one connection may have in flight; more wait in the client."""
    tls: ServerTls | None = None
    """Serve gRPC over TLS (mutual TLS with a client CA); None: plain text."""
    metrics_tls: bool = False
    """Serve ``/metrics`` over HTTPS with the same files as ``tls``."""
    reflection: bool = True
    """Answer server reflection, which lists the services and their messages."""

    def __post_init__(self) -> None:
        """Refuse settings that cannot work, with a message that says why."""
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"{name} must be between 0 and 65535, got {value}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.grace < 0 or self.drain_delay < 0:
            raise ValueError("grace and drain delay must not be negative")
        if self.max_message_bytes < 1 or self.max_concurrent_streams < 1:
            raise ValueError(
                "max message bytes and max concurrent streams must be at least 1"
            )
        if self.metrics_tls and self.tls is None:
            raise ValueError("metrics over TLS needs the server's TLS files")
        self.faults()

    @property
    def metrics_address(self) -> str:
        """The host of the ``/metrics`` endpoint."""
        return self.host if self.metrics_host is None else self.metrics_host

    def faults(self) -> Faults:
        """Return the faults to inject, with their own random draws."""
        return Faults(
            self.inject_latency_ms / 1000,
            self.inject_error_rate,
            random.Random(self.inject_seed),
        )


def serving_status(
    *, serving: bool
) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    """Return the health status that says ``serving`` or not."""
    return (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


class StatusMirror:
    """Mirrors the health service's statuses in a gauge and in the log."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Mirror statuses into the ``calcsvc_server_serving`` gauge of ``registry``."""
        self._gauge = serving_gauge(registry)
        self.services: list[str] = []

    def changed(self, service: str, *, serving: bool) -> None:
        """Publish and log that ``service`` now reports serving or not."""
        self._gauge.labels(service).set(1 if serving else 0)
        if service not in self.services:
            self.services.append(service)
        log.info(
            "serving status changed service=%r status=%s",
            service,
            "SERVING" if serving else "NOT_SERVING",
        )


class ServingStatus:
    """The health service's statuses, mirrored in a gauge and in the log."""

    def __init__(
        self, servicer: health.HealthServicer, registry: CollectorRegistry
    ) -> None:
        """Track the statuses that ``servicer`` reports."""
        self._servicer = servicer
        self._mirror = StatusMirror(registry)

    def set(self, service: str, *, serving: bool) -> None:
        """Report ``service`` as serving or not serving."""
        self._servicer.set(service, serving_status(serving=serving))
        self._mirror.changed(service, serving=serving)

    def shut_down(self) -> None:
        """Report every service NOT_SERVING, for good."""
        for service in self._mirror.services:
            self.set(service, serving=False)
        self._servicer.enter_graceful_shutdown()


def listen(server: grpc.Server | grpc.aio.Server, config: ServerConfig) -> int:
    """Add the port of ``config`` to ``server``, over TLS if set; return its number.

    Raises:
        ServerStartError: the port is in use or the host is not available.

    """
    address = format_address(config.host, config.port)
    try:
        if config.tls is not None:
            return server.add_secure_port(address, config.tls.grpc_credentials())
        return server.add_insecure_port(address)
    except RuntimeError as error:
        raise ServerStartError(
            f"cannot listen on {address}: the port is in use "
            "or the address is not available"
        ) from error


def serve_metrics(
    config: ServerConfig, registry: CollectorRegistry
) -> MetricsServer | None:
    """Serve ``/metrics`` as ``config`` says; None when metrics are off.

    Raises:
        ServerStartError: the metrics port is in use.

    """
    if not config.metrics_port:
        return None
    context = None
    if config.metrics_tls and config.tls is not None:
        context = config.tls.ssl_context()
    try:
        return start_metrics_server(
            registry, config.metrics_address, config.metrics_port, context
        )
    except OSError as error:
        raise ServerStartError(
            "cannot serve metrics on "
            f"{format_address(config.metrics_address, config.metrics_port)}: "
            f"{error.strerror}"
        ) from error


def stop_metrics(httpd: MetricsServer | None) -> None:
    """Stop serving ``/metrics``."""
    if httpd is not None:
        httpd.shutdown()
        httpd.server_close()


def log_listening(config: ServerConfig, port: int, workers: str) -> None:
    """Log that the server listens, and any faults it injects."""
    log.info(
        "listening address=%s metrics=%s workers=%s",
        format_address(config.host, port),
        format_address(config.metrics_address, config.metrics_port)
        if config.metrics_port
        else "off",
        workers,
    )
    if config.tls is not None:
        log.info(
            "tls on client_certificates=%s metrics=%s",
            "required" if config.tls.client_ca else "none",
            "https" if config.metrics_tls else "http",
        )
    if config.inject_latency_ms or config.inject_error_rate:
        log.warning(
            "injecting faults latency_ms=%g error_rate=%g seed=%s",
            config.inject_latency_ms,
            config.inject_error_rate,
            "none" if config.inject_seed is None else config.inject_seed,
        )


def log_shutting_down(config: ServerConfig) -> None:
    """Log that the drain begins, and how long it may take."""
    log.info(
        "shutting down grace=%gs drain_delay=%gs", config.grace, config.drain_delay
    )


def log_drained(config: ServerConfig, registry: CollectorRegistry) -> None:
    """Log how many Calculator calls the server received, and how many it answered.

    The counts come from the call metrics, so nothing is logged when they are
    off. A call received but not answered was cut off: cancelled by its
    client, or still running when ``grace`` ran out.
    """
    if not config.metrics_port:
        return
    received = answered = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.labels.get("grpc_service") != SERVICE_NAME:
                continue
            if sample.name == "grpc_server_started_total":
                received += sample.value
            elif (
                sample.name == "grpc_server_handled_total"
                and sample.labels.get("grpc_code") != grpc.StatusCode.CANCELLED.name
            ):
                answered += sample.value
    log.log(
        logging.WARNING if answered < received else logging.INFO,
        "drained calls_received=%d calls_answered=%d calls_cut_off=%d",
        received,
        answered,
        received - answered,
    )


class CalculatorServer:
    """A running calcsvc server, which :meth:`shutdown` drains and stops."""

    def __init__(
        self, config: ServerConfig, registry: CollectorRegistry | None = None
    ) -> None:
        """Prepare a server for ``config``; :meth:`start` makes it listen."""
        self.config = config
        self._registry = REGISTRY if registry is None else registry
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=config.workers, thread_name_prefix="calcsvc-rpc"
            ),
            # With metrics off nobody can read them, so none are recorded.
            interceptors=[ServerMetricsInterceptor(self._registry, METHODS)]
            if config.metrics_port
            else [],
            options=server_options(config),
        )
        health_servicer = health.HealthServicer()
        add_services(
            self._server,
            CalculatorServicer(config.faults()),
            health_servicer,
            reflection_on=config.reflection,
        )
        self.serving = ServingStatus(health_servicer, self._registry)
        self.port = config.port
        self._metrics_server: MetricsServer | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Listen for gRPC and metrics, and report every service SERVING.

        Raises:
            ServerStartError: a port is in use or the host is not available.

        """
        self.port = listen(self._server, self.config)
        try:
            self._metrics_server = serve_metrics(self.config, self._registry)
        except ServerStartError:
            self._server.stop(None)
            raise
        self._server.start()
        log_listening(self.config, self.port, str(self.config.workers))
        self.serving.set(WHOLE_SERVER, serving=True)
        self.serving.set(SERVICE_NAME, serving=True)

    def shutdown(self) -> None:
        """Drain and stop: NOT_SERVING, then refuse new calls, then stop.

        Calls in flight get ``config.grace`` seconds; :meth:`stop_now` cuts
        that short from another thread or a signal handler.
        """
        config = self.config
        log_shutting_down(config)
        self.serving.shut_down()
        if config.drain_delay:
            self._stopping.wait(config.drain_delay)
        self._server.stop(config.grace).wait()
        log_drained(config, self._registry)
        stop_metrics(self._metrics_server)
        log.info("stopped")

    def stop_now(self) -> None:
        """End the drain at once, cancelling calls still in flight."""
        self._stopping.set()
        self._server.stop(None)


def serve(config: ServerConfig) -> None:
    """Run a server until SIGTERM or SIGINT, then drain it and return.

    Raises:
        ServerStartError: the server could not start.

    """
    server = CalculatorServer(config)
    server.start()

    signalled = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log_signal(signum, again=signalled.is_set())
        if signalled.is_set():
            server.stop_now()
        signalled.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    if config.parent_pid is not None:
        threading.Thread(
            target=_watch_parent,
            args=(config.parent_pid, signalled),
            name="calcsvc-parent-watch",
            daemon=True,
        ).start()
    # Python runs signal handlers in the main thread only, and a signal that
    # lands on one of grpcio's threads does not wake a wait without a
    # timeout: waking up now and then lets the handler run.
    while not signalled.wait(PARENT_POLL_SECONDS):
        pass
    server.shutdown()


def log_signal(signum: int, *, again: bool) -> None:
    """Log a shutdown signal: the first starts the drain, another ends it."""
    name = signal.Signals(signum).name
    if again:
        log.warning("second signal=%s, stopping now", name)
    else:
        log.info("received signal=%s", name)


def parent_exited(parent_pid: int) -> bool:
    """Return whether this process is no longer a child of ``parent_pid``."""
    if os.getppid() == parent_pid:
        return False
    log.warning("parent process exited parent_pid=%d", parent_pid)
    return True


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Set ``stop`` once this process is no longer a child of ``parent_pid``."""
    while not stop.wait(PARENT_POLL_SECONDS):
        if parent_exited(parent_pid):
            stop.set()
