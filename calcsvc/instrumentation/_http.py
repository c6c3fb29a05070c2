"""The ``/metrics`` HTTP(S) endpoint, safe against clients that never finish.

prometheus_client's ``start_http_server`` runs each request on a thread of
its own, but with no timeout, and over HTTPS it shakes hands with a new
client on the one thread that accepts connections: one client that
connects and sends nothing then blocks every scrape after it. Here each
connection shakes hands on its own thread, and one that stays silent for
:data:`CONNECTION_TIMEOUT` seconds is closed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

CONNECTION_TIMEOUT = 10.0
"""Seconds a scrape's connection may stay silent before it is closed."""


class _Handler(WSGIRequestHandler):
    """Answers one connection, after its TLS handshake if it has one."""

    timeout = CONNECTION_TIMEOUT

    def setup(self) -> None:
        """Apply the timeout, then shake hands on this connection's own thread."""
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Log nothing per request: a scrape a second would flood the log."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """Serves ``/metrics`` from a registry, one thread per connection."""

    daemon_threads = True
    # start_metrics_server picks the family of the host it binds, so that an
    # IPv6 address works too.
    address_family = socket.AF_INET

    def handle_error(
        self,
        request: socket.socket | tuple[bytes, socket.socket],  # noqa: ARG002 - socketserver's signature
        client_address: object,
    ) -> None:
        """Log a failed connection (a bad handshake, a timeout) quietly."""
        log.debug("metrics connection failed client=%s", client_address)


def start_metrics_server(
    registry: CollectorRegistry,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` of ``registry`` on ``host:port``, over HTTPS with a context.

    Raises:
        OSError: the port is in use or the host is not available.

    """
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class _Server(MetricsServer):
        address_family = family

    httpd = make_server(
        str(address[0]), port, make_wsgi_app(registry), _Server, _Handler
    )
    if ssl_context is not None:
        # The handshake waits for the client: it happens on the
        # connection's own thread, in the handler, not in accept().
        httpd.socket = ssl_context.wrap_socket(
            httpd.socket, server_side=True, do_handshake_on_connect=False
        )
    threading.Thread(
        target=httpd.serve_forever, name="calcsvc-metrics", daemon=True
    ).start()
    return httpd
