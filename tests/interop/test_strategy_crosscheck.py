"""Stamen's strategies give Flower 1.12's results, to 1e-6, on the same client results.

The test writes fixed scenarios (``manifest.json`` and ``.npy`` arrays), runs them through
Flower's strategies with ``peers/flwr_strategy_crosscheck.py`` in the Flower venv, runs them
through Stamen's strategies here, and compares every round's aggregate (and for the
adaptive DP wrappers the clipping norm, for FedProx and the client-side DP wrappers the fit
config). Each scenario runs several rounds as a server would: ``configure_fit`` with the
current global model, then ``aggregate_fit`` with results ``global + delta_k``.

The DP wrappers run with ``noise_multiplier=0`` (the noise generators differ); the
client-side ones with clients that clip (Flower's client functions there, Stamen's
``stamen.client.dp`` wrappers here), so both halves are checked.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stamen.server.strategy as strategies
from stamen.client.dp import AdaptiveClippingNumPyClient, FixedClippingNumPyClient
from stamen.client.numpy_client import NumPyClient
from stamen.messages import Code, FitRes, Instruction, Parameters, Reply, Status
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server.client_manager import SimpleClientManager
from stamen.server.client_proxy import ClientProxy
from stamen.typing import NDArrays

from ._harness import flower_python, peer_env

pytestmark = pytest.mark.interop

SCRIPT = Path(__file__).resolve().parent / "peers" / "flwr_strategy_crosscheck.py"
TOLERANCE = 1e-6
SHAPES = [(3, 4), (5,)]


def scenario(name: str, strategy: str, **options: Any) -> dict[str, Any]:
    """A scenario: the strategy, its keywords, and how the clients behave."""
    spec: dict[str, Any] = {
        "name": name,
        "strategy": strategy,
        "kwargs": {},
        "initial": False,
        "num_clients": 3,
        "rounds": 3,
        "dtype": "float32",
        "outliers": 0,
        "delta_scale": 0.1,
        "layers": len(SHAPES),
    }
    spec.update(options)
    spec.setdefault("num_examples", [k + 1 for k in range(spec["num_clients"])])
    spec.setdefault("failures", [0] * spec["rounds"])
    return spec


SCENARIOS = [
    scenario("fedavg", "FedAvg", num_examples=[1, 3, 4]),
    scenario("fedavg_f64_initial", "FedAvg", dtype="float64", initial=True, num_clients=4),
    scenario("fedavg_no_failures", "FedAvg", kwargs={"accept_failures": False}, failures=[0, 1, 0]),
    scenario("fault_tolerant", "FaultTolerantFedAvg", failures=[0, 1, 4]),
    scenario(
        "fedavgm",
        "FedAvgM",
        initial=True,
        rounds=4,
        kwargs={"server_learning_rate": 0.7, "server_momentum": 0.9},
    ),
    scenario("fedprox", "FedProx", kwargs={"proximal_mu": 0.1}),
    scenario("fedmedian", "FedMedian", num_clients=5),
    scenario("fedmedian_even", "FedMedian", num_clients=4, outliers=1),
    scenario("trimmed", "FedTrimmedAvg", num_clients=6, outliers=1),
    scenario("trimmed_beta", "FedTrimmedAvg", num_clients=10, kwargs={"beta": 0.3}, outliers=2),
    scenario("krum", "Krum", num_clients=6, outliers=1, kwargs={"num_malicious_clients": 1}),
    scenario(
        "multikrum",
        "Krum",
        num_clients=7,
        outliers=2,
        kwargs={"num_malicious_clients": 2, "num_clients_to_keep": 3},
    ),
    scenario(
        "bulyan",
        "Bulyan",
        num_clients=7,
        outliers=1,
        kwargs={"num_malicious_clients": 1, "to_keep": 0},
    ),
    scenario(
        "qfedavg",
        "QFedAvg",
        evaluate_fn="qffl_loss",
        kwargs={"q_param": 0.2, "qffl_learning_rate": 0.1},
    ),
    scenario("qfedavg_q1", "QFedAvg", evaluate_fn="qffl_loss", kwargs={"q_param": 1.0}),
    scenario("fedopt", "FedOpt", initial=True),
    scenario("fedadagrad", "FedAdagrad", initial=True, rounds=4),
    scenario("fedadam", "FedAdam", initial=True, rounds=4),
    scenario("fedadam_f64", "FedAdam", initial=True, rounds=4, dtype="float64"),
    scenario("fedyogi", "FedYogi", initial=True, rounds=4),
    scenario(
        "dp_server_fixed",
        "FedAvg",
        rounds=4,
        wrapper={"class": "DifferentialPrivacyServerSideFixedClipping", "args": [0.0, 0.3, 3]},
    ),
    scenario(
        "dp_client_fixed",
        "FedAvg",
        rounds=4,
        client_clipping="fixed",
        wrapper={"class": "DifferentialPrivacyClientSideFixedClipping", "args": [0.0, 0.3, 3]},
    ),
    scenario(
        "dp_server_adaptive",
        "FedAvg",
        rounds=5,
        num_clients=4,
        delta_scale=[0.02, 0.05, 0.2, 0.4],
        wrapper={
            "class": "DifferentialPrivacyServerSideAdaptiveClipping",
            "args": [0.0, 4, 0.3, 0.25, 0.2],
        },
    ),
    scenario(
        "dp_client_adaptive_fedadam",
        "FedAdam",
        # Flower's FedOpt averages with its in-place arithmetic (each result scaled by
        # float32(n_k / N), then summed), Stamen with that of Flower's ``aggregate``
        # (n_k w_k summed in float32, divided by N): an ulp apart in a round, which
        # FedAdam's step (divided by sqrt(v_t) + tau) magnifies; 2.1e-6 after 5 rounds.
        tolerance=1e-5,
        initial=True,
        rounds=5,
        num_clients=4,
        client_clipping="adaptive",
        delta_scale=[0.02, 0.05, 0.2, 0.4],
        wrapper={
            "class": "DifferentialPrivacyClientSideAdaptiveClipping",
            "args": [0.0, 4, 0.3, 0.25, 0.5],
        },
    ),
    scenario("xgb", "FedXgbBagging", num_clients=3, rounds=2),
    # dtype changes: the results' dtypes differ from the global model's (Flower promotes).
    scenario(
        "fedavg_int64_initial_f64_results",
        "FedAvg",
        initial=True,
        initial_dtype="int64",
        dtype="float64",
    ),
    scenario(
        "fedavg_f64_initial_f32_results",
        "FedAvg",
        initial=True,
        dtype="float64",
        result_dtype="float32",
        num_examples=[1, 3, 4],
    ),
    scenario(
        "fedavg_no_initial_f32_results",
        "FedAvg",
        dtype="float64",
        result_dtype="float32",
    ),
    scenario(
        "fedprox_f64_initial_f32_results",
        "FedProx",
        initial=True,
        dtype="float64",
        result_dtype="float32",
        kwargs={"proximal_mu": 0.1},
    ),
    scenario(
        "fedadam_f64_initial_f32_results",
        "FedAdam",
        initial=True,
        rounds=4,
        dtype="float64",
        result_dtype="float32",
    ),
    scenario(
        "fedadam_int64_initial_f64_results",
        "FedAdam",
        initial=True,
        rounds=3,
        initial_dtype="int64",
        dtype="float64",
    ),
    scenario(
        "fedavgm_int64_initial_f64_results",
        "FedAvgM",
        initial=True,
        initial_dtype="int64",
        dtype="float64",
        kwargs={"server_learning_rate": 0.7, "server_momentum": 0.9},
    ),
    scenario(
        "fedmedian_f64_initial_f32_results",
        "FedMedian",
        initial=True,
        num_clients=5,
        dtype="float64",
        result_dtype="float32",
    ),
    scenario(
        "krum_f64_initial_f32_results",
        "Krum",
        initial=True,
        num_clients=6,
        outliers=1,
        dtype="float64",
        result_dtype="float32",
        kwargs={"num_malicious_clients": 1},
    ),
]


# --- inputs -----------------------------------------------------------------------------------


def tree(tag: str) -> dict[str, Any]:
    return {"id": 0, "base_weights": [0.25], "left_children": [-1], "tag": tag}


def booster(trees: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "learner": {
            "gradient_booster": {
                "model": {
                    "gbtree_model_param": {"num_trees": str(len(trees)), "num_parallel_tree": "1"},
                    "iteration_indptr": list(range(len(trees) + 1)),
                    "tree_info": [0] * len(trees),
                    "trees": trees,
                },
                "name": "gbtree",
            }
        },
        "version": [2, 1, 0],
    }


def write_inputs(directory: Path) -> None:
    """manifest.json, and per scenario the initial model and each client's delta per round."""
    for index, spec in enumerate(SCENARIOS):
        folder = directory / spec["name"]
        folder.mkdir(parents=True)
        rng = np.random.default_rng(1000 + index)
        if spec["strategy"] == "FedXgbBagging":
            for r in range(1, spec["rounds"] + 1):
                for k in range(spec["num_clients"]):
                    model = booster([tree(f"r{r}c{k}")])
                    (folder / f"trees_r{r}_c{k}.json").write_text(json.dumps(model))
            continue
        dtype = np.dtype(spec["dtype"])
        initial_dtype = np.dtype(spec.get("initial_dtype", spec["dtype"]))
        for i, shape in enumerate(SHAPES):
            initial = rng.normal(0.0, 1.0, shape).astype(initial_dtype)
            np.save(folder / f"initial_l{i}.npy", initial, allow_pickle=False)
        scales = spec["delta_scale"]
        for r in range(1, spec["rounds"] + 1):
            for k in range(spec["num_clients"]):
                scale = scales[k] if isinstance(scales, list) else scales
                outlier = k >= spec["num_clients"] - spec["outliers"]
                for i, shape in enumerate(SHAPES):
                    delta = rng.normal(0.0, scale, shape) + (5.0 if outlier else 0.0)
                    np.save(
                        folder / f"delta_r{r}_c{k}_l{i}.npy",
                        delta.astype(dtype),
                        allow_pickle=False,
                    )
    (directory / "manifest.json").write_text(json.dumps({"scenarios": SCENARIOS}, indent=1))


