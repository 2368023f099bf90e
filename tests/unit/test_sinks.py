"""Metrics sinks read back: TensorBoard event files (tensorboardX) and MLflow's store."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from stamen.server.events import RoundEnded, RunEnded, RunStarted
from stamen.server.history import History
from stamen.server.sinks import MLflowSink, TensorBoardSink

EVENTS = [
    RunStarted(2, "FedAvg"),
    RoundEnded(1, "fit", 2, 0, 0.1, metrics={"n": 3, "name": "text"}),
    RoundEnded(1, "evaluate", 2, 0, 0.1, loss=0.5, metrics={"accuracy": 0.8}),
    RoundEnded(2, "fit", 1, 1, 0.1, aggregated=False, reasons=("no results",)),
    RoundEnded(2, "evaluate", 2, 0, 0.1, loss=0.25, metrics={"accuracy": 0.9}),
    RunEnded(True, 2, 0.5),
]


def _history() -> History:
    history = History()
    history.add_loss_centralized(0, 3.0)
    history.add_loss_centralized(2, 1.0)
    history.add_metrics_centralized(2, {"accuracy": 0.95})
    return history


EXPECTED = {
    ("round/fit_results", 1): 2.0,
    ("round/fit_failures", 1): 0.0,
    ("fit/n", 1): 3.0,
    ("round/evaluate_results", 1): 2.0,
    ("round/evaluate_failures", 1): 0.0,
    ("loss/distributed", 1): 0.5,
    ("evaluate/accuracy", 1): pytest.approx(0.8),
    ("round/fit_results", 2): 1.0,
    ("round/fit_failures", 2): 1.0,
    ("round/evaluate_results", 2): 2.0,
    ("round/evaluate_failures", 2): 0.0,
    ("loss/distributed", 2): 0.25,
    ("evaluate/accuracy", 2): pytest.approx(0.9),
    ("loss/centralized", 0): 3.0,
    ("loss/centralized", 2): 1.0,
    ("centralized/accuracy", 2): pytest.approx(0.95),
}


def read_tensorboard_scalars(logdir: Path) -> dict[tuple[str, int], float]:
    """Every scalar of the event files in ``logdir``: TFRecord framing (length, its CRC,
    data, its CRC) around ``Event`` protos, parsed with tensorboardX's own classes."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[tuple[str, int], float] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_tensorboard_sink_writes_each_rounds_values(tmp_path: Path) -> None:
    """Each round's values at step = round, then the History's centralized values."""
    pytest.importorskip("tensorboardX", reason="tensorboardX (stamen[tensorboard]) missing")
    sink = TensorBoardSink(tmp_path)
    for event in EVENTS:
        sink(event)
    sink.write_history(_history())
    sink.close()
    sink.close()
    assert read_tensorboard_scalars(tmp_path) == EXPECTED


def test_mlflow_sink_logs_a_run_with_each_rounds_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One MLflow run (FINISHED) with the parameters and every value, read back from a
    local file store. mlflow is heavy (not in the dev extra): skipped when not installed."""
    pytest.importorskip("mlflow", reason="mlflow (stamen[mlflow]) is not installed")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    sink = MLflowSink(uri, experiment="stamen-test")
    for event in EVENTS:
        sink(event)
    sink.write_history(_history())
    run_id = sink.run_id
    sink.close()
    assert run_id is not None
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"num_rounds": "2", "strategy": "FedAvg"}
    found = {
        (key, metric.step): metric.value
        for key in run.data.metrics
        for metric in client.get_metric_history(run_id, key)
    }
    assert found == EXPECTED


def test_a_failed_run_ends_the_mlflow_run_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow", reason="mlflow (stamen[mlflow]) is not installed")
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    sink = MLflowSink(uri)
    sink(RunStarted(1, "FedAvg"))
    sink(RunEnded(False, 1, 0.1, "RunError: nothing aggregated"))
    run_id = sink.run_id
    sink.close()
    assert MlflowClient(tracking_uri=uri).get_run(str(run_id)).info.status == "FAILED"
