"""Client-side clipping for central differential privacy: wrappers around a NumPyClient.

They are the client half of the server strategies
``DifferentialPrivacyClientSideFixedClipping`` and
``DifferentialPrivacyClientSideAdaptiveClipping`` (the counterparts of Flower's
``fixedclipping_mod`` and ``adaptiveclipping_mod``, with the same config and metric keys,
so either half may be Flower)::

    from stamen.client.dp import AdaptiveClippingNumPyClient

    def client_fn(context):
        return AdaptiveClippingNumPyClient(MyNumPyClient()).to_client()

In ``fit``, the wrapper reads the clipping norm ``C`` from ``config["clipping_norm"]``,
lets the wrapped client train, and clips its update to ``C`` (FlatClip, the L2 norm over all
arrays)::

    u = w_local - w_global
    w_sent = w_global + u * min(1, C / ||u||_2)

:class:`AdaptiveClippingNumPyClient` also returns ``metrics["norm_bit"] = True`` if the
update had to be scaled down, from which the server adapts ``C``. The other methods go to
the wrapped client unchanged, and a method it does not implement still answers
``*_NOT_IMPLEMENTED``.
"""

from __future__ import annotations

from ..context import Context
from ..errors import ConfigError
from ..messages import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
)
from ..privacy import (
    KEY_CLIPPING_NORM,
    KEY_NORM_BIT,
    compute_clip_model_update,
)
from ..typing import Config, NDArrays, Scalar
from .client import Client
from .numpy_client import NumPyClient, NumPyClientAdapter

__all__ = ["AdaptiveClippingNumPyClient", "FixedClippingNumPyClient"]


def _clipping_norm(config: Config) -> float:
    if KEY_CLIPPING_NORM not in config:
        raise ConfigError(
            f"fit config: expected {KEY_CLIPPING_NORM!r}, sent by the server's "
            "DifferentialPrivacyClientSide*Clipping strategy; received keys "
            f"{sorted(config)}"
        )
    value = config[KEY_CLIPPING_NORM]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            f"fit config[{KEY_CLIPPING_NORM!r}]: expected a number > 0, received {value!r}"
        )
    return float(value)


class FixedClippingNumPyClient(NumPyClient):
    """A NumPyClient whose fit update is clipped to the norm the server sends.

    Use with ``DifferentialPrivacyClientSideFixedClipping`` on the server.

    Args:
        client: The NumPyClient that trains.

    Attributes:
        client: The wrapped NumPyClient.
    """

    def __init__(self, client: NumPyClient) -> None:
        if not isinstance(client, NumPyClient):
            raise ConfigError(
                f"client: expected a NumPyClient to wrap, received {type(client).__name__}"
            )
        self.client = client

    def get_properties(self, config: Config) -> dict[str, Scalar]:
        """The wrapped client's properties."""
        return self.client.get_properties(config)

    def get_parameters(self, config: Config) -> NDArrays:
        """The wrapped client's parameters."""
        return self.client.get_parameters(config)

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        """The wrapped client's evaluation."""
        return self.client.evaluate(parameters, config)

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train with the wrapped client, then clip its update to ``config["clipping_norm"]``.

        Raises:
            ConfigError: the config has no valid clipping norm, or the trained model does
                not have the layers of the received one.
        """
        clipping_norm = _clipping_norm(config)
        received = [a.copy() for a in parameters]  # the client may train in place
        trained, num_examples, metrics = self.client.fit(parameters, config)
        if not isinstance(trained, list) or [a.shape for a in trained] != [
            a.shape for a in received
        ]:
            raise ConfigError(
                "fit: to clip the update, the trained model must have the layers of the "
                f"received one, {[a.shape for a in received]}; received "
                f"{[getattr(a, 'shape', type(a).__name__) for a in trained]}"
            )
        clipped, norm_bit = compute_clip_model_update(trained, received, clipping_norm)
        return clipped, num_examples, self._metrics(metrics, norm_bit)

    def _metrics(self, metrics: dict[str, Scalar], norm_bit: bool) -> dict[str, Scalar]:
        return metrics

    def set_context(self, context: Context) -> None:
        """Set the context here and on the wrapped client."""
        super().set_context(context)
        self.client.set_context(context)

    def to_client(self) -> Client:
        """Wrap as a :class:`Client`; methods the wrapped client lacks stay unimplemented."""
        return _ClippingClientAdapter(self)


class AdaptiveClippingNumPyClient(FixedClippingNumPyClient):
    """A NumPyClient whose update is clipped, and that reports whether it was.

    As :class:`FixedClippingNumPyClient`, and ``fit`` adds ``metrics["norm_bit"]``: True if
    the update was scaled down. Use with ``DifferentialPrivacyClientSideAdaptiveClipping``
    on the server.
    """

    def _metrics(self, metrics: dict[str, Scalar], norm_bit: bool) -> dict[str, Scalar]:
        return {**metrics, KEY_NORM_BIT: norm_bit}


class _ClippingClientAdapter(NumPyClientAdapter):
    """The Client of a clipping wrapper: unimplemented methods stay unimplemented."""

    def __init__(self, wrapper: FixedClippingNumPyClient) -> None:
        super().__init__(wrapper)
        self._wrapped_fit = type(wrapper.client).fit is not NumPyClient.fit
        self._inner = wrapper.client.to_client()

    def set_context(self, context: Context) -> None:
        """Set the context here, on the wrapper and on the wrapped client."""
        super().set_context(context)
        self._inner.set_context(context)

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """The wrapped client's answer."""
        return self._inner.get_properties(ins)

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        """The wrapped client's answer."""
        return self._inner.get_parameters(ins)

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """The wrapped client's answer."""
        return self._inner.evaluate(ins)

    def fit(self, ins: FitIns) -> FitRes:
        """The clipped fit, or FIT_NOT_IMPLEMENTED if the wrapped client has no ``fit``."""
        return super().fit(ins) if self._wrapped_fit else self._inner.fit(ins)