# --- Stamen's side ------------------------------------------------------------------------------


class StandInProxy(ClientProxy):
    """A client proxy that is never called: the strategies only need one to exist."""

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        raise AssertionError("strategies must not call clients")


class DeltaClient(NumPyClient):
    """A client whose training adds a fixed delta to the model it receives."""

    def __init__(self, delta: NDArrays) -> None:
        self.delta = delta

    def fit(self, parameters: NDArrays, config: Any) -> tuple[NDArrays, int, dict[str, Any]]:
        return [p + d for p, d in zip(parameters, self.delta, strict=True)], 1, {}


def qffl_loss(server_round: int, ndarrays: NDArrays, config: Any) -> tuple[float, dict[str, Any]]:
    """The scenarios' centralized loss: 1 + 0.5 * sum of squared weights, in float64."""
    return 1.0 + 0.5 * sum(float(np.sum(np.square(a.astype(np.float64)))) for a in ndarrays), {}


def build(spec: dict[str, Any], initial: NDArrays) -> strategies.Strategy:
    kwargs = dict(spec["kwargs"])
    if spec["initial"]:
        kwargs["initial_parameters"] = ndarrays_to_parameters(initial)
    if spec.get("evaluate_fn") == "qffl_loss":
        kwargs["evaluate_fn"] = qffl_loss
    strategy: strategies.Strategy = getattr(strategies, spec["strategy"])(**kwargs)
    wrapper = spec.get("wrapper")
    if wrapper:
        strategy = getattr(strategies, wrapper["class"])(strategy, *wrapper["args"])
    return strategy


