"""A real Prometheus watches a real outage and recovery.

One run for the whole module: a server process, a client in this process
calling it steadily, and Prometheus scraping both every second with the
rules in monitoring/alerts.yml. The server stops, the breaker opens, the
server comes back (slow, so that the trial call lasts long enough for a
scrape to see the breaker half-open) and the breaker closes. Then every
query on the dashboard runs against what Prometheus recorded.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pybreaker
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from calcsvc import BreakerOpenError, CalculatorClient, CallError
from calcsvc.process import ServerProcess
from tests.monitoring.support import (
    MONITORING,
    annotation_exprs,
    find_program,
    load_dashboard,
    load_yaml,
    panel_exprs,
    substitute_variables,
)
from tests.support import HOST, free_port, scrape, wait_until

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

# Long enough for the server to be back before the first trial call, so
# the trial succeeds and the state path has no detours.
RESET_TIMEOUT = 4.0
# The restarted server's latency: the trial call is in flight, and the
# breaker half-open, for longer than a scrape interval.
TRIAL_LATENCY_MS = 1500


@dataclass
class Run:
    """The recorded outage: where Prometheus is and what it scraped."""

    prometheus: str
    start: float
    client_instance: str
    server_instance: str
    client_port: int
    server_metrics_port: int

    def query(self, path: str, **params: str) -> Any:
        url = f"{self.prometheus}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def instant(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.query("/api/v1/query", query=expr)["result"]
        return result

    def over_the_run(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.query(
            "/api/v1/query_range",
            query=expr,
            start=f"{self.start:.3f}",
            end=f"{time.time():.3f}",
            step="1",
        )["result"]
        return result

    def active_alerts(self, name: str) -> list[dict[str, Any]]:
        alerts = self.query("/api/v1/alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == name]


def prometheus_config(path: Path, server_port: int, client_port: int) -> Path:
    """Write monitoring/prometheus.yml with this run's targets and rules."""
    config = load_yaml(MONITORING / "prometheus.yml")
    config["rule_files"] = [str(MONITORING / rules) for rules in config["rule_files"]]
    ports = {"calcsvc-server": server_port, "calcsvc-client": client_port}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"{HOST}:{ports[job['job_name']]}"]}]
    path.write_text(yaml.safe_dump(config))
    return path


def call_steadily(client: CalculatorClient, stop: threading.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(CallError, BreakerOpenError):
            client.add(5, 3)
        stop.wait(0.05)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    prometheus = find_program("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    grpc_port, server_metrics_port, client_port, web_port = (
        free_port() for _ in range(4)
    )

    registry = CollectorRegistry()
    httpd, _ = start_http_server(client_port, HOST, registry)
    server_log = (folder / "server.log").open("wb")
    server = ServerProcess(
        HOST, grpc_port, metrics_port=server_metrics_port, stderr=server_log
    )
    client = CalculatorClient(
        server.target, reset_timeout=RESET_TIMEOUT, timeout=5, registry=registry
    )
    config = prometheus_config(
        folder / "prometheus.yml", server_metrics_port, client_port
    )
    prometheus_log = (folder / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={HOST}:{web_port}",
        ],
        stdout=prometheus_log,
        stderr=prometheus_log,
    )
    stop = threading.Event()
    caller = threading.Thread(target=call_steadily, args=(client, stop))
    recorded = Run(
        prometheus=f"http://{HOST}:{web_port}",
        start=time.time(),
        client_instance=f"{HOST}:{client_port}",
        server_instance=f"{HOST}:{server_metrics_port}",
        client_port=client_port,
        server_metrics_port=server_metrics_port,
    )

    def sees(expr: str) -> bool:
        return bool(recorded.instant(expr))

    try:
        server.start()
        caller.start()
        wait_until(lambda: prometheus_answers(recorded), timeout=30)
        wait_until(lambda: sees('circuit_breaker_state{state="closed"} == 1'))
        wait_until(lambda: len(recorded.instant("up == 1")) == 2)

        server.stop()  # the outage
        wait_until(lambda: client.breaker.current_state == pybreaker.STATE_OPEN)
        wait_until(lambda: sees('circuit_breaker_state{state="open"} == 1'))

        server = ServerProcess(
            HOST,
            grpc_port,
            metrics_port=server_metrics_port,
            extra_args=["--inject-latency-ms", str(TRIAL_LATENCY_MS)],
            stderr=server_log,
        )
        server.start()
        wait_until(lambda: sees('circuit_breaker_state{state="half_open"} == 1'))
        wait_until(lambda: sees('circuit_breaker_state{state="closed"} == 1'))
        yield recorded
    finally:
        stop.set()
        if caller.is_alive():
            caller.join()
        client.close()
        server.stop()
        process.terminate()
        process.wait(timeout=30)
        httpd.shutdown()
        httpd.server_close()
        server_log.close()
        prometheus_log.close()


def prometheus_answers(run: Run) -> bool:
    try:
        run.instant("up")
    except OSError:
        return False
    return True


def state_path(run: Run) -> list[str]:
    """Return the states Prometheus recorded, each change once, in order."""
    series = run.over_the_run("circuit_breaker_state == 1")
    points = sorted(
        (float(timestamp), s["metric"]["state"])
        for s in series
        for timestamp, _ in s["values"]
    )
    states = [state for _, state in points]
    return [state for i, state in enumerate(states) if i == 0 or states[i - 1] != state]


def test_the_state_goes_closed_open_half_open_closed(run: Run) -> None:
    # A range query's last step can fall just before the newest scrape.
    wait_until(lambda: state_path(run)[-1:] == ["closed"])
    assert state_path(run) == ["closed", "open", "half_open", "closed"]


def test_every_dashboard_query_returns_data(run: Run) -> None:
    dashboard = load_dashboard()
    values = {
        "instance": f"{run.client_instance}|{run.server_instance}",
        "breaker": "calculator",
    }
    empty = [
        expr
        for expr in panel_exprs(dashboard) + annotation_exprs(dashboard)
        if not run.over_the_run(substitute_variables(expr, values))
    ]
    assert empty == []


def test_the_dashboard_variables_find_the_instances_and_breaker(run: Run) -> None:
    instances = run.query("/api/v1/label/instance/values")
    assert {run.client_instance, run.server_instance} <= set(instances)
    breakers = run.query(
        "/api/v1/label/breaker/values", **{"match[]": "circuit_breaker_state"}
    )
    assert breakers == ["calculator"]


@pytest.mark.parametrize("which", ["client", "server"])
def test_promtool_accepts_the_exposition(run: Run, which: str) -> None:
    port = run.client_port if which == "client" else run.server_metrics_port
    result = subprocess.run(
        [find_program("promtool"), "check", "metrics"],
        input=scrape(port).text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_circuit_breaker_open_fired_and_resolves(run: Run) -> None:
    fired = run.over_the_run(
        'ALERTS{alertname="CircuitBreakerOpen", alertstate="firing"}'
    )
    assert [s["metric"]["breaker"] for s in fired] == ["calculator"]

    # The rule looks back 30 s for a trip; the breaker stays closed meanwhile.
    wait_until(lambda: run.active_alerts("CircuitBreakerOpen") == [], timeout=60)
    assert run.instant('circuit_breaker_state{state="closed"} == 1')
