"""Argument checks shared by the strategies' constructors (errors name field and value)."""

from __future__ import annotations

import math

from ...errors import ConfigError

__all__ = ["check_count", "check_fraction", "check_number"]


def check_fraction(name: str, value: float) -> None:
    """Raise ConfigError unless ``value`` is a number in [0, 1]."""
    check_number(name, value, minimum=0.0, maximum=1.0)


def check_count(name: str, value: int, minimum: int = 0) -> None:
    """Raise ConfigError unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: expected an int >= {minimum}, received {value!r}")


def check_number(
    name: str,
    value: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
) -> None:
    """Raise ConfigError unless ``value`` is a finite int or float within the bounds."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and (minimum is None or (value > minimum if exclusive_minimum else value >= minimum))
        and (maximum is None or (value < maximum if exclusive_maximum else value <= maximum))
    )
    if not ok:
        low = "" if minimum is None else ("(" if exclusive_minimum else "[") + f"{minimum:g}"
        high = "" if maximum is None else f"{maximum:g}" + (")" if exclusive_maximum else "]")
        expected = f"a number in {low or '(-inf'}, {high or 'inf)'}"
        raise ConfigError(f"{name}: expected {expected}, received {value!r}")
