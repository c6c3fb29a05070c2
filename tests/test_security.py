"""TLS and mutual TLS on the gRPC port and /metrics, and locking a server down.

The certificates are made for each run: a CA that signs the server's
certificate (for 127.0.0.1 and localhost) and a client's, and an unrelated
CA with a client of its own. The TLS servers run as both kinds of server.
"""

from __future__ import annotations

import re
import socket
import ssl
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import CollectorRegistry

from calcsvc import BackendError, CalculatorClient
from calcsvc.cli import main
from calcsvc.process import ServerProcess, check_serving
from calcsvc.server import ServerConfig
from calcsvc.tls import ClientTls, TlsConfigError
from tests.certs import METRICS_HOST, make_certificates

if TYPE_CHECKING:
    from pathlib import Path

from tests.support import (
    HOST,
    BlockingAioClient,
    Metrics,
    free_port,
    run_calcsvc,
    scrape,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=["threaded", "aio"])
def kind(request):
    return ["--aio"] if request.param == "aio" else []


def client_tls(certs, *, ca=None, cert=None, key=None):
    return ClientTls(ca or certs.ca, cert, key).grpc_credentials()


class LoggedServer(ServerProcess):
    """A server process, and the file its log goes to."""

    log_path: Path


def start_tls_server(log_path, certs, kind, *extra_args, credentials):
    with log_path.open("wb") as log:
        server = LoggedServer(
            HOST,
            free_port(),
            metrics_port=free_port(),
            extra_args=[
                *kind,
                "--tls-cert",
                str(certs.server_cert),
                "--tls-key",
                str(certs.server_key),
                "--metrics-tls",
                *extra_args,
            ],
            stderr=log,
            credentials=credentials,
        )
        server.start()
    server.log_path = log_path
    return server


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, certs, kind):
    """A server over TLS, without client certificates, with /metrics apart."""
    path = tmp_path_factory.mktemp("tls") / "server.log"
    server = start_tls_server(
        path,
        certs,
        kind,
        "--metrics-host",
        METRICS_HOST,
        credentials=client_tls(certs),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, certs, kind):
    """A server locked down: mutual TLS, and no reflection."""
    path = tmp_path_factory.mktemp("mtls") / "server.log"
    credentials = client_tls(certs, cert=certs.client_cert, key=certs.client_key)
    server = start_tls_server(
        path,
        certs,
        kind,
        "--tls-client-ca",
        str(certs.ca),
        "--no-reflection",
        credentials=credentials,
    )
    yield server
    server.stop()


def add(target, credentials, a=2, b=3):
    with CalculatorClient(
        target, credentials=credentials, registry=CollectorRegistry(), timeout=5
    ) as client:
        return client.add(a, b)


def refused(target, credentials):
    """Expect a call with ``credentials`` to fail as a server that is down does."""
    with pytest.raises(BackendError) as failed:
        add(target, credentials)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    return failed.value.details() or ""


def assert_quiet(server):
    """The server is up, and logged no error or warning for what it refused."""
    assert server.running
    log = server.log_path.read_text()
    assert "Traceback" not in log
    assert not re.search(
        r"^(?:[EWF]\d{4} |\S+ \S+ (?:ERROR|WARNING|CRITICAL) )", log, re.MULTILINE
    )


def test_a_client_that_trusts_the_ca_calls_over_tls(tls_server, certs):
    assert add(tls_server.target, client_tls(certs)) == 5
    aio_client = BlockingAioClient(
        tls_server.target, credentials=client_tls(certs), registry=CollectorRegistry()
    )
    try:
        assert aio_client.multiply(6, 7) == 42
    finally:
        aio_client.shut_down()


@pytest.mark.parametrize("client", ["wrong CA", "plain text"])
def test_a_client_that_does_not_trust_the_server_is_refused(tls_server, certs, client):
    credentials = (
        None if client == "plain text" else client_tls(certs, ca=certs.other_ca)
    )
    refused(tls_server.target, credentials)
    assert add(tls_server.target, client_tls(certs)) == 5
    assert_quiet(tls_server)


def test_mutual_tls_serves_a_client_the_ca_signed(mtls_server, certs):
    credentials = client_tls(certs, cert=certs.client_cert, key=certs.client_key)
    assert add(mtls_server.target, credentials, 1, 1) == 2
    assert check_serving(mtls_server.target, 5, credentials=credentials)


@pytest.mark.parametrize("client", ["no certificate", "another CA's certificate"])
def test_mutual_tls_refuses_a_client_without_a_good_certificate(
    mtls_server, certs, client
):
    if client == "no certificate":
        credentials = client_tls(certs)
    else:
        credentials = client_tls(
            certs, cert=certs.stranger_cert, key=certs.stranger_key
        )
    refused(mtls_server.target, credentials)
    good = client_tls(certs, cert=certs.client_cert, key=certs.client_key)
    assert add(mtls_server.target, good) == 5
    assert_quiet(mtls_server)


