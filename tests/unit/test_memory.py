"""stamen.memory: large buffers freed by node threads are reused, not mapped afresh; the
buffer pool reuses received messages and encoded tensors only once nothing reads them."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref
from typing import Any

import numpy as np
import pytest

from stamen import memory, ndarrays
from stamen.errors import ConfigError
from stamen.memory import BufferPool
from stamen.messages import Parameters
from stamen.ndarrays import ReceivedBuffer

# In a fresh interpreter: apply the settings, as a program that starts node threads itself
# does before starting them, then run 3 node-like threads that each allocate a little,
# apply the settings again (as start_client in a thread does), and allocate, fill and
# free 80 MB buffers (over glibc's 64 MiB per-thread heap) four times; report the page
# faults of the rounds after the first.
_PROBE = textwrap.dedent(
    """
    import json, resource, threading
    import numpy as np
    import stamen.client
    from stamen.memory import tune_allocator

    tune_allocator()  # before the node threads exist (one arena for all of them)

    SIZE = 80 * 2**20
    marks = []  # page faults so far, each time every thread has finished a round
    barrier = threading.Barrier(
        3, action=lambda: marks.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    )

    def node():
        scratch = [bytearray(1000) for _ in range(100)]  # the thread's own first allocations
        tune_allocator()  # as start_client does, in the node's thread
        barrier.wait()
        for _ in range(4):
            buffer = np.empty(SIZE, dtype=np.uint8)
            buffer[:] = 1
            reply = b"".join([b"x", buffer.data])
            del buffer, reply
            barrier.wait()

    threads = [threading.Thread(target=node) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Rounds 2 to 4, all threads: what a warm process pays.
    print(json.dumps({"faults": marks[-1] - marks[1], "pages": 3 * 3 * 2 * SIZE // 4096}))
    """
)


def _later_round_faults(tuning: str) -> tuple[int, int]:
    env = {**os.environ, "STAMEN_MALLOC_TUNING": tuning}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    return report["faults"], report["pages"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_node_threads_reuse_freed_buffers() -> None:
    """The 160 MB a thread touches per round (a NumPy buffer and a bytes) are faulted in
    mostly once, in the first round; without the settings every round maps and zeroes them
    afresh (``pages``: the 4 KiB pages of rounds 2-4; NumPy's buffers fault in 2 MiB
    huge pages where the kernel has them, so the bytes alone are half of ``pages``)."""
    tuned, pages = _later_round_faults("1")
    untuned, _ = _later_round_faults("0")
    assert untuned > pages // 3, (untuned, pages)  # the probe shows the problem at all
    # Measured here: 187,764 untuned, 20,480-40,960 tuned (one bytes buffer re-faulted
    # where the three threads' buffers interleave differently from round to round).
    assert tuned * 3 < untuned, (tuned, untuned)


# --- BufferPool and the buffers built on it ----------------------------------------------

MIB = 1 << 20


def _address(array: np.ndarray[Any, Any]) -> int:
    return int(array.__array_interface__["data"][0])


def test_a_freed_buffer_serves_the_next_request_it_fits_without_a_new_mapping() -> None:
    pool = BufferPool()
    block, give_back = pool.take(3 * MIB)
    buffer = block.view(ReceivedBuffer)
    weakref.finalize(buffer, give_back)
    first = _address(buffer)
    buffer[:] = 7
    del block, buffer
    assert pool.cached_bytes == 4 * MIB  # rounded up to whole 2 MiB huge pages
    again, give_back = pool.take(3 * MIB - 100)
    assert _address(again) == first
    assert again.nbytes == 3 * MIB - 100
    assert (pool.mapped, pool.cached_bytes) == (1, 0)
    bigger, _ = pool.take(5 * MIB)  # does not fit the cached one: a new mapping
    assert _address(bigger) != first and pool.mapped == 2


def test_a_cached_buffer_is_not_given_to_a_request_of_under_half_its_size() -> None:
    pool = BufferPool()
    block, give_back = pool.take(10 * MIB)
    give_back()
    del block
    _small, _ = pool.take(3 * MIB)
    assert pool.mapped == 2 and pool.cached_bytes == 10 * MIB


def test_cached_buffers_beyond_the_limit_are_dropped_oldest_first() -> None:
    pool = BufferPool(max_cached_bytes=5 * MIB)
    blocks = [pool.take(2 * MIB) for _ in range(3)]
    for _, give_back in blocks:
        give_back()
    assert pool.cached_bytes == 4 * MIB  # the first of the three was unmapped
    pool.clear()
    assert pool.cached_bytes == 0


def _rss() -> int:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) * 1024


def test_trim_gives_a_cached_buffers_pages_back_and_keeps_it_for_reuse() -> None:
    pool = BufferPool()
    block, give_back = pool.take(64 * MIB)
    first = _address(block)
    block[:] = 1  # touched: resident
    give_back()
    del block
    before = _rss()
    assert pool.trim() == 64 * MIB
    assert before - _rss() > 60 * MIB
    again, _ = pool.take(64 * MIB)
    assert _address(again) == first and pool.mapped == 1  # the same mapping, reused
    assert not again[::4096].any()  # its pages come back as zeros


@pytest.fixture
def small_pool(monkeypatch: pytest.MonkeyPatch) -> BufferPool:
    """Received buffers and sendable tensors of 1 MiB and more from a fresh pool."""
    pool = BufferPool()
    monkeypatch.setattr(ndarrays, "POOLED_FROM", MIB)
    monkeypatch.setattr(ndarrays, "RECEIVE_POOL", pool)
    return pool


@pytest.mark.parametrize(
    "make_view",
    [
        lambda buffer: buffer[10:20],
        lambda buffer: np.asarray(buffer)[5:].reshape(-1)[1:],
        lambda buffer: buffer.view(np.float32)[3:],
        lambda buffer: memoryview(buffer)[100:],
        lambda buffer: np.frombuffer(buffer.data, dtype=np.uint8, offset=8),
        lambda buffer: ndarrays.Lease([buffer]).alias(np.frombuffer(buffer.data, np.uint8)),
    ],
    ids=["slice", "ndarray-of-slice", "dtype-view", "memoryview", "frombuffer", "alias"],
)
def test_a_pooled_buffer_is_not_reused_while_any_view_of_it_lives(
    small_pool: BufferPool, make_view: Any
) -> None:
    """Reusing memory something still reads would corrupt it silently."""
    buffer = ReceivedBuffer.allocate(2 * MIB)
    view = make_view(buffer)
    del buffer
    assert small_pool.cached_bytes == 0
    other = ReceivedBuffer.allocate(2 * MIB)
    assert small_pool.mapped == 2
    del view
    assert small_pool.cached_bytes == 2 * MIB
    del other


def test_a_kept_buffer_stays_out_of_the_pool(small_pool: BufferPool) -> None:
    """kept() releases the receive slot, not the memory: the receiver still uses it."""
    buffer = ReceivedBuffer.allocate(2 * MIB)
    slot_freed: list[bool] = []
    buffer.when_released(lambda: slot_freed.append(True))
    buffer.kept()
    assert slot_freed == [True] and small_pool.cached_bytes == 0
    del buffer
    assert small_pool.cached_bytes == 2 * MIB


@pytest.mark.parametrize(
    "array",
    [
        np.arange(600_000, dtype=np.float32).reshape(600, 1000),
        np.asfortranarray(np.arange(300_000, dtype=np.float64).reshape(300, 1000)),
        np.arange(1_200_000, dtype=np.int32)[::2],
    ],
    ids=["c-order", "fortran-order", "strided"],
)
def test_a_sendable_tensor_is_the_npy_blob_in_pooled_read_only_memory(
    small_pool: BufferPool, array: np.ndarray[Any, Any]
) -> None:
    tensor = ndarrays.ndarray_to_sendable(array)
    assert isinstance(tensor, memoryview) and tensor.readonly
    assert bytes(tensor) == ndarrays.ndarray_to_bytes(array)
    assert np.array_equal(ndarrays.bytes_to_ndarray(tensor), array)
    assert ndarrays.Lease.over([tensor]).buffers == ()  # read-only: nobody's to write
    del tensor
    assert small_pool.mapped == 1 and small_pool.cached_bytes > 0


def test_small_and_unsendable_arrays_stay_bytes_and_keep_their_errors(
    small_pool: BufferPool,
) -> None:
    assert isinstance(ndarrays.ndarray_to_sendable(np.ones(10)), bytes)
    with pytest.raises(ConfigError, match="Python objects"):
        ndarrays.ndarray_to_sendable(np.empty(MIB, dtype=object))
    assert small_pool.mapped == 0


def test_pooled_parameters_move_large_tensors_into_the_pool_once(small_pool: BufferPool) -> None:
    """The server's initial model goes into pooled memory, so that when a round replaces
    it its memory serves the next messages; tensors already pooled are not copied again."""
    big = ndarrays.ndarray_to_bytes(np.arange(400_000, dtype=np.float32))
    small = ndarrays.ndarray_to_bytes(np.arange(10, dtype=np.float32))
    parameters = Parameters(tensors=[big, small], tensor_type=ndarrays.TENSOR_TYPE)
    pooled = ndarrays.pooled_parameters(parameters)
    moved, kept = pooled.tensors
    assert isinstance(moved, memoryview) and moved.readonly and bytes(moved) == big
    assert kept is small and small_pool.mapped == 1
    again = ndarrays.pooled_parameters(pooled)
    assert again.tensors[0] is moved and small_pool.mapped == 1
    del parameters, pooled, again, moved
    assert small_pool.cached_bytes == 2 * MIB


def test_a_pooled_buffer_is_back_in_its_pool_before_its_release_callbacks_run(
    small_pool: BufferPool,
) -> None:
    """The server's receive slot is a release callback: the reply it lets in must find the
    freed buffer in the pool, not map a new one."""
    buffer = ReceivedBuffer.allocate(2 * MIB)
    seen: list[tuple[str, int]] = []
    buffer.when_released(lambda: seen.append(("first", small_pool.cached_bytes)))
    buffer.when_released(lambda: seen.append(("second", small_pool.cached_bytes)))
    del buffer
    assert seen == [("first", 2 * MIB), ("second", 2 * MIB)]


def test_a_buffer_the_system_cannot_map_is_a_memory_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(memory.mmap, "mmap", refuse)
    with pytest.raises(MemoryError, match=r"cannot map 4194304 bytes .*Cannot allocate"):
        BufferPool().take(3 * MIB)


# --- No process-wide setting at import -------------------------------------------------

# In a fresh interpreter: record every function looked up in a C library through ctypes
# (how Stamen reaches glibc's mallopt), import Stamen's packages, report what was looked up
# and whether Stamen's own record says a setting was applied.
_IMPORT_PROBE = textwrap.dedent(
    """
    import ctypes, gc, json, sys

    threshold = gc.get_threshold()
    looked_up = []
    original = ctypes.CDLL.__getitem__

    def spy(self, name_or_ordinal):
        looked_up.append(str(name_or_ordinal))
        return original(self, name_or_ordinal)

    ctypes.CDLL.__getitem__ = spy
    import stamen, stamen.client, stamen.server, stamen.simulation, stamen.wire, stamen.cli
    from stamen import memory

    at_import, applied = list(looked_up), [memory._arenas_limited, memory._tuned]
    collector = [memory._collector, gc.get_threshold()]
    memory.tune_allocator()  # the probe sees a call when there is one
    print(json.dumps(
        {"at_import": at_import, "applied": applied, "after": looked_up, "gc": collector}
    ))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_importing_stamen_changes_no_process_wide_setting() -> None:
    """malloc and garbage collector settings bind the whole process: only an entry point
    (start_client, start_server, start_simulation, the CLI) or the program itself applies
    them."""
    env = {k: v for k, v in os.environ.items() if k != "STAMEN_MALLOC_TUNING"}
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert "mallopt" not in report["at_import"], report
    assert report["applied"] == [None, None], report
    assert "mallopt" in report["after"], report  # the spy would have seen it
    # Nor the cyclic garbage collector's thresholds (Python's defaults: 700, 10, 10).
    assert report["gc"] == [None, [700, 10, 10]], report


# --- The cyclic garbage collector, scaled by a round's nodes ------------------------------


def test_a_tuned_collector_scales_with_the_nodes_of_a_round(collector: int) -> None:
    _, second, third = gc.get_threshold()
    per_node = memory.GC_ALLOCATIONS_PER_NODE
    assert memory.scale_collector(10_000) == collector  # not tuned: nothing changes
    assert gc.get_threshold()[0] == collector
    assert memory.tune_collector()
    assert memory.scale_collector(10_000) == 10_000 * per_node
    assert gc.get_threshold() == (10_000 * per_node, second, third)  # the others kept
    assert memory.scale_collector(2) == collector  # never below Python's own
    assert gc.get_threshold()[0] == collector
    assert memory.scale_collector(500) == max(collector, 500 * per_node)


def test_a_threshold_the_program_set_itself_is_left_alone(collector: int) -> None:
    memory.tune_collector()
    memory.scale_collector(1_000)
    gc.set_threshold(1_234, 5, 6)
    assert memory.scale_collector(10_000) == 1_234
    assert gc.get_threshold() == (1_234, 5, 6)


def test_a_collector_without_automatic_collections_stays_so(collector: int) -> None:
    gc.set_threshold(0)  # how a program turns automatic collection off
    memory.tune_collector()
    assert memory.scale_collector(10_000) == 0
    assert gc.get_threshold()[0] == 0


def test_stamen_gc_tuning_0_leaves_the_collector_alone(
    collector: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAMEN_GC_TUNING", "0")
    assert not memory.tune_collector()
    assert memory.scale_collector(10_000) == collector
    assert gc.get_threshold()[0] == collector


def test_a_threshold_set_before_tuning_is_the_floor(collector: int) -> None:
    """docs/operations.md: a threshold the program set before the server started is the
    floor instead of Python's own."""
    _, second, third = gc.get_threshold()
    gc.set_threshold(5_000, second, third)
    memory.tune_collector()
    assert memory.scale_collector(10) == 5_000
    assert memory.scale_collector(1_000) == 1_000 * memory.GC_ALLOCATIONS_PER_NODE
    assert memory.scale_collector(10) == 5_000
