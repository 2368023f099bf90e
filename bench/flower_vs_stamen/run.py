"""Stamen against Flower 1.12 on the same workloads, in one invocation (``make bench``).

For each workload and framework, a server process (``server_stamen.py`` with this python,
``server_flower.py`` with Flower's venv) and a few client processes (``clients.py``, the
nodes as threads calling the framework's ``start_client`` over grpc-bidi) run on 127.0.0.1,
every byte between them passing through a counting relay (``relay.py``). Runs alternate
between the frameworks (Stamen, Flower, Stamen, Flower, ...). The server times each FedAvg
round from inside its strategy (``configure_fit`` after sampling -> end of
``aggregate_fit``) and checks the final model; each process reports its peak RSS.

Workloads A-E as in issue #7; "E10k" is one Stamen round with 10,000 grpc-bidi nodes
(``swarm.py``: raw grpc.aio streams, Flower's server caps near 1,000); "micro" runs
``micro.py`` (encode/decode of a FitIns, FedAvg) for both frameworks.

Usage::

    .venv/bin/python bench/flower_vs_stamen/run.py [--quick] [--workloads A,B,C,D,E,E10k,micro]
        [--frameworks stamen,flower] [--repeat N] [--rounds N] [--transport grpc-bidi]
        [--flower-python PATH] [--out bench/results/flower_vs_stamen.json] [--readme]

``--quick`` shrinks every size (a smoke test of the harness, not a measurement).
``--readme`` writes the tables into bench/README.md. Flower's python is
``--flower-python``, else ``$STAMEN_FLWR_PYTHON``, else ``.venv-flwr/bin/python``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import queue
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from relay import SpliceRelay  # noqa: E402
from workload import SharedCounter, Workload  # noqa: E402

ASYNCIO = "asyncio"
FULL = {
    "A": Workload("A", 10, 4_000_000, rounds=3, processes=2, repeat=3, timeout=240),
    "B": Workload("B", 10, 100_000_000, rounds=3, processes=2, repeat=1, timeout=600),
    "C": Workload("C", 100, 400_000, rounds=3, processes=4, repeat=3, timeout=300),
    "D": Workload("D", 2, 400_000_000, rounds=2, processes=2, repeat=1, timeout=600),
    "E": Workload("E", 1000, 4_000, 3, processes=4, repeat=1, timeout=300, harness="asyncio"),
    "E10k": Workload(
        "E10k", 10_000, 4_000, 1, processes=2, repeat=1, timeout=600, harness="asyncio"
    ),
    "Ethreads": Workload("Ethreads", 1000, 4_000, rounds=2, processes=4, repeat=1, timeout=300),
}
QUICK = {
    "A": Workload("A", 4, 40_000, rounds=2, processes=2, repeat=1, timeout=60),
    "B": Workload("B", 4, 1_000_000, rounds=2, processes=2, repeat=1, timeout=60),
    "C": Workload("C", 10, 4_000, rounds=2, processes=2, repeat=1, timeout=60),
    "D": Workload("D", 2, 4_000_000, rounds=2, processes=2, repeat=1, timeout=60),
    "E": Workload("E", 40, 4_000, 2, processes=2, repeat=1, timeout=60, harness=ASYNCIO),
    "E10k": Workload("E10k", 200, 4_000, 1, processes=2, repeat=1, timeout=60, harness=ASYNCIO),
    "Ethreads": Workload("Ethreads", 40, 4_000, rounds=2, processes=2, repeat=1, timeout=60),
}
MICRO = {"full": (100_000_000, 10, 5), "quick": (1_000_000, 3, 2)}
ORDER = ("A", "B", "C", "D", "E", "E10k", "Ethreads", "micro")
DEFAULT = ("A", "B", "C", "D", "E", "E10k", "micro")
PORT_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0
KILL_TIMEOUT = 10.0


class Proc:
    """A subprocess whose stdout lines are read by a thread; stderr goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self._log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self._log_path.open("wb")
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
            cwd=HERE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with ``prefix``.

        Raises:
            RuntimeError: the process ended, or printed no such line in ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.name}: no {prefix!r} within {timeout:g} s") from None
            if line is None:
                self.proc.wait(KILL_TIMEOUT)
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def value(self, prefix: str) -> str | None:
        """After exit: the rest of the first stdout line starting with ``prefix``."""
        self._reader.join(KILL_TIMEOUT)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        found = [line for line in self.lines if line.startswith(prefix)]
        return found[0][len(prefix) :].strip() if found else None

    def tail(self, chars: int = 1500) -> str:
        """The end of the process's stderr."""
        self._log.flush()
        text = self._log_path.read_text(encoding="utf-8", errors="replace")
        return text[-chars:].strip()

    def stop(self) -> None:
        """Kill the process if it still runs; release its pipe and log."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(KILL_TIMEOUT)
        self._log.close()


def environment(framework: str) -> dict[str, str]:
    """Stamen processes inherit ours; Flower's get no PYTHONPATH and no telemetry."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if framework == "flower":
        env.pop("PYTHONPATH", None)
        env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def split(total: int, parts: int) -> list[tuple[int, int]]:
    """``(first, count)`` of ``parts`` near-equal slices of ``range(total)``."""
    parts = max(1, min(parts, total))
    base, extra = divmod(total, parts)
    slices, first = [], 0
    for index in range(parts):
        count = base + (1 if index < extra else 0)
        slices.append((first, count))
        first += count
    return slices


