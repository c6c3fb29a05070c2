"""``calcsvc demo`` end to end, as a user runs it."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import pytest

from tests.support import HOST, alive, free_port, wait_until


def demo_command(port=None):
    return [
        sys.executable, "-m", "calcsvc", "demo",
        "--host", HOST,
        "--port", str(port or free_port()),
        "--metrics-port", str(free_port()),
        "--server-metrics-port", str(free_port()),
    ]  # fmt: skip


def server_pids(output):
    return [
        int(pid) for pid in re.findall(r"server (?:re)?started \(pid (\d+)\)", output)
    ]


def test_the_demo_replays_outage_and_recovery():
    result = subprocess.run(
        demo_command(), capture_output=True, text=True, timeout=60, check=False
    )
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
        result = subprocess.run(
            demo_command(port), capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 1
    assert f"port {port} on {HOST} is already in use" in result.stderr
    assert "Traceback" not in result.stderr


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
