"""A network cut between a client and a server, each on a host of its own.

Two network namespaces joined by a veth pair stand for the two hosts. The
server runs in one, and a caller (``tests/caller.py``) in the other, which
reports each call as a JSON line. Setting the server's end of the link down
drops every packet without a word, as a cut cable between two switches
would: every call must end at its deadline, the breaker must open after
``fail_max`` of them, and close again once the link is back up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.caller import Call, check_metrics, check_outage, opened, successes_since
from tests.support import wait_until

FAIL_MAX = 2
TIMEOUT = 0.5
RESET_TIMEOUT = 0.5
SERVER_ADDRESS = "10.233.0.1"
CLIENT_ADDRESS = "10.233.0.2"
PORT = 8080  # each namespace has its own ports
ROOT = Path(__file__).parent.parent
IP = shutil.which("ip") or "ip"


def ip(*args, check=True):
    return subprocess.run(
        [IP, *args], capture_output=True, text=True, timeout=10, check=check
    )


@dataclass(frozen=True)
class Hosts:
    server_ns: str
    client_ns: str
    server_link: str


def build_hosts(hosts):
    """Join the two namespaces with a veth pair, addressed and up."""
    client_link = f"{hosts.server_link[:-1]}c"
    ip("netns", "add", hosts.client_ns)
    ip("link", "add", hosts.server_link, "type", "veth", "peer", "name", client_link)
    ip("link", "set", hosts.server_link, "netns", hosts.server_ns)
    ip("link", "set", client_link, "netns", hosts.client_ns)
    for ns, link, address in (
        (hosts.server_ns, hosts.server_link, SERVER_ADDRESS),
        (hosts.client_ns, client_link, CLIENT_ADDRESS),
    ):
        ip("-n", ns, "address", "add", f"{address}/30", "dev", link)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", link, "up")


@pytest.fixture
def hosts():
    if os.geteuid() != 0:
        pytest.skip("a network cut needs root, to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("a network cut needs the ip command of iproute2")
    # Unique per test process: the xdist workers run side by side.
    hosts = Hosts(
        f"calcsvc-{os.getpid()}-server",
        f"calcsvc-{os.getpid()}-client",
        f"cs{os.getpid()}s",
    )
    try:
        ip("netns", "add", hosts.server_ns)
    except subprocess.CalledProcessError as error:
        pytest.skip(f"cannot create a network namespace: {error.stderr.strip()}")
    try:
        try:
            build_hosts(hosts)
        except subprocess.CalledProcessError as error:
            pytest.skip(f"cannot join two namespaces: {error.stderr.strip()}")
        yield hosts
    finally:
        # Deleting a namespace deletes the veth end inside it, and its peer.
        for ns in (hosts.server_ns, hosts.client_ns):
            ip("netns", "delete", ns, check=False)
        ip("link", "delete", hosts.server_link, check=False)


class RemoteCaller:
    """A caller in another namespace, whose calls arrive as JSON lines."""

    def __init__(self, process):
        self.process = process
        self.before = {}
        self.calls = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            record = json.loads(line)
            if "before" in record:
                self.before = record["before"]
                continue
            record["transitions"] = [tuple(t) for t in record["transitions"]]
            self.calls.append(Call(**record))

    def stop(self):
        self.process.stdin.close()
        assert self.process.wait(timeout=30) == 0
        self._reader.join(timeout=10)
        return self.calls


def listening(server, log):
    assert server.poll() is None, log.read_text()
    return "listening address=" in log.read_text()


def in_namespace(ns, *command, **options):
    return subprocess.Popen(
        [IP, "netns", "exec", ns, sys.executable, *command], cwd=ROOT, **options
    )


def test_the_breaker_rides_out_a_network_cut(hosts, tmp_path):
    serve = [
        *("-m", "calcsvc", "serve", "--host", SERVER_ADDRESS, "--port", str(PORT)),
        *("--metrics-port", "0", "--grace", "1", "--parent-pid", str(os.getpid())),
    ]
    call = [
        *("-m", "tests.caller", f"{SERVER_ADDRESS}:{PORT}", "--timeout", str(TIMEOUT)),
        *("--fail-max", str(FAIL_MAX), "--reset-timeout", str(RESET_TIMEOUT)),
    ]
    server_log = tmp_path / "server.log"
    with server_log.open("wb") as log:
        server = in_namespace(
            hosts.server_ns, *serve, stdin=subprocess.DEVNULL, stderr=log
        )
    caller = None
    try:
        # A caller that started first could open its breaker before the cut,
        # on a server that is not listening yet.
        wait_until(lambda: listening(server, server_log), timeout=30)
        caller = RemoteCaller(
            in_namespace(
                hosts.client_ns,
                *call,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
        wait_until(lambda: successes_since(caller.calls, 0) >= 3, timeout=30)
        fault_at = time.monotonic()
        ip("-n", hosts.server_ns, "link", "set", hosts.server_link, "down")
        wait_until(lambda: opened(caller.calls))
        heal_began = time.monotonic()
        ip("-n", hosts.server_ns, "link", "set", hosts.server_link, "up")
        healed_at = time.monotonic()
        wait_until(lambda: successes_since(caller.calls, healed_at) >= 3)
        calls = caller.stop()
    finally:
        if caller is not None and caller.process.poll() is None:
            caller.process.kill()
            caller.process.wait()
        server.terminate()
        server.wait(timeout=10)

    check_metrics(caller.before, calls)
    check_outage(
        calls,
        fail_max=FAIL_MAX,
        timeout=TIMEOUT,
        reset_timeout=RESET_TIMEOUT,
        fault_at=fault_at,
        heal_began=heal_began,
        healed_at=healed_at,
        codes={"DEADLINE_EXCEEDED"},
    )
