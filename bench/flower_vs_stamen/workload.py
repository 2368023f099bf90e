"""What both frameworks' processes share: the workloads, the model, the result check.

Imported by the driver (Stamen's venv) and by the server and client scripts of either
framework (Flower's venv too), so it needs only the standard library and NumPy.

The model is two float32 layers (a big one and a 256-value "bias") of ``model_bytes`` bytes
in all, zeros at the start. Client ``k`` (0-based, numbered across all client processes)
answers every FitIns with ``parameters + k`` and ``num_examples = 1``, so each FedAvg round
adds the mean of ``k``, ``(clients - 1) / 2``, to every value: after ``rounds`` rounds every
value is ``rounds * (clients - 1) / 2``. :func:`check_tensors` checks that on the ``.npy``
bytes of the final model without copying them.

The server's strategy takes one of four forms (:data:`STRATEGY_FORMS`, built for either
framework by :func:`strategy_class`): the framework's plain FedAvg; a FedAvg subclass that
overrides ``aggregate_fit``, calls the inherited one and saves every round's model with
``np.savez`` (the pattern Flower's documentation teaches for saving the model);
FedMedian; or a strategy of one's own, a ``Strategy`` written from scratch the way
Flower's FedAvg is (every result decoded with ``parameters_to_ndarrays``, then averaged by
the framework's ``aggregate``). The median of ``parameters + k`` over ``k = 0 .. clients - 1`` is
``parameters + (clients - 1) / 2`` too (for an even count, the mean of the two middle
values), so every form must end at the same model; the saving form's last saved file is
checked as well (:func:`check_saved`).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import mmap
import os
import resource
import struct
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

BIAS_VALUES = 256
COUNTER_FORMAT = "<QQ"
"""Layout of the relay's counter file: bytes client->server, bytes server->client."""
COUNTER_SIZE = struct.calcsize(COUNTER_FORMAT)
CHECK_CHUNK = 1 << 20
"""Values compared at a time by :func:`check_tensors` (bounds its temporary memory)."""
STRATEGY_FORMS = {
    "fedavg": "FedAvg",
    "subclass": "FedAvg subclass saving the model",
    "fedmedian": "FedMedian",
    "own": "a Strategy of one's own",
}
"""The strategy forms a server runs (``--strategy``), with the words a table shows."""


@dataclass(frozen=True)
class Workload:
    """One federation: ``clients`` nodes training a model of ``model_bytes`` bytes.

    Attributes:
        name: Short name (``"A"``...).
        clients: Number of client nodes.
        model_bytes: Size of the model (float32 values, both layers).
        rounds: FedAvg rounds per run (the round time is their median).
        processes: Client processes the nodes are spread over (threads in each).
        repeat: Runs per framework by default (alternating Stamen, Flower, ...).
        timeout: Seconds one run may take before it is killed and recorded as failed.
        harness: How the nodes run: ``"threads"`` (``clients.py``: each node a thread
            calling the framework's own ``start_client``) or ``"asyncio"`` (``swarm.py``:
            each node a grpc.aio stream speaking the grpc-bidi wire format directly, the
            same bytes for both frameworks' servers).
        strategy: The server's strategy form, a key of :data:`STRATEGY_FORMS`.
        transport: The Stamen nodes' transport (None: ``run.py --transport``); a
            workload that names one runs on Stamen only (Flower's nodes speak grpc-bidi).
        auth: Nodes authenticate (``authentication_keys``, one key pair per node; the
            server holds their public keys as ``authorized_keys``): on grpc-bidi every
            message then carries a MAC (docs/security.md). Stamen only.
    """

    name: str
    clients: int
    model_bytes: int
    rounds: int
    processes: int
    repeat: int
    timeout: float
    harness: str = "threads"
    strategy: str = "fedavg"
    transport: str | None = None
    auth: bool = False

    @property
    def title(self) -> str:
        """``"B: 10 x 100 MB"``, ``"Bmed: 10 x 100 MB, FedMedian"``."""
        title = f"{self.name}: {self.clients:,} x {human_bytes(self.model_bytes)}"
        return title if self.strategy == "fedavg" else f"{title}, {STRATEGY_FORMS[self.strategy]}"


