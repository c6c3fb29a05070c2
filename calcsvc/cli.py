"""The ``calcsvc`` command line: serve, calculate, check health, run the demo."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from calcsvc import __version__
from calcsvc.aio.server import serve as serve_aio
from calcsvc.client import CalculatorClient, is_redis_url
from calcsvc.demo import DemoConfig
from calcsvc.demo import run as run_demo
from calcsvc.errors import BreakerOpenError, CallError
from calcsvc.process import open_channel
from calcsvc.server import (
    DEFAULT_HOST,
    DEFAULT_MAX_CONCURRENT_STREAMS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    ServerConfig,
    ServerStartError,
    serve,
)
from calcsvc.tls import ClientTls, ServerTls, TlsConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

T = TypeVar("T")

DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"
DEFAULT_CLIENT_METRICS_PORT = 9465

# Exit codes of `calcsvc health`, the same as grpc_health_probe's.
HEALTH_SERVING = 0
HEALTH_CANNOT_CONNECT = 2
HEALTH_RPC_FAILED = 3
HEALTH_NOT_SERVING = 4

LOOP = DemoConfig()  # the loop's defaults, for the help text

OPERATIONS = {
    "add": ("add", "+"),
    "sub": ("subtract", "-"),
    "mul": ("multiply", "*"),
    "div": ("divide", "/"),
}


def format_number(value: float) -> str:
    """Write a float as Python does, without a trailing ``.0``."""
    text = repr(value)
    return text.removesuffix(".0")


def _argument(
    convert: Callable[[str], T], kind: str, accept: Callable[[T], bool], need: str
) -> Callable[[str], T]:
    """Build an argparse type: ``convert`` the text, then check the value."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {kind}: {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{need}: {text!r}")
        return value

    return parse


_port = _argument(
    int, "a port number", lambda p: 0 <= p <= 65535, "port out of range 0-65535"
)
_count = _argument(int, "a whole number", lambda n: n >= 1, "must be at least 1")
_positive = _argument(
    float, "a number", lambda x: 0 < x < math.inf, "must be a finite number above 0"
)
_non_negative = _argument(
    float, "a number", lambda x: 0 <= x < math.inf, "must be a finite number, 0 or more"
)
_rate = _argument(float, "a number", lambda x: 0 <= x <= 1, "must be between 0 and 1")
_storage_url = _argument(
    str,
    "a Redis URL",
    is_redis_url,
    "must be a Redis URL: redis://HOST:PORT/DB, rediss://... or unix://PATH",
)


def _readable_file(text: str) -> Path:
    """Return ``text`` as a path, if it names a file this process can read."""
    path = Path(text)
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r}: {error.strerror}"
        ) from None
    return path


# NaN and infinities are operands on purpose: the server's answer to them is
# part of the contract, and the CLI shows it.
_operand = _argument(float, "a number", lambda _: True, "")


