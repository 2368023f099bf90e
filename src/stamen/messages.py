"""The messages exchanged between server and client nodes.

Slotted dataclasses with Flower's names, field order and defaults, mutable as Flower's
are (strategies assign ``fit_res.num_examples`` or ``fit_res.parameters``). Each validates
its fields on construction and on assignment, so a malformed message fails where it is
built or changed, with an error that names the field, what was expected and what was
received.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeAlias, TypeVar

from .errors import ConfigError
from .typing import Scalar

_T = TypeVar("_T")

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # pragma: no cover - Python 3.10: the decorator only speaks to type checkers

    def dataclass_transform(**_options: object) -> Callable[[_T], _T]:
        return lambda decorated: decorated


__all__ = [
    "EXCHANGES",
    "Code",
    "DisconnectRes",
    "EvaluateIns",
    "EvaluateRes",
    "Exchange",
    "FitIns",
    "FitRes",
    "GetParametersIns",
    "GetParametersRes",
    "GetPropertiesIns",
    "GetPropertiesRes",
    "Instruction",
    "Parameters",
    "Reason",
    "ReconnectIns",
    "Reply",
    "Status",
    "check_scalar",
    "check_scalar_mapping",
    "exchange_for",
]

_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


class Code(IntEnum):
    """Status codes of a reply. 0-4 are Flower's; 5 is Stamen's."""

    OK = 0
    GET_PROPERTIES_NOT_IMPLEMENTED = 1
    GET_PARAMETERS_NOT_IMPLEMENTED = 2
    FIT_NOT_IMPLEMENTED = 3
    EVALUATE_NOT_IMPLEMENTED = 4
    CLIENT_ERROR = 5
    """The client's own code raised; the message says what. (Stamen extension, sent only
    to Stamen peers: Flower 1.12 would read this unknown code as OK, so towards a Flower
    server a node sends the reply kind's ``*_NOT_IMPLEMENTED`` code instead, which Flower
    counts as a failure; see docs/protocol.md.)"""


class Reason(IntEnum):
    """Why a client disconnects (``DisconnectRes.reason``)."""

    UNKNOWN = 0
    RECONNECT = 1
    POWER_DISCONNECTED = 2
    WIFI_UNAVAILABLE = 3
    ACK = 4


def _type_name(value: object) -> str:
    return type(value).__name__


def _check_utf8(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{where}: expected text encodable as UTF-8, received {text!r:.60}"
        ) from exc


def check_scalar(where: str, value: object) -> None:
    """Raise ConfigError unless ``value`` is a Scalar that fits the wire format."""
    if isinstance(value, str):
        _check_utf8(where, value)
        return
    # bool is an int: test it first so that True is not range-checked as 1.
    if isinstance(value, bool | bytes | float):
        return
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _UINT64_MAX:
            raise ConfigError(f"{where}: expected an int in [-2**63, 2**64 - 1], received {value}")
        return
    raise ConfigError(
        f"{where}: expected bool, bytes, float, int or str, received {_type_name(value)} "
        f"({value!r:.60})"
    )


def check_scalar_mapping(where: str, mapping: object) -> None:
    """Raise ConfigError unless ``mapping`` maps str keys to Scalars."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(
            f"{where}: expected a dict of str to scalar, received {_type_name(mapping)}"
        )
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"{where}: expected str keys, received key {key!r} ({_type_name(key)})"
            )
        _check_utf8(f"{where} key", key)
        check_scalar(f"{where}[{key!r}]", value)


def _check_int(where: str, value: object, *, minimum: int = _INT64_MIN) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected int, received {_type_name(value)} ({value!r:.60})")
    if not minimum <= value < 2**63:
        raise ConfigError(f"{where}: expected an int in [{minimum}, 2**63 - 1], received {value}")


def _check_type(where: str, value: object, expected: type) -> None:
    if not isinstance(value, expected):
        raise ConfigError(
            f"{where}: expected {expected.__name__}, received {_type_name(value)} ({value!r:.60})"
        )
    if isinstance(value, str):
        _check_utf8(where, value)


_Message = TypeVar("_Message")


