"""What the monitoring tests share: paths, YAML, the dashboard's queries."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
DASHBOARD = ROOT / "grafana" / "dashboards" / "calcsvc.json"

# Grafana's own variables, and what a query may use in their place.
GRAFANA_VARIABLES = {
    "__rate_interval": "4s",
    "__interval": "1s",
    "__range": "15m",
}

# "$1" in label_replace is a capture group, not a variable.
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")


def variables_in(text: str) -> set[str]:
    """Return the names of the Grafana variables a query refers to."""
    return {braced or bare for braced, bare in _VARIABLE.findall(text)}


def find_program(name: str) -> str:
    """Return the path of a Prometheus program, or fail the test saying why."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH; `make setup` installs it with Debian's "
            "prometheus package (tests/install-debian-package.sh)",
        )
    return path


def load_yaml(path: Path) -> Any:
    """Parse one YAML file."""
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_dashboard() -> dict[str, Any]:
    """Parse the Grafana dashboard."""
    with DASHBOARD.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def annotation_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [a["expr"] for a in dashboard["annotations"]["list"]]


def substitute_variables(
    expr: str, values: dict[str, str] | None = None, others: str = "calcsvc"
) -> str:
    """Put plain values in place of the Grafana variables in a query.

    ``values`` names the dashboard's own variables; Grafana's built-in ones
    get :data:`GRAFANA_VARIABLES`, and any other gets ``others``.
    """
    known = {**GRAFANA_VARIABLES, **(values or {})}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return known.get(name, others)

    return _VARIABLE.sub(value, expr)


def dockerfile_lines() -> list[str]:
    """Return the Dockerfile's instructions, one a line, without comments."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def instructions(dockerfile: list[str], keyword: str) -> list[str]:
    """Return the arguments of every ``keyword`` instruction of ``dockerfile``."""
    return [
        line.split(maxsplit=1)[1]
        for line in dockerfile
        if line.split(maxsplit=1)[0].upper() == keyword
    ]
