"""The machine's floors: what moving a round's bytes costs, with no framework at all.

Two figures, each the best of a few tries (the machine is shared, so the best try is the
one least disturbed):

* **loopback**: bytes per second through one TCP connection over 127.0.0.1, a sender
  thread ``sendall``-ing a large buffer and a receiver thread ``recv_into``-ing it (large
  calls: the Python cost per call is negligible). Each byte is copied twice by the kernel
  (sender's buffer -> socket buffer -> receiver's buffer), the two copies on the two
  threads, so on a 2-core machine this figure takes both cores.
* **memcpy**: bytes per second of ``np.copyto`` between two large preallocated (and
  touched) float32 arrays: one read and one write of each byte on one core, the kind of
  pass the server's aggregation makes over each result.

The floor of one round of ``clients`` models of ``model_bytes`` (:func:`round_floor`)::

    floor = 2 * clients * model_bytes / loopback  +  clients * model_bytes / memcpy

Every client's model crosses the loopback twice (the instruction down, the result up), and
the server reads every result once into the aggregate. The two terms are added, not
overlapped: the loopback figure already keeps both cores busy, so on this machine nothing
else can run beside it. What the floor leaves out, and no real round can avoid: each
client's own pass over its model (``fit`` reads and writes it), the encoding of a message
into the bytes sent (at least one copy per side), the server's copy of the new global
model, and every per-message cost (gRPC calls, Python per message and per client). So it
is a lower bound no framework reaches; a round's multiple of it says how much is spent on
anything but moving the bytes.

Usage: ``floors.py [--quick]`` prints :func:`measure`'s JSON. The driver runs it as a
process of its own: a child inherits its parent's peak RSS through ``fork`` and ``exec``
(Linux folds the old memory map's high-water mark into the new process's ``ru_maxrss``),
so the floors' buffers measured in the driver would show up in every server's peak.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from typing import Any

import numpy as np

CHUNK = 1 << 20
"""Bytes per ``recv_into`` call of the loopback measurement (1 MiB: as fast as any size
tried, 1-16 MiB, and the steadiest; bench/HISTORY.md)."""
SIZES = {"full": (256_000_000, 256_000_000, 5), "quick": (32_000_000, 32_000_000, 3)}
"""``(loopback bytes, memcpy bytes, tries)`` per mode."""
TIMEOUT = 60.0
"""Seconds one loopback transfer may take before it counts as failed."""


def touched(size: int) -> np.ndarray:
    """``size`` bytes of memory already written to (no page faults while timed)."""
    return np.ones(size // 4, dtype=np.float32)


def loopback_seconds(source: np.ndarray, target: np.ndarray) -> float:
    """Seconds to move ``source`` into ``target`` through one 127.0.0.1 TCP connection.

    Raises:
        RuntimeError: the receiver got fewer bytes than sent within ``TIMEOUT``.
    """
    size = source.nbytes
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        receiver, _ = listener.accept()
    received = [0]

    def receive() -> None:
        view = memoryview(target).cast("B")
        while received[0] < size:
            count = receiver.recv_into(view[received[0] : received[0] + CHUNK])
            if count == 0:
                return
            received[0] += count

    with sender, receiver:
        receiver.settimeout(TIMEOUT)
        thread = threading.Thread(target=receive, name="loopback-receiver", daemon=True)
        start = time.perf_counter()
        thread.start()
        sender.sendall(memoryview(source).cast("B"))
        thread.join(TIMEOUT)
        seconds = time.perf_counter() - start
    if received[0] != size:
        raise RuntimeError(
            f"loopback: expected {size} bytes within {TIMEOUT:g} s, received {received[0]}"
        )
    return seconds


def memcpy_seconds(source: np.ndarray, target: np.ndarray) -> float:
    """Seconds of one ``np.copyto`` of ``source`` into ``target``."""
    start = time.perf_counter()
    np.copyto(target, source)
    return time.perf_counter() - start


def measure(quick: bool) -> dict[str, Any]:
    """Both floors, best of a few tries each, as bytes per second (and every try)."""
    loop_bytes, copy_bytes, tries = SIZES["quick" if quick else "full"]
    size = max(loop_bytes, copy_bytes)
    source, target = touched(size), touched(size)
    loop = [loopback_seconds(source[: loop_bytes // 4], target) for _ in range(tries)]
    copy_source, copy_target = source[: copy_bytes // 4], target[: copy_bytes // 4]
    copy = [memcpy_seconds(copy_source, copy_target) for _ in range(tries)]
    return {
        "loopback_bytes_per_s": loop_bytes / min(loop),
        "memcpy_bytes_per_s": copy_bytes / min(copy),
        "loopback_bytes": loop_bytes,
        "memcpy_bytes": copy_bytes,
        "loopback_seconds": loop,
        "memcpy_seconds": copy,
    }


def round_floor(clients: int, model_bytes: int, floors: dict[str, Any]) -> dict[str, float]:
    """The floor of one round (see the module docstring): its bytes and its seconds."""
    loopback = 2 * clients * model_bytes
    aggregated = clients * model_bytes
    return {
        "loopback_bytes": loopback,
        "memcpy_bytes": aggregated,
        "seconds": loopback / floors["loopback_bytes_per_s"]
        + aggregated / floors["memcpy_bytes_per_s"],
    }


def main() -> int:
    """Measure; print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller transfers")
    print(json.dumps(measure(parser.parse_args().quick)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
