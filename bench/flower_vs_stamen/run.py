"""Stamen against Flower 1.12 on the same workloads, in one invocation (``make bench``).

For each workload and framework, a server process (``server_stamen.py`` with this python,
``server_flower.py`` with Flower's venv) and a few client processes run on 127.0.0.1,
the bytes between them counted by the kernel (``ss``: the TCP counters of the server's
connections) or, with ``--wire relay``, by a counting relay (``relay.py``). Runs alternate
between the frameworks (Stamen, Flower, Stamen, Flower, ...). The server times each FedAvg
round from inside its strategy (``configure_fit`` after sampling -> end of
``aggregate_fit``) and checks the final model; each process reports its peak RSS and CPU.

Before the runs, the driver measures the machine's floors (``floors.py``: loopback TCP
throughput and memcpy bandwidth, best of a few tries); each workload's floor is the time
its round's bytes alone take at those speeds, and the report gives both frameworks' round
times as multiples of it. It also runs A's, B's, C's and E500's exchanges with grpcio alone
(``bench/transports/grpc_floor.py``: the same nodes, bytes and client processes, handlers
that do nothing else; ``--no-grpc-floors`` skips them): on this machine, a lower bound for
a framework that moves the same messages with grpcio, as a stream message each way
(grpc-bidi) and as a pull and a push call (grpc-rere). Each round-time target is shown
beside it.

The server's strategy takes one of four forms (``workload.STRATEGY_FORMS``): FedAvg (every
workload but those below), a FedAvg subclass overriding ``aggregate_fit`` to save the model
every round (``Bsub``), FedMedian (``Bmed``) and a ``Strategy`` of one's own written as
Flower's FedAvg is (``Bown``), B's federation in each (and B50's: ``B50sub``...).

Workloads A-D run their nodes as threads calling the framework's own ``start_client``
(``clients.py``); E (1,000 nodes) and E10k (10,000, Stamen only: Flower's server caps near
1,000) run them as grpc.aio streams (``swarm.py``), which drive either server with the
same bytes; ``Ethreads`` is E with each framework's own ``start_client`` threads;
"micro" runs ``micro.py`` (encode/decode of a FitIns, FedAvg) for both frameworks.

Usage::

    .venv/bin/python bench/flower_vs_stamen/run.py [--quick] [--workloads A,B,...,micro]
        [--frameworks stamen,flower] [--repeat N] [--rounds N] [--transport grpc-bidi]
        [--flower-python PATH] [--out bench/results/flower_vs_stamen.json] [--readme]
        [--wire kernel|relay|none] [--trace-rss] [--logs DIR] [--stamen-server-prefix CMD]
        [--no-grpc-floors]
    .venv/bin/python bench/flower_vs_stamen/run.py --render RESULTS.json [--readme]

``--quick`` shrinks every size (a smoke test of the harness, not a measurement).
``--readme`` writes the tables into bench/README.md; ``--render`` redoes them from an
earlier JSON. Flower's python is ``--flower-python``, else ``$STAMEN_FLWR_PYTHON``, else
``.venv-flwr/bin/python``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402
from procs import Proc, environment, split, wait_for_run  # noqa: E402
from relay import SpliceRelay  # noqa: E402
from workload import SharedCounter, Workload  # noqa: E402

ASYNCIO = "asyncio"
SUB, MED, OWN = "subclass", "fedmedian", "own"
FULL = {
    # The small points take five rounds a run: their round is a tenth of a second to a
    # second, and the median of rounds 1-5 is steadier than that of rounds 1-3 (in which
    # one slow round of the two after the first decides it).
    "A": Workload("A", 10, 4_000_000, rounds=5, processes=2, repeat=3, timeout=240),
    "B": Workload("B", 10, 100_000_000, rounds=3, processes=2, repeat=1, timeout=600),
    # B with the strategy forms that collect a round's results before aggregating.
    "Bsub": Workload(
        "Bsub", 10, 100_000_000, rounds=3, processes=2, repeat=1, timeout=600, strategy=SUB
    ),
    "Bmed": Workload(
        "Bmed", 10, 100_000_000, rounds=3, processes=2, repeat=1, timeout=600, strategy=MED
    ),
    "Bown": Workload(
        "Bown", 10, 100_000_000, rounds=3, processes=2, repeat=1, timeout=600, strategy=OWN
    ),
    # 50 clients x 40 MB: the memory bound with many results, in the four forms.
    "B50": Workload("B50", 50, 40_000_000, rounds=3, processes=5, repeat=1, timeout=600),
    "B50sub": Workload(
        "B50sub", 50, 40_000_000, rounds=3, processes=5, repeat=1, timeout=600, strategy=SUB
    ),
    "B50med": Workload(
        "B50med", 50, 40_000_000, rounds=3, processes=5, repeat=1, timeout=600, strategy=MED
    ),
    "B50own": Workload(
        "B50own", 50, 40_000_000, rounds=3, processes=5, repeat=1, timeout=600, strategy=OWN
    ),
    "C": Workload("C", 100, 400_000, rounds=5, processes=4, repeat=3, timeout=300),
    "D": Workload("D", 2, 400_000_000, rounds=3, processes=2, repeat=1, timeout=600),
    "E": Workload("E", 1000, 4_000, 5, processes=4, repeat=1, timeout=300, harness="asyncio"),
    "E500": Workload("E500", 500, 4_000, 5, processes=2, repeat=1, timeout=300, harness=ASYNCIO),
    "E10k": Workload(
        "E10k", 10_000, 4_000, 1, processes=2, repeat=1, timeout=600, harness="asyncio"
    ),
    # The same 10,000 asyncio nodes on Stamen's Fleet protocol (Stamen only).
    "E10k-rere": Workload(
        "E10k-rere", 10_000, 4_000, 1, 2, 1, timeout=600, harness=ASYNCIO, transport="grpc-rere"
    ),
    "E10k-rest": Workload(
        "E10k-rest", 10_000, 4_000, 1, 2, 1, timeout=600, harness=ASYNCIO, transport="rest"
    ),
    # Each framework's own start_client, 1,000 threads: Flower's round takes ~100 s.
    "Ethreads": Workload("Ethreads", 1000, 4_000, rounds=2, processes=4, repeat=1, timeout=900),
}
QUICK = {
    "A": Workload("A", 4, 40_000, rounds=2, processes=2, repeat=1, timeout=60),
    "B": Workload("B", 4, 1_000_000, rounds=2, processes=2, repeat=1, timeout=60),
    "Bsub": Workload("Bsub", 4, 1_000_000, 2, processes=2, repeat=1, timeout=60, strategy=SUB),
    "Bmed": Workload("Bmed", 4, 1_000_000, 2, processes=2, repeat=1, timeout=60, strategy=MED),
    "Bown": Workload("Bown", 4, 1_000_000, 2, processes=2, repeat=1, timeout=60, strategy=OWN),
    "B50": Workload("B50", 6, 400_000, rounds=2, processes=2, repeat=1, timeout=60),
    "B50sub": Workload("B50sub", 6, 400_000, 2, processes=2, repeat=1, timeout=60, strategy=SUB),
    "B50med": Workload("B50med", 6, 400_000, 2, processes=2, repeat=1, timeout=60, strategy=MED),
    "B50own": Workload("B50own", 6, 400_000, 2, processes=2, repeat=1, timeout=60, strategy=OWN),
    "C": Workload("C", 10, 4_000, rounds=2, processes=2, repeat=1, timeout=60),
    "D": Workload("D", 2, 4_000_000, rounds=2, processes=2, repeat=1, timeout=60),
    "E": Workload("E", 40, 4_000, 2, processes=2, repeat=1, timeout=60, harness=ASYNCIO),
    "E500": Workload("E500", 20, 4_000, 2, processes=2, repeat=1, timeout=60, harness=ASYNCIO),
    "E10k": Workload("E10k", 200, 4_000, 1, processes=2, repeat=1, timeout=60, harness=ASYNCIO),
    "E10k-rere": Workload("E10k-rere", 200, 4_000, 1, 2, 1, 60, ASYNCIO, transport="grpc-rere"),
    "E10k-rest": Workload("E10k-rest", 200, 4_000, 1, 2, 1, 60, ASYNCIO, transport="rest"),
    "Ethreads": Workload("Ethreads", 40, 4_000, rounds=2, processes=2, repeat=1, timeout=60),
}
TRANSPORT_POINTS = ("A", "B", "C", "D")
"""Points also run (Stamen only) with grpc-rere and rest nodes, ``A-rere``, ``A-rest``...:
the round time on each transport against grpc-bidi's in the same invocation."""
TRANSPORT_SUFFIX = {"grpc-rere": "rere", "rest": "rest"}


