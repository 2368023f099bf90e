"""The ClientApp: each node boosts from the global forest and sends only its new trees.

A ``Client`` (not a NumPyClient): the model travels as XGBoost's JSON bytes, the one
tensor of ``Parameters``.
"""

import xgboost as xgb

import stamen as fl
from stamen.common import (
    Code,
    Context,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Status,
)

from task import NUM_LOCAL_ROUND, PARAMS, auc, load_booster, load_partition


class FlowerClient(fl.client.Client):
    def __init__(self, train, valid):
        self.train, self.valid = train, valid

    def fit(self, ins: FitIns) -> FitRes:
        if not ins.parameters.tensors:  # first round: no global forest yet
            booster = xgb.train(PARAMS, self.train, num_boost_round=NUM_LOCAL_ROUND)
        else:
            booster = load_booster(ins.parameters.tensors[0])
            for _ in range(NUM_LOCAL_ROUND):
                booster.update(self.train, booster.num_boosted_rounds())
            # Only the trees of this round's boosting: the server appends them to its forest.
            total = booster.num_boosted_rounds()
            booster = booster[total - NUM_LOCAL_ROUND : total]
        return FitRes(
            status=Status(code=Code.OK, message="OK"),
            parameters=Parameters(tensor_type="", tensors=[bytes(booster.save_raw("json"))]),
            num_examples=self.train.num_row(),
            metrics={},
        )

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        booster = load_booster(ins.parameters.tensors[0])
        return EvaluateRes(
            status=Status(code=Code.OK, message="OK"),
            loss=0.0,
            num_examples=self.valid.num_row(),
            metrics={"AUC": auc(booster, self.valid)},
        )


def client_fn(context: Context):
    train, valid = load_partition(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    )
    return FlowerClient(train, valid)


app = fl.client.ClientApp(client_fn=client_fn)
