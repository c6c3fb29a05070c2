"""The server as a real process: the contract, health, reflection, metrics, drain.

Every test runs against the threaded server and the grpc.aio one.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc
from calcsvc.calculator import SERVICE_NAME
from tests.support import (
    HOST,
    alive,
    free_port,
    logged_events,
    run_calcsvc,
    scrape,
    wait_until,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BIG = sys.float_info.max


@pytest.fixture(scope="module", params=["threaded", "aio"])
def server_flags(request):
    return ["--aio"] if request.param == "aio" else []


@pytest.fixture
def channel_to():
    channels = []

    def connect(target):
        channel = grpc.insecure_channel(target)
        channels.append(channel)
        return channel

    yield connect
    for channel in channels:
        channel.close()


def call(channel, method, a, b, timeout=5.0):
    stub = calculator_pb2_grpc.CalculatorStub(channel)
    request = calculator_pb2.BinaryRequest(a=a, b=b)
    return getattr(stub, method)(request, timeout=timeout).value


def check(channel, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize(
    ("method", "a", "b", "expected"),
    [
        ("Add", 5, 3, 8),
        ("Subtract", 5, 3, 2),
        ("Multiply", -4, 2.5, -10),
        ("Divide", 1, 8, 0.125),
    ],
)
def test_every_operation_answers(shared_server, channel_to, method, a, b, expected):
    assert call(channel_to(shared_server.target), method, a, b) == expected


@pytest.mark.parametrize(
    ("method", "a", "b", "code", "words"),
    [
        ("Add", math.nan, 1, grpc.StatusCode.INVALID_ARGUMENT, "operand a"),
        ("Subtract", 1, math.inf, grpc.StatusCode.INVALID_ARGUMENT, "operand b"),
        ("Multiply", -math.inf, 1, grpc.StatusCode.INVALID_ARGUMENT, "operand a"),
        ("Divide", 1, 0, grpc.StatusCode.INVALID_ARGUMENT, "zero"),
        ("Divide", 1, -0.0, grpc.StatusCode.INVALID_ARGUMENT, "zero"),
        ("Multiply", BIG, 10, grpc.StatusCode.OUT_OF_RANGE, "overflows"),
        ("Add", BIG, BIG, grpc.StatusCode.OUT_OF_RANGE, "overflows"),
    ],
)
def test_bad_input_gets_a_clear_status(
    shared_server, channel_to, method, a, b, code, words
):
    channel = channel_to(shared_server.target)
    with pytest.raises(grpc.RpcError) as failed:
        call(channel, method, a, b)
    assert failed.value.code() is code
    details = failed.value.details() or ""
    assert words in details
    assert "Traceback" not in details
    assert call(channel, "Add", 1, 1) == 2  # and the server still answers


def test_health_reports_serving_for_the_server_and_the_calculator(
    shared_server, channel_to
):
    channel = channel_to(shared_server.target)
    assert check(channel, "") == SERVING
    assert check(channel, SERVICE_NAME) == SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        check(channel, "no.such.Service")
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(shared_server, channel_to):
    database = ProtoReflectionDescriptorDatabase(channel_to(shared_server.target))
    services = set(database.get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
    described = database.FindFileContainingSymbol(SERVICE_NAME)
    methods = {m.name for m in described.service[0].method}
    assert methods == {"Add", "Subtract", "Multiply", "Divide"}


def test_server_metrics_count_calls_by_code(server, channel_to):
    channel = channel_to(server.target)
    call(channel, "Add", 1, 2)
    call(channel, "Add", 3, 4)
    with pytest.raises(grpc.RpcError):
        call(channel, "Divide", 1, 0)
    # grpc.aio sends an aborted call's status before its handler has ended,
    # so the client can hear of the refusal before the server has counted it.
    wait_until(
        lambda: (
            scrape(server.metrics_port).value_or_zero(
                "grpc_server_handled_total", grpc_method="Divide"
            )
            == 1
        )
    )

    add = {"grpc_type": "unary", "grpc_service": SERVICE_NAME, "grpc_method": "Add"}
    divide = {**add, "grpc_method": "Divide"}
    # grpc.aio sends an aborted call's status before its handler returns, so
    # the refused call may be counted a moment after the caller has heard.
    wait_until(
        lambda: (
            scrape(server.metrics_port).value(
                "grpc_server_handled_total", **divide, grpc_code="INVALID_ARGUMENT"
            )
            == 1
        )
    )
    metrics = scrape(server.metrics_port)
    assert metrics.value("grpc_server_started_total", **add) == 2
    assert metrics.value("grpc_server_handled_total", **add, grpc_code="OK") == 2
    assert metrics.value("grpc_server_handling_seconds_count", **add) == 2
    # Known methods exist at zero before their first call.
    multiply = {**add, "grpc_method": "Multiply"}
    assert metrics.value("grpc_server_started_total", **multiply) == 0
    assert metrics.value("calcsvc_server_serving", service=SERVICE_NAME) == 1
    assert metrics.value("calcsvc_server_serving", service="") == 1


def test_unknown_methods_are_unimplemented_and_add_no_labels(server, channel_to):
    channel = channel_to(server.target)
    for method in ("/calc.v1.Calculator/Power", "/no.such.Service/Add"):
        unknown = channel.unary_unary(method)
        with pytest.raises(grpc.RpcError) as failed:
            unknown(b"", timeout=5)
        assert failed.value.code() is grpc.StatusCode.UNIMPLEMENTED

    metrics = scrape(server.metrics_port)
    registered = {"Add", "Subtract", "Multiply", "Divide", "Check"}
    for family in ("grpc_server_started_total", "grpc_server_handled_total"):
        assert metrics.label_values(family, "grpc_method") <= registered
        assert metrics.label_values(family, "grpc_service") <= {
            SERVICE_NAME,
            "grpc.health.v1.Health",
        }
    assert call(channel, "Add", 1, 1) == 2


def test_injected_errors_answer_unavailable_and_leave_health_alone(
    start_server, channel_to
):
    server = start_server("--inject-error-rate", "1")
    channel = channel_to(server.target)
    with pytest.raises(grpc.RpcError) as failed:
        call(channel, "Add", 1, 1)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert check(channel, SERVICE_NAME) == SERVING


def test_injected_latency_delays_calls_past_a_short_deadline(start_server, channel_to):
    server = start_server("--inject-latency-ms", "2000")
    channel = channel_to(server.target)
    with pytest.raises(grpc.RpcError) as failed:
        call(channel, "Add", 1, 1, timeout=0.05)
    assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert check(channel) == SERVING


def test_sigterm_drains_calls_in_flight_and_refuses_new_ones(start_server, channel_to):
    server = start_server("--inject-latency-ms", "600", "--grace", "5")
    channel = channel_to(server.target)
    stub = calculator_pb2_grpc.CalculatorStub(channel)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
    )
    assert next(watch).status == SERVING

    in_flight = stub.Add.future(calculator_pb2.BinaryRequest(a=2, b=2), timeout=10)
    # The call is in flight once the server has counted it.
    wait_until(
        lambda: (
            scrape(server.metrics_port).value(
                "grpc_server_started_total", grpc_method="Add"
            )
            == 1
        )
    )

    server.signal(signal.SIGTERM)
    assert next(watch).status == NOT_SERVING
    assert in_flight.result() == calculator_pb2.Result(value=4)

    with pytest.raises(grpc.RpcError) as refused:
        call(channel_to(server.target), "Add", 1, 1, timeout=2)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
    watch.cancel()
    assert server.process.wait(timeout=10) == 0


def test_drain_delay_answers_not_serving_before_refusing_calls(
    start_server, channel_to
):
    server = start_server("--drain-delay", "30")
    channel = channel_to(server.target)
    assert check(channel) == SERVING
    server.signal(signal.SIGTERM)

    wait_until(lambda: check(channel) != SERVING)
    assert check(channel) == NOT_SERVING
    assert check(channel, SERVICE_NAME) == NOT_SERVING
    assert call(channel, "Add", 2, 3) == 5  # still answering while draining

    server.signal(signal.SIGTERM)  # a second signal stops it at once
    assert server.process.wait(timeout=10) == 0


def test_a_port_in_use_is_a_clear_error(shared_server, server_flags):
    result = run_calcsvc(
        "serve",
        *server_flags,
        "--host",
        HOST,
        "--port",
        str(shared_server.port),
        "--metrics-port",
        str(free_port()),
    )
    assert result.returncode == 1
    assert f"cannot listen on {HOST}:{shared_server.port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_metrics_port_in_use_is_a_clear_error(shared_server, server_flags):
    result = run_calcsvc(
        "serve",
        *server_flags,
        "--host",
        HOST,
        "--port",
        str(free_port()),
        "--metrics-port",
        str(shared_server.metrics_port),
    )
    assert result.returncode == 1
    assert f"cannot serve metrics on {HOST}:{shared_server.metrics_port}" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_each_lifecycle_event_is_logged_once(
    start_server, server_flags, channel_to, tmp_path
):
    server = start_server("--metrics-port", "0")
    assert call(channel_to(server.target), "Add", 1, 2) == 3
    assert server.stop() == 0

    workers = "asyncio" if server_flags else "10"
    assert logged_events(tmp_path / "server-0.log") == [
        f"listening address={server.target} metrics=off workers={workers}",
        "serving status changed service='' status=SERVING",
        "serving status changed service='calc.v1.Calculator' status=SERVING",
        "received signal=SIGTERM",
        "shutting down grace=1s drain_delay=0s",
        "serving status changed service='' status=NOT_SERVING",
        "serving status changed service='calc.v1.Calculator' status=NOT_SERVING",
        "stopped",
    ]


def test_a_seed_makes_the_injected_errors_repeat(start_server, channel_to):
    def outcomes(*seed):
        server = start_server("--inject-error-rate", "0.5", *seed)
        channel = channel_to(server.target)
        seen = []
        for _ in range(20):
            try:
                call(channel, "Add", 1, 1)
                seen.append("ok")
            except grpc.RpcError as error:
                seen.append(error.code().name)
        server.stop()
        return seen

    first = outcomes("--inject-seed", "7")
    assert set(first) == {"ok", "UNAVAILABLE"}
    assert outcomes("--inject-seed", "7") == first


def test_the_server_drains_and_exits_once_its_parent_has_exited(server_flags, tmp_path):
    log = tmp_path / "orphan.log"
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys
        with open({str(log)!r}, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "calcsvc", "serve", *{server_flags!r},
                 "--host", {HOST!r}, "--port", "{free_port()}",
                 "--metrics-port", "0", "--parent-pid", str(os.getpid())],
                stderr=log,
            )
        print(server.pid)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", parent],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    pid = int(result.stdout)
    wait_until(lambda: not alive(pid), timeout=20)
    events = logged_events(log)
    assert any(event.startswith("parent process exited") for event in events)
    assert events[-1] == "stopped"
