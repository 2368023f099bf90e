"""TLS material and diagnosis, in one place for every transport and both sides.

grpc is imported when gRPC credentials are built, not with this module: validating a
node's PEM arguments loads no gRPC.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, TLSError
from .address import parse_address, strip_scheme

if TYPE_CHECKING:
    import grpc

__all__ = [
    "channel_credentials",
    "client_ssl_context",
    "diagnose_tls",
    "load_pem",
    "pem_files",
    "server_credentials",
]


def load_pem(name: str, value: bytes | str) -> bytes:
    """Return PEM bytes given as bytes or as a path string.

    Raises:
        ConfigError: the path does not exist or cannot be read, or the value is neither
            bytes nor str.
    """
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        try:
            return Path(value).read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"{name}: expected PEM bytes or the path of a readable PEM file, "
                f"received path {value!r} ({exc.strerror})"
            ) from exc
    raise ConfigError(f"{name}: expected bytes or a path str, received {type(value).__name__}")


@contextlib.contextmanager
def pem_files(*pems: bytes) -> Iterator[list[str]]:
    """Write PEM blobs to private (0600) temporary files for libraries that read only
    files; the files are deleted on exit."""
    folder = tempfile.mkdtemp(prefix="stamen-tls-")
    try:
        paths = []
        for index, pem in enumerate(pems):
            path = os.path.join(folder, f"{index}.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
            paths.append(path)
        yield paths
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def channel_credentials(
    root_certificates: bytes | None, client_certificate: tuple[bytes, bytes] | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials of a client channel; ``None`` roots trust the system's CA store.

    ``client_certificate`` is ``(certificate_chain, private_key)`` PEM, for mutual TLS.
    """
    import grpc

    cert, key = client_certificate if client_certificate is not None else (None, None)
    return grpc.ssl_channel_credentials(
        root_certificates=root_certificates, private_key=key, certificate_chain=cert
    )


def client_ssl_context(
    root_certificates: bytes | None, client_certificate: tuple[bytes, bytes] | None = None
) -> ssl.SSLContext:
    """An ``ssl`` client context (system CAs when ``root_certificates`` is None)."""
    cadata = None if root_certificates is None else root_certificates.decode("ascii")
    context = ssl.create_default_context(cadata=cadata)
    if client_certificate is not None:
        with pem_files(*client_certificate) as (cert_path, key_path):
            context.load_cert_chain(cert_path, key_path)
    return context


def server_credentials(
    certificates: tuple[bytes, bytes, bytes], *, require_client_certificate: bool = False
) -> grpc.ServerCredentials:
    """TLS credentials of a server from ``(ca_cert, server_cert, server_key)`` PEM bytes.

    With ``require_client_certificate``, clients must present a certificate signed by
    ``ca_cert`` (mutual TLS).
    """
    if not (isinstance(certificates, tuple) and len(certificates) == 3):
        raise ConfigError(
            "certificates: expected a tuple (ca_cert, server_cert, server_key) of PEM bytes, "
            f"received {type(certificates).__name__}"
        )
    import grpc

    ca_cert, server_cert, server_key = (
        load_pem(f"certificates[{i}]", v) for i, v in enumerate(certificates)
    )
    return grpc.ssl_server_credentials(
        ((server_key, server_cert),),
        root_certificates=ca_cert,
        require_client_auth=require_client_certificate,
    )


def diagnose_tls(
    address: str,
    *,
    secure: bool,
    root_certificates: bytes | None,
    client_certificate: tuple[bytes, bytes] | None = None,
    timeout: float = 5.0,
) -> TLSError | None:
    """After a failed connection, find out whether TLS is why; None if it is not.

    gRPC reports every handshake failure as "unavailable", indistinguishable from a
    server that is down, so without this a bad certificate would be retried forever.
    This opens one TCP connection and tries the handshake with Python's ``ssl``.
    """
    try:
        host, port = parse_address(strip_scheme(address)[1])
        sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ConfigError):
        return None  # unreachable: not a TLS problem
    with sock:
        if secure:
            return _probe_secure(sock, host, address, root_certificates, client_certificate)
        return _probe_plaintext(sock, address)


class _PeerClosed(Exception):
    """The peer closed or reset the TCP connection."""


class _TLSOverSocket:
    """A TLS client driven over a plain socket through memory BIOs.

    ``ssl.SSLContext.wrap_socket`` takes the socket's descriptor over and, when the peer
    resets the connection at the wrong moment, raises without closing the ``SSLSocket``
    it made (a leaked descriptor and a ResourceWarning later, in whatever code the
    garbage collector interrupts). Here the caller's socket stays the only owner of the
    descriptor, and every read is bounded by the socket's timeout.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str | None) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self._sock.sendall(pending)

    def _receive(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise _PeerClosed
        self._incoming.write(data)

    def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    self._flush()  # our alert tells the server why we hang up
                raise
            else:
                self._flush()  # our Finished message
                return

    def read_one(self) -> bytes:
        """Read one byte of application data; b"" if the peer closes."""
        while True:
            try:
                return self._tls.read(1)
            except ssl.SSLWantReadError:
                self._flush()
                try:
                    self._receive()
                except _PeerClosed:
                    return b""
            except ssl.SSLZeroReturnError:
                return b""


def _probe_secure(
    sock: socket.socket,
    host: str,
    address: str,
    roots: bytes | None,
    client_certificate: tuple[bytes, bytes] | None,
) -> TLSError | None:
    context = client_ssl_context(roots, client_certificate)
    context.set_alpn_protocols(["h2", "http/1.1"])
    tls = _TLSOverSocket(sock, context, host)
    try:
        tls.handshake()
        sock.settimeout(0.5)
        try:
            # TLS 1.3 servers refuse a client certificate after the handshake: with an
            # alert, or by hanging up before sending anything.
            hung_up = tls.read_one() == b""
        except TimeoutError:
            hung_up = False
        if hung_up:
            if client_certificate is None:
                return TLSError(
                    f"TLS with {address}: the server hung up after the handshake: it "
                    "requires a client certificate (mutual TLS): pass client_certificates"
                )
            return TLSError(
                f"TLS with {address}: the server hung up after the handshake: it does "
                "not accept our client certificate (is it signed by the server's CA?)"
            )
    except ssl.SSLCertVerificationError as exc:
        return TLSError(
            f"TLS with {address}: the server's certificate is not accepted: "
            f"{exc.verify_message} (check root_certificates and the address's host name)"
        )
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
            return TLSError(
                f"TLS with {address}: the server requires a client certificate signed by its "
                "CA (mutual TLS): pass client_certificates"
            )
        if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET" in reason:
            return TLSError(
                f"TLS with {address}: the server does not speak TLS (plaintext server?); "
                "connect with insecure=True or give the server certificates"
            )
        return TLSError(f"TLS with {address} failed: {exc.reason or exc}")
    except (_PeerClosed, OSError):
        return None  # closed or reset during the handshake: not a TLS problem
    return None


def _probe_plaintext(sock: socket.socket, address: str) -> TLSError | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    try:
        # Only a completed handshake proves the server speaks TLS.
        _TLSOverSocket(sock, context, None).handshake()
    except (_PeerClosed, ssl.SSLError, OSError):
        return None
    return TLSError(
        f"{address} speaks TLS but the node connects in plaintext: pass root_certificates "
        "(or insecure=False to trust the system's CAs)"
    )
