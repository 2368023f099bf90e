"""The cost of SecAgg+ over the network: one FedAvg round with and without it, real processes.

Usage::

    .venv/bin/python bench/secagg/network.py                       # 10 and 100 nodes x 1 M
    .venv/bin/python bench/secagg/network.py --nodes 1000 --repeat 1
    .venv/bin/python bench/secagg/network.py --transport grpc-rere # or rest
    .venv/bin/python bench/secagg/network.py --quick               # 6 nodes x 10 k, seconds

Each run is a Stamen server process (``server.py``: ``bench/flower_vs_stamen``'s server
with FedAvg or ``SecAggPlus(FedAvg)``, on 127.0.0.1, port chosen by the OS) and
``--processes`` node processes (``flower_vs_stamen/clients.py``: each node a thread
calling ``stamen.client.start_client`` with an unchanged NumPyClient that answers
``parameters + k``), on ``--transport`` (grpc-bidi by default). The server times the round
from the entry of ``configure_fit`` (every node connected; SecAgg+'s key stages run
there) to the end of aggregation, and its CPU over it; the driver reads the node
processes' CPU (``/proc/<pid>/stat``) when the server says the round starts and ends.
Bytes are the kernel's TCP counters of the server's connections (``ss -tinH``, both
directions, payload with the transport's framing, no TCP/IP headers). The aggregate is
checked against plain FedAvg's exact result within SecAgg+'s stated bound (``server.py``).

Round time and CPU are the median of ``--repeat`` runs (the others kept in ``*_all``).
Writes ``bench/results/secagg-network.json`` (``secagg-network-<transport>.json`` for
another transport, or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent / "flower_vs_stamen"
sys.path.insert(0, str(HARNESS))

from procs import Proc, environment, split, wait_for_run  # noqa: E402

PORT_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0
TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) "
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: fields 14, 15


def nodes_cpu(clients: list[Proc]) -> float:
    """CPU seconds the node processes have used so far, together."""
    return sum(process_cpu(client.proc.pid) for client in clients)


def server_argv(case: dict[str, Any], rest: bool, out: Path) -> list[str]:
    """The server's command line for ``case``."""
    argv = [sys.executable, str(HERE / "server.py"), "--clients", str(case["nodes"])]
    argv += ["--model-bytes", str(4 * case["params"]), "--rounds", "1", "--out", str(out)]
    argv += ["--counter", "kernel"]
    if case["secagg"]:
        argv += ["--shares", str(case["num_shares"]), "--threshold", str(case["threshold"])]
    if case["heartbeat_timeout"]:
        argv += ["--heartbeat-timeout", str(case["heartbeat_timeout"])]
    return argv + (["--rest"] if rest else [])


def start_nodes(case: dict[str, Any], address: str, options: Any, log_dir: Path) -> list[Proc]:
    """The node processes, ``--processes`` of them, the nodes split between them."""
    procs = []
    for index, (first, count) in enumerate(split(case["nodes"], options.processes)):
        argv = [sys.executable, str(HARNESS / "clients.py"), "--framework", "stamen"]
        argv += ["--transport", options.transport, "--address", address]
        argv += ["--first", str(first), "--count", str(count), "--timeout", str(options.timeout)]
        procs.append(Proc(f"nodes{index}", argv, log_dir, environment("stamen")))
    return procs


def wait_for_mark(server: Proc, clients: list[Proc], mark: str, deadline: float) -> None:
    """Until the server prints ``mark``; fail as soon as a process fails, or at
    ``deadline``."""
    while True:
        try:
            server.wait_for_line(mark, min(1.0, max(0.0, deadline - time.monotonic())))
            return
        except RuntimeError:
            if server.proc.poll() is not None or time.monotonic() >= deadline:
                raise
        for client in clients:
            if client.proc.poll() is not None:
                raise RuntimeError(
                    f"{client.name} exited ({client.proc.returncode}) "
                    f"before {mark}: {client.tail()}"
                )


def run_once(case: dict[str, Any], options: Any, log_dir: Path) -> dict[str, Any]:
    """One run of ``case``: the measurements. Every process started is stopped on the way
    out, whatever happened.

    Raises:
        RuntimeError: a process failed, timed out, or the aggregate failed its check.
    """
    out = log_dir / "server.json"
    rest = options.transport == "rest"
    deadline = time.monotonic() + options.timeout
    load = os.getloadavg()[0]
    procs: list[Proc] = []
    try:
        server = Proc("server", server_argv(case, rest, out), log_dir, environment("stamen"))
        procs.append(server)
        port = int(server.wait_for_line("REST_PORT" if rest else "PORT", PORT_TIMEOUT).split()[1])
        clients = start_nodes(
            case, f"{'http://' if rest else ''}127.0.0.1:{port}", options, log_dir
        )
        procs.extend(clients)
        wait_for_mark(server, clients, "ROUND_START", deadline)
        cpu_before = nodes_cpu(clients)
        wait_for_mark(server, clients, "ROUND_END", deadline)
        cpu_round = nodes_cpu(clients) - cpu_before
        wait_for_run(server, clients, deadline)
        for client in clients:
            client.proc.wait(EXIT_TIMEOUT)
            if client.proc.returncode != 0:
                raise RuntimeError(f"{client.name} exit {client.proc.returncode}: {client.tail()}")
        report = json.loads(out.read_text(encoding="utf-8"))
        return measurements(case, report, clients, cpu_round, load)
    finally:
        for proc in procs:
            proc.stop()


