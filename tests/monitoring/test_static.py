"""Static checks of the Prometheus configuration, alerts and Grafana dashboard.

Prometheus's own promtool checks the configuration, the alert rules and
every query on the dashboard; the tests here add what promtool cannot know:
that each query uses only the metrics calcsvc exports and only variables the
dashboard defines.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.monitoring.support import (
    GRAFANA_VARIABLES,
    MONITORING,
    ROOT,
    annotation_exprs,
    find_program,
    load_dashboard,
    load_yaml,
    panel_exprs,
    substitute_variables,
    variables_in,
)

PROVISIONING = ROOT / "grafana" / "provisioning"

# The metrics the client and the server export.
CONTRACT_METRICS = frozenset(
    {
        "circuit_breaker_state",
        "circuit_breaker_transitions_total",
        "circuit_breaker_calls_total",
        "circuit_breaker_failures_total",
        "circuit_breaker_consecutive_failures",
        "circuit_breaker_fail_max",
        "circuit_breaker_reset_timeout_seconds",
        "grpc_client_started_total",
        "grpc_client_handled_total",
        "grpc_server_started_total",
        "grpc_server_handled_total",
        "calcsvc_server_serving",
        "up",
    },
)
CONTRACT_HISTOGRAMS = frozenset(
    {
        "circuit_breaker_call_duration_seconds",
        "grpc_client_handling_seconds",
        "grpc_server_handling_seconds",
    },
)
# prometheus_client exports these by default.
DEFAULT_METRIC_PREFIXES = ("process_", "python_")

ALERTS = frozenset(
    {
        "CircuitBreakerOpen",
        "CircuitBreakerFlapping",
        "CalculatorNotServing",
        "CalculatorHighErrorRate",
        "CalculatorHighLatency",
    },
)

_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
)
_NUMBER_OR_DURATION = re.compile(r"(?<![\w:])\d[\w.+-]*")
_NAME = re.compile(r"[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    },
)
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """Return the metric names a PromQL expression selects."""
    text = _STRING.sub(" ", expr)
    for pattern in (_MATCHERS, _RANGE, _LABEL_LIST, _NUMBER_OR_DURATION):
        text = pattern.sub(" ", text)

    names = set()
    for match in _NAME.finditer(text):
        is_call = text[match.end() :].lstrip().startswith("(")
        if not is_call and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def is_contract_metric(name: str) -> bool:
    """Tell whether calcsvc exports a metric of this name."""
    if name in CONTRACT_METRICS or name.startswith(DEFAULT_METRIC_PREFIXES):
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in {"bucket", "sum", "count"} and base in CONTRACT_HISTOGRAMS


@pytest.fixture(scope="module")
def promtool() -> str:
    return find_program("promtool")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def run_promtool(promtool: str, *args: str | Path) -> None:
    result = subprocess.run(
        [promtool, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def all_exprs(
    dashboard: dict[str, Any],
    variables: dict[str, dict[str, Any]],
) -> list[str]:
    """Every PromQL expression on the dashboard, variables' selectors too."""
    selectors = []
    for variable in variables.values():
        if variable["type"] == "query":
            match = _LABEL_VALUES.match(variable_query(variable))
            assert match, f"variable {variable['name']} is not a label_values query"
            selectors.append(match.group(1))
    return panel_exprs(dashboard) + annotation_exprs(dashboard) + selectors


def test_metric_names_finds_selectors_and_skips_the_rest() -> None:
    expr = (
        'sum by (le, job) (rate(foo_bucket{a="b c", d=~"x|y"}[5m] offset 1m))'
        " / on (job) group_left bar_total > bool 0.5"
        ' or label_replace(baz, "dst", "$1", "src", "(.*)") unless Inf'
    )

    assert metric_names(expr) == {"foo_bucket", "bar_total", "baz"}


def test_is_contract_metric_rejects_names_outside_the_contract() -> None:
    assert is_contract_metric("circuit_breaker_call_duration_seconds_bucket")
    assert is_contract_metric("process_cpu_seconds_total")
    assert not is_contract_metric("circuit_breaker_state_bucket")
    assert not is_contract_metric("grpc_server_msg_received_total")


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.docker.yml"])
def test_prometheus_config_is_valid(promtool: str, config: str) -> None:
    run_promtool(promtool, "check", "config", MONITORING / config)


