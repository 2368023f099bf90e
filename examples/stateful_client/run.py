"""Run the example on this machine: a server and --nodes nodes, each a process on 127.0.0.1.

They are started with Stamen's command line, as on real machines (see README.md):
``stamen server server_app:app`` and ``stamen node client_app:app``.
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAMEN = [sys.executable, "-m", "stamen"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: argparse.Namespace, history_file: Path) -> list[int]:
    """Start the server and the nodes; wait for them; return their exit codes."""
    address = f"127.0.0.1:{free_port()}"
    run_config = f"num-server-rounds={args.rounds} num-nodes={args.nodes}"
    server_command = [*STAMEN, "server", "server_app:app", "--address", address, "--insecure"]
    server = subprocess.Popen(
        [*server_command, "--run-config", run_config, "--history", str(history_file)],
        cwd=HERE,
    )
    node_command = [*STAMEN, "node", "client_app:app", "--server", address, "--insecure"]
    node_command += ["--max-wait-time", "60"]  # give up if no server answers for 60 s
    nodes = [
        subprocess.Popen(
            [*node_command, "--node-config", f"partition-id={i} num-partitions={args.nodes}"],
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
    return codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=3, help="number of nodes (default: 3)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of FedAvg (default: 5)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:  # the server writes its History here
        history_file = Path(workdir) / "history.json"
        codes = launch(args, history_file)
        if any(codes):
            print(f"FAILED: exit codes {codes} (server first)")
            return 1
        history = json.loads(history_file.read_text())
    final_round, loss = history["losses_distributed"][-1]
    counts = {name: values[-1][1] for name, values in history["metrics_distributed_fit"].items()}
    print(
        f"Final loss: {loss:.4f} after {final_round} rounds; each of the {args.nodes} nodes "
        f"counted {counts['min_rounds']}-{counts['max_rounds']} rounds in context.state"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
