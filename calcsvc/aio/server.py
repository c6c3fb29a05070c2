"""The calcsvc server on grpc.aio: the same service, health, metrics and drain.

It answers as the threaded server in :mod:`calcsvc.server` does and takes
the same :class:`~calcsvc.server.ServerConfig`, except ``workers``: every
call runs on one event loop, and waiting (injected latency included) holds
no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING

import grpc

# The asyncio health servicer; grpc-stubs describes only the threaded one.
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from prometheus_client import REGISTRY

from calcsvc.calculator import METHODS, SERVICE_NAME, AioCalculatorServicer
from calcsvc.instrumentation import AioServerMetricsInterceptor
from calcsvc.server import (
    PARENT_POLL_SECONDS,
    WHOLE_SERVER,
    ServerConfig,
    ServerStartError,
    StatusMirror,
    add_services,
    listen,
    log_drained,
    log_listening,
    log_shutting_down,
    log_signal,
    parent_exited,
    serve_metrics,
    server_options,
    serving_status,
    stop_metrics,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from calcsvc.instrumentation import MetricsServer

log = logging.getLogger(__name__)


class AioServingStatus:
    """The aio health service's statuses, mirrored in a gauge and in the log."""

    def __init__(
        self, servicer: health_aio.HealthServicer, registry: CollectorRegistry
    ) -> None:
        """Track the statuses that ``servicer`` reports."""
        self._servicer = servicer
        self._mirror = StatusMirror(registry)

    async def set(self, service: str, *, serving: bool) -> None:
        """Report ``service`` as serving or not serving."""
        await self._servicer.set(service, serving_status(serving=serving))
        self._mirror.changed(service, serving=serving)

    async def shut_down(self) -> None:
        """Report every service NOT_SERVING, for good."""
        for service in self._mirror.services:
            await self.set(service, serving=False)
        await self._servicer.enter_graceful_shutdown()


class AioCalculatorServer:
    """A running calcsvc server on grpc.aio, which :meth:`shutdown` drains."""

    def __init__(
        self, config: ServerConfig, registry: CollectorRegistry | None = None
    ) -> None:
        """Prepare a server for ``config``; :meth:`start` makes it listen.

        Create it inside the event loop that will run it.
        """
        self.config = config
        self._registry = REGISTRY if registry is None else registry
        interceptor = AioServerMetricsInterceptor(self._registry, METHODS)
        self._server = grpc.aio.server(
            # With metrics off nobody can read them, so none are recorded.
            interceptors=[interceptor] if config.metrics_port else [],
            options=server_options(config),
        )
        health_servicer = health_aio.HealthServicer()
        add_services(
            self._server,
            AioCalculatorServicer(config.faults()),
            health_servicer,
            reflection_on=config.reflection,
        )
        self.serving = AioServingStatus(health_servicer, self._registry)
        self.port = config.port
        self._metrics_server: MetricsServer | None = None
        self._stopping = asyncio.Event()
        self._stop_now: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen for gRPC and metrics, and report every service SERVING.

        Raises:
            ServerStartError: a port is in use or the host is not available.

        """
        self.port = listen(self._server, self.config)
        try:
            self._metrics_server = serve_metrics(self.config, self._registry)
        except ServerStartError:
            await self._server.stop(None)
            raise
        await self._server.start()
        log_listening(self.config, self.port, "asyncio")
        await self.serving.set(WHOLE_SERVER, serving=True)
        await self.serving.set(SERVICE_NAME, serving=True)

    async def shutdown(self) -> None:
        """Drain and stop: NOT_SERVING, then refuse new calls, then stop.

        Calls in flight get ``config.grace`` seconds; :meth:`stop_now` cuts
        that short.
        """
        config = self.config
        log_shutting_down(config)
        await self.serving.shut_down()
        if config.drain_delay:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), config.drain_delay)
        await self._server.stop(None if self._stopping.is_set() else config.grace)
        if self._stop_now is not None:
            await self._stop_now
        log_drained(config, self._registry)
        # Stopping the metrics server waits for its thread; the loop need not.
        await asyncio.to_thread(stop_metrics, self._metrics_server)
        log.info("stopped")

    def stop_now(self) -> None:
        """End the drain at once, cancelling calls still in flight."""
        self._stopping.set()
        if self._stop_now is None:
            self._stop_now = asyncio.create_task(self._server.stop(None))


def serve(config: ServerConfig) -> None:
    """Run a grpc.aio server until SIGTERM or SIGINT, then drain it and return.

    Raises:
        ServerStartError: the server could not start.

    """
    asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> None:
    server = AioCalculatorServer(config)
    await server.start()

    signalled = asyncio.Event()

    def on_signal(signum: int) -> None:
        log_signal(signum, again=signalled.is_set())
        if signalled.is_set():
            server.stop_now()
        signalled.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    watch = None
    if config.parent_pid is not None:
        watch = asyncio.create_task(_watch_parent(config.parent_pid, signalled))
    await signalled.wait()
    await server.shutdown()
    if watch is not None:
        await watch


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once this process is no longer a child of ``parent_pid``."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), PARENT_POLL_SECONDS)
        if not stop.is_set() and parent_exited(parent_pid):
            stop.set()
