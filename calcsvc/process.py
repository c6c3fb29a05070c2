"""Run a calcsvc server as a child process and wait until it serves.

The demo uses it to stop and restart a real server, and tests can use it the
same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import IO, TYPE_CHECKING, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from calcsvc.server import ServerStartError, format_address

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None = None
) -> grpc.Channel:
    """Open a channel to ``target``, over TLS when there are ``credentials``."""
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


def check_serving(
    target: str,
    timeout: float,
    service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
) -> bool:
    """Return whether the health service at ``target`` says SERVING."""
    with open_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class ServerProcess:
    """A ``calcsvc serve`` child process on a fixed port."""

    def __init__(  # noqa: PLR0913 - the server's documented options
        self,
        host: str,
        port: int,
        *,
        metrics_port: int = 0,
        extra_args: Sequence[str] = (),
        stderr: IO[bytes] | int | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Describe the server; :meth:`start` runs it.

        A server started with ``--tls-cert`` is checked with ``credentials``.
        """
        self.host = host
        self.credentials = credentials
        self.port = port
        self.metrics_port = metrics_port
        self.target = format_address(host, port)
        self._extra_args = list(extra_args)
        self._stderr = stderr
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        """The command line that starts the server."""
        return [
            sys.executable,
            "-m",
            "calcsvc",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            # Even a parent killed with SIGKILL leaves no server behind.
            "--parent-pid",
            str(os.getpid()),
            *self._extra_args,
        ]

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and return once its health service says SERVING.

        Raises:
            ServerStartError: the server exited, or did not serve in time.

        """
        if self.running:
            raise RuntimeError("the server is already running")
        self.process = subprocess.Popen(  # noqa: S603 - our own program
            self.command,
            stdin=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            returncode = self.process.poll()
            if returncode is not None:
                self.process = None
                raise ServerStartError(
                    f"the server for {self.target} exited with code {returncode} "
                    "before it was serving"
                )
            if check_serving(self.target, timeout=0.25, credentials=self.credentials):
                return
        self.kill()
        raise ServerStartError(
            f"the server for {self.target} was not serving after {timeout}s"
        )

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The child's process id, while there is a child."""
        return self.process.pid if self.process else None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server."""
        if self.process is not None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the server with SIGTERM, or SIGKILL after ``timeout``.

        Returns:
            The exit code, or None if no server was running.

        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        returncode = self.process.wait()
        self.process = None
        return returncode

    def kill(self) -> None:
        """Kill the server with SIGKILL and reap it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> Self:
        """Start the server."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()