def _add_limits_and_security(parser: argparse.ArgumentParser) -> None:
    """Add ``calcsvc serve``'s limits and its TLS options to ``parser``."""
    limits = parser.add_argument_group(
        "limits", "what one client may ask of the server"
    )
    limits.add_argument(
        "--max-message-bytes",
        type=_count,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest request accepted; larger ones get RESOURCE_EXHAUSTED "
        "(default: %(default)s)",
    )
    limits.add_argument(
        "--max-concurrent-streams",
        type=_count,
        default=DEFAULT_MAX_CONCURRENT_STREAMS,
        help="calls one connection may have in flight at once (default: %(default)s)",
    )
    security = parser.add_argument_group(
        "security", "TLS, mutual TLS and what the server reveals"
    )
    security.add_argument(
        "--tls-cert",
        type=_readable_file,
        metavar="PEM",
        help="serve gRPC over TLS with this certificate (chain); needs --tls-key",
    )
    security.add_argument(
        "--tls-key", type=_readable_file, metavar="PEM", help="its private key"
    )
    security.add_argument(
        "--tls-client-ca",
        type=_readable_file,
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    security.add_argument(
        "--metrics-tls",
        action="store_true",
        help="serve /metrics over HTTPS with the same certificate, key and "
        "client CA (default: plain HTTP)",
    )
    security.add_argument(
        "--no-reflection",
        dest="reflection",
        action="store_false",
        help="do not answer server reflection (default: on)",
    )


def _client_tls_parser() -> argparse.ArgumentParser:
    """Return a parent parser with the TLS options of the client commands."""
    parser = argparse.ArgumentParser(add_help=False)
    tls = parser.add_argument_group(
        "TLS", "any of these connects over TLS; plain text without them"
    )
    tls.add_argument(
        "--tls-ca",
        type=_readable_file,
        metavar="PEM",
        help="trust the server's certificate only if this CA signed it "
        "(default with TLS: the system's CAs)",
    )
    tls.add_argument(
        "--tls-cert",
        type=_readable_file,
        metavar="PEM",
        help="the client's certificate, for mutual TLS; needs --tls-key",
    )
    tls.add_argument(
        "--tls-key", type=_readable_file, metavar="PEM", help="its private key"
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of every calcsvc command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="how much to log to stderr (default: info for serve and demo, "
        "warning otherwise)",
    )

    faults = argparse.ArgumentParser(add_help=False)
    injected = faults.add_argument_group(
        "fault injection", "misbehave on purpose; health checks are never affected"
    )
    injected.add_argument(
        "--inject-latency-ms",
        type=_non_negative,
        default=0.0,
        help="add this many milliseconds to every calculator call (default: off)",
    )
    injected.add_argument(
        "--inject-error-rate",
        type=_rate,
        default=0.0,
        help="answer this fraction of calculator calls with UNAVAILABLE (default: off)",
    )

    # Every command that runs a client.
    storage = argparse.ArgumentParser(add_help=False)
    storage.add_argument(
        "--breaker-storage",
        type=_storage_url,
        metavar="URL",
        help="keep the breaker's state in Redis at URL (redis://HOST:PORT/DB), "
        "shared by every client with the same breaker name (default: in memory)",
    )

    parser = argparse.ArgumentParser(
        prog="calcsvc",
        description="A gRPC calculator, and a client that stops calling it "
        "while it is down.",
    )
    parser.add_argument("--version", action="version", version=f"calcsvc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser(
        "serve", parents=[common, faults], help="run the Calculator server"
    )
    serve_parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="gRPC port (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--metrics-port",
        type=_port,
        default=DEFAULT_METRICS_PORT,
        help="port of /metrics; 0 turns it off (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--metrics-host",
        help="address /metrics listens on (default: the --host address)",
    )
    serve_parser.add_argument(
        "--aio",
        action="store_true",
        help="serve on grpc.aio: every call runs on one event loop, and "
        "--workers does not apply (default: threads)",
    )
    serve_parser.add_argument(
        "--workers",
        type=int,
        default=10,
        help="threads that run calls (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--grace",
        type=_non_negative,
        default=5.0,
        help="seconds calls in flight get to finish on shutdown (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--drain-delay",
        type=_non_negative,
        default=0.0,
        help="seconds to keep answering, NOT_SERVING, before refusing new calls on "
        "shutdown, so load balancers notice first (default: %(default)s)",
    )
    serve_parser.add_argument(
        "--inject-seed",
        type=int,
        help="seed the draws of --inject-error-rate, so a run fails the same "
        "calls, in the order they arrive, every time (default: random)",
    )
    _add_limits_and_security(serve_parser)
    serve_parser.add_argument(
        "--parent-pid",
        type=int,
        help="drain and exit once the process with this id, the server's "
        "parent, has exited (used by calcsvc demo)",
    )

    client_tls = _client_tls_parser()
    client_options = argparse.ArgumentParser(add_help=False, parents=[client_tls])
    client_options.add_argument(
        "--target", default=DEFAULT_TARGET, help="server address (default: %(default)s)"
    )
    client_options.add_argument(
        "--timeout",
        type=_positive,
        default=1.0,
        help="deadline in seconds (default: %(default)s)",
    )
    client_options.add_argument(
        "--metrics-port",
        type=_port,
        help="serve the client's /metrics on this port while it runs",
    )
    for command, (method, symbol) in OPERATIONS.items():
        op_parser = commands.add_parser(
            command,
            parents=[common, client_options, storage],
            help=f"print A {symbol} B, computed by the server",
        )
        op_parser.add_argument("a", metavar="A", type=_operand)
        op_parser.add_argument("b", metavar="B", type=_operand)
        op_parser.set_defaults(method=method)

    health_parser = commands.add_parser(
        "health",
        parents=[common, client_tls],
        help="check a server's health, with grpc_health_probe's exit codes",
        description="Ask the standard gRPC health service. Exit codes: 0 serving, "
        "2 cannot connect, 3 the check failed, 4 not serving.",
    )
    health_parser.add_argument(
        "--target", default=DEFAULT_TARGET, help="server address (default: %(default)s)"
    )
    health_parser.add_argument(
        "--service", default="", help="service to check (default: the whole server)"
    )
    health_parser.add_argument(
        "--timeout",
        type=_positive,
        default=1.0,
        help="seconds to connect, then to check (default: %(default)s)",
    )

    demo_parser = commands.add_parser(
        "demo",
        parents=[common, faults, storage],
        help="replay an outage and recovery against a real server",
    )
    demo_parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address of the demo's server and metrics (default: %(default)s)",
    )
    demo_parser.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_PORT,
        help="the server's gRPC port (default: %(default)s)",
    )
    demo_parser.add_argument(
        "--metrics-port",
        type=_port,
        default=DEFAULT_CLIENT_METRICS_PORT,
        help="port of the client's /metrics (default: %(default)s)",
    )
    demo_parser.add_argument(
        "--server-metrics-port",
        type=_port,
        default=DEFAULT_METRICS_PORT,
        help="port of the server's /metrics (default: %(default)s)",
    )
    demo_parser.add_argument(
        "--report",
        type=Path,
        metavar="PNG",
        help="draw the breaker state and the calls over time into this picture "
        "(needs matplotlib: pip install 'calcsvc[report]')",
    )
    loop = demo_parser.add_argument_group(
        "loop", "call steadily and stop the server again and again, for dashboards"
    )
    loop.add_argument(
        "--loop",
        action="store_true",
        help="repeat outages and recoveries until stopped",
    )
    loop.add_argument(
        "--target",
        help="call this server (HOST:PORT) instead of the demo's own; "
        "outages are up to you",
    )
    loop.add_argument(
        "--cycles", type=_count, help="end after this many outages (default: never)"
    )
    loop.add_argument(
        "--period",
        type=_positive,
        help="seconds of normal operation before each outage "
        f"(default: {LOOP.period:g})",
    )
    loop.add_argument(
        "--outage",
        type=_positive,
        help=f"seconds the server stays down (default: {LOOP.outage:g})",
    )
    loop.add_argument(
        "--rate", type=_positive, help=f"calls per second (default: {LOOP.rate:g})"
    )
    return parser


