"""A Flower 1.12 ServerApp (legacy workflow, FedAvg) for the SuperLink interop tests.

Run only by the Flower venv, through ``flower-server-app <app dir> --superlink ADDRESS
--insecure``; the app directory's ``pyproject.toml`` names ``flower_serverapp:app`` and
this directory is on ``PYTHONPATH``. ``STAMEN_INTEROP_OUT`` is the JSON file the run's
per-round aggregates (``scenario.encode_ndarray``), failure counts and distributed losses
are written to when the last round has been aggregated.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import flwr as fl
import scenario
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

OUT = Path(os.environ["STAMEN_INTEROP_OUT"])
ROUND_TIMEOUT = float(os.environ.get("STAMEN_INTEROP_ROUND_TIMEOUT", "30"))


class SavingFedAvg(fl.server.strategy.FedAvg):
    """Flower's FedAvg, writing each round's aggregate and failure count to ``OUT``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.result: dict[str, Any] = {
            "rounds": [],
            "fit_failures": [],
            "evaluate_failures": [],
            "losses_distributed": [],
        }

    def _save(self) -> None:
        partial = OUT.with_name(OUT.name + ".partial")
        partial.write_text(json.dumps(self.result), encoding="utf-8")
        os.replace(partial, OUT)

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.result["fit_failures"].append(len(failures))
        if parameters is not None:
            arrays = [scenario.encode_ndarray(a) for a in parameters_to_ndarrays(parameters)]
            self.result["rounds"].append({"round": server_round, "params": arrays})
        self._save()
        return parameters, metrics

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        loss, metrics = super().aggregate_evaluate(server_round, results, failures)
        self.result["evaluate_failures"].append(len(failures))
        self.result["losses_distributed"].append([server_round, loss])
        self._save()
        return loss, metrics


_n = len(scenario.CLIENT_IDS)
strategy = SavingFedAvg(
    min_fit_clients=_n,
    min_evaluate_clients=_n,
    min_available_clients=_n,
    initial_parameters=ndarrays_to_parameters(scenario.initial_ndarrays()),
    on_fit_config_fn=scenario.fit_config,
    on_evaluate_config_fn=scenario.evaluate_config,
    fit_metrics_aggregation_fn=scenario.aggregate_fit_metrics,
    evaluate_metrics_aggregation_fn=scenario.aggregate_evaluate_metrics,
)

app = fl.server.ServerApp(
    config=fl.server.ServerConfig(num_rounds=scenario.NUM_ROUNDS, round_timeout=ROUND_TIMEOUT),
    strategy=strategy,
)
