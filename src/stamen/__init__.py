"""Stamen: federated learning with Flower's API and wire format.

``import stamen as fl`` and Flower code that uses ``fl.client``, ``fl.server``,
``fl.common`` and ``fl.simulation`` runs unchanged. Subpackages load on first use, so
``import stamen.wire`` or ``import stamen.protocol`` loads no network library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ClientApp",
    "NumPyClient",
    "ServerApp",
    "ServerConfig",
    "__version__",
    "client",
    "common",
    "errors",
    "server",
    "simulation",
    "start_client",
    "start_server",
]

_SUBMODULES = {"client", "common", "errors", "server", "simulation"}
_NAMES = {
    "Client": "client",
    "ClientApp": "client",
    "NumPyClient": "client",
    "ServerApp": "server",
    "start_client": "client",
    "ServerConfig": "server",
    "start_server": "server",
}

if TYPE_CHECKING:
    from . import client, common, errors, server, simulation
    from .client import Client, ClientApp, NumPyClient, start_client
    from .server import ServerApp, ServerConfig, start_server


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'stamen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
