"""The ServerApp: FedAvg over every node, evaluated on a held-out test set each round."""

import stamen as fl
from stamen.common import Context, ndarrays_to_parameters
from stamen.server import ServerAppComponents, ServerConfig
from stamen.server.strategy import FedAvg, weighted_average

from task import get_weights, load_test_set, new_model, set_weights, test


def evaluate(server_round, parameters, config):
    """Centralized evaluation of the global model on the held-out test set."""
    model = new_model()
    set_weights(model, parameters)
    loss, accuracy = test(model, *load_test_set())
    return loss, {"accuracy": accuracy}


def server_fn(context: Context):
    num_nodes = int(context.run_config.get("num-nodes", 4))
    strategy = FedAvg(
        min_fit_clients=num_nodes,
        min_evaluate_clients=num_nodes,
        min_available_clients=num_nodes,
        initial_parameters=ndarrays_to_parameters(get_weights(new_model())),
        on_fit_config_fn=lambda server_round: {"local-epochs": 3},
        evaluate_fn=evaluate,
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    config = ServerConfig(num_rounds=int(context.run_config.get("num-server-rounds", 10)))
    return ServerAppComponents(strategy=strategy, config=config)


app = fl.server.ServerApp(server_fn=server_fn)
