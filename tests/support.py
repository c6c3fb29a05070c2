"""Helpers shared by the tests: free ports, scraping /metrics, polling, clients."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
import urllib.request
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from calcsvc import aio

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

HOST = "127.0.0.1"


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