def on_transports(table: dict[str, Workload]) -> dict[str, Workload]:
    """``table`` with each of :data:`TRANSPORT_POINTS` on grpc-rere and rest too."""
    return table | {
        f"{point}-{suffix}": dataclasses.replace(
            table[point], name=f"{point}-{suffix}", transport=transport
        )
        for point in TRANSPORT_POINTS
        for transport, suffix in TRANSPORT_SUFFIX.items()
    }


AUTH_POINTS = report.AUTH_POINTS
"""Points also run (Stamen only, grpc-bidi) with node authentication, ``A-auth``...: the
round time against the same point without it, in the same invocation."""


def with_auth(table: dict[str, Workload]) -> dict[str, Workload]:
    """``table`` with each of :data:`AUTH_POINTS` run by authenticated nodes too."""
    return table | {
        f"{point}-auth": dataclasses.replace(
            table[point], name=f"{point}-auth", transport="grpc-bidi", auth=True
        )
        for point in AUTH_POINTS
    }


FULL = with_auth(on_transports(FULL))
QUICK = with_auth(on_transports(QUICK))
MICRO = {"full": (100_000_000, 10, 5), "quick": (1_000_000, 3, 2)}
ORDER = (
    "A",
    "A-rere",
    "A-rest",
    "A-auth",
    "B",
    "B-rere",
    "B-rest",
    "B-auth",
    "Bsub",
    "Bmed",
    "Bown",
    "B50",
    "B50sub",
    "B50med",
    "B50own",
    "C",
    "C-rere",
    "C-rest",
    "C-auth",
    "D",
    "D-rere",
    "D-rest",
    "E",
    "E500",
    "E10k",
    "E10k-rere",
    "E10k-rest",
    "Ethreads",
    "micro",
)
DEFAULT = ORDER
PORT_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0
FLOORS_TIMEOUT = 300.0