def test_a_locked_down_server_answers_no_reflection(mtls_server, certs):
    credentials = client_tls(certs, cert=certs.client_cert, key=certs.client_key)
    with (
        grpc.secure_channel(mtls_server.target, credentials) as channel,
        pytest.raises(grpc.RpcError) as failed,
    ):
        ProtoReflectionDescriptorDatabase(channel).get_services()
    assert failed.value.code() is grpc.StatusCode.UNIMPLEMENTED


def https_scrape(port, context, host=HOST):
    url = f"https://{host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return Metrics(response.read().decode())


def test_metrics_are_served_over_https_on_their_own_address(tls_server, certs):
    context = ssl.create_default_context(cafile=certs.ca)
    metrics = https_scrape(tls_server.metrics_port, context, METRICS_HOST)
    assert metrics.value("calcsvc_server_serving", service="") == 1
    url = f"http://{METRICS_HOST}:{tls_server.metrics_port}/metrics"
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(url, timeout=5)  # plain HTTP gets nothing
    with pytest.raises(urllib.error.URLError):
        scrape(tls_server.metrics_port)  # nothing on the gRPC address


def test_metrics_under_mutual_tls_need_a_client_certificate(mtls_server, certs):
    context = ssl.create_default_context(cafile=certs.ca)
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        https_scrape(mtls_server.metrics_port, context)
    context.load_cert_chain(certs.client_cert, certs.client_key)
    assert https_scrape(mtls_server.metrics_port, context).value(
        "calcsvc_server_serving", service=""
    )
    assert_quiet(mtls_server)


def test_a_half_open_connection_does_not_block_https_scrapes(tls_server, certs):
    context = ssl.create_default_context(cafile=certs.ca)
    # A client that connects and never finishes its handshake.
    address = (METRICS_HOST, tls_server.metrics_port)
    with socket.create_connection(address) as silent:
        silent.sendall(b"\x16\x03\x01")
        assert https_scrape(tls_server.metrics_port, context, METRICS_HOST).value(
            "calcsvc_server_serving", service=""
        )
        assert add(tls_server.target, client_tls(certs)) == 5


def test_the_client_commands_speak_tls(mtls_server, certs, kind):
    if kind:
        pytest.skip("the client commands are run once, against the threaded server")
    tls = [
        "--tls-ca",
        str(certs.ca),
        "--tls-cert",
        str(certs.client_cert),
        "--tls-key",
        str(certs.client_key),
    ]
    result = run_calcsvc("mul", "6", "7", "--target", mtls_server.target, *tls)
    assert (result.returncode, result.stdout) == (0, "42\n"), result.stderr
    result = run_calcsvc("health", "--target", mtls_server.target, *tls)
    assert (result.returncode, result.stdout) == (0, "status: SERVING\n")

    result = run_calcsvc(
        "add", "1", "2", "--target", mtls_server.target, *tls[:2], "--timeout", "5"
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (
            ("serve", "--tls-key", "{server_key}"),
            "--tls-cert and --tls-key go together",
        ),
        (("add", "1", "2", "--tls-cert", "{client_cert}"), "go together"),
        (("serve", "--tls-client-ca", "{ca}"), "need --tls-cert"),
        (("serve", "--metrics-tls"), "need --tls-cert"),
        (("health", "--tls-ca", "{missing}"), "cannot read"),
        (
            ("serve", "--tls-cert", "{ca}", "--tls-key", "{server_key}"),
            "are not a PEM certificate and its private key",
        ),
        (("sub", "1", "2", "--tls-ca", "{server_key}"), "holds no PEM certificate"),
    ],
)
def test_bad_tls_options_are_a_clear_error(certs, tmp_path, capsys, args, words):
    paths = {name: str(getattr(certs, name)) for name in ("ca", "server_key")}
    paths["client_cert"] = str(certs.client_cert)
    paths["missing"] = str(tmp_path / "missing.pem")
    # Refused while the arguments are parsed, before anything starts.
    with pytest.raises(SystemExit) as exited:
        main([arg.format(**paths) for arg in args])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "usage: calcsvc" in stderr
    assert words in stderr
    assert "Traceback" not in stderr


def test_client_tls_refuses_a_certificate_without_its_key(certs):
    with pytest.raises(TlsConfigError, match="go together"):
        ClientTls(certs.ca, cert=certs.client_cert)


def test_server_config_refuses_metrics_tls_without_tls():
    with pytest.raises(ValueError, match="needs the server's TLS files"):
        ServerConfig(metrics_tls=True)
    with pytest.raises(ValueError, match="at least 1"):
        ServerConfig(max_message_bytes=0)
