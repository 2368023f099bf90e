"""The data and the booster settings: scikit-learn's breast cancer data set, split by node."""

import numpy as np
import xgboost as xgb
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

SEED = 0
PARAMS = {  # one boosting round per node and round: what FedXgbBagging expects
    "objective": "binary:logistic",
    "eta": 0.1,
    "max_depth": 6,
    "eval_metric": "auc",
    "nthread": 1,
    "num_parallel_tree": 1,
    "subsample": 1.0,
    "tree_method": "hist",
}
NUM_LOCAL_ROUND = 1


def _split():
    x, y = load_breast_cancer(return_X_y=True)
    return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


def load_partition(partition_id: int, num_partitions: int):
    """This node's training and validation data (``xgb.DMatrix``): a random part of the
    training set, node k holding k + 1 shares of it (nodes of different sizes)."""
    x_train, _, y_train, _ = _split()
    order = np.random.default_rng(SEED).permutation(len(y_train))
    shares = np.arange(1, num_partitions + 1)
    bounds = (np.cumsum(shares)[:-1] / shares.sum() * len(order)).astype(int)
    index = np.split(order, bounds)[partition_id]
    x_part, x_valid, y_part, y_valid = train_test_split(
        x_train[index], y_train[index], test_size=0.2, random_state=SEED
    )
    return xgb.DMatrix(x_part, label=y_part), xgb.DMatrix(x_valid, label=y_valid)


def load_test_set():
    _, x_test, _, y_test = _split()
    return xgb.DMatrix(x_test, label=y_test)


def auc(booster: xgb.Booster, data: xgb.DMatrix) -> float:
    """The booster's AUC on ``data``, from XGBoost's own evaluation."""
    result = booster.eval_set([(data, "data")], iteration=booster.num_boosted_rounds() - 1)
    return float(result.split("\t")[1].split(":")[1])


def load_booster(model: bytes) -> xgb.Booster:
    booster = xgb.Booster(params=PARAMS)
    booster.load_model(bytearray(model))
    return booster