KEYS = "node-keys"
"""Directory of an authenticated run's keys, in its log directory."""


def write_node_keys(directory: Path, count: int) -> None:
    """A P-256 key pair per node: ``node-<k>.pem`` (private) and ``authorized.pem`` (every
    public key, the server's ``authorized_keys``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(exist_ok=True)
    public = []
    for k in range(count):
        private = ec.generate_private_key(ec.SECP256R1())
        (directory / f"node-{k}.pem").write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        public.append(
            private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    (directory / "authorized.pem").write_bytes(b"".join(public))


def transport_of(framework: str, load: Workload, options: argparse.Namespace) -> str:
    """The transport of a run's nodes: the workload's, else ``--transport`` (Flower's
    nodes: grpc-bidi)."""
    if framework != "stamen":
        return "grpc-bidi"
    return load.transport or options.transport


def server_argv(
    framework: str, load: Workload, options: argparse.Namespace, out: Path, counter: Path
) -> list[str]:
    """The command line of the server process of one run."""
    stamen = framework == "stamen"
    python = sys.executable if stamen else options.flower_python
    argv = [python, str(HERE / ("server_stamen.py" if stamen else "server_flower.py"))]
    argv += ["--clients", str(load.clients), "--model-bytes", str(load.model_bytes)]
    argv += ["--rounds", str(load.rounds), "--out", str(out), "--strategy", load.strategy]
    if options.wire == "relay":
        argv += ["--counter", str(counter)]
    elif options.wire == "kernel":
        argv += ["--counter", "kernel"]
    if stamen and transport_of(framework, load, options) == "rest":
        argv.append("--rest")
    if load.auth:
        argv += ["--authorized-keys", str(out.parent / KEYS / "authorized.pem")]
    if options.trace_rss:
        argv.append("--trace-rss")
    if stamen and options.stamen_server_prefix:
        argv = shlex.split(options.stamen_server_prefix) + argv
    return argv


def start_clients(
    framework: str, load: Workload, options: argparse.Namespace, address: str, log_dir: Path
) -> list[Proc]:
    """Start the client processes of one run (``load.processes`` of them)."""
    swarm = load.harness == "asyncio"
    clients = []
    for index, (first, count) in enumerate(split(load.clients, load.processes)):
        if swarm:  # a neutral load generator, so Stamen's python for either server
            argv = [sys.executable, str(HERE / "swarm.py")]
            argv += ["--transport", transport_of(framework, load, options)]
        else:
            python = sys.executable if framework == "stamen" else options.flower_python
            transport = transport_of(framework, load, options)
            argv = [python, str(HERE / "clients.py"), "--framework", framework]
            argv += ["--transport", transport]
        argv += ["--address", address, "--first", str(first), "--count", str(count)]
        argv += ["--timeout", str(load.timeout)]
        if load.auth:
            argv += ["--keys", str(log_dir / KEYS)]
        env = environment("stamen" if swarm else framework)
        clients.append(Proc(f"{framework}-{load.name}-clients{index}", argv, log_dir, env))
    return clients


def clipped(error: str, keep: int = 2000) -> str:
    """``error`` cut to about ``keep`` characters: its first line (what failed, with the
    exit status) and its last lines (how the process's log ended)."""
    if len(error) <= keep:
        return error
    first = error.split("\n", 1)[0][:300]
    return f"{first}\n...\n{error[-(keep - len(first)) :]}"


def measurements(
    server: dict[str, Any], clients: list[Proc], load: Workload, counted: bool
) -> dict[str, Any]:
    """What one successful run measured: the server's report and the clients' lines."""
    rounds = server["rounds"]
    return {
        "ok": bool(server["check"]["ok"]),
        "error": None if server["check"]["ok"] else "result check failed",
        "round_seconds": [r["seconds"] for r in rounds],
        "aggregate_seconds": [r["aggregate_seconds"] for r in rounds],
        "wire_bytes": [r["wire_bytes"] for r in rounds] if counted else None,
        "wire_connections_lost": sum(r.get("wire_connections_lost", 0) for r in rounds),
        "server_peak_rss_bytes": server["peak_rss_bytes"],
        "server_rss_after_setup_bytes": server["rss_after_setup_bytes"],
        "client_peak_rss_bytes": [int(c.value("PEAK_RSS") or 0) for c in clients],
        "clients_per_process": [count for _, count in split(load.clients, load.processes)],
        "server_cpu_seconds": server["cpu_seconds"],
        "client_cpu_seconds": [json.loads(c.value("CPU") or "null") for c in clients],
        "client_retries": sum(int(c.value("RETRIES") or 0) for c in clients),
        "check": server["check"],
        "authorized_keys": server.get("authorized_keys"),
        "marks": server["marks"],
        "rss_trace": server["rss_trace"] or None,
    }


def run_federation(
    framework: str, load: Workload, options: argparse.Namespace, log_dir: Path
) -> dict[str, Any]:
    """One run of ``load`` on ``framework``; the measurements, or what went wrong.

    Every process started is killed (if still running) and the relay stopped on the way
    out, whatever happened.
    """
    out = log_dir / f"{framework}-{load.name}-server.json"
    counter = log_dir / f"{framework}-{load.name}-counter"
    rest = transport_of(framework, load, options) == "rest"
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    procs: list[Proc] = []
    relay: SpliceRelay | None = None
    shared = SharedCounter(str(counter)) if options.wire == "relay" else None
    result: dict[str, Any] = {"framework": framework, "ok": False, "load": os.getloadavg()[0]}
    try:
        if load.auth:
            write_node_keys(log_dir / KEYS, load.clients)
        argv = server_argv(framework, load, options, out, counter)
        server = Proc(f"{framework}-{load.name}-server", argv, log_dir, environment(framework))
        procs.append(server)
        port = int(server.wait_for_line("REST_PORT" if rest else "PORT", PORT_TIMEOUT).split()[1])
        if shared is not None:
            relay = SpliceRelay(port, shared).start()
            port = relay.port
        address = f"{'http://' if rest else ''}127.0.0.1:{port}"
        clients = start_clients(framework, load, options, address, log_dir)
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
        result.update(measurements(server_report, clients, load, options.wire != "none"))
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        result["error"] = clipped(str(exc))
    finally:
        for proc in procs:
            proc.stop()
        if relay is not None:
            relay.stop()
        elif shared is not None:
            shared.close()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    result["wall_seconds"] = time.monotonic() - started
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


def measure_floors(quick: bool) -> dict[str, Any]:
    """``floors.py`` in a process of its own (its buffers would raise the peak RSS that every
    process started later by this one reports: see floors.py)."""
    argv = [sys.executable, str(HERE / "floors.py")] + (["--quick"] if quick else [])
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=FLOORS_TIMEOUT, check=False, cwd=HERE
    )
    if done.returncode != 0:
        raise RuntimeError(f"floors.py exit {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


GRPC_FLOOR = HERE.parent / "transports" / "grpc_floor.py"
GRPC_FLOOR_FRAME = 4 << 20
"""Bytes per message of a model larger than this in ``grpc_floor.py`` (Stamen's reply
frame; its instruction frames are 1 MiB)."""
GRPC_FLOOR_TIMEOUT = 600.0


def measure_grpc_floors(
    table: dict[str, Workload], selected: list[str], quick: bool
) -> dict[str, Any]:
    """``grpc_floor.py`` for the exchange of each selected workload that has one
    (``report.GRPC_FLOOR_OF``: A, B and Bsub, C, E500), a process tree of its own per
    point: the round time and server CPU of grpcio alone moving the point's bytes between
    its nodes and client processes as grpc-bidi (a stream message each way) and as
    grpc-rere (a pull and a push call), handlers that do nothing else. A point whose
    script fails is recorded with its error."""
    points = {report.GRPC_FLOOR_OF[n] for n in selected if n in report.GRPC_FLOOR_OF}
    floors: dict[str, Any] = {}
    for name in (n for n in ORDER if n in points):
        load = table[name]
        frame = GRPC_FLOOR_FRAME if load.model_bytes > GRPC_FLOOR_FRAME else 0
        # Whole-message points take 20 rounds (their round is 30-120 ms); framed ones 3.
        rounds, repeat = (load.rounds, 1) if quick else (3, 1) if frame else (20, 3)
        with tempfile.TemporaryDirectory(prefix="bench-grpc-floor-") as tmp:
            out = Path(tmp) / "floor.json"
            argv = [sys.executable, str(GRPC_FLOOR), "--nodes", str(load.clients)]
            argv += ["--size", str(load.model_bytes), "--processes", str(load.processes)]
            argv += ["--rounds", str(rounds), "--repeat", str(repeat), "--frame", str(frame)]
            argv += ["--out", str(out)]
            try:
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=GRPC_FLOOR_TIMEOUT, check=False
                )
            except subprocess.TimeoutExpired:
                floors[name] = {"ok": False, "error": f"no result in {GRPC_FLOOR_TIMEOUT:g} s"}
                continue
            if done.returncode != 0 or not out.exists():
                error = f"grpc_floor.py exit {done.returncode}: {done.stderr[-2000:]}"
                floors[name] = {"ok": False, "error": error}
                continue
            record = json.loads(out.read_text(encoding="utf-8"))
        floors[name] = {"ok": True, "frame": frame, "rounds": rounds, "repeat": repeat}
        floors[name] |= {mode: record["summary"][mode] for mode in ("bidi", "rere")}
        print(report.grpc_floor_line(name, floors[name]), flush=True)
    return floors


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
    parser.add_argument(
        "--wire",
        choices=("kernel", "relay", "none"),
        default="kernel",
        help="how bytes on the wire are counted: the kernel's TCP counters of the server's "
        "connections (ss), a relay in the path (its CPU competes with the frameworks), or not",
    )
    parser.add_argument("--stamen-server-prefix", default="", help="e.g. 'py-spy record ... --'")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/flower_vs_stamen.json")
    parser.add_argument("--readme", action="store_true", help="write the tables into README")
    parser.add_argument("--trace-rss", action="store_true", help="servers sample their RSS")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="only print (and with --readme write) the tables of an earlier results JSON",
    )
    parser.add_argument("--logs", type=Path, default=None, help="keep every process's log here")
    parser.add_argument(
        "--grpc-floors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run A's, B's, C's and E500's exchanges with grpcio alone too (grpc_floor.py)",
    )
    options = parser.parse_args(argv)
    options.flower_python = flower_python(options.flower_python)
    if "flower" in options.frameworks.split(",") and not Path(options.flower_python).exists():
        parser.error(
            f"no Flower interpreter at {options.flower_python}: run `make interop-venv`, "
            "pass --flower-python, or --frameworks stamen"
        )
    if options.wire == "kernel" and shutil.which("ss") is None:
        parser.error(
            "--wire kernel reads the TCP counters with ss (iproute2): install it or "
            "pass --wire relay"
        )
    unknown = set(options.workloads.split(",")) - set(ORDER)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(ORDER)}")
    return options


