"""Keep large buffers warm: glibc ``malloc`` settings for processes that move whole models.

A federated round allocates the same few large buffers again and again (a model's
encoded tensors, a received message, the aggregate). glibc serves each allocation over
128 KiB-32 MiB with a fresh ``mmap`` and gives it back on ``free``; every page of the next
one is then faulted in and zeroed by the kernel again. On this project's benchmark machine
that costs 0.5 s for 300 MB, against 0.04 s to copy 300 MB into memory already mapped:
for big models, first-touch page faults, not copies, were most of a round.

:func:`tune_allocator` makes large allocations come from the heap and keeps freed memory
mapped for reuse (one arena, so buffers freed by one thread serve the next allocation of
another). The cost: a process keeps its peak memory until it exits, as caching
allocators (PyTorch's, jemalloc's) do.

glibc binds a thread to an arena at its first allocation, and a thread with an arena of
its own gets every allocation over 64 MiB as a fresh ``mmap`` whatever the settings. So
the arena limit (:func:`limit_arenas`) is set when this module is imported, that is when
``stamen.client``, ``stamen.server`` or ``stamen.simulation`` is, normally before the
threads that will run nodes exist; set from inside each node's thread, the first
benchmark with 100 MB models spent half of the nodes' CPU time zeroing fresh pages. The
thresholds are set by ``start_client``, ``start_server`` and ``start_simulation``
(:func:`tune_allocator`), so what a program allocates before it starts Stamen (an
initial model, a dataset) is mapped and returned to the system as usual. Set
``STAMEN_MALLOC_TUNING=0`` before importing Stamen to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import cast

__all__ = ["limit_arenas", "tune_allocator"]

logger = logging.getLogger("stamen")

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

    Run at import: a thread that has already allocated keeps the arena it has.
    """
    global _arenas_limited
    with _lock:
        if _arenas_limited is None:
            mallopt = _mallopt()
            _arenas_limited = mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1
        return _arenas_limited


def tune_allocator() -> bool:
    """Apply the settings once per process; True if they are in effect.

    Does nothing (False) off glibc, or when ``STAMEN_MALLOC_TUNING=0``.
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


# At import, before the threads that will run nodes exist (see the module docstring).
limit_arenas()
