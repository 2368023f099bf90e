"""Client transports behind one interface, :class:`ClientTransport`, and their registry.

The registry is the one place a transport is added: a name and a factory
``TransportSettings -> ClientTransport``. ``start_client(transport=...)`` and the
conformance suite (:mod:`stamen.testing.conformance`) find transports here, so a new one
needs one :func:`register_transport` call and no other edit (docs/transports.md)::

    from stamen.transport import register_transport

    register_transport("my-transport", MyTransport)  # or "my_package.module:MyTransport"

The built-in transports are registered by dotted path and imported on first use:
importing this package loads neither grpc nor an HTTP client library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._registry import (
    BUILT_IN_TRANSPORTS,
    TransportFactory,
    make_transport,
    register_transport,
    transport_factory,
    transport_names,
    transport_url_schemes,
    unregister_transport,
)
from .base import ClientTransport, TransportSettings

if TYPE_CHECKING:
    from .grpc_bidi import GrpcBidiTransport

__all__ = [
    "BUILT_IN_TRANSPORTS",
    "ClientTransport",
    "GrpcBidiTransport",
    "TransportFactory",
    "TransportSettings",
    "make_transport",
    "register_transport",
    "transport_factory",
    "transport_names",
    "transport_url_schemes",
    "unregister_transport",
]


def __getattr__(name: str) -> Any:
    """``GrpcBidiTransport`` is imported on first use (it loads grpc)."""
    if name == "GrpcBidiTransport":
        from .grpc_bidi import GrpcBidiTransport

        return GrpcBidiTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
