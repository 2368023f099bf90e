"""Deprecated Flower entry points kept for old code: ``start_numpy_client``."""

from __future__ import annotations

import logging
import threading

from ..errors import ConfigError
from .app import GRPC_MAX_MESSAGE_LENGTH, start_client
from .numpy_client import NumPyClient

__all__ = ["start_numpy_client"]

_logger = logging.getLogger("stamen.client")

_warned = threading.Event()

_DEPRECATION = (
    "start_numpy_client() is deprecated (as in Flower since 1.7): call "
    "start_client(server_address=..., client=YourNumPyClient().to_client()) instead"
)


def start_numpy_client(
    *,
    server_address: str,
    client: NumPyClient,
    grpc_max_message_length: int = GRPC_MAX_MESSAGE_LENGTH,
    root_certificates: bytes | str | None = None,
    insecure: bool | None = None,
    transport: str | None = None,
) -> None:
    """Start a node serving ``client``: ``start_client(client=client.to_client(), ...)``.

    Deprecated, as in Flower 1.12, which logs a WARNING on every call; Stamen logs it once
    per process (on the ``stamen.client`` logger, like Flower: a log record, not a
    Python warning).

    Args:
        server_address: ``host:port`` of the server.
        client: The NumPyClient.
        grpc_max_message_length: Largest message sent or received, in bytes.
        root_certificates: PEM bytes or the path of a PEM file of the CAs to trust.
        insecure: True for plaintext, False for TLS (see :func:`start_client`).
        transport: ``"grpc-bidi"`` (default), ``"grpc-rere"`` or ``"rest"``.

    Raises:
        ConfigError: ``client`` is not a NumPyClient, or any error of :func:`start_client`.
    """
    if not _warned.is_set():
        _warned.set()
        _logger.warning("%s", _DEPRECATION)
    if not isinstance(client, NumPyClient):
        raise ConfigError(
            f"client: expected a NumPyClient, received {type(client).__name__} (for a Client, "
            "call start_client(client=...))"
        )
    start_client(
        server_address=server_address,
        client=client.to_client(),
        grpc_max_message_length=grpc_max_message_length,
        root_certificates=root_certificates,
        insecure=insecure,
        transport=transport,
    )