def main(argv: list[str] | None = None) -> int:
    """Run the selected workloads, alternating frameworks; write JSON, print the tables."""
    options = parse_args(argv)
    if options.render is not None:
        earlier = json.loads(options.render.read_text(encoding="utf-8"))
        report.summarize(earlier)  # with this version's summary and targets, saved back
        options.render.write_text(json.dumps(earlier, indent=1) + "\n", encoding="utf-8")
        return publish(earlier, options)
    frameworks = [f for f in ("stamen", "flower") if f in options.frameworks.split(",")]
    table = QUICK if options.quick else FULL
    selected = [w for w in ORDER if w in options.workloads.split(",")]
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()[0],
        },
        "quick": options.quick,
        "transport": options.transport,
        "wire": options.wire,
        "floors": measure_floors(options.quick),  # before the runs: nothing else of ours runs
        "workloads": {},
    }
    print(report.floors_line(results["floors"]), flush=True)
    if options.grpc_floors:  # before the runs too, on the quiet machine
        results["grpc_floors"] = measure_grpc_floors(table, selected, options.quick)
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
            names = ["stamen"] if name == "E10k" or load.transport else frameworks
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
    return publish(results, options)


def publish(results: dict[str, Any], options: argparse.Namespace) -> int:
    """Print the tables; with ``--readme``, write them into bench/README.md."""
    text = report.markdown(results)
    if options.readme:
        report.write_readme(REPO / "bench" / "README.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
