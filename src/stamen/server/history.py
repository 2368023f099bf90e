"""``History``: losses and metrics of a run, round by round."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DecodeError
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

    def __str__(self) -> str:
        """Per-round lines, as Flower's ``History`` prints them (then metrics per round)::

        History (loss, distributed):
            round 1: 0.52
            round 2: 0.31
        History (metrics, distributed, evaluate):
            round 1: accuracy=0.81
        """
        parts: list[str] = []
        for title, losses in (
            ("loss, distributed", self.losses_distributed),
            ("loss, centralized", self.losses_centralized),
        ):
            if losses:
                parts.append(f"History ({title}):")
                parts.extend(f"\tround {r}: {loss}" for r, loss in losses)
        for title, metrics in (
            ("metrics, distributed, fit", self.metrics_distributed_fit),
            ("metrics, distributed, evaluate", self.metrics_distributed),
            ("metrics, centralized", self.metrics_centralized),
        ):
            if metrics:
                parts.append(f"History ({title}):")
                for server_round, values in _by_round(metrics):
                    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                    parts.append(f"\tround {server_round}: {shown}")
        return "\n".join(parts) if parts else "History (empty)"

    def columns(self) -> dict[str, dict[int, Scalar]]:
        """Every series, by name and round: ``loss_distributed``, ``loss_centralized``,
        ``fit_<metric>``, ``distributed_<metric>`` and ``centralized_<metric>``."""
        table: dict[str, dict[int, Scalar]] = {}
        if self.losses_distributed:
            table["loss_distributed"] = dict(self.losses_distributed)
        if self.losses_centralized:
            table["loss_centralized"] = dict(self.losses_centralized)
        for prefix, metrics in (
            ("fit", self.metrics_distributed_fit),
            ("distributed", self.metrics_distributed),
            ("centralized", self.metrics_centralized),
        ):
            for name, series in metrics.items():
                table[f"{prefix}_{name}"] = dict(series)
        return table

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """The history as CSV: one row per round, one column per series (see
        :meth:`columns`), empty where a series has no value for a round. Written to
        ``path`` too when given; returned either way."""
        table = self.columns()
        rounds = sorted({r for series in table.values() for r in series})
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["round", *table])
        for server_round in rounds:
            row: list[object] = [server_round]
            for series in table.values():
                value = series.get(server_round, "")
                row.append(
                    base64.b64encode(value).decode("ascii") if isinstance(value, bytes) else value
                )
            writer.writerow(row)
        text = out.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def plot(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Draw the losses and each numeric metric over the rounds into an image (PNG
        unless ``path`` names another format matplotlib writes), with matplotlib
        (``pip install 'stamen[plot]'``): the panels of :meth:`figure`.

        Returns:
            The path written.

        Raises:
            ConfigError: matplotlib is not installed, or there is nothing to plot.
        """
        target = Path(path)
        self.figure(title=title).savefig(target)
        return target

    def figure(self, *, title: str | None = None) -> Any:
        """A matplotlib ``Figure``: one panel for the losses (distributed and centralized),
        then one per metric name with its distributed (fit, evaluate) and centralized
        series; a line per series (:meth:`plot_panels`). Made without pyplot, so no GUI
        backend is involved.

        Raises:
            ConfigError: matplotlib is not installed, or there is nothing to plot.
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ConfigError(
                f"History.plot needs matplotlib: pip install 'stamen[plot]': {exc}"
            ) from exc
        panels = self.plot_panels()
        if not panels:
            raise ConfigError("History.plot: the history has no numeric series to plot")
        figure = Figure(figsize=(6.4, 3.0 * len(panels)), layout="constrained")
        axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
        for ax, (name, series) in zip(axes, panels.items(), strict=True):
            for label, points in series.items():
                ax.plot([r for r, _ in points], [v for _, v in points], marker="o", label=label)
            ax.set_title(name)
            ax.set_xlabel("round")
            ax.legend()
            ax.grid(True, alpha=0.3)
        if title:
            figure.suptitle(title)
        return figure

    def plot_panels(self) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """What :meth:`plot` draws: panel name -> series label -> ``(round, value)``."""
        panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
        losses = {
            label: [(r, float(v)) for r, v in values]
            for label, values in (
                ("distributed", self.losses_distributed),
                ("centralized", self.losses_centralized),
            )
            if values
        }
        if losses:
            panels["loss"] = losses
        for label, metrics in (
            ("distributed, fit", self.metrics_distributed_fit),
            ("distributed, evaluate", self.metrics_distributed),
            ("centralized", self.metrics_centralized),
        ):
            for name, series in metrics.items():
                points = [
                    (r, float(v))
                    for r, v in series
                    if isinstance(v, bool | int | float) and math.isfinite(float(v))
                ]
                if points:
                    panels.setdefault(name, {})[label] = points
        return panels


def _by_round(
    metrics: dict[str, list[tuple[int, Scalar]]],
) -> list[tuple[int, dict[str, Scalar]]]:
    rounds: dict[int, dict[str, Scalar]] = {}
    for name, series in metrics.items():
        for server_round, value in series:
            rounds.setdefault(server_round, {})[name] = value
    return sorted(rounds.items())


def _add(
    target: dict[str, list[tuple[int, Scalar]]], server_round: int, metrics: dict[str, Scalar]
) -> None:
    for key, value in metrics.items():
        target.setdefault(key, []).append((server_round, value))
