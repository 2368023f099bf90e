"""``StrategyState``: what a strategy must save to resume exactly where it stopped.

A strategy's state (FedAvgM's momentum, the FedOpt moments, an adaptive clipping norm, ...)
is split into two plain parts that a checkpoint can write without pickle:

* ``arrays``: named lists of NumPy arrays of non-object dtypes, saved as ``.npy`` files
  (``allow_pickle=False``);
* ``values``: named JSON values (``bool``, ``int``, ``float``, ``str``, ``None`` and lists
  of them).

A wrapper strategy (the differential-privacy wrappers) stores the state of the strategy it
wraps under a prefix with :meth:`StrategyState.nest` and reads it back with
:meth:`StrategyState.unnest`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeAlias

import numpy as np

from ...errors import ConfigError
from ...typing import NDArrays

__all__ = ["JSONValue", "StrategyState"]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | None
"""A value that JSON represents exactly."""

_SEPARATOR = "/"


def _check_value(where: str, value: object) -> None:
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite float, received {value!r}")
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(f"{where}[{index}]", item)
        return
    raise ConfigError(
        f"{where}: expected bool, int, float, str, None or a list of them, "
        f"received {type(value).__name__}"
    )


@dataclass
class StrategyState:
    """The state of a strategy, in a form a checkpoint saves without pickle.

    Attributes:
        arrays: Named lists of arrays (non-object dtypes), e.g. ``{"m_t": [...]}``.
        values: Named JSON values, e.g. ``{"clipping_norm": 0.1}``.
    """

    arrays: dict[str, NDArrays] = field(default_factory=dict)
    values: dict[str, JSONValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, arrays in self.arrays.items():
            if not isinstance(name, str) or not isinstance(arrays, list):
                raise ConfigError(
                    f"StrategyState.arrays[{name!r}]: expected a str key and a list of "
                    f"arrays, received {type(arrays).__name__}"
                )
            for index, array in enumerate(arrays):
                if not isinstance(array, np.ndarray) or array.dtype.hasobject:
                    raise ConfigError(
                        f"StrategyState.arrays[{name!r}][{index}]: expected a numpy array "
                        f"of a non-object dtype, received {type(array).__name__}"
                    )
        for name, value in self.values.items():
            if not isinstance(name, str):
                raise ConfigError(f"StrategyState.values: expected str keys, received {name!r}")
            _check_value(f"StrategyState.values[{name!r}]", value)

    def is_empty(self) -> bool:
        """True if the state holds nothing (the state of a stateless strategy)."""
        return not self.arrays and not self.values

    def nest(self, prefix: str, inner: StrategyState) -> None:
        """Add ``inner``'s entries to this state under ``prefix + "/"``."""
        for name, arrays in inner.arrays.items():
            self.arrays[f"{prefix}{_SEPARATOR}{name}"] = arrays
        for name, value in inner.values.items():
            self.values[f"{prefix}{_SEPARATOR}{name}"] = value

    def unnest(self, prefix: str) -> tuple[StrategyState, StrategyState]:
        """Split into (the entries under ``prefix + "/"`` without it, all the others)."""
        start = f"{prefix}{_SEPARATOR}"
        inner = StrategyState(
            arrays={k[len(start) :]: v for k, v in self.arrays.items() if k.startswith(start)},
            values={k[len(start) :]: v for k, v in self.values.items() if k.startswith(start)},
        )
        outer = StrategyState(
            arrays={k: v for k, v in self.arrays.items() if not k.startswith(start)},
            values={k: v for k, v in self.values.items() if not k.startswith(start)},
        )
        return inner, outer

    def check_keys(self, owner: str, arrays: set[str], values: set[str]) -> None:
        """Raise ConfigError if the state has entries ``owner`` does not know.

        Args:
            owner: Name of the strategy loading the state, for the error message.
            arrays: Array entries the strategy may read.
            values: Value entries the strategy may read.
        """
        unknown = sorted(set(self.arrays) - arrays) + sorted(set(self.values) - values)
        if unknown:
            raise ConfigError(
                f"{owner}.load_state_dict: unknown entries {unknown}; expected arrays "
                f"{sorted(arrays)} and values {sorted(values)} (a state saved by another "
                "strategy?)"
            )
