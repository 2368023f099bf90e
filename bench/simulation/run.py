"""Simulation benchmark: Stamen (processes, threads, ray) against Flower 1.12's start_simulation.

Runs each case in a fresh process, samples the memory of its whole process tree (the
driver plus, on Ray, the raylet, GCS and worker processes) every 50 ms, and reports
client-rounds per second and peak memory, with Stamen's figures as ratios to Flower's.

Usage::

    STAMEN_FLWR_SIM_PYTHON=/path/to/venv-with-flwr[simulation]==1.12.0/bin/python \\
        .venv/bin/python bench/simulation/run.py [--clients 1000] [--rounds 10] \\
        [--fraction 0.1 | --sampled K] [--repeat 1] [--cases stamen/threads,...] \\
        [--out bench/results/simulation.json]

``--clients`` takes a list (``1000,10000,100000``): each case runs at each size, and
with ``--sampled K`` every size samples the same ``K`` clients per round (fraction
``K / clients``), so the driver's peak RSS against the size is the memory one registered
client costs (printed as MB per registered client).

Without ``$STAMEN_FLWR_SIM_PYTHON`` only the Stamen cases run (no ratios). Stamen's cases
run with this interpreter, which needs Stamen, Ray (``stamen[ray]``) and scikit-learn.
Before timing, the Flower-style scripts of ``tests/integration/sim`` are run by both
frameworks, and their outputs must match: ``sim_flower_script.py`` exactly, and
``sim_module_global_script.py`` (a model kept in a module global, on Stamen's default
backend) to 1e-9 relative.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SCRIPT = REPO / "tests" / "integration" / "sim" / "sim_flower_script.py"
GLOBAL_SCRIPT = REPO / "tests" / "integration" / "sim" / "sim_module_global_script.py"
CASES = [("stamen", "processes"), ("stamen", "threads"), ("stamen", "ray"), ("flwr", "ray")]
TIMEOUT = 1800.0


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _pss_kb(pid: int) -> int:
    """Proportional set size of one process (shared pages split between their users)."""
    try:
        for line in (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class _TreeSampler:
    """Samples the total PSS of a process tree until stopped; keeps the peak."""

    def __init__(self, root: int, period: float = 0.05) -> None:
        self.root, self.period = root, period
        self.peak_kb = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.root)
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in pids))
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(self.period)


def _env(data: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env["STAMEN_BENCH_DIGITS"] = str(data)
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def run_case(
    python: str, framework: str, backend: str, clients: int, args: argparse.Namespace, data: Path
) -> dict[str, Any]:
    """One case in a fresh process; its JSON line plus the tree's peak memory."""
    fraction = args.sampled / clients if args.sampled else args.fraction
    command = [python, str(HERE / "case.py"), framework, backend]
    command += [str(clients), str(args.rounds), str(fraction)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, env=_env(data)
        )
        with _TreeSampler(proc.pid) as sampler:
            out, _ = proc.communicate(timeout=TIMEOUT)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{framework}/{backend} failed:\n{log.read()[-4000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["tree_peak_pss_kb"] = sampler.peak_kb
    result["tree_peak_processes"] = sampler.peak_processes
    result["client_rounds_per_s"] = result["client_rounds"] / result["round_seconds"]
    result["client_rounds_per_s_with_startup"] = result["client_rounds"] / result["total_seconds"]
    return result


def check_same_output(flwr_python: str) -> str:
    """The Flower-style script prints the same with Stamen and with Flower 1.12."""
    with tempfile.TemporaryDirectory() as tmp:
        flower_copy = Path(tmp) / "flower_script.py"
        flower_copy.write_text(
            SCRIPT.read_text().replace("import stamen as fl", "import flwr as fl")
        )
        outputs = {}
        for name, python, script in (
            ("stamen", sys.executable, SCRIPT),
            ("flwr", flwr_python, flower_copy),
        ):
            done = subprocess.run(
                [python, str(script)], capture_output=True, text=True, timeout=600, check=False
            )
            if done.returncode != 0:
                raise RuntimeError(f"{name} could not run {SCRIPT.name}:\n{done.stderr[-4000:]}")
            outputs[name] = done.stdout
    if outputs["stamen"] != outputs["flwr"]:
        raise RuntimeError(f"the script's output differs: {outputs}")
    return outputs["stamen"]


def check_module_global(flwr_python: str) -> list[list[float]]:
    """A model kept in a module global trains the same on Stamen's default backend as on
    Flower 1.12 (losses within 1e-9 relative); returns both frameworks' losses."""
    losses = []
    for name, python in (("stamen", sys.executable), ("flwr", flwr_python)):
        env = dict(os.environ, SIM_FRAMEWORK=name, FLWR_TELEMETRY_ENABLED="0")
        done = subprocess.run(
            [python, str(GLOBAL_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env=env,
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith("LOSSES ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"{name} could not run {GLOBAL_SCRIPT.name}:\n{done.stderr[-4000:]}")
        losses.append([float(v) for _, v in ast.literal_eval(line[len("LOSSES ") :])])
    ours, theirs = losses
    if len(ours) != len(theirs) or any(
        abs(a - b) > 1e-9 * abs(b) for a, b in zip(ours, theirs, strict=True)
    ):
        raise RuntimeError(f"{GLOBAL_SCRIPT.name}: Stamen {ours}, Flower {theirs}")
    return losses


def _write_digits(path: Path) -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    np.savez(path, x=np.asarray(x, dtype=np.float64) / 16.0, y=np.asarray(y, dtype=np.intp))


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median throughput (all repetitions are kept in the JSON)."""
    ordered = sorted(results, key=lambda r: r["client_rounds_per_s"])
    return ordered[len(ordered) // 2]


def main() -> None:
    """Run every case, print a table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1000", help="a number, or a list: 1000,100000")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--sampled", type=int, default=None, help="clients sampled per round")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cases", default=",".join(f"{f}/{b}" for f, b in CASES))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "simulation.json")
    args = parser.parse_args()
    sizes = [int(n) for n in args.clients.split(",")]
    cases = [c for c in CASES if f"{c[0]}/{c[1]}" in args.cases.split(",")]
    flwr_python = os.environ.get("STAMEN_FLWR_SIM_PYTHON")
    report: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "workload": {
            "clients": sizes,
            "rounds": args.rounds,
            "fraction": args.fraction,
            "sampled": args.sampled,
            "client_resources": {"num_cpus": 1},
        },
        "cases": {},
    }
    if flwr_python:
        report["same_output_as_flower"] = check_same_output(flwr_python)
        report["module_global_losses_stamen_flower"] = check_module_global(flwr_python)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits.npz"
        _write_digits(data)
        for clients in sizes:
            for framework, backend in cases:
                if framework == "flwr" and not flwr_python:
                    continue
                python = flwr_python if framework == "flwr" else sys.executable
                runs = [
                    run_case(python, framework, backend, clients, args, data)
                    for _ in range(args.repeat)
                ]
                name = f"{framework}/{backend}" + (f"@{clients}" if len(sizes) > 1 else "")
                report["cases"][name] = {"median": _median(runs), "runs": runs}
                print(f"done: {name}", file=sys.stderr, flush=True)
    _ratios(report)
    report["mb_per_registered_client"] = _per_client(report)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    for case, mb in report["mb_per_registered_client"].items():
        print(f"{case}: {mb * 1e3:.2f} KB of driver peak RSS per registered client")


def _per_client(report: dict[str, Any]) -> dict[str, float]:
    """Driver peak RSS per registered client of each case run at several sizes: the slope
    between the smallest and the largest size (MB per client)."""
    sizes: dict[str, list[tuple[int, float]]] = {}
    for case in report["cases"].values():
        m = case["median"]
        sizes.setdefault(f"{m['framework']}/{m['backend']}", []).append(
            (m["clients"], m["driver_peak_kb"] / 1024)
        )
    slopes = {}
    for name, points in sizes.items():
        (low, low_mb), (high, high_mb) = min(points), max(points)
        if high > low:
            slopes[name] = (high_mb - low_mb) / (high - low)
    return slopes


def _ratios(report: dict[str, Any]) -> None:
    for name, case in report["cases"].items():
        size = name.partition("@")[2]
        flower = report["cases"].get("flwr/ray" + (f"@{size}" if size else ""), {}).get("median")
        if name.startswith("stamen/") and flower is not None:
            median = case["median"]
            case["vs_flower"] = {
                "client_rounds_per_s": median["client_rounds_per_s"]
                / flower["client_rounds_per_s"],
                "client_rounds_per_s_with_startup": median["client_rounds_per_s_with_startup"]
                / flower["client_rounds_per_s_with_startup"],
                "tree_peak_pss": median["tree_peak_pss_kb"] / flower["tree_peak_pss_kb"],
                "driver_peak": median["driver_peak_kb"] / flower["driver_peak_kb"],
            }


_COLUMNS = (
    "case",
    "client-rounds/s (rounds only)",
    "client-rounds/s (with start-up)",
    "total s",
    "peak PSS, all processes (MiB)",
    "driver peak RSS (MiB)",
    "final accuracy",
)


def _cell(value: float, ratio: dict[str, float] | None, key: str, digits: int = 1) -> str:
    text = f"{value:.{digits}f}"
    return f"{text} ({ratio[key]:.2f}x)" if ratio else text


def _table(report: dict[str, Any]) -> str:
    rows = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for name, case in report["cases"].items():
        m, ratio = case["median"], case.get("vs_flower")
        cells = [
            name,
            _cell(m["client_rounds_per_s"], ratio, "client_rounds_per_s"),
            _cell(m["client_rounds_per_s_with_startup"], ratio, "client_rounds_per_s_with_startup"),
            f"{m['total_seconds']:.1f}",
            _cell(m["tree_peak_pss_kb"] / 1024, ratio, "tree_peak_pss", 0),
            _cell(m["driver_peak_kb"] / 1024, ratio, "driver_peak", 0),
            f"{m['final_accuracy']:.3f}",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
