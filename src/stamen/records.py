"""Typed records: what ``Context.state`` and a ``Message``'s content are made of.

Flower 1.12's record types, with their names, constructors and checks:

* :class:`Array` -- one serialized array (``dtype``, ``shape``, ``stype``, ``data``);
  :func:`array_from_numpy` makes one, :meth:`Array.numpy` reads it back;
* :class:`ParametersRecord` -- ``str`` -> :class:`Array`;
* :class:`MetricsRecord` -- ``str`` -> ``int | float | list[int] | list[float]``;
* :class:`ConfigsRecord` -- ``str`` -> ``int | float | str | bytes | bool`` or a list of
  one of them;
* :class:`RecordSet` -- the three kinds of record, by name.

Each record is a mutable mapping (not a ``dict``) that checks every key and value it is
given and raises ``TypeError`` naming what it expected and what it received. Arrays are
``.npy`` bytes, decoded with :mod:`stamen.ndarrays` (never pickle).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from .ndarrays import TENSOR_TYPE, bytes_to_ndarray, ndarray_to_bytes
from .typing import NDArray

__all__ = [
    "Array",
    "ConfigsRecord",
    "ConfigsRecordValues",
    "MetricsRecord",
    "MetricsRecordValues",
    "ParametersRecord",
    "RecordSet",
    "TypedRecord",
    "array_from_numpy",
]

_MetricsScalar: TypeAlias = int | float
MetricsRecordValues: TypeAlias = int | float | list[int] | list[float]
"""What a :class:`MetricsRecord` holds (Flower's name)."""

_ConfigsScalar: TypeAlias = int | float | str | bytes | bool
ConfigsRecordValues: TypeAlias = (
    _ConfigsScalar | list[int] | list[float] | list[str] | list[bytes] | list[bool]
)
"""What a :class:`ConfigsRecord` holds (Flower's name)."""

_V = TypeVar("_V")
_State: TypeAlias = "tuple[type[Any], dict[str, Any]]"
"""What copy.copy / copy.deepcopy keep of a typed record: its value type and its data."""


@dataclass
class Array:
    """One array, serialized: what a :class:`ParametersRecord` holds.

    Attributes:
        dtype: The NumPy dtype's name (``"float32"``); may be ``""`` when the bytes carry it.
        shape: The array's shape; may be ``[]`` when the bytes carry it.
        stype: How ``data`` is serialized: ``"numpy.ndarray"`` is a ``.npy`` file.
        data: The serialized array.
    """

    dtype: str
    shape: list[int]
    stype: str
    data: bytes

    def numpy(self) -> NDArray:
        """The array as a NumPy ndarray (a new array, decoded without pickle).

        Raises:
            TypeError: ``stype`` is not ``"numpy.ndarray"``.
        """
        if self.stype != TENSOR_TYPE:
            raise TypeError(f"Array.numpy: expected stype {TENSOR_TYPE!r}, received {self.stype!r}")
        return bytes_to_ndarray(self.data)


def array_from_numpy(ndarray: NDArray) -> Array:
    """An :class:`Array` holding ``ndarray`` as ``.npy`` bytes (``stype="numpy.ndarray"``)."""
    dtype = getattr(ndarray, "dtype", None)
    if dtype is None:
        raise TypeError(
            f"array_from_numpy: expected a NumPy ndarray, received {type(ndarray).__name__}"
        )
    return Array(
        dtype=str(dtype),
        shape=list(ndarray.shape),
        stype=TENSOR_TYPE,
        data=ndarray_to_bytes(ndarray),
    )


class TypedRecord(MutableMapping[str, _V], Generic[_V]):
    """A mutable mapping of ``str`` keys whose every value is checked on the way in.

    Subclasses define :meth:`_check_value`. Equal to any mapping with the same items.
    """

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[str, Any] | None = None, keep_input: bool = True) -> None:
        self._data: dict[str, _V] = {}
        if items is None:
            return
        if not isinstance(items, Mapping):
            raise TypeError(
                f"{type(self).__name__}: expected a dict, received {type(items).__name__}"
            )
        if keep_input:
            for key, value in items.items():
                self[key] = value
            return
        if not isinstance(items, MutableMapping):
            raise TypeError(
                f"{type(self).__name__}: keep_input=False empties the input, so it must be a "
                f"mutable mapping, received {type(items).__name__}"
            )
        for key in list(items):
            self[key] = items[key]
            del items[key]

    def _check_value(self, value: object) -> None:
        raise NotImplementedError

    def __setitem__(self, key: str, value: _V) -> None:
        if not isinstance(key, str):
            raise TypeError(
                f"{type(self).__name__}: expected str keys, received {type(key).__name__} "
                f"({key!r:.60})"
            )
        self._check_value(value)
        self._data[key] = value

    def __getitem__(self, key: str) -> _V:
        return self._data[key]

    def __delitem__(self, key: str) -> None:
        del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TypedRecord):
            return self._data == other._data
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return repr(self._data)

    def __getstate__(self) -> dict[str, _V]:
        return self._data

    def __setstate__(self, state: dict[str, _V]) -> None:
        self._data = state

    def count_bytes(self) -> int:
        """Bytes of the keys and values, as Flower counts them (see each record type)."""
        raise NotImplementedError


