"""What both frameworks' processes share: the workloads, the model, the result check.

Imported by the driver (Stamen's venv) and by the server and client scripts of either
framework (Flower's venv too), so it needs only the standard library and NumPy.

The model is two float32 layers (a big one and a 256-value "bias") of ``model_bytes`` bytes
in all, zeros at the start. Client ``k`` (0-based, numbered across all client processes)
answers every FitIns with ``parameters + k`` and ``num_examples = 1``, so each FedAvg round
adds the mean of ``k``, ``(clients - 1) / 2``, to every value: after ``rounds`` rounds every
value is ``rounds * (clients - 1) / 2``. :func:`check_tensors` checks that on the ``.npy``
bytes of the final model without copying them.
"""

from __future__ import annotations

import argparse
import io
import json
import mmap
import os
import resource
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BIAS_VALUES = 256
COUNTER_FORMAT = "<QQ"
"""Layout of the relay's counter file: bytes client->server, bytes server->client."""
COUNTER_SIZE = struct.calcsize(COUNTER_FORMAT)
CHECK_CHUNK = 1 << 20
"""Values compared at a time by :func:`check_tensors` (bounds its temporary memory)."""


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
        transport: The Stamen nodes' transport (None: ``run.py --transport``); a
            workload that names one runs on Stamen only (Flower's nodes speak grpc-bidi).
    """

    name: str
    clients: int
    model_bytes: int
    rounds: int
    processes: int
    repeat: int
    timeout: float
    harness: str = "threads"
    transport: str | None = None

    @property
    def title(self) -> str:
        """``"B: 10 x 100 MB"``."""
        return f"{self.name}: {self.clients:,} x {human_bytes(self.model_bytes)}"


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


def npy_view(tensor: bytes) -> np.ndarray:
    """A read-only view (no copy) of the array in ``.npy`` bytes."""
    head = io.BytesIO(bytes(memoryview(tensor)[:4096]))
    version = np.lib.format.read_magic(head)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    count = int(np.prod(shape))
    flat = np.frombuffer(tensor, dtype=dtype, count=count, offset=head.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def check_tensors(tensors: list[bytes], model_bytes: int, expected: float) -> dict[str, Any]:
    """Compare the final model (``.npy`` tensors) with ``expected``, a chunk at a time.

    The tolerance, ``1e-4 * max(1, |expected|)``, allows for float32 accumulation (Flower
    sums the scaled models in float32).

    Returns:
        ``{"ok", "expected", "max_abs_error", "first_values", "shapes"}``.
    """
    shapes = model_shapes(model_bytes)
    found = [npy_view(t) for t in tensors]
    error = 0.0
    for array in found:
        flat = array.reshape(-1)
        for start in range(0, flat.size, CHECK_CHUNK):
            chunk = flat[start : start + CHECK_CHUNK]
            error = max(error, float(np.max(np.abs(chunk.astype(np.float64) - expected))))
    layout_ok = [a.shape for a in found] == [(n,) for n in shapes] and all(
        a.dtype == np.float32 for a in found
    )
    return {
        "ok": layout_ok and error <= 1e-4 * max(1.0, abs(expected)),
        "expected": expected,
        "max_abs_error": error,
        "first_values": [float(a.reshape(-1)[0]) for a in found if a.size],
        "shapes": [list(a.shape) for a in found],
    }


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

    def __init__(self, counter: WireCounter | KernelWireCounter, trace_rss: bool = False) -> None:
        self.counter = counter
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


def server_report(
    framework: str, clock: RoundClock, final: list[bytes] | None, args: Any, started_rss: int
) -> dict[str, Any]:
    """What a server script writes at the end of its run (``--out``)."""
    expected = expected_value(args.clients, args.rounds)
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
    return {
        "framework": framework,
        "clients": args.clients,
        "model_bytes": args.model_bytes,
        "rounds": clock.rounds,
        "check": check,
        "rss_after_setup_bytes": started_rss,
        "peak_rss_bytes": peak_rss_bytes(),
        "cpu_seconds": cpu_seconds(),
        "rss_trace": clock.trace[:: max(1, len(clock.trace) // 2000)],
        "marks": clock.marks,
    }


def server_parser(description: str) -> argparse.ArgumentParser:
    """The command line both server scripts take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--model-bytes", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
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
