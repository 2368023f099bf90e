"""Client nodes: ``Client``, ``NumPyClient`` and ``start_client``."""

from __future__ import annotations

from .app import start_client
from .client import Client
from .numpy_client import NumPyClient

__all__ = ["Client", "NumPyClient", "start_client"]
