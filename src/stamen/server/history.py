"""``History``: losses and metrics of a run, round by round."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import DecodeError
from ..typing import Scalar

__all__ = ["History"]


def _scalar_to_json(value: Scalar) -> Any:
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode("ascii")}
    return value


def _scalar_from_json(value: Any) -> Scalar:
    if isinstance(value, dict):
        if set(value) != {"bytes"} or not isinstance(value["bytes"], str):
            raise DecodeError(
                f"History: expected a scalar or {{'bytes': base64}}, received {value!r:.80}"
            )
        return base64.b64decode(value["bytes"])
    if isinstance(value, bool | int | float | str):
        return value
    raise DecodeError(f"History: expected a scalar, received {type(value).__name__}")


@dataclass
class History:
    """Everything measured during a run, as ``(server_round, value)`` pairs.

    Attributes:
        losses_distributed: Weighted loss of the clients' evaluations.
        losses_centralized: Loss of the strategy's server-side ``evaluate``.
        metrics_distributed_fit: Aggregated fit metrics, per name.
        metrics_distributed: Aggregated evaluation metrics, per name.
        metrics_centralized: Server-side evaluation metrics, per name.
    """

    losses_distributed: list[tuple[int, float]] = field(default_factory=list)
    losses_centralized: list[tuple[int, float]] = field(default_factory=list)
    metrics_distributed_fit: dict[str, list[tuple[int, Scalar]]] = field(default_factory=dict)
    metrics_distributed: dict[str, list[tuple[int, Scalar]]] = field(default_factory=dict)
    metrics_centralized: dict[str, list[tuple[int, Scalar]]] = field(default_factory=dict)

    def add_loss_distributed(self, server_round: int, loss: float) -> None:
        """Record the distributed loss of a round."""
        self.losses_distributed.append((server_round, loss))

    def add_loss_centralized(self, server_round: int, loss: float) -> None:
        """Record the centralized loss of a round."""
        self.losses_centralized.append((server_round, loss))

    def add_metrics_distributed_fit(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        """Record aggregated fit metrics of a round."""
        _add(self.metrics_distributed_fit, server_round, metrics)

    def add_metrics_distributed(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        """Record aggregated evaluation metrics of a round."""
        _add(self.metrics_distributed, server_round, metrics)

    def add_metrics_centralized(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        """Record centralized evaluation metrics of a round."""
        _add(self.metrics_centralized, server_round, metrics)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (bytes metrics as ``{"bytes": base64}``)."""

        def metrics(m: dict[str, list[tuple[int, Scalar]]]) -> dict[str, list[list[Any]]]:
            return {k: [[r, _scalar_to_json(v)] for r, v in vs] for k, vs in m.items()}

        return {
            "losses_distributed": [[r, v] for r, v in self.losses_distributed],
            "losses_centralized": [[r, v] for r, v in self.losses_centralized],
            "metrics_distributed_fit": metrics(self.metrics_distributed_fit),
            "metrics_distributed": metrics(self.metrics_distributed),
            "metrics_centralized": metrics(self.metrics_centralized),
        }

    def to_json(self) -> str:
        """The history as JSON text."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Rebuild a History from :meth:`to_dict` output.

        Raises:
            DecodeError: ``data`` is not of that shape.
        """
        try:

            def losses(key: str) -> list[tuple[int, float]]:
                return [(int(r), float(v)) for r, v in data[key]]

            def metrics(key: str) -> dict[str, list[tuple[int, Scalar]]]:
                return {
                    str(k): [(int(r), _scalar_from_json(v)) for r, v in vs]
                    for k, vs in data[key].items()
                }

            return cls(
                losses_distributed=losses("losses_distributed"),
                losses_centralized=losses("losses_centralized"),
                metrics_distributed_fit=metrics("metrics_distributed_fit"),
                metrics_distributed=metrics("metrics_distributed"),
                metrics_centralized=metrics("metrics_centralized"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DecodeError(f"History: malformed data: {exc!r}") from exc

    def __repr__(self) -> str:
        lines = ["History("]
        for name in ("losses_distributed", "losses_centralized"):
            values = getattr(self, name)
            if values:
                lines.append(f"  {name}: {values}")
        for name in ("metrics_distributed_fit", "metrics_distributed", "metrics_centralized"):
            values = getattr(self, name)
            if values:
                lines.append(f"  {name}: {values}")
        lines.append(")")
        return "\n".join(lines) if len(lines) > 2 else "History(empty)"


def _add(
    target: dict[str, list[tuple[int, Scalar]]], server_round: int, metrics: dict[str, Scalar]
) -> None:
    for key, value in metrics.items():
        target.setdefault(key, []).append((server_round, value))