def _assign(self: object, name: str, value: object) -> None:
    """A message's field assigned: checked as the constructor checks it; a value that
    would make the message invalid raises ConfigError and the field keeps its value."""
    old = getattr(self, name)  # AttributeError for a name that is not a field
    object.__setattr__(self, name, value)
    try:
        self.__post_init__()  # type: ignore[attr-defined]
    except ConfigError:
        object.__setattr__(self, name, old)
        raise


def _refuse_delete(self: object, name: str) -> None:
    raise AttributeError(f"{type(self).__name__}.{name}: a message's fields cannot be deleted")


@dataclass_transform(field_specifiers=(field,))
def _message(cls: type[_Message]) -> type[_Message]:
    """A message class: a slotted dataclass whose fields may be assigned, as in Flower (a
    strategy that replaces ``fit_res.parameters`` in ``aggregate_fit``, say), and are
    checked when they are (:func:`_assign`). Its constructor sets the fields without
    that check (``__post_init__`` checks them all once): as fast as a frozen dataclass's.
    Unhashable, as mutable dataclasses are."""
    made = dataclass(frozen=True, slots=True)(cls)
    for name, value in (("__setattr__", _assign), ("__delattr__", _refuse_delete)):
        setattr(made, name, value)
    made.__hash__ = None  # type: ignore[assignment]
    return made


@_message
class Parameters:
    """Model parameters as opaque byte tensors plus the name of their serialization.

    A tensor is ``bytes``, or a byte ``memoryview``: tensors decoded from the network are
    read-only views into the received message, not copies (``bytes(tensor)`` gives a copy
    where ``bytes`` is needed).
    """

    tensors: list[bytes | memoryview]
    tensor_type: str

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, list):
            raise ConfigError(
                f"Parameters.tensors: expected a list of bytes, received {_type_name(self.tensors)}"
            )
        for index, tensor in enumerate(self.tensors):
            if isinstance(tensor, memoryview):
                if tensor.format != "B" or not tensor.c_contiguous:
                    raise ConfigError(
                        f"Parameters.tensors[{index}]: expected a contiguous byte memoryview, "
                        f"received format {tensor.format!r}"
                        + ("" if tensor.c_contiguous else " (not contiguous)")
                    )
            elif not isinstance(tensor, bytes):
                raise ConfigError(
                    f"Parameters.tensors[{index}]: expected bytes, received {_type_name(tensor)}"
                )
        _check_type("Parameters.tensor_type", self.tensor_type, str)


@_message
class Status:
    """The outcome of a client operation."""

    code: Code
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, Code):
            raise ConfigError(f"Status.code: expected a Code, received {self.code!r}")
        _check_type("Status.message", self.message, str)


@_message
class GetPropertiesIns:
    """Ask a client for its properties."""

    config: dict[str, Scalar]

    def __post_init__(self) -> None:
        check_scalar_mapping("GetPropertiesIns.config", self.config)


@_message
class GetPropertiesRes:
    """A client's properties."""

    status: Status
    properties: dict[str, Scalar]

    def __post_init__(self) -> None:
        _check_type("GetPropertiesRes.status", self.status, Status)
        check_scalar_mapping("GetPropertiesRes.properties", self.properties)


@_message
class GetParametersIns:
    """Ask a client for its current model parameters."""

    config: dict[str, Scalar]

    def __post_init__(self) -> None:
        check_scalar_mapping("GetParametersIns.config", self.config)


@_message
class GetParametersRes:
    """A client's current model parameters."""

    status: Status
    parameters: Parameters

    def __post_init__(self) -> None:
        _check_type("GetParametersRes.status", self.status, Status)
        _check_type("GetParametersRes.parameters", self.parameters, Parameters)


@_message
class FitIns:
    """Train the global model on local data."""

    parameters: Parameters
    config: dict[str, Scalar]

    def __post_init__(self) -> None:
        _check_type("FitIns.parameters", self.parameters, Parameters)
        check_scalar_mapping("FitIns.config", self.config)


@_message
class FitRes:
    """The result of local training."""

    status: Status
    parameters: Parameters
    num_examples: int
    metrics: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_type("FitRes.status", self.status, Status)
        _check_type("FitRes.parameters", self.parameters, Parameters)
        _check_int("FitRes.num_examples", self.num_examples)
        check_scalar_mapping("FitRes.metrics", self.metrics)