def wait_for_run(server: Proc, clients: list[Proc], deadline: float) -> None:
    """Until the server exits; fail early when a client process fails or time runs out."""
    while server.proc.poll() is None:
        for client in clients:
            if client.proc.poll() not in (None, 0):
                raise RuntimeError(
                    f"{client.name} failed (exit {client.proc.returncode}): {client.tail()}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out; server: {server.tail(600)}")
        time.sleep(0.1)
    if server.proc.returncode != 0:
        raise RuntimeError(f"server failed (exit {server.proc.returncode}): {server.tail()}")


def run_federation(
    framework: str, load: Workload, options: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    """One run of ``load`` on ``framework``; the measurements, or what went wrong."""
    stamen = framework == "stamen"
    python = sys.executable if stamen else options.flower_python
    env = environment(framework)
    out = log_dir / f"{framework}-{load.name}-server.json"
    counter = log_dir / f"{framework}-{load.name}-counter"
    rest = stamen and options.transport == "rest"
    argv = [python, str(HERE / ("server_stamen.py" if stamen else "server_flower.py"))]
    argv += ["--clients", str(load.clients), "--model-bytes", str(load.model_bytes)]
    argv += ["--rounds", str(load.rounds), "--out", str(out)]
    if options.relay:
        argv += ["--counter", str(counter)]
    if rest:
        argv.append("--rest")
    if options.trace_rss:
        argv.append("--trace-rss")
    if stamen and options.stamen_server_prefix:
        argv = shlex.split(options.stamen_server_prefix) + argv
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    procs: list[Proc] = []
    relay: SpliceRelay | None = None
    shared = SharedCounter(str(counter)) if options.relay else None
    result: dict[str, Any] = {"framework": framework, "ok": False}
    try:
        server = Proc(f"{framework}-{load.name}-server", argv, log_dir, env)
        procs.append(server)
        port = int(server.wait_for_line("REST_PORT" if rest else "PORT", PORT_TIMEOUT).split()[1])
        if shared is not None:
            relay = SpliceRelay(port, shared).start()
            port = relay.port
        address = f"{'http://' if rest else ''}127.0.0.1:{port}"
        swarm = load.harness == "asyncio"
        clients = []
        for index, (first, count) in enumerate(split(load.clients, load.processes)):
            if swarm:  # a neutral load generator: Stamen's python for either server
                cargv = [sys.executable, str(HERE / "swarm.py")]
            else:
                cargv = [python, str(HERE / "clients.py"), "--framework", framework]
                cargv += ["--transport", options.transport if stamen else "grpc-bidi"]
            cargv += ["--address", address, "--first", str(first), "--count", str(count)]
            cargv += ["--timeout", str(load.timeout)]
            cenv = environment("stamen") if swarm else env
            clients.append(Proc(f"{framework}-{load.name}-clients{index}", cargv, log_dir, cenv))
        procs.extend(clients)
        wait_for_run(server, clients, started + load.timeout)
        for client in clients:
            try:
                client.proc.wait(EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{client.name} still running after the run") from None
            if client.proc.returncode != 0:
                raise RuntimeError(f"{client.name} exit {client.proc.returncode}: {client.tail()}")
        server_report = json.loads(out.read_text(encoding="utf-8"))
        result.update(
            ok=bool(server_report["check"]["ok"]),
            error=None if server_report["check"]["ok"] else "result check failed",
            round_seconds=[r["seconds"] for r in server_report["rounds"]],
            aggregate_seconds=[r["aggregate_seconds"] for r in server_report["rounds"]],
            wire_bytes=[r["wire_bytes"] for r in server_report["rounds"]] if relay else None,
            server_peak_rss_bytes=server_report["peak_rss_bytes"],
            server_rss_after_setup_bytes=server_report["rss_after_setup_bytes"],
            client_peak_rss_bytes=[int(c.value("PEAK_RSS") or 0) for c in clients],
            clients_per_process=[count for _, count in split(load.clients, load.processes)],
            server_cpu_seconds=server_report["cpu_seconds"],
            client_cpu_seconds=[json.loads(c.value("CPU") or "null") for c in clients],
            client_retries=sum(int(c.value("RETRIES") or 0) for c in clients),
            check=server_report["check"],
            marks=server_report["marks"],
            rss_trace=server_report["rss_trace"] or None,
        )
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        result["error"] = str(exc)[-2000:]
    finally:
        for proc in procs:
            proc.stop()
        if relay is not None:
            relay.stop()
        elif shared is not None:
            shared.close()
    result["wall_seconds"] = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result["relay_cpu_seconds"] = {  # the driver's own CPU: the relay thread, mostly
        "user": cpu_after.ru_utime - cpu_before.ru_utime,
        "system": cpu_after.ru_stime - cpu_before.ru_stime,
    }
    return result


def run_micro(framework: str, options: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """``micro.py`` for one framework, in a fresh process."""
    model_bytes, models, repeat = MICRO["quick" if options.quick else "full"]
    python = sys.executable if framework == "stamen" else options.flower_python
    argv = [python, str(HERE / "micro.py"), "--framework", framework]
    argv += ["--model-bytes", str(model_bytes), "--models", str(models), "--repeat", str(repeat)]
    proc = Proc(f"{framework}-micro", argv, log_dir, environment(framework))
    try:
        line = proc.wait_for_line("{", 900)
        proc.proc.wait(EXIT_TIMEOUT)
        return {"ok": True, **json.loads(line)}
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        return {"ok": False, "framework": framework, "error": str(exc)[-2000:]}
    finally:
        proc.stop()


def flower_python(given: str | None) -> str:
    """Flower's interpreter: the option, ``$STAMEN_FLWR_PYTHON`` or ``.venv-flwr``."""
    return given or os.environ.get("STAMEN_FLWR_PYTHON") or str(REPO / ".venv-flwr/bin/python")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: test the harness")
    parser.add_argument("--workloads", default=",".join(DEFAULT))
    parser.add_argument("--frameworks", default="stamen,flower")
    parser.add_argument("--repeat", type=int, default=None, help="runs per framework")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per run")
    parser.add_argument("--transport", default="grpc-bidi", help="Stamen clients' transport")
    parser.add_argument("--flower-python", default=None)
    parser.add_argument("--no-relay", dest="relay", action="store_false", help="no wire bytes")
    parser.add_argument("--stamen-server-prefix", default="", help="e.g. 'py-spy record ... --'")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/flower_vs_stamen.json")
    parser.add_argument("--readme", action="store_true", help="write the tables into README")
    parser.add_argument("--trace-rss", action="store_true", help="servers sample their RSS")
    parser.add_argument("--logs", type=Path, default=None, help="keep every process's log here")
    options = parser.parse_args(argv)
    options.flower_python = flower_python(options.flower_python)
    unknown = set(options.workloads.split(",")) - set(ORDER)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(ORDER)}")
    return options


def main(argv: list[str] | None = None) -> int:
    """Run the selected workloads, alternating frameworks; write JSON, print the tables."""
    options = parse_args(argv)
    frameworks = [f for f in ("stamen", "flower") if f in options.frameworks.split(",")]
    table = QUICK if options.quick else FULL
    selected = [w for w in ORDER if w in options.workloads.split(",")]
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "quick": options.quick,
        "transport": options.transport,
        "relay": options.relay,
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-fvs-") as tmp:
        log_dir = Path(tmp)
        if options.logs is not None:
            log_dir = options.logs
            log_dir.mkdir(parents=True, exist_ok=True)
        for name in selected:
            if name == "micro":
                results["micro"] = {f: run_micro(f, options, log_dir) for f in frameworks}
                print(f"micro: {report.micro_line(results['micro'])}", flush=True)
                continue
            load = table[name]
            if options.rounds:
                load = dataclasses.replace(load, rounds=options.rounds)
            names = ["stamen"] if name == "E10k" else frameworks
            runs: dict[str, list[dict[str, Any]]] = {f: [] for f in names}
            for index in range(options.repeat or load.repeat):
                for framework in names:
                    run = run_federation(framework, load, options, log_dir)
                    run["run"] = index
                    runs[framework].append(run)
                    print(report.run_line(load, run), flush=True)
            results["workloads"][name] = {
                "spec": dataclasses.asdict(load),
                "title": load.title,
                "runs": runs,
            }
    report.summarize(results)
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    text = report.markdown(results)
    print(text)
    if options.readme:
        report.write_readme(REPO / "bench" / "README.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