def _configure_logging(level: str | None, default: str) -> None:
    logging.basicConfig(
        level=(level or default).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _error(message: str) -> None:
    print(f"calcsvc: error: {message}", file=sys.stderr)


def _server_tls(args: argparse.Namespace) -> ServerTls | None:
    if args.tls_cert is None:
        return None
    return ServerTls(args.tls_cert, args.tls_key, args.tls_client_ca)


def _client_tls(args: argparse.Namespace) -> ClientTls | None:
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    return ClientTls(args.tls_ca, args.tls_cert, args.tls_key)


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    tls = _client_tls(args)
    return None if tls is None else tls.grpc_credentials()


def _check_tls_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
    """Refuse TLS options that do not go together, or files that are not PEM."""
    if args.command == "demo":
        return
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together: give both or neither")
    try:
        if args.command != "serve":
            _credentials(args)
            return
        if args.tls_cert is None and (args.tls_client_ca or args.metrics_tls):
            parser.error("--tls-client-ca and --metrics-tls need --tls-cert")
        tls = _server_tls(args)
        if tls is not None:
            tls.check()
    except TlsConfigError as error:
        parser.error(str(error))


def _serve(args: argparse.Namespace) -> int:
    try:
        config = ServerConfig(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            max_message_bytes=args.max_message_bytes,
            max_concurrent_streams=args.max_concurrent_streams,
            tls=_server_tls(args),
            metrics_tls=args.metrics_tls,
            reflection=args.reflection,
            workers=args.workers,
            grace=args.grace,
            drain_delay=args.drain_delay,
            inject_latency_ms=args.inject_latency_ms,
            inject_error_rate=args.inject_error_rate,
            inject_seed=args.inject_seed,
            parent_pid=args.parent_pid,
        )
        (serve_aio if args.aio else serve)(config)
    except (ValueError, ServerStartError) as error:
        _error(str(error))
        return 1
    return 0


def _calculate(args: argparse.Namespace) -> int:
    if args.metrics_port is not None:
        try:
            start_http_server(args.metrics_port)
        except OSError as error:
            _error(
                f"cannot serve metrics on port {args.metrics_port}: {error.strerror}"
            )
            return 1
    try:
        client = CalculatorClient(
            args.target,
            timeout=args.timeout,
            credentials=_credentials(args),
            breaker_storage=args.breaker_storage,
        )
    except ImportError as error:
        _error(str(error))
        return 1
    with client:
        try:
            result = getattr(client, args.method)(args.a, args.b)
        except (CallError, BreakerOpenError) as error:
            _error(str(error))
            return 1
    print(format_number(result))
    return 0


def _health(args: argparse.Namespace) -> int:
    with open_channel(args.target, _credentials(args)) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            _error(f"cannot connect to {args.target} within {args.timeout:g}s")
            return HEALTH_CANNOT_CONNECT
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
            )
        except grpc.RpcError as error:
            _error(f"health check failed: {error.code().name}: {error.details()}")
            return HEALTH_RPC_FAILED
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"status: {status}")
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return HEALTH_NOT_SERVING
    return HEALTH_SERVING


