"""The Kubernetes manifests in deploy/kubernetes/, checked without a cluster.

Each manifest must agree with the code it runs: the commands parse with the
calcsvc command line, probes and annotations name the ports the commands
open, Services select the pods they mean and reach their ports, and the
image is the one the Dockerfile builds.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from calcsvc import __version__
from calcsvc.calculator import SERVICE_NAME
from calcsvc.cli import build_parser
from calcsvc.server import DEFAULT_METRICS_PORT, DEFAULT_PORT
from tests.monitoring.support import dockerfile_lines, instructions
from tests.support import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
API_VERSIONS = {"Deployment": "apps/v1", "Service": "v1"}
# The oldest release kubernetes-validate has a schema for, and its newest.
KUBERNETES = ("1.25.0", kubernetes_validate.latest_version())


def _documents():
    documents = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        with path.open(encoding="utf-8") as f:
            documents += [doc for doc in yaml.safe_load_all(f) if doc]
    return documents


DOCUMENTS = _documents()


def _named(kind, name):
    for doc in DOCUMENTS:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    pytest.fail(f"no {kind} {name} in {DEPLOY}")


def _container(deployment):
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _args(deployment):
    return build_parser().parse_args(_container(deployment)["args"])


def _port_numbers(container):
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def test_the_kustomization_lists_every_manifest():
    with (DEPLOY / "kustomization.yaml").open(encoding="utf-8") as f:
        kustomization = yaml.safe_load(f)
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize(
    "document",
    DOCUMENTS,
    ids=[f"{doc['kind']}/{doc['metadata']['name']}" for doc in DOCUMENTS],
)
def test_every_object_is_valid_kubernetes(document, version):
    # Strict: a misspelt field is an error, not a field Kubernetes ignores.
    kubernetes_validate.validate(document, version, strict=True)


def test_every_object_has_a_known_kind_and_api_version():
    assert {doc["kind"] for doc in DOCUMENTS} == set(API_VERSIONS)
    for doc in DOCUMENTS:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]]
        assert doc["metadata"]["name"]


def test_deployments_select_their_own_pods():
    deployments = [doc for doc in DOCUMENTS if doc["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {
        "calcsvc-server",
        "calcsvc-client",
        "calcsvc-redis",
    }
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        others = [d for d in deployments if d is not deployment]
        for other in others:
            other_labels = other["spec"]["template"]["metadata"]["labels"]
            assert not selector.items() <= other_labels.items()


def test_every_service_reaches_one_deployments_ports():
    deployments = [doc for doc in DOCUMENTS if doc["kind"] == "Deployment"]
    for service in (doc for doc in DOCUMENTS if doc["kind"] == "Service"):
        selector = service["spec"]["selector"]
        (target,) = [
            d
            for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = _port_numbers(_container(target))
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
            assert port["port"] == ports[port["targetPort"]]


def test_the_server_is_probed_on_its_grpc_health_service():
    server = _named("Deployment", "calcsvc-server")
    container = _container(server)
    args = _args(server)

    assert args.command == "serve"
    assert args.port == DEFAULT_PORT
    assert args.metrics_port == DEFAULT_METRICS_PORT
    assert _port_numbers(container) == {
        "grpc": DEFAULT_PORT,
        "metrics": DEFAULT_METRICS_PORT,
    }
    liveness = container["livenessProbe"]["grpc"]
    readiness = container["readinessProbe"]["grpc"]
    assert liveness == {"port": DEFAULT_PORT}
    assert readiness == {"port": DEFAULT_PORT, "service": SERVICE_NAME}
    grace = server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > args.drain_delay + args.grace


@pytest.mark.parametrize(
    ("deployment", "port"),
    [("calcsvc-server", "metrics_port"), ("calcsvc-client", "metrics_port")],
)
def test_prometheus_scrapes_the_port_the_command_serves_metrics_on(deployment, port):
    manifest = _named("Deployment", deployment)
    annotations = manifest["spec"]["template"]["metadata"]["annotations"]
    served = getattr(_args(manifest), port)

    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == served
    assert served in _port_numbers(_container(manifest)).values()


def test_the_client_fleet_shares_its_breaker_through_the_redis_service():
    client = _named("Deployment", "calcsvc-client")
    args = _args(client)
    assert client["spec"]["replicas"] > 1
    assert args.command == "demo"
    assert args.loop

    host, _, port = args.target.rpartition(":")
    server = _named("Service", host)
    assert int(port) in {p["port"] for p in server["spec"]["ports"]}

    storage = urlsplit(args.breaker_storage)
    assert storage.scheme == "redis"
    redis_service = _named("Service", storage.hostname)
    assert storage.port in {p["port"] for p in redis_service["spec"]["ports"]}


def test_the_calcsvc_image_is_the_one_the_dockerfile_builds():
    dockerfile = dockerfile_lines()
    assert instructions(dockerfile, "ENTRYPOINT") == ['["calcsvc"]']
    exposed = {
        int(port)
        for line in instructions(dockerfile, "EXPOSE")
        for port in line.split()
    }

    for name in ("calcsvc-server", "calcsvc-client"):
        container = _container(_named("Deployment", name))
        assert container["image"] == f"calcsvc:{__version__}"
        assert set(_port_numbers(container).values()) <= exposed
