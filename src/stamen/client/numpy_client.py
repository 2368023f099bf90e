"""``NumPyClient``: a client that works with lists of NumPy arrays, and its adapter."""

from __future__ import annotations

import warnings
from abc import ABC
from typing import Protocol, runtime_checkable

from .. import ndarrays
from ..context import Context
from ..errors import ConfigError
from ..memory import BufferPool
from ..messages import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Reply,
    Status,
)
from ..ndarrays import Lease, ndarrays_to_parameters, parameters_to_ndarrays
from ..typing import Config, NDArrays, Scalar
from .client import Client

__all__ = ["NumPyClient", "TakesLease"]

_OK = Status(code=Code.OK, message="Success")


@runtime_checkable
class TakesLease(Protocol):
    """A client that can be handed the memory of an instruction its node received.

    :func:`~stamen.client.dispatch.handle` calls :meth:`handle_received` instead of the
    plain method when the node hands over the instruction with its
    :class:`~stamen.ndarrays.Lease`. Stamen's NumPyClient adapter implements it.
    """

    def handle_received(self, instruction: Instruction, lease: Lease) -> Reply:
        """Run ``instruction``, which the node received and hands over whole under
        ``lease`` (nothing else reads its memory); the reply is only sent."""
        ...


class NumPyClient(ABC):
    """A federated learning client that works with NumPy arrays.

    Override what your client supports; ``to_client()`` turns it into a :class:`Client`
    in which the methods you did not override answer ``*_NOT_IMPLEMENTED``.
    """

    _context: Context | None = None

    def get_properties(self, config: Config) -> dict[str, Scalar]:
        """Return the client's properties."""
        _ = config
        return {}

    def get_parameters(self, config: Config) -> NDArrays:
        """Return the current local model parameters."""
        _ = config
        return []

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train ``parameters`` on local data.

        Returns:
            ``(parameters, num_examples, metrics)``: a list of arrays, an int and a dict.
        """
        _ = (parameters, config)
        return [], 0, {}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate ``parameters`` on local data.

        Returns:
            ``(loss, num_examples, metrics)``: a float, an int and a dict.
        """
        _ = (parameters, config)
        return 0.0, 0, {}

    def get_context(self) -> Context:
        """Return the :class:`Context` of the message being handled."""
        if self._context is None:
            raise AttributeError("no Context is set: the client is not handling a message")
        return self._context

    def set_context(self, context: Context) -> None:
        """Set the :class:`Context` (done by the node before each message)."""
        self._context = context

    @property
    def context(self) -> Context:
        """Deprecated: use the ``Context`` given to ``client_fn``."""
        warnings.warn(
            "NumPyClient.context is deprecated: use the Context passed to client_fn",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.get_context()

    @context.setter
    def context(self, context: Context) -> None:
        warnings.warn(
            "NumPyClient.context is deprecated: use the Context passed to client_fn",
            DeprecationWarning,
            stacklevel=2,
        )
        self.set_context(context)

    def to_client(self) -> Client:
        """Wrap this client as a :class:`Client`."""
        return NumPyClientAdapter(self)


def _overrides(numpy_client: NumPyClient, method: str) -> bool:
    return getattr(type(numpy_client), method) is not getattr(NumPyClient, method)


def _own(adapter: NumPyClientAdapter, method: str) -> bool:
    """True if ``method`` of ``adapter`` is :class:`NumPyClientAdapter`'s own."""
    return getattr(type(adapter), method) is getattr(NumPyClientAdapter, method)


def _describe(value: object) -> str:
    if isinstance(value, tuple | list):
        inner = ", ".join(type(v).__name__ for v in value)
        return f"{type(value).__name__} of {len(value)} ({inner})"
    return type(value).__name__


class NumPyClientAdapter(Client):
    """A :class:`Client` that converts messages for a wrapped :class:`NumPyClient`.

    Methods the NumPyClient does not override answer ``*_NOT_IMPLEMENTED``, exactly as an
    un-overridden :class:`Client` method does.
    """

    def __init__(self, numpy_client: NumPyClient) -> None:
        self.numpy_client = numpy_client

    def handle_received(self, instruction: Instruction, lease: Lease) -> Reply:
        """Run an instruction the node received and hands over under ``lease``.

        The NumPyClient then gets writable arrays over the received bytes instead of
        copies, and the reply's large tensors are encoded into pooled memory (only the
        node reads them, to send them). Only where the adapter's own method handles the
        instruction: a subclass that overrides it may read ``ins.parameters`` after the
        NumPyClient wrote into them, so it gets a plain call (copies), as any other
        :class:`Client` does.

        Raises:
            ConfigError: ``instruction`` is not one a client answers.
        """
        pool = ndarrays.RECEIVE_POOL
        if isinstance(instruction, FitIns) and _own(self, "fit"):
            return self._fit(instruction, lease, pool)
        if isinstance(instruction, EvaluateIns) and _own(self, "evaluate"):
            return self._evaluate(instruction, lease)
        if isinstance(instruction, GetParametersIns) and _own(self, "get_parameters"):
            return self._get_parameters(instruction, pool)
        return self._plain(instruction)

    def _plain(self, instruction: Instruction) -> Reply:
        if isinstance(instruction, FitIns):
            return self.fit(instruction)
        if isinstance(instruction, EvaluateIns):
            return self.evaluate(instruction)
        if isinstance(instruction, GetParametersIns):
            return self.get_parameters(instruction)
        if isinstance(instruction, GetPropertiesIns):
            return self.get_properties(instruction)
        raise ConfigError(f"dispatch: {type(instruction).__name__} is not handled by a client")

    def set_context(self, context: Context) -> None:
        """Set the context here and on the wrapped NumPyClient."""
        super().set_context(context)
        self.numpy_client.set_context(context)

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """Call ``NumPyClient.get_properties``."""
        if not _overrides(self.numpy_client, "get_properties"):
            return super().get_properties(ins)
        properties = self.numpy_client.get_properties(ins.config)
        return GetPropertiesRes(status=_OK, properties=properties)

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        """Call ``NumPyClient.get_parameters``."""
        return self._get_parameters(ins, None)

    def _get_parameters(self, ins: GetParametersIns, into: BufferPool | None) -> GetParametersRes:
        if not _overrides(self.numpy_client, "get_parameters"):
            return super().get_parameters(ins)
        arrays = self.numpy_client.get_parameters(ins.config)
        parameters = ndarrays_to_parameters(arrays, into=into)
        return GetParametersRes(status=_OK, parameters=parameters)

    def fit(self, ins: FitIns) -> FitRes:
        """Call ``NumPyClient.fit`` and check what it returns."""
        return self._fit(ins, None, None)

    def _fit(self, ins: FitIns, lease: Lease | None, into: BufferPool | None) -> FitRes:
        """``fit``, decoding under ``lease`` and encoding the reply ``into`` a pool."""
        if not _overrides(self.numpy_client, "fit"):
            return super().fit(ins)
        arrays = parameters_to_ndarrays(ins.parameters, lease=lease)
        result = self.numpy_client.fit(arrays, ins.config)
        if not (
            isinstance(result, tuple | list)
            and len(result) == 3
            and isinstance(result[0], list)
            and isinstance(result[1], int)
            and not isinstance(result[1], bool)
            and isinstance(result[2], dict)
        ):
            raise TypeError(
                "NumPyClient.fit: expected a tuple of 3 elements (list of ndarrays, int, dict) "
                f"= (parameters, num_examples, metrics), received {_describe(result)}"
            )
        trained, num_examples, metrics = result
        return FitRes(
            status=_OK,
            parameters=ndarrays_to_parameters(trained, into=into),
            num_examples=num_examples,
            metrics=metrics,
        )

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Call ``NumPyClient.evaluate`` and check what it returns."""
        return self._evaluate(ins, None)

    def _evaluate(self, ins: EvaluateIns, lease: Lease | None) -> EvaluateRes:
        """``evaluate``, decoding under ``lease``."""
        if not _overrides(self.numpy_client, "evaluate"):
            return super().evaluate(ins)
        arrays = parameters_to_ndarrays(ins.parameters, lease=lease)
        result = self.numpy_client.evaluate(arrays, ins.config)
        if not (
            isinstance(result, tuple | list)
            and len(result) == 3
            and isinstance(result[0], float)
            and isinstance(result[1], int)
            and not isinstance(result[1], bool)
            and isinstance(result[2], dict)
        ):
            raise TypeError(
                "NumPyClient.evaluate: expected a tuple of 3 elements (float, int, dict) "
                f"= (loss, num_examples, metrics), received {_describe(result)}"
            )
        loss, num_examples, metrics = result
        return EvaluateRes(status=_OK, loss=loss, num_examples=num_examples, metrics=metrics)
