"""The ServerApp: FedXgbBagging collects every node's new trees into one global forest."""

import stamen as fl
from stamen.common import Context, Parameters
from stamen.server import ServerAppComponents, ServerConfig
from stamen.server.strategy import FedXgbBagging, weighted_average

from task import auc, load_booster, load_test_set


def evaluate(server_round, parameters: Parameters, config):
    """AUC of the global forest on the held-out test set (none before round 1)."""
    if not parameters.tensors:
        return None
    return 0.0, {"AUC": auc(load_booster(parameters.tensors[0]), load_test_set())}


def server_fn(context: Context):
    num_nodes = int(context.run_config.get("num-nodes", 3))
    strategy = FedXgbBagging(
        evaluate_function=evaluate,
        min_fit_clients=num_nodes,
        min_evaluate_clients=num_nodes,
        min_available_clients=num_nodes,
        evaluate_metrics_aggregation_fn=weighted_average,
        initial_parameters=Parameters(tensor_type="", tensors=[]),
    )
    config = ServerConfig(num_rounds=int(context.run_config.get("num-server-rounds", 10)))
    return ServerAppComponents(strategy=strategy, config=config)


app = fl.server.ServerApp(server_fn=server_fn)