def _type_name(value: object) -> str:
    return type(value).__name__


def _scalar_kind(value: object, scalars: tuple[type, ...], bools: bool) -> type | None:
    """The allowed type ``value`` is an instance of (bool first), or None."""
    if isinstance(value, bool):
        return bool if bools else None
    for kind in scalars:
        if isinstance(value, kind):
            return kind
    return None


def _check_value_of(
    record: str, value: object, scalars: tuple[type, ...], allowed: str, *, bools: bool
) -> None:
    """A scalar of ``scalars`` (bool only if ``bools``), or a list of one kind of them.

    A list's kind is its first element's; the others must be instances of that type
    (Flower's rule: ``[1, True]`` passes, ``[True, 1]`` does not).
    """
    if isinstance(value, list):
        if not value:
            return
        kind = _scalar_kind(value[0], scalars, bools)
        if kind is None or not all(isinstance(item, kind) for item in value):
            raise TypeError(
                f"{record}: expected a list whose values all have one type of {allowed}, "
                f"received a list of {sorted({_type_name(item) for item in value})}"
            )
        return
    if _scalar_kind(value, scalars, bools) is None:
        raise TypeError(
            f"{record}: expected a value of type {allowed} or a list of one of them, received "
            f"{_type_name(value)} ({value!r:.60})"
        )


class ParametersRecord(TypedRecord[Array]):
    """Named :class:`Array` s, in order (Flower 1.12's ``ParametersRecord``).

    Args:
        array_dict: Initial arrays by name.
        keep_input: False (the default, as in Flower): ``array_dict`` is emptied as its
            arrays move into the record, so a model is held once.
    """

    __slots__ = ()

    def __init__(
        self, array_dict: Mapping[str, Array] | None = None, keep_input: bool = False
    ) -> None:
        super().__init__(array_dict, keep_input)

    def _check_value(self, value: object) -> None:
        if not isinstance(value, Array):
            raise TypeError(
                f"ParametersRecord: expected an Array (see array_from_numpy), received "
                f"{_type_name(value)}"
            )

    def count_bytes(self) -> int:
        """Bytes of the arrays' data plus the length of each name."""
        return sum(len(array.data) + len(key) for key, array in self._data.items())


class MetricsRecord(TypedRecord[MetricsRecordValues]):
    """Named metrics: ``int``, ``float`` or a list of one of them (not bool, not NumPy).

    Args:
        metrics_dict: Initial metrics.
        keep_input: True (the default): copy from ``metrics_dict``; False: empty it.
    """

    __slots__ = ()

    def __init__(
        self, metrics_dict: Mapping[str, MetricsRecordValues] | None = None, keep_input: bool = True
    ) -> None:
        super().__init__(metrics_dict, keep_input)

    def _check_value(self, value: object) -> None:
        _check_value_of("MetricsRecord", value, (int, float), "int | float", bools=False)

    def count_bytes(self) -> int:
        """8 bytes per number (each element of a list) plus the length of each name."""
        total = 0
        for key, value in self._data.items():
            total += len(key) + 8 * (len(value) if isinstance(value, list) else 1)
        return total