LOOP_ONLY = (
    "target",
    "cycles",
    "period",
    "outage",
    "rate",
    "inject_latency_ms",
    "inject_error_rate",
)
OWN_SERVER_ONLY = ("cycles", "inject_latency_ms", "inject_error_rate")


def _demo(args: argparse.Namespace) -> int:
    return run_demo(
        DemoConfig(
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            server_metrics_port=args.server_metrics_port,
            loop=args.loop,
            target=args.target,
            cycles=args.cycles,
            period=args.period or LOOP.period,
            outage=args.outage or LOOP.outage,
            rate=args.rate or LOOP.rate,
            inject_latency_ms=args.inject_latency_ms,
            inject_error_rate=args.inject_error_rate,
            report=args.report,
            breaker_storage=args.breaker_storage,
        )
    )


def _given(args: argparse.Namespace, names: Sequence[str]) -> str:
    return ", ".join(
        f"--{name.replace('_', '-')}" for name in names if getattr(args, name)
    )


def _check_demo_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> None:
    """Refuse demo options that do nothing in the mode asked for."""
    if not args.loop and (given := _given(args, LOOP_ONLY)):
        parser.error(f"{given} only work with --loop")
    if args.target and (given := _given(args, OWN_SERVER_ONLY)):
        parser.error(f"{given} need the demo's own server, not --target")


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the calcsvc command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check_demo_options(parser, args)
    _check_tls_options(parser, args)
    _configure_logging(
        args.log_level, "info" if args.command in ("serve", "demo") else "warning"
    )

    handlers = {"serve": _serve, "health": _health, "demo": _demo}
    handler = handlers.get(args.command, _calculate)
    if args.command != "serve":
        # serve drains on SIGTERM itself; everything else stops like on ^C.
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return handler(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
