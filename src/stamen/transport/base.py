"""The one client transport interface.

The node's session loop talks to the server only through a :class:`ClientTransport`; it
never asks which transport it has. Adapters map their library's errors to
:mod:`stamen.errors` (``TransportError`` for a link that failed, which is retried;
anything else is final).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, cast, runtime_checkable

from ..messages import Instruction, Reply
from ..protocol.auth import RequestSigner
from ..wire import RefusedResult

__all__ = [
    "ClientTransport",
    "RefusalNotices",
    "TransportSettings",
    "default_max_model_bytes",
    "refusal_notice",
]


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - Linux and macOS have both
        return 1 << 62


def default_max_model_bytes(max_message_length: int) -> int:
    """A node's default bound of one incoming message, framed or not: half of this
    machine's physical memory, and never less than ``max_message_length`` (a message the
    node takes whole anyway). A model larger than half the memory could not be trained
    here: the received message, the client's arrays and the reply would not fit."""
    return max(max_message_length, _physical_memory() // 2)


@dataclass(frozen=True)
class TransportSettings:
    """What every client transport needs to reach a server.

    Attributes:
        address: ``host:port`` (rest also takes ``http(s)://host:port``).
        max_message_length: Bound of one message, both ways.
        secure: Use TLS.
        root_certificates: PEM of the CAs to trust (None: the system's).
        client_certificate: ``(certificate_chain, private_key)`` PEM for mutual TLS.
        signer: Signs every request (node authentication), or None.
        connect_timeout: Seconds to wait for a connection.
        max_model_bytes: Largest incoming message (an instruction put together from
            frames included) the node accepts; a frame that announces more is refused
            before anything is allocated. None: :func:`default_max_model_bytes`.
    """

    address: str
    max_message_length: int
    secure: bool = False
    root_certificates: bytes | None = None
    client_certificate: tuple[bytes, bytes] | None = None
    signer: RequestSigner | None = None
    connect_timeout: float = 10.0
    max_model_bytes: int | None = None

    @property
    def model_bound(self) -> int:
        """The bound of one incoming message: ``max_model_bytes`` or its default."""
        if self.max_model_bytes is not None:
            return self.max_model_bytes
        return default_max_model_bytes(self.max_message_length)


class ClientTransport(Protocol):
    """A link from a client node to a server."""

    @property
    def node_id(self) -> int:
        """The id the server knows this node by (``-1`` where the transport has none)."""
        ...

    def connect(self) -> None:
        """Open the link.

        Raises:
            ConnectError: the server could not be reached (retried by the caller).
        """
        ...

    def receive(self) -> Instruction:
        """Block until the server sends the next instruction.

        Raises:
            ConnectionLost: the link broke (retried by the caller).
            DecodeError, MessageTooLarge, AuthError: final errors.
        """
        ...

    def send(self, reply: Reply) -> None:
        """Send the reply to the last instruction."""
        ...

    def close(self, *, graceful: bool) -> None:
        """Close the link; ``graceful`` lets a last reply reach the server first.

        Never raises; safe to call more than once and before ``connect``.
        """
        ...


def refusal_notice(transport: object) -> RefusedResult | None:
    """The refusal notice that came with ``transport``'s last instruction, if it is a
    :class:`RefusalNotices` (asked by attribute: a runtime-checkable protocol's
    ``isinstance`` costs 8-26 us, paid on every instruction of every node)."""
    ask = getattr(transport, "refused_result", None)
    return None if ask is None else cast("RefusedResult | None", ask())


@runtime_checkable
class RefusalNotices(Protocol):
    """A transport that hands over what a Stamen server tells the node beside an
    instruction (``ServerMessage`` field 17, docs/protocol.md). Optional: the node's loop
    asks a transport that has it after each :meth:`ClientTransport.receive`."""

    def refused_result(self) -> RefusedResult | None:
        """The notice that came with the last instruction received: the server refused
        this node's fit result of a round, and why; None if there was none."""
        ...
