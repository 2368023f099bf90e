"""FedXgbBagging on small XGBoost JSON models built by hand (no xgboost needed)."""

from __future__ import annotations

import json
import logging
from typing import Any

from stamen.messages import Code, FitRes, Parameters, Status
from stamen.server.strategy import FedXgbBagging
from stamen.server.strategy.fedxgb_bagging import aggregate_bagging


def tree(tag: str, tree_id: int = 0) -> dict[str, Any]:
    """A one-leaf tree in XGBoost's JSON layout; ``tag`` tells trees apart."""
    return {"id": tree_id, "base_weights": [0.5], "split_indices": [0], "tag": tag}


def booster(trees: list[dict[str, Any]], parallel: int = 1) -> dict[str, Any]:
    """An XGBoost model (JSON) holding ``trees``."""
    return {
        "learner": {
            "gradient_booster": {
                "model": {
                    "gbtree_model_param": {
                        "num_trees": str(len(trees)),
                        "num_parallel_tree": str(parallel),
                    },
                    "iteration_indptr": list(range(0, len(trees) + 1, parallel)),
                    "tree_info": [0] * len(trees),
                    "trees": trees,
                },
                "name": "gbtree",
            },
            "objective": {"name": "binary:logistic"},
        },
        "version": [2, 1, 0],
    }


def as_bytes(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def xgb_res(model_bytes: bytes, num_examples: int = 10) -> FitRes:
    return FitRes(Status(Code.OK, ""), Parameters([model_bytes], ""), num_examples, {})


def test_bagging_appends_the_new_trees() -> None:
    """Forest of 2 trees + a client's 1 tree: 3 trees, ids 0..2, one more iteration."""
    forest = as_bytes(booster([tree("a", 0), tree("b", 1)]))
    out = json.loads(aggregate_bagging(forest, as_bytes(booster([tree("c", 0)]))))
    model = out["learner"]["gradient_booster"]["model"]
    assert model["gbtree_model_param"] == {"num_trees": "3", "num_parallel_tree": "1"}
    assert model["iteration_indptr"] == [0, 1, 2, 3]
    assert model["tree_info"] == [0, 0, 0]
    assert [(t["tag"], t["id"]) for t in model["trees"]] == [("a", 0), ("b", 1), ("c", 2)]


def test_bagging_takes_num_parallel_tree_trees() -> None:
    """With num_parallel_tree=2, the client's first 2 trees form one iteration."""
    forest = as_bytes(booster([tree("a", 0), tree("b", 1)], parallel=2))
    client = as_bytes(booster([tree("c", 0), tree("d", 1)], parallel=2))
    model = json.loads(aggregate_bagging(forest, client))["learner"]["gradient_booster"]["model"]
    assert model["iteration_indptr"] == [0, 2, 4]
    assert [t["id"] for t in model["trees"]] == [0, 1, 2, 3]


def test_first_round_keeps_the_first_model_bytes_then_appends(kit: Any) -> None:
    """Round 1: the first client's bytes are the forest unchanged, the second's tree is
    appended (bytes exactly as Flower's json.dumps); round 2 builds on the kept forest."""
    strategy = FedXgbBagging()
    first, second = as_bytes(booster([tree("a")])), as_bytes(booster([tree("b")]))
    results = [(kit.proxy("c0"), xgb_res(first)), (kit.proxy("c1"), xgb_res(second))]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    assert parameters is not None
    assert parameters.tensor_type == ""
    expected = booster([tree("a", 0), tree("b", 1)])
    assert parameters.tensors == [json.dumps(expected).encode()]
    assert strategy.global_model == parameters.tensors[0]
    assert metrics == {}
    third = as_bytes(booster([tree("c")]))
    parameters, _ = strategy.aggregate_fit(2, [(kit.proxy("c0"), xgb_res(third))], [])
    assert parameters is not None
    model = json.loads(parameters.tensors[0])["learner"]["gradient_booster"]["model"]
    assert [t["tag"] for t in model["trees"]] == ["a", "b", "c"]


def test_invalid_models_are_refused(kit: Any, caplog: Any) -> None:
    """Non-JSON bytes, a JSON that is not a booster, or 0 examples are refused and logged;
    the valid result is still bagged."""
    good = as_bytes(booster([tree("a")]))
    results = [
        (kit.proxy("junk"), xgb_res(b"\x00not json")),
        (kit.proxy("shape"), xgb_res(b'{"learner": {}}')),
        (kit.proxy("empty"), xgb_res(good, num_examples=0)),
        (kit.proxy("good"), xgb_res(good)),
    ]
    strategy = FedXgbBagging()
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        parameters, _ = strategy.aggregate_fit(1, results, [])
    assert parameters is not None
    assert parameters.tensors == [good]
    for cid in ("junk", "shape", "empty"):
        assert f"refusing the fit result of client {cid}" in caplog.text
    strict = FedXgbBagging(accept_failures=False)
    assert strict.aggregate_fit(1, results, []) == (None, {})
    assert strict.global_model is None


def test_evaluation_loss_is_zero_and_metrics_are_aggregated(kit: Any) -> None:
    """As in Flower the loss is 0; metrics go through evaluate_metrics_aggregation_fn, and
    evaluate_function gets the forest as Parameters."""
    strategy = FedXgbBagging(
        evaluate_function=lambda r, p, c: (float(len(p.tensors)), {"round": r}),
        evaluate_metrics_aggregation_fn=lambda m: {"auc": sum(x["auc"] for _, x in m) / len(m)},
        min_fit_clients=1,
    )
    results = [
        (kit.proxy("a"), kit.eval_res(0.0, 5, {"auc": 0.5})),
        (kit.proxy("b"), kit.eval_res(0.0, 5, {"auc": 1.0})),
    ]
    assert strategy.aggregate_evaluate(1, results, []) == (0.0, {"auc": 0.75})
    assert strategy.evaluate(3, Parameters([b"{}"], "")) == (1.0, {"round": 3})
    assert strategy.min_fit_clients == 1
