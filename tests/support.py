"""Helpers shared by the tests: free ports, scraping /metrics, polling, clients."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from calcsvc import aio

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a loopback port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Metrics:
    """One scrape of a /metrics endpoint, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            sample
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """Sum the samples called ``name`` whose labels include ``labels``."""
        matching = self._matching(name, labels)
        if not matching:
            pytest.fail(f"no sample {name}{labels} in the scrape")
        return sum(matching)

    def value_or_zero(self, name: str, **labels: str) -> float:
        """Like :meth:`value`, but 0 for a series that does not exist yet."""
        return sum(self._matching(name, labels))

    def _matching(self, name: str, labels: dict[str, str]) -> list[float]:
        return [
            s.value
            for s in self.samples
            if s.name == name and labels.items() <= s.labels.items()
        ]

    def label_values(self, name: str, label: str) -> set[str]:
        """Return every value of ``label`` among the samples called ``name``."""
        return {s.labels[label] for s in self.samples if s.name == name}


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie waiting for its reaper does not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:  # noqa: PTH123
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def scrape(port: int) -> Metrics:
    """Fetch and parse http://127.0.0.1:<port>/metrics."""
    url = f"http://{HOST}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return Metrics(response.read().decode())


def logged_events(path: Path) -> list[str]:
    """The messages of a server's log, without times, levels and loggers."""
    return [
        re.sub(r"^\S+ \S+ \w+ [\w.]+: ", "", line)
        for line in path.read_text().splitlines()
    ]


def run_calcsvc(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the calcsvc command line to its end and capture what it printed."""
    return subprocess.run(
        [sys.executable, "-m", "calcsvc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class BlockingAioClient:
    """A :class:`calcsvc.aio.CalculatorClient` driven from synchronous test code.

    Each method runs the client's coroutine to its end on the adapter's own
    event loop, so the tests written for the threaded client run unchanged
    against the asyncio one.
    """

    def __init__(self, target, **options):
        self._runner = asyncio.Runner()
        try:
            self._client = self._runner.run(self._create(target, options))
        except BaseException:
            self._runner.close()
            raise
        self.breaker = self._client.breaker

    @staticmethod
    async def _create(target, options):
        return aio.CalculatorClient(target, **options)

    def add(self, a, b):
        return self._runner.run(self._client.add(a, b))

    def subtract(self, a, b):
        return self._runner.run(self._client.subtract(a, b))

    def multiply(self, a, b):
        return self._runner.run(self._client.multiply(a, b))

    def divide(self, a, b):
        return self._runner.run(self._client.divide(a, b))

    def close(self):
        self._runner.run(self._client.close())

    def shut_down(self):
        """Close the client and its event loop."""
        if not self._client._closed:
            self.close()
        self._runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc_info):
        self.close()


class RedisProcess:
    """A real ``redis-server`` on a loopback port, keeping nothing on disk."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self._directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start Redis and return once it answers PING."""
        program = shutil.which("redis-server")
        if program is None:
            pytest.fail(
                "redis-server is not on PATH; `make setup` installs Debian's "
                "redis-server package (tests/install-debian-package.sh)"
            )
        log = (self._directory / "redis.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [
                    program,
                    "--port",
                    str(self.port),
                    "--bind",
                    HOST,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self._directory),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_until(self._answers)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"redis-server exited with code {self.process.returncode}")
        try:
            with socket.create_connection((HOST, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Kill Redis with SIGKILL and reap it; everything it held is lost."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


class FleetWorker:
    """One ``tests.fleet_worker`` process, and the outcomes of its calls so far."""

    def __init__(
        self, target: str, *args: str, stderr: Path, env: dict[str, str] | None = None
    ) -> None:
        self.stderr = stderr
        self.outcomes: list[str] = []
        self.ends: list[float] = []
        self.durations: list[float] = []
        self.ready = threading.Event()
        with stderr.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tests.fleet_worker", "--target", target, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=ROOT,
                env=env,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            record: dict[str, Any] = json.loads(line)
            if record.get("ready"):
                self.ready.set()
            else:
                self.ends.append(record["end"])
                self.durations.append(record["seconds"])
                self.outcomes.append(record["outcome"])

    def count(self, outcome: str) -> int:
        """How many calls so far ended with ``outcome``."""
        return self.outcomes.count(outcome)

    def ends_of(self, outcome: str) -> list[float]:
        """When each call that ended with ``outcome`` ended, as ``time.time()``."""
        return [
            end
            for end, each in zip(self.ends, self.outcomes, strict=False)
            if each == outcome
        ]

    def last(self, outcome: str, calls: int = 3) -> bool:
        """Whether the last ``calls`` calls all ended with ``outcome``."""
        tail = self.outcomes[-calls:]
        return len(tail) == calls and all(each == outcome for each in tail)

    def log(self) -> str:
        """What the worker has logged so far."""
        return self.stderr.read_text()

    def stop(self) -> None:
        """End the loop by closing standard input, and wait for the exit."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


def stop_all(workers: Sequence[FleetWorker]) -> None:
    """Close every worker's standard input first, then wait for each."""
    for worker in workers:
        if worker.process.stdin is not None and not worker.process.stdin.closed:
            worker.process.stdin.close()
    for worker in workers:
        worker.stop()