def measurements(
    case: dict[str, Any], report: dict[str, Any], clients: list[Proc], cpu: float, load: float
) -> dict[str, Any]:
    """One run's row, from the server's report and the node processes' last lines."""
    [round_] = report["rounds"]
    if not (report["check"]["ok"] and report["bound_check"]["ok"]):
        raise RuntimeError(f"the aggregate failed its check: {report['bound_check']}")
    client_cpu = [json.loads(c.value("CPU") or "null") for c in clients]
    return {
        **case,
        "round_s": round(round_["seconds"], 3),
        "aggregate_s": round(round_["aggregate_seconds"], 3),
        "server_cpu_s": round(round_["server_cpu_seconds"], 3),
        "nodes_cpu_s": round(cpu, 2),
        "nodes_cpu_life_s": round(sum(c["user"] + c["system"] for c in client_cpu), 2),
        "wire_bytes": round_["wire_bytes"],
        "bytes_per_node": round_["wire_bytes"] // case["nodes"],
        "connections_lost": round_["wire_connections_lost"],
        "server_peak_rss_mb": round(report["peak_rss_bytes"] / 2**20, 1),
        "server_rss_setup_mb": round(report["rss_after_setup_bytes"] / 2**20, 1),
        "node_process_peak_rss_mb": max(
            round(int(c.value("PEAK_RSS") or 0) / 2**20, 1) for c in clients
        ),
        "max_abs_error": report["bound_check"]["max_abs_error"],
        "bound": report["bound_check"]["bound"],
        "tolerance": report["bound_check"]["tolerance"],
        "load": round(load, 2),
    }


def run_case(case: dict[str, Any], options: Any) -> dict[str, Any]:
    """``--repeat`` runs of ``case``: the median run's row, with every run's times."""
    runs = []
    for _ in range(options.repeat):
        if options.logs:  # kept: the processes' stderr and the server's report
            options.logs.mkdir(parents=True, exist_ok=True)
            runs.append(run_once(case, options, Path(tempfile.mkdtemp(dir=options.logs))))
            continue
        with tempfile.TemporaryDirectory(prefix="secagg-network-") as logs:
            runs.append(run_once(case, options, Path(logs)))
    runs.sort(key=lambda r: float(r["round_s"]))
    row = dict(runs[len(runs) // 2])
    for key in ("round_s", "server_cpu_s", "nodes_cpu_s", "load"):
        row[f"{key}_all"] = [r[key] for r in runs]
    row["server_cpu_s"] = statistics.median(row["server_cpu_s_all"])
    row["nodes_cpu_s"] = statistics.median(row["nodes_cpu_s_all"])
    return row


def plan(options: Any) -> list[dict[str, Any]]:
    """The cases: each node count and size, plain then SecAgg+."""
    sizes = [(6, 10_000)] if options.quick else [(n, options.params) for n in options.nodes]
    cases = []
    for nodes, params in sizes:
        shares = options.shares or (5 if nodes <= 10 else 15)
        threshold = options.threshold or (3 if nodes <= 10 else 8)
        for secure in (False, True):
            cases.append(
                {
                    "nodes": nodes,
                    "params": params,
                    "secagg": secure,
                    "num_shares": shares if secure else None,
                    "threshold": threshold if secure else None,
                    "transport": options.transport,
                    "processes": options.processes,
                    "heartbeat_timeout": options.heartbeat_timeout,
                }
            )
    return cases


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table."""
    header = ("nodes", "secagg", "round s", "srv CPU", "nodes CPU", "MB/node", "MB srv", "RSS MB")
    lines = [" ".join(f"{h:>9}" for h in header)]
    for r in rows:
        secagg = f"{r['num_shares']}/{r['threshold']}" if r["secagg"] else "none"
        lines.append(
            f"{r['nodes']:>9} {secagg:>9} {r['round_s']:>9} {r['server_cpu_s']:>9} "
            f"{r['nodes_cpu_s']:>9} {r['bytes_per_node'] / 1e6:>9.3f} "
            f"{r['wire_bytes'] / 1e6:>9.1f} {r['server_peak_rss_mb']:>9}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 nodes x 10 k parameters")
    parser.add_argument("--nodes", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--shares", type=int, help="num_shares (default 5 up to 10 nodes, 15)")
    parser.add_argument("--threshold", type=int, help="threshold (default 3 up to 10 nodes, 8)")
    parser.add_argument(
        "--transport", choices=("grpc-bidi", "grpc-rere", "rest"), default="grpc-bidi"
    )
    parser.add_argument("--processes", type=int, default=2, help="node processes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    parser.add_argument("--out", type=Path, help="the JSON results (default bench/results/)")
    parser.add_argument(
        "--heartbeat-timeout",
        type=float,
        help="seconds of silence after which the server drops a node (default 45): "
        "1,000 nodes x 1 M on 2 cores receive their models more slowly than that",
    )
    parser.add_argument("--logs", type=Path, help="keep each run's logs and report here")
    options = parser.parse_args()
    rows = []
    for case in plan(options):
        rows.append(run_case(case, options))
        print(rows[-1], flush=True)
    suffix = "" if options.transport == "grpc-bidi" else f"-{options.transport}"
    target = options.out or HERE.parent / "results" / f"secagg-network{suffix}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
