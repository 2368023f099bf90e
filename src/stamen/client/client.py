"""The ``Client`` base class: what a node runs for each instruction."""

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

__all__ = ["Client"]


def _not_implemented(code: Code, method: str) -> Status:
    return Status(code=code, message=f"Client does not implement `{method}`")


class Client(ABC):
    """A federated learning client working with serialized :class:`Parameters`.

    Override the methods your client supports. A method left as is answers with the
    matching ``*_NOT_IMPLEMENTED`` status and empty payloads, which the server counts as a
    failure (for fit and evaluate).
    """

    _context: Context | None = None

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """Return the client's properties."""
        _ = ins
        return GetPropertiesRes(
            status=_not_implemented(Code.GET_PROPERTIES_NOT_IMPLEMENTED, "get_properties"),
            properties={},
        )

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        """Return the current local model parameters."""
        _ = ins
        return GetParametersRes(
            status=_not_implemented(Code.GET_PARAMETERS_NOT_IMPLEMENTED, "get_parameters"),
            parameters=Parameters(tensors=[], tensor_type=""),
        )

    def fit(self, ins: FitIns) -> FitRes:
        """Train the given parameters on local data and return the result."""
        _ = ins
        return FitRes(
            status=_not_implemented(Code.FIT_NOT_IMPLEMENTED, "fit"),
            parameters=Parameters(tensors=[], tensor_type=""),
            num_examples=0,
            metrics={},
        )

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Evaluate the given parameters on local data and return the result."""
        _ = ins
        return EvaluateRes(
            status=_not_implemented(Code.EVALUATE_NOT_IMPLEMENTED, "evaluate"),
            loss=0.0,
            num_examples=0,
            metrics={},
        )

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
            "Client.context is deprecated: use the Context passed to client_fn",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.get_context()

    @context.setter
    def context(self, context: Context) -> None:
        warnings.warn(
            "Client.context is deprecated: use the Context passed to client_fn",
            DeprecationWarning,
            stacklevel=2,
        )
        self.set_context(context)

    def to_client(self) -> Client:
        """Return this client (for symmetry with ``NumPyClient.to_client``)."""
        return self