class ConfigsRecord(TypedRecord[ConfigsRecordValues]):
    """Named configuration values: ``int | float | str | bytes | bool`` or a list of one.

    Args:
        configs_dict: Initial values.
        keep_input: True (the default): copy from ``configs_dict``; False: empty it.
    """

    __slots__ = ()

    def __init__(
        self, configs_dict: Mapping[str, ConfigsRecordValues] | None = None, keep_input: bool = True
    ) -> None:
        super().__init__(configs_dict, keep_input)

    def _check_value(self, value: object) -> None:
        _check_value_of(
            "ConfigsRecord",
            value,
            (int, float, str, bytes),
            "int | float | str | bytes | bool",
            bools=True,
        )

    def count_bytes(self) -> int:
        """Per value: 8 for a number, 1 for a bool, the length of a str or bytes (each
        element of a list), plus the length of each name."""
        total = 0
        for key, value in self._data.items():
            items = value if isinstance(value, list) else [value]
            total += len(key) + sum(_item_bytes(item) for item in items)
        return total


def _item_bytes(item: object) -> int:
    if isinstance(item, bool):
        return 1
    if isinstance(item, str | bytes):
        return len(item)
    return 8


class _RecordsOf(TypedRecord[_V]):
    """The records of one kind in a :class:`RecordSet`, checked by type."""

    __slots__ = ("_kind",)

    def __init__(self, kind: type[_V], items: Mapping[str, _V] | None) -> None:
        self._kind = kind
        super().__init__(items)

    def _check_value(self, value: object) -> None:
        if not isinstance(value, self._kind):
            raise TypeError(
                f"RecordSet: expected a {self._kind.__name__} here, received {_type_name(value)}"
            )

    def __getstate__(self) -> _State:  # type: ignore[override]  # copy's (kind, data)
        return self._kind, self._data

    def __setstate__(self, state: _State) -> None:  # type: ignore[override]  # copy's state
        self._kind, self._data = state


class RecordSet:
    """Parameters, metrics and configs records by name: ``Context.state`` and a
    ``Message``'s content.

    Args:
        parameters_records: :class:`ParametersRecord` s by name.
        metrics_records: :class:`MetricsRecord` s by name.
        configs_records: :class:`ConfigsRecord` s by name.
    """

    __slots__ = ("_configs", "_metrics", "_parameters")

    def __init__(
        self,
        parameters_records: Mapping[str, ParametersRecord] | None = None,
        metrics_records: Mapping[str, MetricsRecord] | None = None,
        configs_records: Mapping[str, ConfigsRecord] | None = None,
    ) -> None:
        self._parameters = _RecordsOf(ParametersRecord, parameters_records)
        self._metrics = _RecordsOf(MetricsRecord, metrics_records)
        self._configs = _RecordsOf(ConfigsRecord, configs_records)

    @property
    def parameters_records(self) -> TypedRecord[ParametersRecord]:
        """The :class:`ParametersRecord` s, by name."""
        return self._parameters

    @property
    def metrics_records(self) -> TypedRecord[MetricsRecord]:
        """The :class:`MetricsRecord` s, by name."""
        return self._metrics

    @property
    def configs_records(self) -> TypedRecord[ConfigsRecord]:
        """The :class:`ConfigsRecord` s, by name."""
        return self._configs

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordSet):
            return NotImplemented
        return (
            self._parameters == other._parameters
            and self._metrics == other._metrics
            and self._configs == other._configs
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"RecordSet(parameters_records={self._parameters!r}, "
            f"metrics_records={self._metrics!r}, configs_records={self._configs!r})"
        )

    def __getstate__(self) -> tuple[Any, Any, Any]:
        return self._parameters, self._metrics, self._configs

    def __setstate__(self, state: tuple[Any, Any, Any]) -> None:
        self._parameters, self._metrics, self._configs = state
