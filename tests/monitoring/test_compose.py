"""Static checks of docker-compose.yml and the Dockerfile.

Docker does not run where the tests run, so these tests read the files: the
services and their ports, the flags each one starts with, and that every file
the containers mount or the image copies is in the repository.
"""

from __future__ import annotations

import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from tests.monitoring.support import (
    ROOT,
    dockerfile_lines,
    instructions,
    load_yaml,
)

GRPC_PORT = 8080
SERVER_METRICS_PORT = 9464
CLIENT_METRICS_PORT = 9465
PROMETHEUS_PORT = 9090
GRAFANA_PORT = 3000
# In a container, servers must accept connections from the other services.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = load_yaml(ROOT / "docker-compose.yml")[
        "services"
    ]
    return loaded


def command(service: dict[str, Any]) -> list[str]:
    value = service["command"]
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def flag(args: list[str], name: str) -> str:
    """Return a command-line flag's value, given as `--name value` or `--name=value`."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.partition("=")[2]
    pytest.fail(f"{name} not in {args}")


def published_ports(service: dict[str, Any]) -> set[tuple[int, int]]:
    pairs = set()
    for entry in service.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        pairs.add((int(host), int(container)))
    return pairs


def mounts(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Map each container path mounted from the repository to its host path."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        found[PurePosixPath(target)] = (ROOT / source).resolve()
    return found


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Find the repository file behind a path inside a container."""
    path = PurePosixPath(container_path)
    for target, source in mounts(service).items():
        if path == target or target in path.parents:
            return source / path.relative_to(target)
    pytest.fail(f"{container_path} is not mounted from the repository")


def test_compose_defines_the_four_services(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(services) == {"server", "demo", "prometheus", "grafana"}


def test_every_mounted_path_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for source in mounts(service).values():
            assert source.exists(), f"{name} mounts missing {source}"
            assert ROOT in source.parents, f"{name} mounts {source} from outside"


def test_server_listens_on_the_default_ports(
    services: dict[str, dict[str, Any]],
) -> None:
    server = services["server"]
    args = command(server)

    assert args[0] == "serve"
    assert flag(args, "--host") == ALL_INTERFACES
    assert flag(args, "--port") == str(GRPC_PORT)
    assert flag(args, "--metrics-port") == str(SERVER_METRICS_PORT)
    assert published_ports(server) == {
        (GRPC_PORT, GRPC_PORT),
        (SERVER_METRICS_PORT, SERVER_METRICS_PORT),
    }


def test_demo_calls_the_server_and_exports_client_metrics(
    services: dict[str, dict[str, Any]],
) -> None:
    demo = services["demo"]
    args = command(demo)

    assert args[0] == "demo"
    assert "--loop" in args
    assert flag(args, "--target") == f"server:{GRPC_PORT}"
    assert flag(args, "--host") == ALL_INTERFACES
    assert flag(args, "--metrics-port") == str(CLIENT_METRICS_PORT)
    assert published_ports(demo) == {(CLIENT_METRICS_PORT, CLIENT_METRICS_PORT)}
    assert "server" in demo["depends_on"]


def test_server_and_demo_are_built_from_the_dockerfile(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in ("server", "demo"):
        assert services[name]["build"] == ".", name
    assert (ROOT / "Dockerfile").is_file()


def test_prometheus_scrapes_the_compose_services(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    config_file = host_path(prometheus, flag(command(prometheus), "--config.file"))
    config = load_yaml(config_file)
    targets = {
        job["job_name"]: [t for s in job["static_configs"] for t in s["targets"]]
        for job in config["scrape_configs"]
    }

    assert config_file == ROOT / "monitoring" / "prometheus.docker.yml"
    assert targets == {
        "calcsvc-server": [f"server:{SERVER_METRICS_PORT}"],
        "calcsvc-client": [f"demo:{CLIENT_METRICS_PORT}"],
    }
    for rule_file in config["rule_files"]:
        assert (config_file.parent / rule_file).is_file(), rule_file
    assert published_ports(prometheus) == {(PROMETHEUS_PORT, PROMETHEUS_PORT)}


def test_grafana_reads_provisioning_and_dashboards_from_the_repository(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    provisioning = host_path(grafana, "/etc/grafana/provisioning")
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")
    [provider] = load_yaml(provisioning / "dashboards" / "calcsvc.yml")["providers"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]

    assert provisioning == ROOT / "grafana" / "provisioning"
    assert (
        datasources["datasources"][0]["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    )
    dashboards = host_path(grafana, provider["options"]["path"])
    assert dashboards == ROOT / "grafana" / "dashboards"
    assert (dashboards / "calcsvc.json").is_file()
    assert host_path(grafana, home) == dashboards / "calcsvc.json"
    assert published_ports(grafana) == {(GRAFANA_PORT, GRAFANA_PORT)}


def test_published_ports_do_not_clash(services: dict[str, dict[str, Any]]) -> None:
    host_ports = [host for s in services.values() for host, _ in published_ports(s)]

    assert len(host_ports) == len(set(host_ports))


@pytest.fixture(scope="module")
def dockerfile() -> list[str]:
    return dockerfile_lines()


def test_image_installs_the_package_on_python_311(dockerfile: list[str]) -> None:
    assert instructions(dockerfile, "FROM") == ["python:3.11-slim"]
    # With Redis: the client pods keep their breaker there.
    assert 'pip install ".[redis]"' in instructions(dockerfile, "RUN")
    assert instructions(dockerfile, "ENTRYPOINT") == ['["calcsvc"]']


def test_image_copies_only_files_that_exist(dockerfile: list[str]) -> None:
    copies = instructions(dockerfile, "COPY")

    assert copies
    for copy in copies:
        *sources, _ = shlex.split(copy)
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"


def test_image_exposes_the_default_ports(dockerfile: list[str]) -> None:
    exposed = {
        int(p) for line in instructions(dockerfile, "EXPOSE") for p in line.split()
    }

    assert exposed == {GRPC_PORT, SERVER_METRICS_PORT, CLIENT_METRICS_PORT}
