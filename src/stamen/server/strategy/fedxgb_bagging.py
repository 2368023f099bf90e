"""FedXgbBagging: federated XGBoost by bagging the clients' new trees into one forest."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...messages import Code, FitRes, Parameters
from ...typing import Scalar
from .fedavg import FedAvg
from .state import StrategyState
from .strategy import EvaluateFailures, EvaluateResults, FitFailures, FitResults
from .validate import refuse_result, validate_evaluate_results

__all__ = ["FedXgbBagging", "XgbEvaluateFn", "aggregate_bagging"]

logger = logging.getLogger("stamen.server")

XgbEvaluateFn = Callable[
    [int, Parameters, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None
]
"""``evaluate_function(server_round, parameters, config) -> (loss, metrics) | None``."""


def _booster(document: Any) -> dict[str, Any]:
    model = document["learner"]["gradient_booster"]["model"]
    if not isinstance(model, dict):
        raise TypeError("learner.gradient_booster.model is not an object")
    return model


def _tree_counts(model: dict[str, Any]) -> tuple[int, int]:
    params = model["gbtree_model_param"]
    return int(params["num_trees"]), int(params["num_parallel_tree"])


def _load(model_bytes: bytes) -> dict[str, Any]:
    document = json.loads(model_bytes)
    if not isinstance(document, dict):
        raise TypeError("the model is not a JSON object")
    return document


def aggregate_bagging(previous: bytes | None, current: bytes) -> bytes:
    """Append the newest trees of ``current`` to the forest ``previous``.

    Both are XGBoost models in XGBoost's JSON format. With ``N`` trees in ``previous`` and
    ``P = num_parallel_tree`` of ``current``, the first ``P`` trees of ``current`` become
    trees ``N .. N + P - 1`` of the forest (one more boosting iteration, ``tree_info``
    0). Without ``previous``, ``current`` is the forest (its bytes unchanged). The output
    bytes are those of Flower 1.12 for the same inputs.

    Raises:
        ValueError, KeyError, TypeError, IndexError: an input is not such a model.
    """
    current_doc = _load(current)
    current_model = _booster(current_doc)
    _, parallel = _tree_counts(current_model)
    new_trees = current_model["trees"]
    if not isinstance(new_trees, list) or len(new_trees) < parallel:
        raise IndexError(f"the model has fewer trees than num_parallel_tree={parallel}")
    if previous is None:
        return current
    forest_doc = _load(previous)
    forest = _booster(forest_doc)
    num_trees, _ = _tree_counts(forest)
    forest["gbtree_model_param"]["num_trees"] = str(num_trees + parallel)
    forest["iteration_indptr"].append(forest["iteration_indptr"][-1] + parallel)
    for index in range(parallel):
        tree = new_trees[index]
        tree["id"] = num_trees + index
        forest["trees"].append(tree)
        forest["tree_info"].append(0)
    return bytes(json.dumps(forest_doc), "utf-8")


class FedXgbBagging(FedAvg):
    """Federated XGBoost bagging: the global forest collects every client's new trees.

    Each round, each client boosts on its data from the current forest and sends only its
    new trees (XGBoost JSON as the one tensor of ``Parameters``); the server appends them,
    one client after another, to the forest (:func:`aggregate_bagging`):
    ``F_{t+1} = F_t + sum_k trees_k``.

    Papers: Breiman, "Bagging Predictors", Machine Learning 24, 1996, applied to the tree
    ensembles of Chen and Guestrin, "XGBoost: A Scalable Tree Boosting System", KDD 2016
    (arXiv:1603.02754); the federated scheme of Flower's XGBoost examples.

    As in Flower 1.12, one boosting iteration of ``num_parallel_tree`` trees is taken from
    each client with ``tree_info`` 0, which fits regression and binary classification.
    XGBoost itself is needed only by the clients (``pip install stamen[xgboost]``).

    A result whose tensors are not XGBoost JSON models, or that reports
    ``num_examples <= 0``, is refused and logged and counts as a failure. State: the
    global forest (``global_model``, as a uint8 array). Beyond Flower: the
    ``fit_metrics_aggregation_fn`` hook is applied (Flower ignores it).

    Keywords and defaults are Flower 1.12's: ``evaluate_function`` and FedAvg's keywords.

    Args:
        evaluate_function: ``fn(server_round, parameters, config) -> (loss, metrics)``
            for centralized evaluation of the forest.
        **kwargs: FedAvg's keywords.
    """

    def __init__(self, evaluate_function: XgbEvaluateFn | None = None, **kwargs: Any) -> None:
        self.evaluate_function = evaluate_function
        self.global_model: bytes | None = None
        super().__init__(**kwargs)

    def observe_global_model(self, parameters: Parameters) -> None:
        """Nothing to remember: the forest is this strategy's own state."""

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Bag the valid results' trees into the global forest."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        forest = self.global_model
        accepted: FitResults = []
        refused = 0
        for proxy, fit_res in results:
            try:
                forest = _bag_result(forest, fit_res)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                refused += 1
                refuse_result(
                    server_round,
                    proxy,
                    fit_res,
                    f"not a valid XGBoost JSON model result: {type(exc).__name__}: {exc}",
                )
                if not self.accept_failures:
                    logger.warning(
                        "round %s: a result was refused and accept_failures=False: not aggregating",
                        server_round,
                    )
                    return None, {}
                continue
            accepted.append((proxy, fit_res))
        if forest is None or not accepted:
            logger.error(
                "round %s: not aggregating: no valid result (%d refused)", server_round, refused
            )
            return None, {}
        self.global_model = forest
        return Parameters(tensors=[forest], tensor_type=""), self.aggregate_fit_metrics(accepted)

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Loss 0 (as in Flower); the metrics of the valid results through the hook."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        valid, _ = validate_evaluate_results(server_round, results, failures)
        metrics: dict[str, Scalar] = {}
        if self.evaluate_metrics_aggregation_fn is not None:
            metrics = self.evaluate_metrics_aggregation_fn(
                [(r.num_examples, r.metrics) for _, r in valid]
            )
        return 0.0, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Run ``evaluate_function`` on the forest, if one is set."""
        if self.evaluate_function is None:
            return None
        return self.evaluate_function(server_round, parameters, {})

    def state_dict(self) -> StrategyState:
        """The global forest as a uint8 array (``global_model``), once there is one."""
        if self.global_model is None:
            return StrategyState()
        return StrategyState(
            arrays={"global_model": [np.frombuffer(self.global_model, dtype=np.uint8).copy()]}
        )

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore the global forest."""
        state.check_keys("FedXgbBagging", arrays={"global_model"}, values=set())
        arrays = state.arrays.get("global_model")
        if arrays is None:
            self.global_model = None
            return
        if len(arrays) != 1 or arrays[0].dtype != np.uint8 or arrays[0].ndim != 1:
            raise ConfigError(
                "FedXgbBagging.load_state_dict: global_model must be one 1-D uint8 array"
            )
        self.global_model = arrays[0].tobytes()


def _bag_result(forest: bytes | None, fit_res: FitRes) -> bytes:
    """``forest`` with the trees of every tensor of ``fit_res``; raise if it is invalid."""
    if fit_res.status.code != Code.OK:
        raise ValueError(f"status {fit_res.status.code.name}")
    if fit_res.num_examples <= 0:
        raise ValueError(f"num_examples={fit_res.num_examples}; at least 1 is needed")
    tensors = fit_res.parameters.tensors
    if not tensors:
        raise ValueError("no tensor")
    out = aggregate_bagging(forest, bytes(tensors[0]))
    for tree_bytes in tensors[1:]:
        out = aggregate_bagging(out, bytes(tree_bytes))
    return out
