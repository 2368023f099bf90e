"""Run the example on this machine: server.py and --nodes client.py, each a process on
127.0.0.1, then load the model the strategy saved last."""

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from task import load_partition, mse

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of FedAvg (default: 5)")
    parser.add_argument("--model-dir", type=Path, default=HERE / "models")
    args = parser.parse_args()

    address = f"127.0.0.1:{free_port()}"
    server_args = ["--address", address, "--nodes", str(args.nodes), "--rounds", str(args.rounds)]
    server_args += ["--model-dir", str(args.model_dir)]
    server = subprocess.Popen([sys.executable, "server.py", *server_args], cwd=HERE)
    nodes = [
        subprocess.Popen(
            [sys.executable, "client.py", "--server", address, "--partition-id", str(i)],
            cwd=HERE,
        )
        for i in range(args.nodes)
    ]
    processes = [server, *nodes]
    try:
        codes = [process.wait(timeout=600) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if any(codes):
        print(f"FAILED: exit codes {codes} (server first)")
        return 1

    last = args.model_dir / f"round-{args.rounds}.npz"
    weights = np.load(last)["arr_0"]
    loss = np.mean([mse(weights, *load_partition(i)) for i in range(args.nodes)])
    saved = len(list(args.model_dir.glob("round-*.npz")))
    print(
        f"Saved {saved} models in {args.model_dir}; the last one, {last.name}: "
        f"mean MSE {loss:.4f} on the nodes' data"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
