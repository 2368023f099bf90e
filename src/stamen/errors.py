"""The one exception tree of Stamen.

Every error Stamen raises on purpose derives from :class:`StamenError`. Errors of the
libraries underneath (grpc, protobuf, sockets) are translated at the boundary with
``raise ... from exc``, so callers only ever catch these::

    StamenError
    ├── ConfigError (ValueError)          bad arguments; raised before any I/O
    ├── TransportError                    the link to the peer failed; the ONLY retried family
    │   ├── ConnectError                  could not reach the peer (also: gave up retrying)
    │   │   └── TLSError                  TLS failed (untrusted, wrong host, mismatch): NOT retried
    │   ├── ConnectionLost                an established session broke
    │   │   └── NodeUnknown               the server forgot this node: register again
    │   └── Timeout (TimeoutError)        a bounded wait ran out
    ├── ProtocolError                     the peer answered, but not as the protocol says
    │   ├── DecodeError (ValueError)      bytes that are not a valid message
    │   ├── MessageTooLarge               a message over ``grpc_max_message_length``
    │   ├── VersionMismatch               the peer speaks another protocol version
    │   └── InvalidResult                 a client's result a strategy refused (a failure)
    ├── FleetError                        a Fleet server refuses a request (server side;
    │                                     its ``kind``, an :class:`ErrorKind`, picks the status)
    ├── AuthError                         credentials rejected; never retried
    ├── ClientAppError                    user code in a client raised
    └── RunError                          a server run cannot go on
        └── NotEnoughClients (TimeoutError)  too few clients connected in time

``TransportError`` is the only family the client retries, and only where its ``retryable``
is true (a :class:`TLSError` is not: the same certificate fails the same way again);
anything else means that trying again cannot help.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

__all__ = [
    "AuthError",
    "ClientAppError",
    "ConfigError",
    "ConnectError",
    "ConnectionLost",
    "DecodeError",
    "ErrorKind",
    "FleetError",
    "InvalidResult",
    "MessageTooLarge",
    "NodeUnknown",
    "NotEnoughClients",
    "ProtocolError",
    "RunError",
    "StamenError",
    "TLSError",
    "Timeout",
    "TransportError",
    "VersionMismatch",
]


class StamenError(Exception):
    """Base class of every error Stamen raises on purpose."""


class ConfigError(StamenError, ValueError):
    """An argument or configuration value is invalid; raised before any I/O."""


class TransportError(StamenError):
    """The link to the peer failed. The only family of errors that is retried."""

    retryable: bool = True


class ConnectError(TransportError):
    """The peer could not be reached, or reconnection was given up."""


class TLSError(ConnectError):
    """The TLS handshake failed: an untrusted certificate, a wrong hostname, a missing
    client certificate, or one side speaking TLS and the other plaintext. Not retried."""

    retryable = False


class ConnectionLost(TransportError):
    """An established session with the peer broke."""


class NodeUnknown(ConnectionLost):
    """The server does not know this node (it restarted, or dropped the node): register again."""


class Timeout(TransportError, TimeoutError):
    """A bounded wait ran out."""


class ProtocolError(StamenError):
    """The peer answered, but not as the protocol says. Not retried."""


class DecodeError(ProtocolError, ValueError):
    """Bytes that do not decode to a valid message."""


class MessageTooLarge(ProtocolError):
    """A message is larger than the configured maximum message length."""


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the protocol."""


class InvalidResult(ProtocolError):
    """A client's result that a strategy refused; it counts as a failure of the round.

    Attributes:
        proxy: The client that sent it (a ``ClientProxy``).
        result: The refused ``FitRes`` or ``EvaluateRes``.
        reason: Why it was refused.
    """

    def __init__(self, proxy: Any, result: Any, reason: str) -> None:
        super().__init__(f"result of client {proxy.cid} refused: {reason}")
        self.proxy = proxy
        self.result = result
        self.reason = reason


class ErrorKind(Enum):
    """Errors a Fleet server reports (``stamen.protocol.fleet.ERRORS`` maps each to its
    gRPC status, its HTTP status and the exception a node raises for it)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNKNOWN_NODE = "UNKNOWN_NODE"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    TOO_LARGE = "TOO_LARGE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNAVAILABLE = "UNAVAILABLE"
    RATE_LIMITED = "RATE_LIMITED"


class FleetError(StamenError):
    """An error a Fleet server returns to the node (server side).

    Attributes:
        kind: What went wrong; the transport adapter maps it to its own status.
        message: The text sent to the node.
    """

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @classmethod
    def from_decode(cls, exc: DecodeError) -> FleetError:
        """The error for a request that did not decode."""
        return cls(ErrorKind.INVALID_ARGUMENT, str(exc))


class AuthError(StamenError):
    """The peer rejected our credentials, or we rejected theirs. Not retried."""


class ClientAppError(StamenError):
    """User code inside a client raised; the message says which method and why."""


class RunError(StamenError):
    """A server run cannot go on."""


class NotEnoughClients(RunError, TimeoutError):
    """Fewer clients than required connected within the allowed time."""
