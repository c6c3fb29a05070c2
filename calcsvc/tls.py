"""TLS and mutual TLS for the gRPC port and ``/metrics``, from PEM files.

The files are read and checked once, when a server or a client is set up,
so a missing file, a key that does not match its certificate or a file that
is not PEM is named in a clear error before anything listens or connects.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from pathlib import Path


class TlsConfigError(ValueError):
    """A TLS file is missing, unreadable, or not what it should be."""


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsConfigError(
            f"cannot read the {what} {str(path)!r}: {error.strerror}"
        ) from None


def _check_pair(cert: Path, key: Path) -> None:
    """Check that ``cert`` and ``key`` are PEM and belong together."""
    _read(cert, "TLS certificate")
    _read(key, "TLS key")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except ssl.SSLError:
        raise TlsConfigError(
            f"the TLS certificate {str(cert)!r} and key {str(key)!r} are not a "
            "PEM certificate and its private key"
        ) from None


def _check_ca(ca: Path) -> bytes:
    """Return the PEM certificates in ``ca``, checked."""
    pem = _read(ca, "CA certificate file")
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise TlsConfigError(
            f"the CA certificate file {str(ca)!r} holds no PEM certificate"
        ) from None
    return pem


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key, and the CA its clients must prove.

    With ``client_ca`` every client must present a certificate that CA
    signed (mutual TLS); without it any client may connect, as over TLS on
    the web.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def check(self) -> None:
        """Read and check the files.

        Raises:
            TlsConfigError: a file is missing or unreadable, the key does not
                match the certificate, or a file is not PEM.

        """
        _check_pair(self.cert, self.key)
        if self.client_ca is not None:
            _check_ca(self.client_ca)

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Return the credentials of a gRPC port that serves these files."""
        _check_pair(self.cert, self.key)
        client_ca = None if self.client_ca is None else _check_ca(self.client_ca)
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """Return a server context for ``/metrics`` that serves these files."""
        self.check()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass(frozen=True)
class ClientTls:
    """The CA a client trusts, and its own certificate for mutual TLS.

    Without ``ca`` the system's trusted CAs verify the server. ``cert`` and
    ``key`` go together: a server that requires client certificates refuses
    a client without them.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        """Refuse a certificate without its key, or a key without its certificate."""
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError(
                "a client certificate and its key go together: give both or neither"
            )

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        """Return channel credentials for these files.

        Raises:
            TlsConfigError: a file is missing, unreadable or not PEM, or the
                key does not match the certificate.

        """
        ca = None if self.ca is None else _check_ca(self.ca)
        if self.cert is None or self.key is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        _check_pair(self.cert, self.key)
        return grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=_read(self.key, "TLS key"),
            certificate_chain=_read(self.cert, "TLS certificate"),
        )
