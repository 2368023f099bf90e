"""Stamen: federated learning with Flower's API and wire format.

``import stamen as fl`` and Flower code that uses ``fl.client``, ``fl.server`` and
``fl.common`` runs unchanged.
"""

from __future__ import annotations

from . import client, common, errors, server
from .client import Client, NumPyClient, start_client
from .server import ServerConfig, start_server

__version__ = "0.1.0"

__all__ = [
    "Client",
    "NumPyClient",
    "ServerConfig",
    "__version__",
    "client",
    "common",
    "errors",
    "server",
    "start_client",
    "start_server",
]
