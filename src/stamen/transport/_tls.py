"""TLS material, built in one place for every transport."""

from __future__ import annotations

from pathlib import Path

import grpc

from ..errors import ConfigError

__all__ = ["channel_credentials", "load_pem", "server_credentials"]


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


def channel_credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials:
    """TLS credentials of a client channel; ``None`` trusts the system's CA store."""
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def server_credentials(certificates: tuple[bytes, bytes, bytes]) -> grpc.ServerCredentials:
    """TLS credentials of a server from ``(ca_cert, server_cert, server_key)`` PEM bytes."""
    if not (isinstance(certificates, tuple) and len(certificates) == 3):
        raise ConfigError(
            "certificates: expected a tuple (ca_cert, server_cert, server_key) of PEM bytes, "
            f"received {type(certificates).__name__}"
        )
    ca_cert, server_cert, server_key = (
        load_pem(f"certificates[{i}]", v) for i, v in enumerate(certificates)
    )
    return grpc.ssl_server_credentials(
        ((server_key, server_cert),), root_certificates=ca_cert, require_client_auth=False
    )