def test_alert_rules_are_valid(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", MONITORING / "alerts.yml")


def test_alert_rules_pass_their_unit_tests(promtool: str) -> None:
    run_promtool(promtool, "test", "rules", MONITORING / "tests" / "alerts_test.yml")


def test_prometheus_configs_differ_only_in_target_hosts() -> None:
    local = load_yaml(MONITORING / "prometheus.yml")
    docker = load_yaml(MONITORING / "prometheus.docker.yml")
    docker_hosts = {"server:9464": "localhost:9464", "demo:9465": "localhost:9465"}
    for job in docker["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [docker_hosts[t] for t in static["targets"]]

    assert docker == local


def test_prometheus_scrapes_server_and_client_on_their_ports() -> None:
    config = load_yaml(MONITORING / "prometheus.yml")
    targets = {
        job["job_name"]: [t for s in job["static_configs"] for t in s["targets"]]
        for job in config["scrape_configs"]
    }

    assert targets == {
        "calcsvc-server": ["localhost:9464"],
        "calcsvc-client": ["localhost:9465"],
    }
    assert config["rule_files"] == ["alerts.yml"]


def test_every_alert_is_documented_and_has_a_severity() -> None:
    rules = [
        r for g in load_yaml(MONITORING / "alerts.yml")["groups"] for r in g["rules"]
    ]

    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert metric_names(rule["expr"]), rule["alert"]
        unknown = {n for n in metric_names(rule["expr"]) if not is_contract_metric(n)}
        assert not unknown, f"{rule['alert']} uses {unknown}"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = load_yaml(MONITORING / "tests" / "alerts_test.yml")["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]

    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert firing == ALERTS
    assert quiet == ALERTS


def test_dashboard_is_current(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["panels"]


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]

    assert len(ids) == len(set(ids))


def test_datasource_is_a_prometheus_variable(
    variables: dict[str, dict[str, Any]],
) -> None:
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_and_query_uses_the_datasource_variable(
    dashboard: dict[str, Any],
    variables: dict[str, dict[str, Any]],
) -> None:
    users = [
        *dashboard["panels"],
        *(t for p in dashboard["panels"] for t in p["targets"]),
        *dashboard["annotations"]["list"],
        *(v for v in variables.values() if v["type"] == "query"),
    ]

    for user in users:
        assert user["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
            user.get("title") or user.get("name") or user.get("refId")
        )


def test_every_panel_has_a_query(dashboard: dict[str, Any]) -> None:
    for panel in dashboard["panels"]:
        exprs = [t.get("expr", "").strip() for t in panel["targets"]]
        assert exprs, panel["title"]
        assert all(exprs), panel["title"]


def test_queries_use_only_contract_metrics(
    dashboard: dict[str, Any],
    variables: dict[str, dict[str, Any]],
) -> None:
    for expr in all_exprs(dashboard, variables):
        names = metric_names(expr)
        assert names, expr
        unknown = {n for n in names if not is_contract_metric(n)}
        assert not unknown, f"{unknown} in {expr}"


def test_queries_use_only_defined_variables(
    dashboard: dict[str, Any],
    variables: dict[str, dict[str, Any]],
) -> None:
    known = variables.keys() | GRAFANA_VARIABLES.keys()

    for expr in all_exprs(dashboard, variables):
        assert variables_in(expr) <= known, expr


def test_breaker_and_instance_variables_filter_the_panels(
    dashboard: dict[str, Any],
    variables: dict[str, dict[str, Any]],
) -> None:
    used = set().union(*map(variables_in, panel_exprs(dashboard)))

    for name in ("breaker", "instance"):
        assert variables[name]["type"] == "query"
        assert variable_query(variables[name]).startswith("label_values(")
        assert name in used


def test_open_breakers_are_shown_from_the_transitions_counter(
    dashboard: dict[str, Any],
) -> None:
    # A trip shorter than a scrape leaves the state gauge at closed.
    state = next(p for p in dashboard["panels"] if p["type"] == "state-timeline")
    state_exprs = " ".join(t["expr"] for t in state["targets"])

    assert "circuit_breaker_state" in state_exprs
    assert "circuit_breaker_transitions_total" in state_exprs
    assert dashboard["annotations"]["list"]
    for expr in annotation_exprs(dashboard):
        assert "circuit_breaker_transitions_total" in expr


def test_queries_parse_as_promql(
    promtool: str,
    dashboard: dict[str, Any],
    variables: dict[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    # promtool parses the expression of every recording rule it checks.
    exprs = sorted(set(map(substitute_variables, all_exprs(dashboard, variables))))
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)
    ]
    rule_file = tmp_path / "dashboard_queries.yml"
    # JSON is YAML, so promtool reads this file as it is.
    rule_file.write_text(
        json.dumps({"groups": [{"name": "dashboard", "rules": rules}]})
    )

    run_promtool(promtool, "check", "rules", rule_file)


def test_datasource_provisioning_matches_prometheus() -> None:
    config = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    scrape_interval = load_yaml(MONITORING / "prometheus.docker.yml")["global"][
        "scrape_interval"
    ]

    [datasource] = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["isDefault"] is True
    # Grafana's $__rate_interval is only as short as this says.
    assert datasource["jsonData"]["timeInterval"] == scrape_interval


def test_dashboard_provisioning_reads_a_folder() -> None:
    config = load_yaml(PROVISIONING / "dashboards" / "calcsvc.yml")

    [provider] = config["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()


def test_breaker_state_panel_shows_a_trip_shorter_than_a_scrape(
    promtool: str,
    dashboard: dict[str, Any],
    tmp_path: Path,
) -> None:
    # The breaker trips at 9.5 s and closes again before the 10 s scrape, so
    # the gauge never reads open; only the transitions counter moved. At 20 s
    # a scrape catches it half_open.
    state = next(p for p in dashboard["panels"] if p["title"] == "Breaker state")
    expr = substitute_variables(state["targets"][0]["expr"], others=".*")
    labels = 'job="calcsvc-client", instance="localhost:9465", breaker="calculator"'
    result = '{breaker="calculator", instance="localhost:9465"}'
    unit_test = {
        "evaluation_interval": "1s",
        "tests": [
            {
                "interval": "1s",
                "input_series": [
                    {
                        "series": f'circuit_breaker_state{{{labels}, state="open"}}',
                        "values": "0x40",
                    },
                    {
                        "series": (
                            f'circuit_breaker_state{{{labels}, state="half_open"}}'
                        ),
                        "values": "0x19 1 0x20",
                    },
                    {
                        "series": (
                            f"circuit_breaker_transitions_total{{{labels}, "
                            'from_state="closed", to_state="open"}'
                        ),
                        "values": "0x9 1x31",
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": f"{seconds}s",
                        "exp_samples": [{"labels": result, "value": value}],
                    }
                    for seconds, value in ((5, 0), (12, 2), (20, 1), (30, 0))
                ],
            },
        ],
    }
    test_file = tmp_path / "breaker_state_test.yml"
    test_file.write_text(json.dumps(unit_test))

    run_promtool(promtool, "test", "rules", test_file)
