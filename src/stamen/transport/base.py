"""The one client transport interface.

The node's session loop talks to the server only through a :class:`ClientTransport`; it
never asks which transport it has. Adapters map their library's errors to
:mod:`stamen.errors` (``TransportError`` for a link that failed, which is retried;
anything else is final).
"""

from __future__ import annotations

from typing import Protocol

from ..messages import Instruction, Reply

__all__ = ["ClientTransport"]


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
