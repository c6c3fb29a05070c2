"""A server drains under load: no call is lost, and none is answered wrongly.

Many clients, each a thread with a channel of its own, call a slow server
without pause. SIGTERM arrives while calls are in flight. Health must turn
NOT_SERVING before the listener closes, every call the server received must
end with its right answer, and every call it did not receive must end with
UNAVAILABLE, which a client may retry elsewhere. Each client stops at its
first refused call, so the counts must come out exactly.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from calcsvc._generated.calc.v1 import calculator_pb2, calculator_pb2_grpc
from calcsvc.calculator import SERVICE_NAME
from tests.support import HOST, logged_events, scrape, wait_until

CLIENTS = 16
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module", params=["threaded", "aio"])
def server_flags(request):
    return ["--aio"] if request.param == "aio" else ["--workers", str(2 * CLIENTS)]


class Client(threading.Thread):
    """Calls Add without pause on its own channel, until a call fails."""

    def __init__(self, number, target):
        super().__init__(name=f"client-{number}", daemon=True)
        self.number = number
        self.target = target
        # (start, end, a, b, value or None, status code's name) for each call
        self.calls = []

    def run(self):
        with grpc.insecure_channel(self.target) as channel:
            add = calculator_pb2_grpc.CalculatorStub(channel).Add
            a = 0
            while True:
                a += 1
                start = time.monotonic()
                try:
                    reply = add(
                        calculator_pb2.BinaryRequest(a=a, b=self.number), timeout=20
                    )
                except grpc.RpcError as error:
                    self.calls.append(
                        (
                            start,
                            time.monotonic(),
                            a,
                            self.number,
                            None,
                            error.code().name,
                        )
                    )
                    return
                self.calls.append(
                    (start, time.monotonic(), a, self.number, reply.value, "OK")
                )


def watch_health(target, seen):
    """Note when the server's Watch stream first says NOT_SERVING."""
    with grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
        )
        for reply in watch:
            if reply.status == NOT_SERVING:
                seen["not_serving"] = time.monotonic()
                watch.cancel()  # an open stream would hold up the drain
                return
            seen["serving"] = time.monotonic()


def watch_listener(port, seen):
    """Note when a new connection to the port is first refused."""
    while True:
        try:
            socket.create_connection((HOST, port), timeout=5).close()
        except ConnectionRefusedError:
            seen["refused"] = time.monotonic()
            return
        time.sleep(0.005)  # the poll's interval


def test_sigterm_under_load_loses_no_call_and_answers_none_wrongly(
    start_server, tmp_path
):
    server = start_server(
        "--inject-latency-ms", "200", "--grace", "10", "--drain-delay", "0.5"
    )
    seen: dict[str, float] = {}
    watchers = [
        threading.Thread(target=watch_health, args=(server.target, seen), daemon=True),
        threading.Thread(target=watch_listener, args=(server.port, seen), daemon=True),
    ]
    for watcher in watchers:
        watcher.start()
    wait_until(lambda: "serving" in seen)
    clients = [Client(number, server.target) for number in range(CLIENTS)]
    for client in clients:
        client.start()
    wait_until(lambda: all(len(client.calls) >= 2 for client in clients))

    signalled = time.monotonic()
    server.signal(signal.SIGTERM)
    for thread in (*clients, *watchers):
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert server.process.wait(timeout=30) == 0

    calls = [call for client in clients for call in client.calls]
    codes = Counter(code for *_, code in calls)
    assert set(codes) == {"OK", "UNAVAILABLE"}
    assert codes["UNAVAILABLE"] == CLIENTS  # each client's last call, only
    assert codes["OK"] + codes["UNAVAILABLE"] == len(calls)
    assert all(value == a + b for _, _, a, b, value, code in calls if code == "OK")
    # Calls were in flight when the signal came, and they were answered.
    in_flight = [call for call in calls if call[0] < signalled < call[1]]
    assert len(in_flight) >= CLIENTS // 2
    assert all(code == "OK" for *_, code in in_flight)

    # Health said NOT_SERVING before the listener refused a connection, and
    # before any call was refused.
    first_refused = min(end for _, end, *_, code in calls if code == "UNAVAILABLE")
    assert signalled < seen["not_serving"] < seen["refused"]
    assert seen["not_serving"] < first_refused

    # The server received exactly the calls that were answered.
    events = logged_events(tmp_path / "server-0.log")
    drained = [event for event in events if event.startswith("drained ")]
    answered = codes["OK"]
    assert drained == [
        f"drained calls_received={answered} calls_answered={answered} calls_cut_off=0"
    ]
    assert events[-1] == "stopped"


def test_calls_cut_off_when_the_grace_runs_out_are_logged(start_server, tmp_path):
    server = start_server("--inject-latency-ms", "1500", "--grace", "0.2")
    with grpc.insecure_channel(server.target) as channel:
        add = calculator_pb2_grpc.CalculatorStub(channel).Add
        pending = add.future(calculator_pb2.BinaryRequest(a=1, b=2), timeout=20)
        wait_until(
            lambda: (
                scrape(server.metrics_port).value(
                    "grpc_server_started_total", grpc_service=SERVICE_NAME
                )
                == 1
            )
        )
        server.signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as cut_off:
            pending.result()
    assert cut_off.value.code() is grpc.StatusCode.UNAVAILABLE
    assert server.process.wait(timeout=30) == 0
    events = logged_events(tmp_path / "server-0.log")
    assert "drained calls_received=1 calls_answered=0 calls_cut_off=1" in events
