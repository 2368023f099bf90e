"""``host:port`` addresses: the one parser, for every transport and both sides."""

from __future__ import annotations

from ..errors import ConfigError

__all__ = ["parse_address", "strip_scheme"]


def parse_address(address: object, *, field: str = "server_address") -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` into ``(host, port)``.

    Args:
        address: The address to split.
        field: The argument's name, for the error message.

    Raises:
        ConfigError: not a string of that form with a port in 0..65535 (an IPv6 address
            without brackets is refused: its port cannot be told apart).
    """
    if not isinstance(address, str):
        raise ConfigError(f"{field}: expected 'host:port', received {type(address).__name__}")
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address without brackets is ambiguous
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(
            f"{field}: expected 'host:port' or '[ipv6]:port' with a port in 0..65535, "
            f"received {address!r}"
        )
    return host, int(port_text)


def strip_scheme(address: str) -> tuple[str, str]:
    """Split ``scheme://host:port/`` into ``(scheme, "host:port")``; scheme ``""`` if none."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        return "", address
    return scheme, rest.rstrip("/")
