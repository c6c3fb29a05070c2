"""Hostile input on both servers: each is refused cleanly, and the server serves on.

Every test ends with a normal call that must get the right answer, and no
status message may carry a traceback or a path of the server's files.
"""

from __future__ import annotations

import random
import re
import socket
import string

import grpc
import pytest

from calcsvc._generated.calc.v1 import calculator_pb2
from calcsvc.calculator import NOT_A_REQUEST, OPERATIONS, SERVICE_NAME
from calcsvc.process import check_serving
from calcsvc.server import (
    HEALTH_SERVICE_NAME,
    NOT_A_HEALTH_REQUEST,
    ServerConfig,
    server_options,
)
from tests.support import HOST, scrape, wait_until

# A request with the operands 1 and 2, padded with an unknown field (7) of
# ``size`` bytes in all: proto3 parses and ignores it.
UNKNOWN_FIELD = b"\x3a"
# The servers' request size limit here, larger than padded_request's least.
LIMIT = 0x5000


def padded_request(size: int) -> bytes:
    request = calculator_pb2.BinaryRequest(a=1, b=2).SerializeToString()
    padding = size - len(request) - 1 - 3  # the tag, and a 3-byte length
    assert padding >= 0x4000  # the length takes 3 bytes
    length = bytes([padding & 0x7F | 0x80, (padding >> 7) & 0x7F | 0x80, padding >> 14])
    return request + UNKNOWN_FIELD + length + b"x" * padding


# Bytes that are no BinaryRequest: a truncated varint, a double cut short, a
# length past the end, an end-group tag, and field number 0.
MALFORMED = [
    b"\xff\xff\xff",
    b"\x09\x00",
    b"\x0a\x05abc",
    b"\x0c",
    b"\x00\x01",
    b"garbage that is not protobuf at all",
]


@pytest.fixture(scope="module", params=["threaded", "aio"])
def server_flags(request):
    # A limit of its own proves the option is applied; the default is
    # checked where the options are made.
    limit = ["--max-message-bytes", str(LIMIT)]
    return ["--aio", *limit] if request.param == "aio" else limit


@pytest.fixture(scope="module")
def channel(shared_server):
    with grpc.insecure_channel(shared_server.target) as channel:
        yield channel


def raw(channel, method):
    """A callable that sends bytes to ``method`` and returns the bytes answered."""
    return channel.unary_unary(f"/{SERVICE_NAME}/{method}")


def refused(send, payload, timeout=5.0):
    """Send ``payload``, expect a refusal, and check what it says."""
    with pytest.raises(grpc.RpcError) as failed:
        send(payload, timeout=timeout)
    details = failed.value.details() or ""
    for leak in ("Traceback", 'File "', ".py", "calcsvc/", "Error"):
        assert leak not in details, details
    return failed.value


def still_serves(channel):
    answer = raw(channel, "Multiply")(
        calculator_pb2.BinaryRequest(a=6, b=7).SerializeToString(), timeout=5
    )
    assert calculator_pb2.Result.FromString(answer).value == 42


@pytest.mark.parametrize("method", sorted(OPERATIONS))
def test_bytes_that_are_no_request_are_invalid_argument(shared_server, channel, method):
    before = scrape(shared_server.metrics_port)
    send = raw(channel, method)
    for payload in MALFORMED:
        error = refused(send, payload)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == NOT_A_REQUEST
    still_serves(channel)

    # They are counted as the calls they are. grpc.aio sends the status
    # before the handler has returned, so the count may come a little later.
    labels = {"grpc_method": method, "grpc_code": "INVALID_ARGUMENT"}
    counted_before = before.value("grpc_server_handled_total", **labels)
    wait_until(
        lambda: (
            scrape(shared_server.metrics_port).value(
                "grpc_server_handled_total", **labels
            )
            == counted_before + len(MALFORMED)
        )
    )


@pytest.mark.parametrize("method", ["Check", "Watch"])
def test_health_requests_that_do_not_parse_are_invalid_argument(
    shared_server, channel, method
):
    path = f"/{HEALTH_SERVICE_NAME}/{method}"
    send = (
        channel.unary_unary(path)
        if method == "Check"
        else lambda payload, timeout: list(
            channel.unary_stream(path)(payload, timeout=timeout)
        )
    )
    for payload in MALFORMED:
        error = refused(send, payload)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == NOT_A_HEALTH_REQUEST
    assert check_serving(shared_server.target, timeout=5)
    still_serves(channel)


