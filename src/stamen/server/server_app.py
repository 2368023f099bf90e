"""``ServerApp`` and ``ServerAppComponents``: Flower 1.12's app object for a server.

A ``ServerApp`` says which Server, ServerConfig, Strategy and ClientManager run -- given
directly (``ServerApp(config=..., strategy=...)``) or built per run by
``server_fn(context) -> ServerAppComponents``. It runs in a simulation
(:func:`stamen.simulation.run_simulation`) or as a server (``stamen server module:app``,
which calls :func:`stamen.server.start_server` with the components).

Flower's low-level ``@app.main()`` (a function driving a ``Driver``) is not supported: it
raises :class:`NotImplementedError` naming what to use instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..context import Context
from ..errors import ConfigError
from ..records import RecordSet
from .client_manager import ClientManager
from .server import Server, ServerConfig
from .strategy import Strategy

__all__ = ["Driver", "ServerApp", "ServerAppComponents", "server_context"]


@dataclass
class ServerAppComponents:
    """What a ``server_fn`` returns: the parts of one run (each None: Flower's default).

    Attributes:
        server: The Server (default: one with ``strategy`` and ``client_manager``).
        config: Rounds and round timeout (default ``ServerConfig()``: 1 round).
        strategy: The strategy (default FedAvg).
        client_manager: The client manager (default ``SimpleClientManager``).
    """

    server: Server | None = None
    config: ServerConfig | None = None
    strategy: Strategy | None = None
    client_manager: ClientManager | None = None


def server_context(run_config: dict[str, bool | float | int | str] | None = None) -> Context:
    """The Context a ServerApp's ``server_fn`` receives: node 0, no node config, empty
    state, the run's config (``{}`` by default, as in Flower 1.12's simulation)."""
    return Context(node_id=0, node_config={}, state=RecordSet(), run_config=dict(run_config or {}))


def _check(name: str, value: object, expected: type) -> None:
    if value is not None and not isinstance(value, expected):
        raise ConfigError(
            f"{name}: expected a {expected.__name__} or None, received {type(value).__name__}"
        )


class ServerApp:
    """A server's application: the components of its runs, fixed or built per run.

    Args:
        server: A Server.
        config: A ServerConfig.
        strategy: A Strategy.
        client_manager: A ClientManager.
        server_fn: ``server_fn(context) -> ServerAppComponents``, called at the start of
            each run instead of giving the four above.

    Raises:
        ConfigError (a ValueError, as Flower's): ``server_fn`` given together with any of
            the other four, or an argument of the wrong type.
    """

    def __init__(
        self,
        server: Server | None = None,
        config: ServerConfig | None = None,
        strategy: Strategy | None = None,
        client_manager: ClientManager | None = None,
        server_fn: Callable[[Context], ServerAppComponents] | None = None,
    ) -> None:
        given = [
            name
            for name, value in (
                ("server", server),
                ("config", config),
                ("strategy", strategy),
                ("client_manager", client_manager),
            )
            if value is not None
        ]
        if server_fn is not None and given:
            raise ConfigError(
                f"ServerApp: expected either server_fn or the components, received both "
                f"server_fn and {', '.join(given)}; return them from server_fn in a "
                "ServerAppComponents"
            )
        if server_fn is not None and not callable(server_fn):
            raise ConfigError(
                f"server_fn: expected a callable server_fn(context), received "
                f"{type(server_fn).__name__}"
            )
        _check("server", server, Server)
        _check("config", config, ServerConfig)
        _check("strategy", strategy, Strategy)
        _check("client_manager", client_manager, ClientManager)
        self._components = ServerAppComponents(server, config, strategy, client_manager)
        self._server_fn = server_fn

    def components(self, context: Context) -> ServerAppComponents:
        """The components of a run: ``server_fn(context)``, or those given (Stamen).

        Raises:
            ConfigError: ``server_fn`` did not return a valid ServerAppComponents.
        """
        if self._server_fn is None:
            return self._components
        built: Any = self._server_fn(context)
        if not isinstance(built, ServerAppComponents):
            raise ConfigError(
                f"server_fn: expected it to return a ServerAppComponents, received "
                f"{type(built).__name__}"
            )
        _check("ServerAppComponents.server", built.server, Server)
        _check("ServerAppComponents.config", built.config, ServerConfig)
        _check("ServerAppComponents.strategy", built.strategy, Strategy)
        _check("ServerAppComponents.client_manager", built.client_manager, ClientManager)
        return built

    def main(self) -> Callable[[Callable[..., None]], Callable[..., None]]:
        """Not supported (Flower's Driver API): raises NotImplementedError."""
        raise NotImplementedError(
            "ServerApp.main(): Flower's low-level Driver API is not supported by Stamen. "
            "Use ServerApp(server_fn=...) returning ServerAppComponents(strategy=..., "
            "config=...), or ServerApp(strategy=..., config=...)."
        )


class Driver:
    """Flower's Driver API (messages sent by a ServerApp's ``main``): not supported.

    The name exists so that Flower code importing it loads; making one raises
    NotImplementedError naming what to use instead.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            "Driver: Flower's low-level Driver API is not supported by Stamen. Use "
            "ServerApp(server_fn=...) returning ServerAppComponents(strategy=..., config=...); "
            "the Server runs the rounds."
        )
