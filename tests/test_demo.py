"""``calcsvc demo`` end to end, as a user runs it."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry

from calcsvc.demo import DemoConfig, _check_port_free, _Demo
from tests.support import HOST, alive, free_port, run_calcsvc, scrape, wait_until


def demo_args(port=None):
    return [
        "demo",
        "--host", HOST,
        "--port", str(port or free_port()),
        "--metrics-port", str(free_port()),
        "--server-metrics-port", str(free_port()),
    ]  # fmt: skip


def demo_command(port=None):
    return [sys.executable, "-m", "calcsvc", *demo_args(port)]


def server_pids(output):
    return [
        int(pid) for pid in re.findall(r"server (?:re)?started \(pid (\d+)\)", output)
    ]


def test_the_demo_replays_outage_and_recovery():
    result = run_calcsvc(*demo_args(), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    outcomes = re.findall(r"add\(5, 3\)\s+(\w+)", result.stdout)
    assert outcomes == [
        "success",
        "failure",
        "failure",
        "rejected",
        "success",
    ]
    lines = [line for line in result.stdout.splitlines() if "add(5, 3)" in line]
    assert "breaker: closed -> closed" in lines[0]
    assert "breaker: closed -> closed" in lines[1]
    assert "breaker: closed -> open" in lines[2]
    assert "network=no" in lines[3]
    assert "breaker: open -> open" in lines[3]
    assert "breaker: open -> half_open -> closed" in lines[4]
    assert "= 8" in lines[0]
    assert "= 8" in lines[4]
    assert 'circuit_breaker_calls_total{breaker="calculator",outcome="rejected"} 1' in (
        result.stdout
    )
    assert "Every call behaved as expected." in result.stdout
    assert "state=open" in result.stderr  # the breaker's log line

    pids = server_pids(result.stdout)
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids)


def test_a_port_in_use_is_named():
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_calcsvc(*demo_args(port), timeout=60)
    assert result.returncode == 1
    assert f"port {port} on {HOST} is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_left_in_time_wait_counts_as_free():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection((HOST, port)):
            accepted, _ = listener.accept()
            accepted.close()  # the side that closes first lingers in TIME_WAIT
    _check_port_free(HOST, port)  # no ServerStartError


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_demo_leaves_no_server_behind(signum):
    demo = subprocess.Popen(
        demo_command(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert demo.stdout is not None
    seen = ""
    while not server_pids(seen):
        line = demo.stdout.readline()
        assert line, "the demo ended before starting its server"
        seen += line
    (pid,) = server_pids(seen)
    assert alive(pid)

    demo.send_signal(signum)
    returncode = demo.wait(timeout=30)
    demo.stdout.close()
    assert returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 130)
    wait_until(lambda: not alive(pid), timeout=10)


def test_the_loop_repeats_outages_and_draws_the_timeline(tmp_path):
    picture = tmp_path / "outage.png"
    loop = ["--loop", "--cycles", "1", "--period", "1", "--outage", "2.5"]
    result = run_calcsvc(*demo_args(), *loop, "--report", str(picture), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    transitions = re.findall(r"breaker -> (\w+)", result.stdout)
    assert transitions[0] == "open"
    assert transitions[-2:] == ["half_open", "closed"]
    assert re.search(r"cycle 1: \d+ calls: .*rejected [1-9]", result.stdout)
    assert "The breaker closed again after every outage." in result.stdout
    assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not any(alive(pid) for pid in server_pids(result.stdout))


def test_the_loop_stops_cleanly_on_an_interrupt():
    demo = subprocess.Popen(
        [*demo_command(), "--loop", "--period", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert demo.stdout is not None
    seen = ""
    while "Cycle 1" not in seen:
        line = demo.stdout.readline()
        assert line, "the demo ended before its first cycle"
        seen += line
    (pid,) = server_pids(seen)

    demo.send_signal(signal.SIGINT)
    output, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0
    assert "Client metrics:" in output
    wait_until(lambda: not alive(pid), timeout=10)


def test_the_loop_calls_a_server_it_does_not_own(start_server):
    server = start_server()
    metrics_port = free_port()
    demo = subprocess.Popen(
        [
            *demo_command(), "--metrics-port", str(metrics_port),
            "--loop", "--target", server.target, "--rate", "50",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip

    def value(name, **labels):
        try:
            return scrape(metrics_port).value_or_zero(name, **labels)
        except OSError:
            return 0.0

    wait_until(lambda: value("circuit_breaker_calls_total", outcome="success") > 0)
    server.stop()  # the outage is ours to make
    wait_until(lambda: value("circuit_breaker_state", state="open") == 1)
    server.start()
    wait_until(lambda: value("circuit_breaker_state", state="closed") == 1)

    demo.send_signal(signal.SIGINT)
    output, _ = demo.communicate(timeout=30)
    assert demo.returncode == 0
    assert re.findall(r"breaker -> (\w+)", output)[:1] == ["open"]
    assert "server started" not in output


@pytest.mark.parametrize(
    "options",
    [
        ["--cycles", "2"],
        ["--inject-error-rate", "0.5"],
        ["--rate", "5"],
        ["--target", "localhost:8080"],
    ],
)
def test_loop_options_need_the_loop(options):
    result = run_calcsvc(*demo_args(), *options)
    assert result.returncode == 2
    assert "only work with --loop" in result.stderr


def test_a_target_leaves_no_server_to_stop():
    result = run_calcsvc(
        *demo_args(), "--loop", "--target", "localhost:8080", "--cycles", "1"
    )
    assert result.returncode == 2
    assert "--cycles need the demo's own server" in result.stderr


def test_the_loop_passes_injected_faults_to_its_server():
    config = DemoConfig(loop=True, inject_latency_ms=5, inject_error_rate=0.25)
    demo = _Demo(config, CollectorRegistry())
    try:
        command = demo.server.command
    finally:
        demo.close()
    assert command[command.index("--inject-latency-ms") + 1] == "5"
    assert command[command.index("--inject-error-rate") + 1] == "0.25"
