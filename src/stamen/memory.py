"""Keep large buffers warm: glibc ``malloc`` settings for processes that move whole models.

A federated round allocates the same few large buffers again and again (a model's
encoded tensors, a received message, the aggregate). glibc serves each allocation over
128 KiB-32 MiB with a fresh ``mmap`` and gives it back on ``free``; every page of the next
one is then faulted in and zeroed by the kernel again: for big models, first-touch page
faults, not copies, were most of a round (figures in ``bench/HISTORY.md``).

:func:`tune_allocator` makes large allocations come from the heap and keeps freed memory
mapped for reuse (one arena, so buffers freed by one thread serve the next allocation of
another). The cost: a process keeps its peak memory until it exits, as caching
allocators (PyTorch's, jemalloc's) do.

glibc binds a thread to an arena at its first allocation, and a thread with an arena of
its own gets every allocation over 64 MiB as a fresh ``mmap`` whatever the settings. So
the settings must be in effect before the threads that will run nodes exist. They are
process-wide, so Stamen never applies them
at import: only its entry points do (``start_client``, ``start_server``,
``start_simulation`` and the ``stamen`` command), when they start, so what a program
allocates before it starts Stamen (an initial model, a dataset) is mapped and returned
to the system as usual. **A program that starts node threads itself** (many
``start_client`` calls in threads of one process) should call :func:`tune_allocator`
once before starting them. Set ``STAMEN_MALLOC_TUNING=0`` to leave malloc alone.

Python's cyclic garbage collector is the other process-wide setting. Its full collections
walk every live object, and a server holds some for each connected node, so a full
collection costs more with every node (10,000 nodes: ~0.4 s each, 19 of them in three
rounds); they come every ~70,000 allocations, and a round allocates some for each node.
:func:`tune_collector` (at the server's entry points) lets the server scale the young
generation's threshold with the number of nodes in a round (:func:`scale_collector`), so
collections come per round, not per node: never below Python's default, which a round of
a few nodes (large models, few allocations) keeps. Stamen's own code leaves no reference
cycle behind in a round (the tests check it), so the later collections free nothing that
waited. Set ``STAMEN_GC_TUNING=0`` to leave the collector alone.

The heap still fragments when several threads each hold model-sized buffers for
different spans of time: freed holes get split by smaller allocations and the next
round's model no longer fits, so the heap grows into fresh pages. The buffers Stamen
itself allocates per message (received messages, encoded replies and global models) come
from a :class:`BufferPool` instead: private anonymous mappings with huge pages, kept for
reuse when freed.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import mmap
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, cast

import numpy as np

__all__ = [
    "BufferPool",
    "limit_arenas",
    "physical_memory_bytes",
    "scale_collector",
    "tune_allocator",
    "tune_collector",
]

logger = logging.getLogger("stamen")


@functools.cache
def physical_memory_bytes() -> int:
    """This machine's physical memory, in bytes (asked once)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - every Linux and macOS has both
        return 1 << 62


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_MMAP_THRESHOLD = 1 << 30
"""Allocations up to 1 GiB come from the heap (larger ones are mapped, as before)."""

_TRIM_THRESHOLD = (1 << 31) - 1
"""Free memory at the top of the heap is kept up to this many bytes (mallopt takes int)."""