def test_unknown_fields_and_empty_requests_are_requests(channel):
    # proto3 skips fields it does not know, and a field left out is zero.
    assert raw(channel, "Add")(padded_request(0x4800), timeout=5) == (
        calculator_pb2.Result(value=3).SerializeToString()
    )
    with pytest.raises(grpc.RpcError) as failed:
        raw(channel, "Divide")(b"", timeout=5)
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "zero" in (failed.value.details() or "")


def test_a_request_over_the_limit_is_resource_exhausted(channel):
    send = raw(channel, "Add")
    assert send(padded_request(LIMIT), timeout=5)
    error = refused(send, padded_request(LIMIT + 1))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    still_serves(channel)


def test_the_default_limit_is_64_kib():
    options = dict(server_options(ServerConfig()))
    assert options["grpc.max_receive_message_length"] == 64 * 1024


def random_name(rng, length):
    return "".join(rng.choices(string.ascii_letters + string.digits + "._", k=length))


def label_sets(metrics):
    """Every grpc_server_* series, as its name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items()))
        for sample in metrics.samples
        if sample.name.startswith("grpc_server_")
    }


def test_unknown_methods_are_unimplemented_and_add_no_series(shared_server, channel):
    rng = random.Random(5)
    paths = [
        f"/{random_name(rng, rng.randint(1, 40))}/{random_name(rng, 12)}"
        for _ in range(60)
    ]
    paths += [f"/{SERVICE_NAME}/{random_name(rng, 8)}" for _ in range(20)]
    paths += [f"/{SERVICE_NAME}/add", f"/{SERVICE_NAME}/", "/", "/grpc.health.v1"]

    before = label_sets(scrape(shared_server.metrics_port))
    for path in paths:
        error = refused(channel.unary_unary(path), b"")
        assert error.code() is grpc.StatusCode.UNIMPLEMENTED, path
    assert label_sets(scrape(shared_server.metrics_port)) == before
    still_serves(channel)


def exchange(port, payload, *, close=True):
    """Send ``payload`` to ``port`` and read what comes back until it closes."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(payload)
        if close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
    return received


def test_garbage_on_the_grpc_port_is_dropped(shared_server, channel):
    rng = random.Random(7)
    # grpcio closes a connection that does not open with the HTTP/2 preface.
    for payload in (
        rng.randbytes(4096),
        b"GET /metrics HTTP/1.1\r\nHost: calcsvc\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(512),
    ):
        assert b"calc" not in exchange(shared_server.port, payload, close=False)
        still_serves(channel)


def test_a_half_open_connection_blocks_neither_port(shared_server, channel):
    with (
        socket.create_connection((HOST, shared_server.port)) as grpc_half,
        socket.create_connection((HOST, shared_server.metrics_port)) as http_half,
    ):
        grpc_half.sendall(b"PRI * HTTP/2.0\r\n")
        http_half.sendall(b"GET /metr")
        still_serves(channel)
        assert scrape(shared_server.metrics_port).value(
            "calcsvc_server_serving", service=""
        )


def test_garbage_on_the_metrics_port_gets_a_4xx_and_scrapes_go_on(shared_server):
    rng = random.Random(11)
    for payload in (
        b"\x16\x03\x01" + rng.randbytes(600),
        b"BREW /pot HTCPCP/1.0\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n" + b"X: y\r\n" * 200,
    ):
        answer = exchange(shared_server.metrics_port, payload)
        assert re.search(rb"Error code explanation: 4\d\d", answer), answer
    assert scrape(shared_server.metrics_port).value("calcsvc_server_serving") == 2


def test_calls_past_the_stream_limit_wait_in_the_client(start_server):
    server = start_server(
        "--max-concurrent-streams", "1", "--inject-latency-ms", "10000"
    )
    request = calculator_pb2.BinaryRequest(a=1, b=1).SerializeToString()
    with grpc.insecure_channel(server.target) as channel:
        first = raw(channel, "Add").future(request, timeout=20)
        wait_until(
            lambda: (
                scrape(server.metrics_port).value(
                    "grpc_server_started_total", grpc_method="Add"
                )
                == 1
            )
        )
        # The connection's one stream is taken: the second call never
        # reaches the server before its deadline.
        error = refused(raw(channel, "Subtract"), request, timeout=0.5)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        metrics = scrape(server.metrics_port)
        assert metrics.value("grpc_server_started_total", grpc_method="Subtract") == 0
        first.cancel()
    server.kill()  # rather than wait for the first call's latency to pass
