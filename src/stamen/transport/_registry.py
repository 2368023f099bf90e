"""The transport registry (see :mod:`stamen.transport`)."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias

from ..errors import ConfigError
from .base import ClientTransport, TransportSettings

__all__ = [
    "BUILT_IN_TRANSPORTS",
    "TransportFactory",
    "make_transport",
    "register_transport",
    "transport_factory",
    "transport_names",
    "transport_url_schemes",
    "unregister_transport",
]

TransportFactory: TypeAlias = Callable[[TransportSettings], ClientTransport]
"""Builds a client transport from the node's settings (it connects later, in ``connect``)."""


@dataclass(frozen=True)
class _Registered:
    factory: TransportFactory | str
    url_schemes: tuple[str, ...]


_lock = threading.Lock()
_registry: dict[str, _Registered] = {}


def register_transport(
    name: str,
    factory: TransportFactory | str,
    *,
    url_schemes: Iterable[str] = (),
    replace: bool = False,
) -> None:
    """Make ``start_client(transport=name)`` build its transport with ``factory``.

    Args:
        name: The transport's name, as ``start_client``'s ``transport`` argument takes it.
        factory: ``TransportSettings -> ClientTransport``, or its dotted path
            ``"package.module:attribute"``, imported on first use.
        url_schemes: URL schemes ``server_address`` may start with for this transport
            (``("http", "https")`` for rest); by default only ``host:port``.
        replace: Replace a transport registered under ``name`` (else an error).

    Raises:
        ConfigError: an empty name, a factory that is neither callable nor
            ``"module:attribute"``, or a name already registered.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name: expected a non-empty str, received {name!r}")
    if isinstance(factory, str):
        module, sep, attribute = factory.partition(":")
        if not (module and sep and attribute):
            raise ConfigError(
                f"factory: expected a callable or 'package.module:attribute', received {factory!r}"
            )
    elif not callable(factory):
        raise ConfigError(
            f"factory: expected a callable or 'package.module:attribute', "
            f"received {type(factory).__name__}"
        )
    entry = _Registered(factory, tuple(url_schemes))
    with _lock:
        if name in _registry and not replace:
            raise ConfigError(f"transport {name!r} is already registered (pass replace=True)")
        _registry[name] = entry


def unregister_transport(name: str) -> None:
    """Remove a registered transport.

    Raises:
        ConfigError: no transport is registered under ``name``.
    """
    with _lock:
        removed = _registry.pop(name, None)
    if removed is None:
        raise _unknown(name)


def transport_names() -> tuple[str, ...]:
    """The registered transports' names, in the order they were registered."""
    with _lock:
        return tuple(_registry)


def _entry(name: object) -> _Registered:
    with _lock:
        entry = _registry.get(name) if isinstance(name, str) else None
    if entry is None:
        raise _unknown(name)
    return entry


def _unknown(name: object) -> ConfigError:
    return ConfigError(f"transport: expected one of {list(transport_names())}, received {name!r}")


def transport_url_schemes(name: str) -> tuple[str, ...]:
    """The URL schemes ``server_address`` may start with for transport ``name``.

    Raises:
        ConfigError: ``name`` is not a registered transport.
    """
    return _entry(name).url_schemes


def transport_factory(name: str) -> TransportFactory:
    """The factory of transport ``name``, its module imported now if it was registered by path.

    Raises:
        ConfigError: ``name`` is not a registered transport, or its path does not load.
    """
    factory = _entry(name).factory
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        try:
            loaded: TransportFactory = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"transport {name!r}: cannot load its factory {factory!r}: {exc}"
            ) from exc
        return loaded
    return factory


def make_transport(name: str, settings: TransportSettings) -> ClientTransport:
    """Build transport ``name`` for ``settings`` (it connects later, in ``connect``).

    Raises:
        ConfigError: ``name`` is not a registered transport.
    """
    return transport_factory(name)(settings)


BUILT_IN_TRANSPORTS = ("grpc-bidi", "grpc-rere", "rest")
"""The transports Stamen ships with (every one also served by ``start_server``)."""

register_transport("grpc-bidi", "stamen.transport.grpc_bidi:GrpcBidiTransport")
register_transport("grpc-rere", "stamen.transport.grpc_rere:grpc_rere_transport")
register_transport("rest", "stamen.transport.rest:rest_transport", url_schemes=("http", "https"))