@_message
class EvaluateIns:
    """Evaluate the global model on local data."""

    parameters: Parameters
    config: dict[str, Scalar]

    def __post_init__(self) -> None:
        _check_type("EvaluateIns.parameters", self.parameters, Parameters)
        check_scalar_mapping("EvaluateIns.config", self.config)


@_message
class EvaluateRes:
    """The result of local evaluation.

    ``loss`` travels as a 32-bit float on the wire (as in Flower), so a loss read back from
    the network may differ from the client's value in the 8th significant digit.
    """

    status: Status
    loss: float
    num_examples: int
    metrics: dict[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_type("EvaluateRes.status", self.status, Status)
        if isinstance(self.loss, bool) or not isinstance(self.loss, float | int):
            raise ConfigError(
                f"EvaluateRes.loss: expected float, received {_type_name(self.loss)} "
                f"({self.loss!r:.60})"
            )
        _check_int("EvaluateRes.num_examples", self.num_examples)
        check_scalar_mapping("EvaluateRes.metrics", self.metrics)


@_message
class ReconnectIns:
    """End the session; come back after ``seconds`` (``None`` or ``0``: do not come back).

    ``reason`` (Stamen): why the server ends the session, when the run failed -- None for
    a run that completed. It travels only between Stamen peers (an extra protobuf field
    that Flower peers skip: docs/protocol.md); a Stamen node that receives one reports the
    run as failed.
    """

    seconds: int | None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.seconds is not None:
            _check_int("ReconnectIns.seconds", self.seconds, minimum=0)
        if self.reason is not None:
            _check_type("ReconnectIns.reason", self.reason, str)
            _check_utf8("ReconnectIns.reason", self.reason)


@_message
class DisconnectRes:
    """A client's answer to ReconnectIns; ``reason`` is a :class:`Reason` name."""

    reason: str

    def __post_init__(self) -> None:
        if self.reason not in Reason.__members__:
            raise ConfigError(
                f"DisconnectRes.reason: expected one of {sorted(Reason.__members__)}, "
                f"received {self.reason!r}"
            )


Instruction: TypeAlias = GetPropertiesIns | GetParametersIns | FitIns | EvaluateIns | ReconnectIns
"""What a server sends to a client node."""

Reply: TypeAlias = GetPropertiesRes | GetParametersRes | FitRes | EvaluateRes | DisconnectRes
"""What a client node sends back."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """How one kind of instruction is answered.

    Attributes:
        reply: The reply class that answers it.
        method: The :class:`~stamen.client.Client` method that handles it (None: the
            node session answers it, not user code).
        error_reply: Builds the reply that reports a failure to handle it, from its
            status (None: it cannot fail that way).
    """

    reply: type[Reply]
    method: str | None
    error_reply: Callable[[Status], Reply] | None


def _no_parameters() -> Parameters:
    return Parameters(tensors=[], tensor_type="")


EXCHANGES: dict[type, Exchange] = {
    GetPropertiesIns: Exchange(
        GetPropertiesRes, "get_properties", lambda status: GetPropertiesRes(status, {})
    ),
    GetParametersIns: Exchange(
        GetParametersRes,
        "get_parameters",
        lambda status: GetParametersRes(status, _no_parameters()),
    ),
    FitIns: Exchange(FitRes, "fit", lambda status: FitRes(status, _no_parameters(), 0, {})),
    EvaluateIns: Exchange(EvaluateRes, "evaluate", lambda status: EvaluateRes(status, 0.0, 0, {})),
    ReconnectIns: Exchange(DisconnectRes, None, None),
}
"""The one instruction -> reply table: per instruction class, its :class:`Exchange`."""


def exchange_for(instruction: object) -> Exchange:
    """The :class:`Exchange` of ``instruction``.

    Raises:
        ConfigError: ``instruction`` is not an instruction message.
    """
    try:
        return EXCHANGES[type(instruction)]
    except KeyError:
        raise ConfigError(
            f"expected an instruction message, received {_type_name(instruction)}"
        ) from None