_lock = threading.Lock()
_tuned: bool | None = None
_arenas_limited: bool | None = None


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None (tuning off, not Linux, or a libc without it)."""
    if os.environ.get("STAMEN_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return cast("Callable[[int, int], int]", mallopt)


def limit_arenas() -> bool:
    """One malloc arena for the whole process, from now on; True if in effect.

    A thread that has already allocated keeps the arena it has: call this (or
    :func:`tune_allocator`) before starting the threads that will run nodes.
    """
    global _arenas_limited
    with _lock:
        if _arenas_limited is None:
            mallopt = _mallopt()
            _arenas_limited = mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1
        return _arenas_limited


def tune_allocator() -> bool:
    """Apply the settings (one arena, large allocations from the heap, freed memory kept
    mapped) once per process; True if they are in effect.

    Called by Stamen's entry points as they start. A program that runs node threads of
    its own calls it before starting them. Does nothing (False) off glibc, or when
    ``STAMEN_MALLOC_TUNING=0``.
    """
    global _tuned
    arenas = limit_arenas()
    with _lock:
        if _tuned is not None:
            return _tuned
        mallopt = _mallopt()
        _tuned = bool(
            arenas
            and mallopt is not None
            and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
        )
        logger.debug("malloc tuning %s", "applied" if _tuned else "not applied")
        return _tuned


GC_ALLOCATIONS_PER_NODE = 40
"""Net allocations per node of a round between two collections of the cyclic garbage
collector's young generation, once :func:`tune_collector` is in effect. A round of 500
small-model nodes allocates ~50 objects per node on the server: it then sees about one
young collection a round and a full one at most every hundred, whatever its node count."""

_collector: list[int] | None = None
"""[Python's young-generation threshold before tuning, the threshold last set here];
None while the collector is not tuned."""


def tune_collector() -> bool:
    """Let :func:`scale_collector` set the cyclic garbage collector's young-generation
    threshold from now on (process-wide: Stamen's server entry points call it as they
    start, never at import); True if in effect. Off with ``STAMEN_GC_TUNING=0``."""
    global _collector
    with _lock:
        if os.environ.get("STAMEN_GC_TUNING", "1") == "0":
            return False
        if _collector is None:
            first = gc.get_threshold()[0]
            _collector = [first, first]
        return True


def scale_collector(nodes: int) -> int:
    """Set the young-generation threshold for a round of ``nodes`` nodes, if
    :func:`tune_collector` is in effect: :data:`GC_ALLOCATIONS_PER_NODE` per node, never
    below Python's own. Left alone if the program set a threshold of its own since (0
    turns automatic collection off, say). Returns the threshold in effect."""
    with _lock:
        first, second, third = gc.get_threshold()
        if _collector is None or first != _collector[1] or _collector[0] == 0:
            return first
        wanted = max(_collector[0], GC_ALLOCATIONS_PER_NODE * nodes)
        if wanted != first:
            gc.set_threshold(wanted, second, third)
            _collector[1] = wanted
        return wanted


_HUGE_PAGE = 2 << 20


def _anonymous(capacity: int) -> mmap.mmap:
    """``capacity`` bytes of private anonymous memory, huge pages requested.

    Private: Python's default for ``mmap(-1, ...)`` on Unix is shared memory, which Linux
    backs with shmem pages (no transparent huge pages, slower faults).

    Raises:
        MemoryError: the system cannot map that much.
    """
    try:
        if hasattr(mmap, "MAP_PRIVATE"):
            private = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0)
            mapping = mmap.mmap(-1, capacity, flags=private)
        else:  # Windows: anonymous memory is private already
            mapping = mmap.mmap(-1, capacity)
    except OSError as exc:
        raise MemoryError(f"cannot map {capacity} bytes for a message buffer: {exc}") from exc
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


class _Block(np.ndarray[Any, np.dtype[np.uint8]]):
    """The memory of one pooled mapping, as the base of exactly one buffer.

    A type of its own on purpose: NumPy skips from a view to the first base that owns the
    memory, but never across a change of subclass, so every view of a pooled buffer keeps
    that buffer (not just the mapping) alive, and the buffer's death means the memory is
    free.
    """


class BufferPool:
    """Large buffers that go back to a cache, still mapped, when freed.

    A round allocates the same model-sized buffers again and again (each received
    message). From glibc's heap, buffers freed by different threads at different times
    leave holes that the next round's buffers do not fit, so the heap keeps growing into
    fresh pages that the kernel must zero (a benchmark with 5 nodes x 100 MB per process
    grew its heap by a model every few seconds); a fresh ``mmap`` per buffer zeroes every
    page every time. Pooled buffers are anonymous mappings with transparent huge pages
    requested, reused by the next request they fit (best fit, at most twice the size
    asked for). Freed buffers stay mapped, up to ``max_cached_bytes``, until reused or
    :meth:`clear`: like the malloc settings, a process keeps what its busiest round
    needed.

    Args:
        max_cached_bytes: Free buffers kept beyond this many bytes are unmapped.
    """

    def __init__(self, max_cached_bytes: int = 4 << 30) -> None:
        self._max_cached = max_cached_bytes
        self._lock = threading.Lock()
        self._free: list[tuple[int, int, mmap.mmap]] = []  # (capacity, serial, mapping)
        self._serial = 0
        self.cached_bytes = 0
        self.mapped = 0
        """Mappings made so far (each a fresh, zero-filled allocation)."""

    def take(self, size: int) -> tuple[np.ndarray[Any, np.dtype[np.uint8]], Callable[[], None]]:
        """An uninitialized buffer of ``size`` bytes (a :class:`_Block` view: view it as
        the array type wanted) and the function to call when that view has died."""
        capacity = -(-max(size, 1) // _HUGE_PAGE) * _HUGE_PAGE
        mapping = self._reuse(size)
        if mapping is None:
            mapping = _anonymous(capacity)
            with self._lock:
                self.mapped += 1
        block = np.frombuffer(mapping, dtype=np.uint8, count=size).view(_Block)
        return block, lambda: self._give_back(mapping)

    def _reuse(self, size: int) -> mmap.mmap | None:
        with self._lock:
            at = bisect.bisect_left(self._free, (size, -1))
            if at == len(self._free) or self._free[at][0] > 2 * size + _HUGE_PAGE:
                return None
            capacity, _, mapping = self._free.pop(at)
            self.cached_bytes -= capacity
            return mapping

    def _give_back(self, mapping: mmap.mmap) -> None:
        with self._lock:
            self._serial += 1
            bisect.insort(self._free, (len(mapping), self._serial, mapping))
            self.cached_bytes += len(mapping)
            while self.cached_bytes > self._max_cached:  # drop the oldest first
                oldest = min(range(len(self._free)), key=lambda i: self._free[i][1])
                self.cached_bytes -= self._free.pop(oldest)[0]  # unmapped once unused

    def trim(self) -> int:
        """Give the pages of every cached buffer back to the system, keeping the mappings.

        A cached buffer's pages stay resident until it is reused. Once a round has
        received its replies, those pages only weigh on the aggregation's peak; trimmed,
        the next use of the buffer finds fresh zero pages (the kernel fills them in as
        they are touched). Returns the bytes trimmed.
        """
        with self._lock:  # held throughout: no buffer is taken out while it is trimmed
            for _, _, mapping in self._free:
                with contextlib.suppress(OSError):  # a platform without MADV_DONTNEED
                    mapping.madvise(mmap.MADV_DONTNEED)
            return self.cached_bytes

    def clear(self) -> None:
        """Unmap every cached buffer."""
        with self._lock:
            self._free.clear()
            self.cached_bytes = 0
