"""Server: ``start_server``, ``Server``, ``ServerConfig``, ``ClientManager``, ``History``."""

from __future__ import annotations

from . import strategy
from .app import start_server
from .client_manager import ClientManager, SimpleClientManager
from .client_proxy import ClientProxy
from .history import History
from .server import Server, ServerConfig

__all__ = [
    "ClientManager",
    "ClientProxy",
    "History",
    "Server",
    "ServerConfig",
    "SimpleClientManager",
    "start_server",
    "strategy",
]
