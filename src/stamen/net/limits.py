"""Message size bounds shared by client and server."""

from __future__ import annotations

__all__ = ["GRPC_MAX_MESSAGE_LENGTH", "grpc_message_options"]

GRPC_MAX_MESSAGE_LENGTH = 536_870_912
"""Default bound of one gRPC message, in bytes (512 MiB), as in Flower."""


def grpc_message_options(max_message_length: int) -> list[tuple[str, int]]:
    """The gRPC channel/server options that bound one message to ``max_message_length``
    bytes, both ways."""
    return [
        ("grpc.max_send_message_length", max_message_length),
        ("grpc.max_receive_message_length", max_message_length),
    ]
