"""Server: ``start_server``, ``Server``, ``ServerConfig``, ``ClientManager``, ``History``,
``ServerApp`` and ``ServerAppComponents``."""

from __future__ import annotations

from . import strategy
from .app import start_server
from .client_manager import ClientManager, SimpleClientManager
from .client_proxy import ClientProxy
from .history import History
from .server import Server, ServerConfig
from .server_app import Driver, ServerApp, ServerAppComponents

__all__ = [
    "ClientManager",
    "ClientProxy",
    "Driver",
    "History",
    "Server",
    "ServerApp",
    "ServerAppComponents",
    "ServerConfig",
    "SimpleClientManager",
    "start_server",
    "strategy",
]
