"""Client transports behind one interface, :class:`ClientTransport`."""

from __future__ import annotations

from .base import ClientTransport
from .grpc_bidi import GrpcBidiTransport

__all__ = ["ClientTransport", "GrpcBidiTransport"]
