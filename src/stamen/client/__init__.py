"""Client nodes: ``Client``, ``NumPyClient``, ``start_client`` and ``ClientApp``."""

from __future__ import annotations

from . import mod as mod
from .app import start_client
from .client import Client
from .client_app import ClientApp, ClientFnExt
from .deprecated import start_numpy_client
from .dispatch import ClientFn
from .numpy_client import NumPyClient

__all__ = [
    "Client",
    "ClientApp",
    "ClientFn",
    "ClientFnExt",
    "NumPyClient",
    "start_client",
    "start_numpy_client",
]
