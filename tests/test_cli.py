"""The calcsvc command line, run as a real program."""

from __future__ import annotations

import signal

import pytest

from tests.support import HOST, free_port, run_calcsvc, wait_until

COMMANDS = ["serve", "add", "sub", "mul", "div", "health", "demo"]


def test_help_lists_every_command():
    result = run_calcsvc("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_and_a_log_level(command):
    result = run_calcsvc(command, "--help")
    assert result.returncode == 0
    assert "usage: calcsvc" in result.stdout
    assert "--log-level" in result.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "the following arguments are required: COMMAND"),
        (("frobnicate",), "invalid choice"),
        (("add", "x", "1"), "not a number: 'x'"),
        (("add", "1"), "the following arguments are required: B"),
        (("serve", "--port", "70000"), "port out of range"),
        (("serve", "--port", "http"), "not a port number"),
        (("serve", "--inject-error-rate", "2"), "must be between 0 and 1"),
        (("serve", "--grace", "-1"), "must be a finite number, 0 or more"),
        (("serve", "--workers", "many"), "invalid int value"),
        (("serve", "--inject-seed", "x"), "invalid int value"),
        (("add", "1", "2", "--timeout", "0"), "must be a finite number above 0"),
        (("health", "--log-level", "loud"), "invalid choice"),
    ],
)
def test_bad_arguments_print_usage_and_exit_2(args, words):
    result = run_calcsvc(*args)
    assert result.returncode == 2
    assert "usage: calcsvc" in result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "a", "b", "printed"),
    [
        ("add", "5", "3", "8"),
        ("sub", "5", "3", "2"),
        ("mul", "-2", "2.5", "-5"),
        ("div", "1", "8", "0.125"),
        ("div", "1", "3", repr(1 / 3)),
    ],
)
def test_operations_print_the_result(shared_server, command, a, b, printed):
    result = run_calcsvc(command, a, b, "--target", shared_server.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{printed}\n"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("div", "1", "0"), "INVALID_ARGUMENT: operand b must not be zero"),
        (("add", "nan", "1"), "INVALID_ARGUMENT: operand a must be a finite number"),
        (("mul", "1e308", "10"), "OUT_OF_RANGE"),
    ],
)
def test_refused_requests_exit_1_with_the_status(shared_server, args, words):
    result = run_calcsvc(*args, "--target", shared_server.target)
    assert result.returncode == 1
    assert words in result.stderr
    assert "Traceback" not in result.stderr


def test_a_server_that_is_down_is_a_clear_error():
    result = run_calcsvc("add", "1", "2", "--target", f"{HOST}:{free_port()}")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_client_metrics_port_in_use_is_a_clear_error(shared_server):
    result = run_calcsvc(
        "add", "1", "2", "--target", shared_server.target,
        "--metrics-port", str(shared_server.metrics_port),
    )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot serve metrics on port {shared_server.metrics_port}" in (
        result.stderr
    )


def test_health_exits_0_when_serving(shared_server):
    result = run_calcsvc("health", "--target", shared_server.target)
    assert result.returncode == 0
    assert result.stdout == "status: SERVING\n"
    result = run_calcsvc(
        "health", "--target", shared_server.target, "--service", "calc.v1.Calculator"
    )
    assert result.returncode == 0


def test_health_exits_2_when_it_cannot_connect():
    result = run_calcsvc(
        "health", "--target", f"{HOST}:{free_port()}", "--timeout", "0.2"
    )
    assert result.returncode == 2
    assert "cannot connect" in result.stderr


def test_health_exits_3_when_the_check_fails(shared_server):
    result = run_calcsvc(
        "health", "--target", shared_server.target, "--service", "no.such.Service"
    )
    assert result.returncode == 3
    assert "NOT_FOUND" in result.stderr


def test_health_exits_4_when_not_serving(start_server):
    server = start_server("--drain-delay", "30")
    server.signal(signal.SIGTERM)
    wait_until(lambda: run_calcsvc("health", "--target", server.target).returncode != 0)
    result = run_calcsvc("health", "--target", server.target)
    assert result.returncode == 4
    assert result.stdout == "status: NOT_SERVING\n"
