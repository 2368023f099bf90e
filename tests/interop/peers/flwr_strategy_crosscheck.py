"""Runs the cross-check scenarios through Flower 1.12's strategies (Flower venv only).

Usage: ``flwr_strategy_crosscheck.py --inputs DIR --outputs DIR``

``DIR/manifest.json`` (written by ``tests/interop/test_strategy_crosscheck.py``) lists the
scenarios; their arrays are ``.npy`` files (read with ``allow_pickle=False``). For each
scenario and round this script does what a Flower server does around a strategy:
``configure_fit`` with the current global model, then ``aggregate_fit`` with the clients'
results, whose models are ``global + delta`` (clipped by Flower's client-side DP functions
when the scenario says so). Outputs: the aggregated arrays as ``.npy`` and
``summary.json`` (per round: aggregated or not, the fit config, the clipping norm).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import flwr.server.strategy as strategies
import numpy as np
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.differential_privacy import (
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy


class StandInProxy(ClientProxy):
    """A client proxy that is never called: the strategies only need one to exist."""

    def get_properties(self, ins: Any, timeout: Any, group_id: Any) -> Any:
        raise NotImplementedError

    def get_parameters(self, ins: Any, timeout: Any, group_id: Any) -> Any:
        raise NotImplementedError

    def fit(self, ins: Any, timeout: Any, group_id: Any) -> Any:
        raise NotImplementedError

    def evaluate(self, ins: Any, timeout: Any, group_id: Any) -> Any:
        raise NotImplementedError

    def reconnect(self, ins: Any, timeout: Any, group_id: Any) -> Any:
        raise NotImplementedError


def qffl_loss(server_round: int, ndarrays: list[Any], config: Any) -> tuple[float, dict[str, Any]]:
    """The scenarios' centralized loss: 1 + 0.5 * sum of squared weights, in float64."""
    return 1.0 + 0.5 * sum(float(np.sum(np.square(a.astype(np.float64)))) for a in ndarrays), {}


def load(path: Path) -> Any:
    return np.load(path, allow_pickle=False)


def build(spec: dict[str, Any], initial: list[Any]) -> Any:
    kwargs = dict(spec["kwargs"])
    if spec["initial"]:
        kwargs["initial_parameters"] = ndarrays_to_parameters(initial)
    if spec.get("evaluate_fn") == "qffl_loss":
        kwargs["evaluate_fn"] = qffl_loss
    strategy = getattr(strategies, spec["strategy"])(**kwargs)
    wrapper = spec.get("wrapper")
    if wrapper:
        strategy = getattr(strategies, wrapper["class"])(strategy, *wrapper["args"])
    return strategy


def run_numpy(spec: dict[str, Any], inputs: Path, outputs: Path) -> list[dict[str, Any]]:
    folder = inputs / spec["name"]
    initial = [load(folder / f"initial_l{i}.npy") for i in range(spec["layers"])]
    strategy = build(spec, initial)
    manager = SimpleClientManager()
    proxies = [StandInProxy(f"c{k}") for k in range(spec["num_clients"])]
    for proxy in proxies:
        manager.register(proxy)
    global_params = ndarrays_to_parameters(initial)
    summary = []
    for server_round in range(1, spec["rounds"] + 1):
        instructions = strategy.configure_fit(server_round, global_params, manager)
        config = dict(instructions[0][1].config)
        global_arrays = parameters_to_ndarrays(global_params)
        results = []
        for k, proxy in enumerate(proxies):
            deltas = [
                load(folder / f"delta_r{server_round}_c{k}_l{i}.npy") for i in range(spec["layers"])
            ]
            model = [g + d for g, d in zip(global_arrays, deltas, strict=True)]
            if spec.get("result_dtype"):  # a client that trains in its own dtype
                model = [np.asarray(m, dtype=spec["result_dtype"]) for m in model]
            metrics: dict[str, Any] = {}
            if spec.get("client_clipping") == "fixed":
                compute_clip_model_update(model, global_arrays, float(config["clipping_norm"]))
            elif spec.get("client_clipping") == "adaptive":
                metrics["norm_bit"] = compute_adaptive_clip_model_update(
                    model, global_arrays, float(config["clipping_norm"])
                )
            fit_res = FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters(model),
                spec["num_examples"][k],
                metrics,
            )
            results.append((proxy, fit_res))
        failures = [RuntimeError("failed") for _ in range(spec["failures"][server_round - 1])]
        parameters, _ = strategy.aggregate_fit(server_round, results, failures)
        entry: dict[str, Any] = {
            "aggregated": parameters is not None,
            "config": {k: v for k, v in config.items() if isinstance(v, int | float | str)},
            "clipping_norm": getattr(strategy, "clipping_norm", None),
        }
        if parameters is not None:
            arrays = parameters_to_ndarrays(parameters)
            entry["layers"] = len(arrays)
            for i, array in enumerate(arrays):
                np.save(
                    outputs / f"{spec['name']}_r{server_round}_l{i}.npy", array, allow_pickle=False
                )
            global_params = parameters
        summary.append(entry)
    return summary


def run_xgb(spec: dict[str, Any], inputs: Path, outputs: Path) -> list[dict[str, Any]]:
    folder = inputs / spec["name"]
    strategy = strategies.FedXgbBagging(**spec["kwargs"])
    proxies = [StandInProxy(f"c{k}") for k in range(spec["num_clients"])]
    summary = []
    for server_round in range(1, spec["rounds"] + 1):
        results = [
            (
                proxy,
                FitRes(
                    Status(Code.OK, ""),
                    Parameters(
                        tensors=[(folder / f"trees_r{server_round}_c{k}.json").read_bytes()],
                        tensor_type="",
                    ),
                    spec["num_examples"][k],
                    {},
                ),
            )
            for k, proxy in enumerate(proxies)
        ]
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        (outputs / f"{spec['name']}_r{server_round}.json").write_bytes(parameters.tensors[0])
        summary.append({"aggregated": True, "config": {}, "clipping_norm": None, "layers": 1})
    return summary


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--outputs", type=Path, required=True)
    args = parser.parse_args()
    manifest = json.loads((args.inputs / "manifest.json").read_text())
    args.outputs.mkdir(parents=True, exist_ok=True)
    summary = {}
    for spec in manifest["scenarios"]:
        runner = run_xgb if spec["strategy"] == "FedXgbBagging" else run_numpy
        summary[spec["name"]] = runner(spec, args.inputs, args.outputs)
    (args.outputs / "summary.json").write_text(json.dumps(summary, indent=1))
    print("DONE", len(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
