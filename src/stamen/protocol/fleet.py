"""The Fleet protocol of the grpc-rere and rest transports (sans-IO definitions).

A node registers, long-polls for instructions, pushes replies, sends heartbeats while it
is busy, and unregisters. Both transports carry the same messages (see
``wire/proto/stamen_fleet.proto``) and report the same errors, each as its own status:
one table, :data:`ERRORS`, maps an error kind to its gRPC status name, its HTTP status
and the Stamen exception a client raises for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import (
    AuthError,
    ConnectionLost,
    ErrorKind,
    FleetError,
    MessageTooLarge,
    NodeUnknown,
    ProtocolError,
    StamenError,
    VersionMismatch,
)

if TYPE_CHECKING:
    from .mailbox import Payload

__all__ = [
    "ERRORS",
    "PROTOCOL_VERSION",
    "CreateNodeRequest",
    "CreateNodeResponse",
    "ErrorKind",
    "FleetError",
    "NodeUnknown",
    "PullRequest",
    "PullResponse",
    "PushRequest",
    "SimpleRequest",
]

PROTOCOL_VERSION = 2
"""Version of the Fleet protocol spoken by this release (2: instructions and replies in frames)."""


@dataclass(frozen=True)
class ErrorSpec:
    """How one error kind travels on each transport, and what a client raises for it."""

    grpc_status: str
    http_status: int
    exception: type[StamenError]


ERRORS: dict[ErrorKind, ErrorSpec] = {
    ErrorKind.INVALID_ARGUMENT: ErrorSpec("INVALID_ARGUMENT", 400, ProtocolError),
    ErrorKind.UNKNOWN_NODE: ErrorSpec("NOT_FOUND", 404, NodeUnknown),
    ErrorKind.VERSION_MISMATCH: ErrorSpec("FAILED_PRECONDITION", 412, VersionMismatch),
    ErrorKind.TOO_LARGE: ErrorSpec("RESOURCE_EXHAUSTED", 413, MessageTooLarge),
    ErrorKind.UNAUTHENTICATED: ErrorSpec("UNAUTHENTICATED", 401, AuthError),
    ErrorKind.UNAVAILABLE: ErrorSpec("UNAVAILABLE", 503, ConnectionLost),
    # Retry later: gRPC clients retry UNAVAILABLE; HTTP's own code for it is 429.
    ErrorKind.RATE_LIMITED: ErrorSpec("UNAVAILABLE", 429, ConnectionLost),
}


@dataclass(frozen=True, slots=True)
class CreateNodeRequest:
    """Register a new node, whose messages are bounded by ``max_message_length`` bytes
    (0: no bound of its own)."""

    protocol_version: int = PROTOCOL_VERSION
    max_message_length: int = 0


@dataclass(frozen=True, slots=True)
class CreateNodeResponse:
    """The node's id and the server's timing parameters."""

    node_id: int
    heartbeat_interval: float
    poll_timeout: float
    max_message_length: int = 0


@dataclass(frozen=True, slots=True)
class SimpleRequest:
    """DeleteNode and Heartbeat: the header alone."""

    node_id: int
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class PullRequest:
    """Ask for the next instruction (held open up to ``poll_timeout``), or, with a
    ``task_id``, for the frame of that instruction that starts at ``offset``."""

    node_id: int
    task_id: int = 0
    offset: int = 0
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class PullResponse:
    """The next instruction, or ``task_id == 0`` when there was none in time.

    A server's response may carry its message as a payload (a frame of a large
    instruction as views of the model: ``Payload.frame_payload``), joined once when the
    response is encoded; a decoded response carries bytes.
    """

    task_id: int
    server_message: bytes | memoryview | Payload


@dataclass(frozen=True, slots=True)
class PushRequest:
    """The reply to the instruction ``task_id``."""

    node_id: int
    task_id: int
    client_message: bytes | memoryview
    protocol_version: int = PROTOCOL_VERSION