def human_bytes(size: float) -> str:
    """Decimal units, as the issue writes sizes: 4 MB is 4,000,000 bytes."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size:.0f} B"


def model_shapes(model_bytes: int) -> list[int]:
    """Lengths of the model's float32 layers: a big one and a small "bias"."""
    values = max(2, model_bytes // 4)
    bias = min(BIAS_VALUES, values // 4)
    return [values - bias, bias]


def initial_model(model_bytes: int) -> list[np.ndarray]:
    """The starting model: zeros."""
    return [np.zeros(n, dtype=np.float32) for n in model_shapes(model_bytes)]


def expected_value(clients: int, rounds: int) -> float:
    """Every value of the final model (see the module docstring)."""
    return rounds * (clients - 1) / 2


def _npy_header(file: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` data ``file`` starts with."""
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(file)
    return np.lib.format.read_array_header_2_0(file)


def npy_view(tensor: bytes) -> np.ndarray:
    """A read-only view (no copy) of the array in ``.npy`` bytes."""
    head = io.BytesIO(bytes(memoryview(tensor)[:4096]))
    shape, fortran, dtype = _npy_header(head)
    count = int(np.prod(shape))
    flat = np.frombuffer(tensor, dtype=dtype, count=count, offset=head.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


Layer = tuple[tuple[int, ...], np.dtype[Any], Iterator[np.ndarray]]
"""A layer to check: its shape, its dtype and its values, a flat chunk at a time."""


def _array_layer(array: np.ndarray) -> Layer:
    flat = array.reshape(-1)
    chunks = (flat[i : i + CHECK_CHUNK] for i in range(0, flat.size, CHECK_CHUNK))
    return array.shape, array.dtype, chunks


def _npz_layers(archive: zipfile.ZipFile) -> Iterator[Layer]:
    """The arrays of an ``np.savez`` archive, read from the file a chunk at a time."""
    for name in archive.namelist():
        with archive.open(name) as member:
            shape, _, dtype = _npy_header(member)
            size = int(np.prod(shape)) * dtype.itemsize
            step = CHECK_CHUNK * dtype.itemsize
            yield (
                shape,
                dtype,
                (
                    np.frombuffer(member.read(min(step, size - i)), dtype=dtype)
                    for i in range(0, size, step)
                ),
            )


def check_layers(layers: Iterable[Layer], model_bytes: int, expected: float) -> dict[str, Any]:
    """Compare a model, layer by layer and a chunk at a time, with ``expected``.

    The tolerance, ``1e-4 * max(1, |expected|)``, allows for float32 accumulation (Flower
    sums the scaled models in float32).

    Returns:
        ``{"ok", "expected", "max_abs_error", "first_values", "shapes"}``.
    """
    error, first, shapes, dtypes = 0.0, [], [], []
    for shape, dtype, chunks in layers:
        shapes.append(list(shape))
        dtypes.append(dtype)
        for index, chunk in enumerate(chunks):
            if index == 0 and chunk.size:
                first.append(float(chunk[0]))
            error = max(error, float(np.max(np.abs(chunk.astype(np.float64) - expected))))
    layout_ok = shapes == [[n] for n in model_shapes(model_bytes)] and all(
        d == np.float32 for d in dtypes
    )
    return {
        "ok": layout_ok and error <= 1e-4 * max(1.0, abs(expected)),
        "expected": expected,
        "max_abs_error": error,
        "first_values": first,
        "shapes": shapes,
    }


def check_tensors(tensors: list[bytes], model_bytes: int, expected: float) -> dict[str, Any]:
    """:func:`check_layers` of the final model's ``.npy`` tensors, read without copies."""
    return check_layers((_array_layer(npy_view(t)) for t in tensors), model_bytes, expected)


def check_saved(path: Path, model_bytes: int, expected: float) -> dict[str, Any]:
    """:func:`check_layers` of a model saved with ``np.savez``, read from the file."""
    with zipfile.ZipFile(path) as archive:
        return check_layers(_npz_layers(archive), model_bytes, expected)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM; ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> dict[str, float]:
    """CPU time this process has used so far: ``{"user": s, "system": s}``."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": usage.ru_utime, "system": usage.ru_stime}


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class WireCounter:
    """Reads the byte counters a relay keeps in a file (None path: no relay, no bytes)."""

    def __init__(self, path: str | None) -> None:
        self._fd = None if not path else os.open(path, os.O_RDONLY)
        self.ports: list[int] = []  # the relay knows its connections: unused

    def read(self) -> int:
        """Bytes relayed so far, both directions."""
        if self._fd is None:
            return 0
        up, down = struct.unpack(COUNTER_FORMAT, os.pread(self._fd, COUNTER_SIZE, 0))
        return int(up + down)

    def snapshot(self) -> Any:
        """The counters now (for :meth:`since`)."""
        return self.read()

    def since(self, snapshot: Any) -> tuple[int, int]:
        """Bytes since ``snapshot``, and connections whose bytes were lost (always 0)."""
        return self.read() - int(snapshot), 0


class KernelWireCounter:
    """Bytes on the wire from the kernel's TCP counters of the server's connections.

    ``ss -ti`` reports, per established connection, the payload bytes sent and acknowledged
    and the payload bytes received: the same bytes a relay would count, without a relay
    copying them on the way (on a 2-core machine a relay's CPU is taken from the
    frameworks being measured). A connection that closes during a round takes its counts
    with it: such rounds report how many were lost (``wire_connections_lost``).
    """

    def __init__(self) -> None:
        self.ports: list[int] = []
        """The server's listening ports (the server script sets them once bound)."""

    def snapshot(self) -> dict[tuple[str, str], int]:
        """Bytes each connection to the server's ports has carried so far."""
        if not self.ports:
            return {}
        condition = " or ".join(f"sport = :{port}" for port in self.ports)
        listing = subprocess.run(
            ["ss", "-tinH", "state", "established", f"( {condition} )"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        counts: dict[tuple[str, str], int] = {}
        key: tuple[str, str] | None = None
        for line in listing.splitlines():
            if not line.startswith((" ", "\t")):  # "Recv-Q Send-Q local peer"
                fields = line.split()
                key = (fields[2], fields[3]) if len(fields) >= 4 else None
                continue
            if key is None:
                continue
            values = dict(item.split(":", 1) for item in line.split() if item.startswith("bytes_"))
            counts[key] = int(values.get("bytes_acked", 0)) + int(values.get("bytes_received", 0))
        return counts

    def since(self, snapshot: dict[tuple[str, str], int]) -> tuple[int, int]:
        """Bytes since ``snapshot`` and the number of its connections that have closed."""
        now = self.snapshot()
        carried = sum(count - snapshot.get(key, 0) for key, count in now.items())
        return carried, sum(key not in now for key in snapshot)


def wire_counter(argument: str | None) -> WireCounter | KernelWireCounter:
    """``--counter``: ``kernel`` (the server's TCP counters), a relay's counter file, or
    nothing (no bytes counted)."""
    return KernelWireCounter() if argument == "kernel" else WireCounter(argument)


class SharedCounter:
    """The writing side of :class:`WireCounter`: two uint64 in a memory-mapped file."""

    def __init__(self, path: str) -> None:
        with open(path, "wb") as file:
            file.write(b"\0" * mmap.PAGESIZE)
        self._file = open(path, "r+b")  # noqa: SIM115 (kept open with the mapping)
        self._map = mmap.mmap(self._file.fileno(), mmap.PAGESIZE)
        self.up = 0
        self.down = 0

    def add(self, upstream: bool, count: int) -> None:
        """Count ``count`` bytes client->server (``upstream``) or server->client."""
        if upstream:
            self.up += count
        else:
            self.down += count
        struct.pack_into(COUNTER_FORMAT, self._map, 0, self.up, self.down)

    def close(self) -> None:
        """Unmap and close the file."""
        self._map.close()
        self._file.close()


class RoundClock:
    """Times rounds from inside a strategy: call :meth:`start` in ``configure_fit`` (after
    sampling: all clients are connected), :meth:`aggregating` when ``aggregate_fit`` is
    called (every reply is in) and :meth:`stop` at its end.

    Each round records its seconds, the seconds spent in ``aggregate_fit``, the relay's
    bytes during the round, and how many results and failures it aggregated. With
    ``trace_rss``, a thread samples the process's RSS every 20 ms (see :attr:`trace`).
    """

    def __init__(
        self,
        counter: WireCounter | KernelWireCounter,
        trace_rss: bool = False,
        rounds: int | None = None,
    ) -> None:
        self.counter = counter
        self.last_round = rounds
        """The run's last round (None: unknown): see :meth:`is_last`."""
        self.rounds: list[dict[str, Any]] = []
        self.started: float | None = None
        self._snapshot: Any = None
        self._aggregating: float | None = None
        self.origin = time.perf_counter()
        self.trace: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        if trace_rss:
            threading.Thread(target=self._sample, name="rss-trace", daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.trace.append((time.perf_counter() - self.origin, current_rss_bytes()))
            time.sleep(0.02)

    def _mark(self, name: str) -> float:
        now = time.perf_counter()
        self.marks.append((now - self.origin, name))
        return now

    def is_last(self, server_round: int) -> bool:
        """Whether ``server_round`` is the run's last: only its model is kept for the
        final check (keeping each round's model until the next one replaced it would
        hold a model the framework itself may have let go, and weigh on its memory)."""
        return self.last_round is None or server_round >= self.last_round

    def start(self) -> None:
        """The round's instructions exist: start the clock (once the bytes are counted)."""
        self._snapshot = self.counter.snapshot()
        self.started = self._mark("round start")

    def aggregating(self) -> None:
        """Every reply is in: aggregation starts."""
        self._aggregating = self._mark("aggregation start")

    def stop(self, results: int, failures: int) -> None:
        """The round is aggregated: record it."""
        assert self.started is not None, "stop() without start()"
        end = self._mark("round end")
        wire_bytes, lost = self.counter.since(self._snapshot)  # after the clock stopped
        self.rounds.append(
            {
                "seconds": end - self.started,
                "aggregate_seconds": end - (self._aggregating or end),
                "wire_bytes": wire_bytes,
                "wire_connections_lost": lost,
                "results": results,
                "failures": failures,
            }
        )
        self.started = self._aggregating = None


def clocked(base: type) -> type:
    """``base`` (a strategy class of either framework) with a :class:`RoundClock` started in
    ``configure_fit`` after sampling (waits until every client is connected), and room for
    the last aggregated model (``final``) and the files it saved (``saved``, None if it
    saves none). Its first argument is the clock; the others are ``base``'s."""

    class Clocked(base):  # type: ignore[misc, valid-type]
        saved: list[Path] | None = None

        def __init__(self, clock: RoundClock, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.clock = clock
            self.final: list[Any] | None = None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            instructions = super().configure_fit(server_round, parameters, client_manager)
            self.clock.start()
            return instructions

    return Clocked


def timed(base: type) -> type:
    """:func:`clocked` ``base`` whose clock stops at the end of ``aggregate_fit``.

    Overriding ``aggregate_fit`` is transparent in Flower. In Stamen it makes the server
    collect a round's results and call ``aggregate_fit`` instead of folding each result
    as it arrives, so ``server_stamen.py`` times its plain FedAvg through the streaming
    accumulator instead, and uses this only for the forms that collect anyway.
    """

    class Timed(clocked(base)):  # type: ignore[misc]
        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            self.clock.aggregating()
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            self.clock.stop(len(results), len(failures))
            if parameters is not None and self.clock.is_last(server_round):
                self.final = parameters.tensors
            return parameters, metrics

    return Timed


def strategy_class(fl: Any, form: str) -> type:
    """The untimed strategy class of ``form`` (see :data:`STRATEGY_FORMS`) for ``fl``
    (``stamen`` or ``flwr``)."""
    if form == "fedmedian":
        return fl.server.strategy.FedMedian
    if form == "fedavg":
        return fl.server.strategy.FedAvg
    if form == "own":
        return own_strategy(fl)

    class SaveModelFedAvg(fl.server.strategy.FedAvg):  # type: ignore[misc, name-defined]
        """FedAvg saving each round's aggregated model as ``round-<n>.npz`` in
        ``save_dir``, as a user of either framework writes it."""

        def __init__(self, *, save_dir: str, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.save_dir = Path(save_dir)
            self.saved: list[Path] = []

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is not None:
                path = self.save_dir / f"round-{server_round}.npz"
                np.savez(path, *fl.common.parameters_to_ndarrays(parameters))
                self.saved.append(path)
            return parameters, metrics

    return SaveModelFedAvg


def own_strategy(fl: Any) -> type:
    """A ``Strategy`` of one's own for ``fl`` (``stamen`` or ``flwr``), not a FedAvg
    subclass: written as Flower's FedAvg is, it asks every client to fit, decodes every
    result with ``parameters_to_ndarrays`` and averages them with the framework's
    ``aggregate`` (``<framework>.server.strategy.aggregate``); no evaluation."""
    aggregate = importlib.import_module(f"{fl.__name__}.server.strategy.aggregate").aggregate

    class OwnFedAvg(fl.server.strategy.Strategy):  # type: ignore[misc, name-defined]
        def __init__(
            self,
            *,
            min_fit_clients: int,
            min_available_clients: int,
            fraction_evaluate: float,
            initial_parameters: Any,
        ) -> None:
            super().__init__()
            self.min_fit_clients = min_fit_clients
            self.min_available_clients = min_available_clients
            self.initial_parameters = initial_parameters

        def initialize_parameters(self, client_manager: Any) -> Any:
            initial, self.initial_parameters = self.initial_parameters, None
            return initial

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            clients = client_manager.sample(
                num_clients=self.min_fit_clients, min_num_clients=self.min_available_clients
            )
            fit_ins = fl.common.FitIns(parameters, {})
            return [(client, fit_ins) for client in clients]

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            if not results:
                return None, {}
            weights = [
                (fl.common.parameters_to_ndarrays(fit_res.parameters), fit_res.num_examples)
                for _, fit_res in results
            ]
            return fl.common.ndarrays_to_parameters(aggregate(weights)), {}

        def configure_evaluate(
            self, server_round: int, parameters: Any, client_manager: Any
        ) -> Any:
            return []

        def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
            return None, {}

        def evaluate(self, server_round: int, parameters: Any) -> Any:
            return None

    return OwnFedAvg


def strategy_kwargs(args: Any, initial: Any, save_dir: str) -> dict[str, Any]:
    """The strategy's keywords: every client in every fit round, no evaluation."""
    kwargs = {
        "min_fit_clients": args.clients,
        "min_available_clients": args.clients,
        "fraction_evaluate": 0.0,
        "initial_parameters": initial,
    }
    return {**kwargs, "save_dir": save_dir} if args.strategy == "subclass" else kwargs


def server_report(
    framework: str, clock: RoundClock, strategy: Any, args: Any, started_rss: int
) -> dict[str, Any]:
    """What a server script writes at the end of its run (``--out``): ``strategy`` is the
    :func:`clocked` strategy that ran."""
    peak = peak_rss_bytes()  # before the checks read anything
    expected = expected_value(args.clients, args.rounds)
    final = strategy.final
    check = (
        {"ok": False, "error": "no aggregated model"}
        if final is None
        else check_tensors(final, args.model_bytes, expected)
    )
    complete = len(clock.rounds) == args.rounds and all(
        r["results"] == args.clients and r["failures"] == 0 for r in clock.rounds
    )
    if not complete:
        check = {**check, "ok": False, "error": f"incomplete rounds: {clock.rounds}"}
    if strategy.saved is not None:
        check = {**check, "saved": check_saved_rounds(strategy.saved, args, expected)}
        check["ok"] = check["ok"] and check["saved"]["ok"]
    return {
        "framework": framework,
        "strategy": args.strategy,
        "clients": args.clients,
        "model_bytes": args.model_bytes,
        "rounds": clock.rounds,
        "check": check,
        "rss_after_setup_bytes": started_rss,
        "peak_rss_bytes": peak,
        "cpu_seconds": cpu_seconds(),
        "rss_trace": clock.trace[:: max(1, len(clock.trace) // 2000)],
        "marks": clock.marks,
    }


def check_saved_rounds(saved: list[Path], args: Any, expected: float) -> dict[str, Any]:
    """One file saved per round, the last one holding the final model."""
    if len(saved) != args.rounds:
        return {"ok": False, "error": f"expected {args.rounds} saved models, found {saved}"}
    return {"file": saved[-1].name, **check_saved(saved[-1], args.model_bytes, expected)}


def server_parser(description: str) -> argparse.ArgumentParser:
    """The command line both server scripts take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--model-bytes", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--strategy", choices=tuple(STRATEGY_FORMS), default="fedavg")
    parser.add_argument(
        "--counter", default=None, help="'kernel' (TCP counters) or the relay's counter file"
    )
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    parser.add_argument("--trace-rss", action="store_true", help="sample RSS every 20 ms")
    return parser


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a reader never sees half a file)."""
    partial = f"{path}.partial"
    Path(partial).write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(partial, path)
