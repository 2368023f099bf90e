"""A client node: linear regression by gradient descent on this node's own data."""

import argparse

import stamen as fl

from task import gradient, load_partition, mse


class FlowerClient(fl.client.NumPyClient):
    def __init__(self, partition_id: int):
        self.x, self.y = load_partition(partition_id)
        self.lr = 0.2 / (1 + partition_id) ** 2  # steps fit for this node's feature scale

    def fit(self, parameters, config):
        weights = parameters[0]
        for _ in range(int(config["local-steps"])):
            weights = weights - self.lr * gradient(weights, self.x, self.y)
        return [weights], len(self.y), {}

    def evaluate(self, parameters, config):
        return mse(parameters[0], self.x, self.y), len(self.y), {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="127.0.0.1:8080")
    parser.add_argument("--partition-id", type=int, required=True)
    args = parser.parse_args()
    fl.client.start_client(
        server_address=args.server,
        client=FlowerClient(args.partition_id).to_client(),
        max_wait_time=60,
    )


if __name__ == "__main__":
    main()
