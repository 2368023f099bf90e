"""``NumPyClient``: a client that works with lists of NumPy arrays, and its adapter."""

from __future__ import annotations

import warnings
from abc import ABC

from ..context import Context
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
    Parameters,
    Status,
)
from ..ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from ..typing import Config, NDArrays, Scalar
from .client import Client

__all__ = ["NumPyClient"]

_OK = Status(code=Code.OK, message="Success")


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
        self.owns_instructions = False
        """Set by the node for an instruction it received and hands over whole: the
        NumPyClient then gets arrays over the received bytes, not copies of them, and
        its reply is encoded into pooled memory (only the node reads it, to send it)."""

    def _arrays(self, parameters: Parameters) -> NDArrays:
        return parameters_to_ndarrays(parameters, owned=self.owns_instructions)

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
        if not _overrides(self.numpy_client, "get_parameters"):
            return super().get_parameters(ins)
        ndarrays = self.numpy_client.get_parameters(ins.config)
        parameters = ndarrays_to_parameters(ndarrays, sending=self.owns_instructions)
        return GetParametersRes(status=_OK, parameters=parameters)

    def fit(self, ins: FitIns) -> FitRes:
        """Call ``NumPyClient.fit`` and check what it returns."""
        if not _overrides(self.numpy_client, "fit"):
            return super().fit(ins)
        result = self.numpy_client.fit(self._arrays(ins.parameters), ins.config)
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
        ndarrays, num_examples, metrics = result
        return FitRes(
            status=_OK,
            parameters=ndarrays_to_parameters(ndarrays, sending=self.owns_instructions),
            num_examples=num_examples,
            metrics=metrics,
        )

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Call ``NumPyClient.evaluate`` and check what it returns."""
        if not _overrides(self.numpy_client, "evaluate"):
            return super().evaluate(ins)
        result = self.numpy_client.evaluate(self._arrays(ins.parameters), ins.config)
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
