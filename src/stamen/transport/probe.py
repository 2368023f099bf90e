"""What answers at a server address: tell a wrong peer from a server that is down.

gRPC reports a peer that speaks another protocol (a plain HTTP/1 server, a TLS port
reached in plaintext, an SSH daemon) as "unavailable", like a server that is down, so a
node would retry it forever. After a failed connection, :func:`identify_peer` opens one
TCP connection, sends the HTTP/2 client preface with an empty SETTINGS frame (what every
gRPC client sends first) and reads the first bytes of the answer:

* an HTTP/2 SETTINGS frame: an HTTP/2 (gRPC) server -- not a wrong peer; the call itself
  will say more (a gRPC server without Stamen's or Flower's service answers
  ``UNIMPLEMENTED``, which the transports do not retry);
* ``HTTP/1.x ...`` (or a bare HTML page): an HTTP/1 server;
* a TLS record: a TLS server reached in plaintext;
* anything else: some other protocol, named by its first bytes.

Nothing, a refused connection or a timeout is not a finding (the server may be down or
starting): the caller retries as usual.
"""

from __future__ import annotations

import socket

from ..errors import ConfigError, ProtocolError, StamenError, TLSError
from ..net.address import parse_address, strip_scheme

__all__ = ["HTTP2_PREFACE", "identify_peer"]

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
"""The HTTP/2 connection preface and an empty SETTINGS frame."""

_READ = 256


def _first_bytes(sock: socket.socket) -> bytes:
    data = b""
    try:
        sock.sendall(HTTP2_PREFACE)
        while len(data) < 9:
            chunk = sock.recv(_READ)
            if not chunk:
                break
            data += chunk
    except OSError:  # reset or timed out: whatever arrived is all there is
        pass
    return data


def _printable(data: bytes) -> str:
    text = data[:40].decode("latin-1")
    return "".join(c if c.isprintable() else "." for c in text)


def identify_peer(address: str, *, timeout: float = 3.0) -> StamenError | None:
    """After a plaintext gRPC connection to ``address`` failed, the error that says it is
    a wrong peer (not retried), or None if nothing is wrong with what answers there.

    Returns:
        ``ProtocolError`` for an HTTP/1 server or another protocol, ``TLSError`` for a TLS
        server, None for an HTTP/2 server, no answer, or no server at all.
    """
    try:
        host, port = parse_address(strip_scheme(address)[1])
        sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ConfigError):
        return None
    with sock:
        sock.settimeout(timeout)
        data = _first_bytes(sock)
    if not data:
        return None
    if len(data) >= 9 and data[3] == 0x04 and data[4] in (0, 1):  # an HTTP/2 SETTINGS frame
        return None
    if data.startswith(b"HTTP/") or data.lstrip()[:9].lower() in (b"<!doctype", b"<html>"):
        # (an HTTP/1 server may answer an HTTP/2.0 request line as HTTP/0.9: a bare page)
        status = data.split(b"\r\n", 1)[0][:60].decode("latin-1", "replace")
        return ProtocolError(
            f"{address} is an HTTP/1 server, not a gRPC server: it answered {status!r} "
            "(wrong port? a rest server is reached with --transport rest and http://)"
        )
    if data[0] in (0x15, 0x16) and data[1:2] == b"\x03":  # a TLS alert or handshake record
        return TLSError(
            f"{address} speaks TLS but the node connects in plaintext: pass "
            "root_certificates (or insecure=False to trust the system's CAs)"
        )
    return ProtocolError(
        f"{address} does not speak gRPC (HTTP/2): it answered {_printable(data)!r}"
    )
