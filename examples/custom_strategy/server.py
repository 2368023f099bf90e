"""The server: a FedAvg subclass that saves the global model after every round."""

import argparse
from pathlib import Path

import numpy as np

import stamen as fl
from stamen.common import ndarrays_to_parameters, parameters_to_ndarrays


class SaveModelStrategy(fl.server.strategy.FedAvg):
    """FedAvg that writes each round's aggregated model to ``model_dir/round-N.npz``."""

    def __init__(self, model_dir: Path, **kwargs):
        super().__init__(**kwargs)
        self.model_dir = model_dir

    def aggregate_fit(self, server_round, results, failures):
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:  # None: nothing to aggregate this round
            path = self.model_dir / f"round-{server_round}.npz"
            np.savez(path, *parameters_to_ndarrays(parameters))
            print(f"round {server_round}: saved the global model to {path}", flush=True)
        return parameters, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:8080")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    args = parser.parse_args()
    args.model_dir.mkdir(parents=True, exist_ok=True)

    strategy = SaveModelStrategy(
        args.model_dir,
        min_fit_clients=args.nodes,
        min_evaluate_clients=args.nodes,
        min_available_clients=args.nodes,
        initial_parameters=ndarrays_to_parameters([np.zeros(4)]),
        on_fit_config_fn=lambda server_round: {"local-steps": 10},
    )
    history = fl.server.start_server(
        server_address=args.address,
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
    )
    print(history, flush=True)


if __name__ == "__main__":
    main()