def run_stamen(spec: dict[str, Any], inputs: Path) -> list[dict[str, Any]]:
    """Stamen's rounds, as run_numpy() of the Flower script runs Flower's."""
    folder = inputs / spec["name"]
    initial = [
        np.load(folder / f"initial_l{i}.npy", allow_pickle=False) for i in range(len(SHAPES))
    ]
    strategy = build(spec, initial)
    manager = SimpleClientManager(wait_timeout=5.0, seed=0)
    proxies = [StandInProxy(f"c{k}") for k in range(spec["num_clients"])]
    for proxy in proxies:
        manager.register(proxy)
    global_params = ndarrays_to_parameters(initial)
    rounds = []
    for server_round in range(1, spec["rounds"] + 1):
        instructions = strategy.configure_fit(server_round, global_params, manager)
        config = dict(instructions[0][1].config)
        global_arrays = parameters_to_ndarrays(global_params)
        results = []
        for k, proxy in enumerate(proxies):
            delta = [
                np.load(folder / f"delta_r{server_round}_c{k}_l{i}.npy", allow_pickle=False)
                for i in range(len(SHAPES))
            ]
            client: NumPyClient = DeltaClient(delta)
            if spec.get("client_clipping") == "fixed":
                client = FixedClippingNumPyClient(client)
            elif spec.get("client_clipping") == "adaptive":
                client = AdaptiveClippingNumPyClient(client)
            model, _, metrics = client.fit([a.copy() for a in global_arrays], config)
            if spec.get("result_dtype"):  # a client that trains in its own dtype
                model = [np.asarray(m, dtype=spec["result_dtype"]) for m in model]
            fit_res = FitRes(
                Status(Code.OK, ""), ndarrays_to_parameters(model), spec["num_examples"][k], metrics
            )
            results.append((proxy, fit_res))
        failures: list[Any] = [RuntimeError("failed")] * spec["failures"][server_round - 1]
        parameters, _ = strategy.aggregate_fit(server_round, results, failures)
        entry: dict[str, Any] = {
            "aggregated": parameters is not None,
            "config": {k: v for k, v in config.items() if isinstance(v, int | float | str)},
            "clipping_norm": getattr(strategy, "clipping_norm", None),
            "arrays": parameters_to_ndarrays(parameters) if parameters is not None else None,
        }
        if parameters is not None:
            global_params = parameters
        rounds.append(entry)
    return rounds


