"""The cost of SecAgg+: one FedAvg round with and without it, in simulation.

Usage::

    .venv/bin/python bench/secagg/run.py                 # 10 and 100 nodes x 1 M parameters
    .venv/bin/python bench/secagg/run.py --quick         # 10 nodes x 10 k parameters
    .venv/bin/python bench/secagg/run.py --nodes 100 --params 1000000 --shares 15 --threshold 8
    .venv/bin/python bench/secagg/run.py --flower .venv-flwr-sim/bin/python --repeat 1

Each case runs in a process of its own (so its peak RSS is its own): the round loop
(``Server.fit_round``) with ``FedAvg`` or ``SecAggPlus(FedAvg)``, over in-process nodes
that go through the wire codec both ways (each instruction encoded and decoded, each
reply too), as a network node's messages would; a pool of 2 threads runs the nodes.
Round time is wall-clock (the median of ``--repeat`` runs), CPU time is the process's
(user + system, all threads) over the round: on a shared machine the second is the
steadier. Bytes are the encoded messages (``stamen.wire``), both directions, without transport
framing. Writes ``bench/results/secagg.json`` (``secagg-kK.json`` with ``--shares K``,
or ``--out``) and prints a table.

``--flower PYTHON`` runs the same cases under Flower 1.12 (``flower.py``: its
``SecAggPlusWorkflow`` and ``secaggplus_mod`` under ``run_simulation``, i.e. Ray) with that
interpreter, into ``secagg-flower*.json``; see ``flower.py`` for what is measured there.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _case(nodes: int, params: int, secure: bool, shares: int, threshold: int) -> dict[str, object]:
    import stamen as fl
    from stamen.client.dispatch import handle
    from stamen.context import Context
    from stamen.messages import Instruction, Reply
    from stamen.ndarrays import ndarrays_to_parameters
    from stamen.records import RecordSet
    from stamen.server import Server, SimpleClientManager
    from stamen.server.client_proxy import ClientProxy
    from stamen.server.strategy import FedAvg, SecAggPlus
    from stamen.wire import decode_instruction, decode_reply, encode_instruction, encode_reply

    class Client(fl.client.NumPyClient):
        def __init__(self, k: int) -> None:
            self.k = k

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            return [p + np.float32(0.001 * self.k) for p in parameters], 10 + self.k, {}

    def client_fn(context: Context) -> fl.client.Client:
        return Client(int(context.node_config["partition-id"])).to_client()

    lock = threading.Lock()
    sent = {"down": 0, "up": 0}

    class Node(ClientProxy):
        def __init__(self, cid: str, pool: ThreadPoolExecutor) -> None:
            super().__init__(cid)
            self.pool = pool
            self.context = Context(int(cid), {"partition-id": cid}, RecordSet(), {})

        def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
            def run() -> Reply:
                down = encode_instruction(ins)
                reply = handle(client_fn, self.context, decode_instruction(down))
                up = encode_reply(reply)
                with lock:
                    sent["down"] += len(down)
                    sent["up"] += len(up)
                return decode_reply(up)

            return self.pool.submit(run)

    rows, cols = 1000, params // 1000
    init = ndarrays_to_parameters([np.zeros((rows, cols), np.float32)])
    inner = FedAvg(min_fit_clients=nodes, min_available_clients=nodes, fraction_evaluate=0.0)
    strategy = (
        SecAggPlus(inner, num_shares=shares, reconstruction_threshold=threshold)
        if secure
        else inner
    )
    manager = SimpleClientManager()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i in range(nodes):
            manager.register(Node(str(i), pool))
        server = Server(client_manager=manager, strategy=strategy)
        server.parameters = init
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        fitted = server.fit_round(1, None)
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    assert fitted is not None and fitted[0] is not None, "the round aggregated nothing"
    total = sent["down"] + sent["up"]
    return {
        "nodes": nodes,
        "params": rows * cols,
        "secagg": secure,
        "num_shares": shares if secure else None,
        "threshold": threshold if secure else None,
        "round_s": round(elapsed, 3),
        "cpu_s": round(cpu_s, 3),
        "bytes_per_node": total // nodes,
        "bytes_server": total,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


FLOWER = Path(__file__).with_name("flower.py")
"""The same round under Flower 1.12 (``--flower PYTHON``)."""


def _run_case(python: str, script: Path, case: list[str], timeout: float) -> dict[str, object]:
    """One case in a process of its own: its JSON line."""
    done = subprocess.run(
        [python, str(script), "--case", *case], capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--nodes", type=int, nargs="*")
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--shares", type=int)
    parser.add_argument("--threshold", type=int)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument(
        "--flower",
        metavar="PYTHON",
        help="run the cases under Flower 1.12 (flower.py) with this interpreter, which "
        "has flwr[simulation]==1.12.0 (make .venv-flwr-sim/.installed)",
    )
    parser.add_argument("--out", type=Path, help="the JSON results (default: see above)")
    parser.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        n, p, s, k, t = (int(v) for v in args.case)
        print(json.dumps(_case(n, p, bool(s), k, t)))
        return
    python, script = (args.flower, FLOWER) if args.flower else (sys.executable, Path(__file__))
    plan = [(10, 10_000)] if args.quick else [(n, args.params) for n in (args.nodes or [10, 100])]
    results = []
    for nodes, params in plan:
        shares = args.shares or (5 if nodes <= 10 else 15)
        threshold = args.threshold or (3 if nodes <= 10 else 8)
        for secure in (False, True):
            case = [str(v) for v in (nodes, params, int(secure), shares, threshold)]
            runs = [_run_case(python, script, case, args.timeout) for _ in range(args.repeat)]
            runs.sort(key=lambda r: float(r["round_s"]))  # type: ignore[arg-type]
            row = {
                **runs[len(runs) // 2],
                "round_s_all": [r["round_s"] for r in runs],
                "cpu_s_all": [r["cpu_s"] for r in runs],
            }
            results.append(row)
            print(row, flush=True)
    name = "secagg-flower" if args.flower else "secagg"
    name += "" if args.shares is None else f"-k{args.shares}"
    target = args.out or Path(__file__).resolve().parents[1] / "results" / f"{name}.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(results, indent=1) + "\n")
    header = ("nodes", "params", "secagg", "round s", "CPU s", "MB/node", "MB server", "RSS MB")
    print(" ".join(f"{h:>9}" for h in header))
    for r in results:
        mb_node = r["bytes_per_node"] / 1e6 if r["bytes_per_node"] is not None else float("nan")
        mb_server = r["bytes_server"] / 1e6 if r["bytes_server"] is not None else float("nan")
        print(
            f"{r['nodes']:>9} {r['params']:>9} {r['secagg']!s:>9} {r['round_s']:>9} "
            f"{r['cpu_s']:>9} "
            f"{mb_node:>9.2f} {mb_server:>9.1f} {r['peak_rss_mb']:>9}"
        )


if __name__ == "__main__":
    main()
