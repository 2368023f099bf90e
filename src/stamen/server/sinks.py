"""Metrics sinks: each round's losses and metrics written to TensorBoard or MLflow.

A sink is a subscriber of the run's events (:mod:`stamen.server.events`): it writes the
distributed loss and the aggregated fit and evaluation metrics of each round as that round
ends, then the centralized loss and metrics (the strategy's ``evaluate``, kept in the
History) when the run returns. ``start_server(tensorboard_dir=..., mlflow_uri=...)`` and
``stamen server --tensorboard-dir DIR --mlflow-uri URI`` make them; pass your own sink in
``start_server(subscribers=[...])``.

Names of the values (TensorBoard tags, MLflow metric keys), at step = the round:

* ``loss/distributed``, ``loss/centralized``;
* ``fit/<metric>``, ``evaluate/<metric>``, ``centralized/<metric>``;
* ``round/fit_results``, ``round/fit_failures``, ``round/evaluate_results``,
  ``round/evaluate_failures``.

Only numbers are written (a metric that is a string or bytes is skipped). The writers
are well-kept libraries, installed as extras: ``stamen[tensorboard]`` (``tensorboardX``)
and ``stamen[mlflow]`` (``mlflow-skinny``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from ..errors import ConfigError
from ..typing import Scalar
from .events import RoundEnded, RunEnded, RunEvent, RunStarted
from .history import History

__all__ = ["MLflowSink", "MetricsSink", "TensorBoardSink", "make_sinks", "round_values"]

logger = logging.getLogger("stamen.server")


class MetricsSink(Protocol):
    """What ``start_server`` needs of a sink: a run-event subscriber that also takes the
    final History and is closed at the end."""

    def __call__(self, event: RunEvent) -> None:
        """Record ``event`` (called on the publishing thread: be quick)."""
        ...

    def write_history(self, history: History) -> None:
        """Record what only the History has: the centralized losses and metrics."""
        ...

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        ...


def _numbers(prefix: str, metrics: Mapping[str, Scalar]) -> Iterator[tuple[str, float]]:
    for name, value in sorted(metrics.items()):
        if isinstance(value, bool | int | float) and math.isfinite(float(value)):
            yield f"{prefix}/{name}", float(value)


def round_values(event: RoundEnded) -> list[tuple[str, float]]:
    """The values a sink writes for the end of a round's phase."""
    values = [
        (f"round/{event.phase}_results", float(event.results)),
        (f"round/{event.phase}_failures", float(event.failures)),
    ]
    if event.aggregated:
        if event.phase == "evaluate" and event.loss is not None:
            values.append(("loss/distributed", float(event.loss)))
        values.extend(_numbers(event.phase, event.metrics))
    return values


def history_values(history: History) -> list[tuple[int, str, float]]:
    """The centralized values of ``history``: ``(round, name, value)``."""
    values = [(r, "loss/centralized", float(loss)) for r, loss in history.losses_centralized]
    for name, series in sorted(history.metrics_centralized.items()):
        for server_round, value in series:
            values.extend((server_round, n, v) for n, v in _numbers("centralized", {name: value}))
    return values


def _missing(extra: str, package: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        f"{package} is not installed: pip install 'stamen[{extra}]' (or {package}): {exc}"
    )


class TensorBoardSink:
    """Writes a run's values as TensorBoard event files in ``logdir`` (``tensorboardX``'s
    ``SummaryWriter``: read them with TensorBoard, ``tbparse`` or ``tensorboardX``'s
    reader)."""

    def __init__(self, logdir: str | os.PathLike[str]) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as exc:
            raise _missing("tensorboard", "tensorboardX", exc) from exc
        self.logdir = os.fspath(logdir)
        self._writer: Any = SummaryWriter(logdir=self.logdir)
        self._closed = False

    def __call__(self, event: RunEvent) -> None:
        """Write the values of each round's end."""
        if isinstance(event, RoundEnded):
            for tag, value in round_values(event):
                self._writer.add_scalar(tag, value, event.server_round)
            self._writer.flush()

    def write_history(self, history: History) -> None:
        """Write the centralized losses and metrics."""
        for server_round, tag, value in history_values(history):
            self._writer.add_scalar(tag, value, server_round)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if not self._closed:
            self._closed = True
            self._writer.close()


class MLflowSink:
    """Logs a run's values to an MLflow tracking server or store (``mlflow``'s
    ``MlflowClient``): one MLflow run per Stamen run, in ``experiment``, with the
    parameters ``num_rounds`` and ``strategy``; it ends FINISHED or FAILED as the run does.

    ``tracking_uri`` is any URI MLflow takes: ``http://host:5000``, ``sqlite:///mlflow.db``,
    or a local folder ``file:./mlruns`` (MLflow 3 wants ``MLFLOW_ALLOW_FILE_STORE=true``
    in the environment for the latter).
    """

    def __init__(
        self, tracking_uri: str, experiment: str = "stamen", run_name: str | None = None
    ) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise _missing("mlflow", "mlflow", exc) from exc
        self.tracking_uri = tracking_uri
        self._client: Any = MlflowClient(tracking_uri=tracking_uri)
        self._experiment = experiment
        self._run_name = run_name
        self.run_id: str | None = None
        self._status = "FINISHED"

    def _ensure_run(self, params: Mapping[str, object] | None = None) -> str:
        if self.run_id is None:
            found = self._client.get_experiment_by_name(self._experiment)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self._client.create_experiment(self._experiment)
            )
            run = self._client.create_run(experiment_id, run_name=self._run_name)
            self.run_id = str(run.info.run_id)
            for key, value in (params or {}).items():
                self._client.log_param(self.run_id, key, value)
        return self.run_id

    def __call__(self, event: RunEvent) -> None:
        """Start the MLflow run, log each round's values, note how the run ended."""
        if isinstance(event, RunStarted):
            self._ensure_run({"num_rounds": event.num_rounds, "strategy": event.strategy})
        elif isinstance(event, RoundEnded):
            run_id = self._ensure_run()
            for key, value in round_values(event):
                self._client.log_metric(run_id, key, value, step=event.server_round)
        elif isinstance(event, RunEnded) and not event.ok:
            self._status = "FAILED"

    def write_history(self, history: History) -> None:
        """Log the centralized losses and metrics."""
        run_id = self._ensure_run()
        for server_round, key, value in history_values(history):
            self._client.log_metric(run_id, key, value, step=server_round)

    def close(self) -> None:
        """End the MLflow run (FINISHED, or FAILED if the run failed)."""
        if self.run_id is not None:
            run_id, self.run_id = self.run_id, None
            self._client.set_terminated(run_id, self._status)


def make_sinks(
    *,
    tensorboard_dir: str | os.PathLike[str] | None = None,
    mlflow_uri: str | None = None,
) -> list[MetricsSink]:
    """The sinks ``start_server``'s keywords ask for.

    Raises:
        ConfigError: a sink's library is not installed.
    """
    sinks: list[MetricsSink] = []
    makers: list[Callable[[], MetricsSink]] = []
    if tensorboard_dir is not None:
        makers.append(lambda: TensorBoardSink(tensorboard_dir))
    if mlflow_uri is not None:
        makers.append(lambda: MLflowSink(mlflow_uri))
    for make in makers:
        sinks.append(make())
    return sinks