def run_stamen_xgb(spec: dict[str, Any], inputs: Path) -> list[bytes]:
    strategy = strategies.FedXgbBagging(**spec["kwargs"])
    out = []
    for server_round in range(1, spec["rounds"] + 1):
        results: list[tuple[ClientProxy, FitRes]] = [
            (
                StandInProxy(f"c{k}"),
                FitRes(
                    Status(Code.OK, ""),
                    Parameters(
                        [(inputs / spec["name"] / f"trees_r{server_round}_c{k}.json").read_bytes()],
                        "",
                    ),
                    spec["num_examples"][k],
                ),
            )
            for k in range(spec["num_clients"])
        ]
        parameters, _ = strategy.aggregate_fit(server_round, results, [])
        assert parameters is not None
        out.append(parameters.tensors[0])
    return out


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flower_outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """Inputs written once, run through Flower once (one subprocess for all scenarios)."""
    python = flower_python()
    inputs = tmp_path_factory.mktemp("crosscheck-inputs")
    outputs = tmp_path_factory.mktemp("crosscheck-outputs")
    write_inputs(inputs)
    proc = subprocess.run(
        [str(python), str(SCRIPT), "--inputs", str(inputs), "--outputs", str(outputs)],
        capture_output=True,
        text=True,
        timeout=120,
        env=peer_env(),
        cwd=outputs,
        check=False,
    )
    assert proc.returncode == 0, f"Flower cross-check script failed:\n{proc.stderr[-4000:]}"
    return inputs, outputs, json.loads((outputs / "summary.json").read_text())


@pytest.mark.parametrize("spec", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_stamen_matches_flower(
    spec: dict[str, Any], flower_outputs: tuple[Path, Path, dict[str, Any]]
) -> None:
    """Round by round: aggregated or not alike; arrays within 1e-6 (a scenario may say
    otherwise, and why), same dtype; the fit config and the adaptive clipping norm alike."""
    inputs, outputs, summary = flower_outputs
    flower_rounds = summary[spec["name"]]
    if spec["strategy"] == "FedXgbBagging":
        ours = run_stamen_xgb(spec, inputs)
        for r, forest in enumerate(ours, start=1):
            assert forest == (outputs / f"{spec['name']}_r{r}.json").read_bytes()
        return
    ours = run_stamen(spec, inputs)
    assert len(ours) == len(flower_rounds)
    for r, (mine, theirs) in enumerate(zip(ours, flower_rounds, strict=True), start=1):
        where = f"{spec['name']} round {r}"
        assert mine["aggregated"] == theirs["aggregated"], where
        assert mine["config"] == theirs["config"], where
        if theirs["clipping_norm"] is not None:
            assert mine["clipping_norm"] == pytest.approx(theirs["clipping_norm"], rel=1e-9), where
        if not theirs["aggregated"]:
            continue
        assert len(mine["arrays"]) == theirs["layers"], where
        for i, array in enumerate(mine["arrays"]):
            expected = np.load(outputs / f"{spec['name']}_r{r}_l{i}.npy", allow_pickle=False)
            assert array.dtype == expected.dtype, f"{where} layer {i}"
            tolerance = spec.get("tolerance", TOLERANCE)
            np.testing.assert_allclose(
                array, expected, rtol=tolerance, atol=tolerance, err_msg=f"{where} layer {i}"
            )


def test_scenarios_cover_every_strategy() -> None:
    """The cross-check runs every strategy of the issue, wrappers included. SecAggPlus is
    a protocol over several exchanges with the nodes, not an aggregation rule that Flower's
    classic strategies have: it is checked against plain FedAvg within its quantization
    bound (tests/integration/test_secagg_rounds.py)."""
    covered = {s["strategy"] for s in SCENARIOS} | {
        s["wrapper"]["class"] for s in SCENARIOS if s.get("wrapper")
    }
    checked_elsewhere = {"SecAggPlus"}
    expected = {
        name
        for name in strategies.__all__
        if isinstance(getattr(strategies, name), type)
        and issubclass(getattr(strategies, name), strategies.Strategy)
        and name != "Strategy"
    }
    assert expected - checked_elsewhere <= covered
