"""Fit results that wait on disk instead of in RAM, for rules that need them all at once.

A strategy that aggregates results one at a time (FedAvg and the strategies built on its
rule: :meth:`~stamen.server.strategy.Strategy.fit_accumulator`) never holds more than one
model. Any other ``aggregate_fit`` — a FedAvg subclass that overrides it to save the model,
the robust rules (median, trimmed mean, Krum, Bulyan), a user's own strategy — receives
every result of the round at once. Held in RAM, ten 100 MB results are a gigabyte.

:class:`SpillStore` keeps a round's results in RAM up to a budget and writes the rest,
as they arrive, into spill files in a spill directory (results share files of
:data:`SEGMENT_BYTES`, so a round holds a few descriptors), mapped: a result's
``Parameters.tensors`` are then read-only ``memoryview`` slices of its file (bytes-like:
``np.frombuffer``, ``parameters_to_ndarrays``, ``bytes(...)`` work unchanged). The files
are anonymous (``O_TMPFILE`` on Linux; elsewhere unlinked as soon as made): no name is
ever visible. Once the last result in a file is let go (after the round), the file takes
a later round's results over the same pages (up to :data:`SPARE_SEGMENTS` files kept);
the disk is given back when the run ends (:meth:`SpillStore.close`) or the process exits,
killed or not. Nothing is left to clean up.

Reading a mapped file brings its pages into the process (they count in its RSS) until
:func:`release` lets them go: the aggregation kernels release each part of each model as
soon as they have read it (:mod:`~stamen.server.strategy.aggregate`, the result checks),
so a rule that reads every result once holds one part of each at a time. Releasing never
loses data: the pages are read again from the file if they are read again. :func:`release`
does nothing to memory that is not a spilled result's.

``parameters_to_ndarrays`` of a spilled result makes no copy either
(:func:`copy_on_write`): its large layers become private mappings of the same bytes of the
file, new and writable arrays whose pages stay the file's until written to. A strategy of
one's own that decodes every result and averages them so holds a part of each at a time,
as the built-in rules do; :func:`release` keeps the pages such an array was written to.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import sys
import tempfile
import threading
import weakref
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from ..messages import FitRes, Parameters
from ..ndarrays import Lease, ReceivedBuffer, copy_on_write_with

__all__ = [
    "COPY_ON_WRITE_FROM",
    "DEFAULT_BUDGET",
    "PRIVATE_VIEWS_LIMIT",
    "SEGMENT_BYTES",
    "ParkedModels",
    "SpillBuffer",
    "SpillReport",
    "SpillStore",
    "close_segments",
    "copy_on_write",
    "drop_spares",
    "is_spilled",
    "receive_buffer",
    "release",
    "spill_buffer",
    "spill_parameters",
    "spilled_bytes_mapped",
    "spilled_like",
]

logger = logging.getLogger("stamen.server")

DEFAULT_BUDGET = 64 << 20
"""Bytes of a round's results a :class:`SpillStore` keeps in RAM before it spills."""

PARK_FROM = 16 << 20
"""Bytes from which :meth:`SpillStore.park` moves a round's old global model to disk
(with a budget of its own: one model, not a round's results, so not
:data:`DEFAULT_BUDGET`). Parking frees a whole model while the results are received, for
a write of it each round (10-20 ms per 40 MB once its file is warm): a 40 MB model kept
in RAM was a third of the three models' worth of memory a round may use
(bench/HISTORY.md); below 16 MiB the memory saved is less than the fixed overhead
allowed, and the write not worth it."""

_PAGE = mmap.PAGESIZE
_ALIGN = max(_PAGE, 4096)
"""Each tensor starts on a page: its array data then has any alignment NumPy wants."""


# --- the mappings of spilled results, by address -------------------------------------------

_lock = threading.Lock()
_starts: list[int] = []


@dataclass(frozen=True)
class _Mapped:
    """A mapping of a spill file: a file's shared mapping, or a private (copy-on-write)
    view of some of its bytes made by :func:`copy_on_write`."""

    start: int
    end: int
    mapping: weakref.ref[mmap.mmap]
    directory: str | None
    segment: weakref.ref[_Segment] | None
    """The file's :class:`_Segment` (its descriptor); None for a private view."""


_maps: list[_Mapped] = []
"""Every spill file mapping, by start address."""
_private_views = 0
"""Private views (:func:`copy_on_write`) mapped now."""


def _address(buffer: Any) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0])


def _register(mapping: mmap.mmap, directory: str | None, segment: _Segment | None) -> None:
    start = _address(mapping)
    ref = weakref.ref(mapping, lambda _: _forget(start))
    owner = None if segment is None else weakref.ref(segment)
    entry = _Mapped(start, start + len(mapping), ref, directory, owner)
    global _private_views
    with _lock:
        at = bisect.bisect_left(_starts, start)
        _starts.insert(at, start)
        _maps.insert(at, entry)
        _private_views += owner is None


def _forget(start: int) -> None:
    global _private_views
    with _lock:
        at = bisect.bisect_left(_starts, start)
        if at < len(_starts) and _starts[at] == start:
            del _starts[at]
            _private_views -= _maps.pop(at).segment is None


def _mapping_at(address: int) -> tuple[_Mapped, mmap.mmap] | None:
    with _lock:
        at = bisect.bisect_right(_starts, address) - 1
        if at < 0:
            return None
        entry = _maps[at]
    mapping = entry.mapping()
    if mapping is None or not entry.start <= address < entry.end:
        return None
    return entry, mapping


def spilled_bytes_mapped() -> int:
    """Bytes of spilled results whose files are still mapped (for tests and reports)."""
    with _lock:
        return sum(m.end - m.start for m in _maps if m.mapping() is not None)


def _advise(mapping: mmap.mmap, advice: str, start: int = 0, length: int | None = None) -> None:
    """``madvise`` where the platform has it (the mapping may have been closed
    meanwhile); nothing elsewhere."""
    flag = getattr(mmap, advice, None)
    if flag is not None:
        with contextlib.suppress(ValueError, OSError):
            mapping.madvise(flag, start, len(mapping) - start if length is None else length)


def _pages(
    array: np.ndarray[Any, Any] | memoryview | bytes,
) -> tuple[mmap.mmap, int, int, bool] | None:
    """The spill file mapping ``array`` lies in, the pages it covers there (offset,
    length), and whether the mapping is a private view (:func:`copy_on_write`); None if
    it is empty or not a spilled result's."""
    if isinstance(array, np.ndarray):
        if array.size == 0:
            return None
        address = int(array.__array_interface__["data"][0])
        nbytes = int(array.nbytes)
    else:
        if len(array) == 0:
            return None
        address, nbytes = _address(array), memoryview(array).nbytes
    found = _mapping_at(address)
    if found is None:
        return None
    entry, mapping = found
    first = (address - entry.start) // _PAGE * _PAGE
    length = min(address + nbytes, entry.end) - entry.start - first
    return mapping, first, length, entry.segment is None


def _readable(parameters: Parameters) -> None:
    """Readahead back on for the spilled tensors of ``parameters`` (whole now: read in
    order from here on, from the disk if memory was short meanwhile)."""
    for tensor in parameters.tensors:
        if (pages := _pages(tensor)) is not None:
            _advise(pages[0], "MADV_NORMAL", pages[1], pages[2])


def release(array: np.ndarray[Any, Any] | memoryview | bytes) -> None:
    """Let the pages of ``array`` go from the process if it lies in a spilled result.

    The data stays in the result's file and is read again if read again; memory that is
    not a spilled result's is left alone (this is a no-op there).
    """
    if not _starts:  # nothing is spilled: the common case costs one test
        return
    if (pages := _pages(array)) is not None:
        mapping, first, length, private = pages
        # Reading the start of ``array`` mapped the fault-around window before it too: a
        # part released earlier, mapped again. Let it go with this part, or a result
        # read in parts keeps ~60 KB per part (22 MB of a 100 MB result in 256 KB parts).
        behind = min(first, _FAULT_AROUND)
        start, length = first - behind, length + behind
        # In a private view, a page written to is the view's own copy: letting it go
        # would lose what was written. Such a range stays. (Releasing is for arrays
        # being read: a write from another thread between this check and the advice
        # would be lost, as it would race with the reading anyway.)
        if private and _own_pages(_address(mapping) + start, length):
            return
        _advise(mapping, "MADV_DONTNEED", start, length)


_OWN_PAGE = bytes(int(top & 0x40 != 0 or top & 0xA0 == 0x80) for top in range(256))
"""By the top byte of a page map entry: 1 if the page is the process's own (swapped out,
bit 62; or present, bit 63, and not the file's, bit 61)."""
_TOP_BYTE = 7 if sys.byteorder == "little" else 0
"""Where the top byte of each 8-byte page map entry (native byte order) lies."""
_pagemap: tuple[int, int] | None = None
"""(process id, descriptor) of this process's page map, opened once (a child process
opens its own: the descriptor it inherits reads its parent's)."""


def _pagemap_fd() -> int:
    global _pagemap
    pid = os.getpid()
    with _lock:
        if _pagemap is None or _pagemap[0] != pid:
            _pagemap = (pid, os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC))
        return _pagemap[1]


def _own_pages(address: int, length: int) -> bool:
    """Whether a page of ``[address, address + length)`` in a private file mapping has
    been written to: it is then the process's own page (present and not the file's, or
    swapped out), as the kernel's page map says. True when that cannot be told (no page
    map: not Linux), so the caller keeps the pages."""
    first, stop = address // _PAGE, -(-(address + length) // _PAGE)
    try:
        entries = os.pread(_pagemap_fd(), 8 * (stop - first), 8 * first)
    except OSError:
        return True
    if len(entries) != 8 * (stop - first):
        return True
    return 1 in entries[_TOP_BYTE::8].translate(_OWN_PAGE)


COPY_ON_WRITE_FROM = 1 << 20
"""Bytes from which :func:`copy_on_write` maps an array instead of letting it be copied
(a mapping is a kernel object of its own: a model's small layers are copied)."""


def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


PRIVATE_VIEWS_LIMIT = _max_map_count() // 4
"""Private views mapped at once at most: a process has a limit of mappings (Linux's
``vm.max_map_count``, 65,530 by default), which every allocator and thread stack draws
on too. Beyond it, arrays are copied."""


class _PrivateMap(mmap.mmap):
    """A private view of a spill file (:func:`copy_on_write`). The arrays decoded over it
    keep it (their buffer), and it keeps the tensor it was made from (:attr:`source`),
    and so the spill file's memory, alive: the file is not handed out again to later
    results while the view may still read it."""

    source: object


def copy_on_write(view: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    """A new, writable array equal to ``view`` (a read-only array decoded over a spilled
    result's tensor) without copying it: a private mapping of the same bytes of the spill
    file, whose pages are the file's until written to (copy on write: a write changes the
    array only, never the tensor or the file). None — copy it — if ``view`` is not in a
    spill file, is smaller than :data:`COPY_ON_WRITE_FROM`, or cannot be mapped (already
    :data:`PRIVATE_VIEWS_LIMIT` views, or no memory map).

    Reading the array maps the file's pages into the process as reading the tensor does;
    the aggregation kernels let them go part by part (:func:`release`), except pages the
    array's owner has written to. So a strategy of one's own that decodes every result
    with ``parameters_to_ndarrays`` and averages them with
    :func:`~stamen.server.strategy.aggregate.aggregate` holds the results' pages one part
    at a time, not every result twice.
    """
    if not _starts or view.nbytes < COPY_ON_WRITE_FROM or view.dtype.hasobject:
        return None
    if _private_views >= PRIVATE_VIEWS_LIMIT:
        return None
    order: Literal["C", "F"]
    if view.flags.c_contiguous:
        order = "C"
    elif view.flags.f_contiguous:
        order = "F"
    else:
        return None
    address = int(view.__array_interface__["data"][0])
    found = _mapping_at(address)
    if found is None:  # not spilled
        return None
    entry = found[0]
    segment = None if entry.segment is None else entry.segment()
    if segment is None:  # a private view, or its file let go meanwhile
        return None
    at = address - entry.start  # the file's offset: a segment maps its file from 0
    offset = at // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
    inner = at - offset
    try:
        private = _PrivateMap(
            segment.fd,
            inner + view.nbytes,
            flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset,
        )
    except (OSError, ValueError, AttributeError):  # no MAP_PRIVATE (Windows), no memory map
        return None
    private.source = view
    _register(private, entry.directory, None)
    flat = np.frombuffer(private, dtype=view.dtype, count=view.size, offset=inner)
    shape: tuple[int, ...] = view.shape
    return flat.reshape(shape, order=order)


# --- writing results out ---------------------------------------------------------------------

SEGMENT_BYTES = 1 << 30
"""Address space of one spill file. Results share files (a result larger than this gets
one of its own): a round of a thousand spilled results holds a few file descriptors, not
a thousand (a mapping keeps its file open). The files are sparse: disk is used only as
results are written."""

_FAULT_AROUND = 64 << 10
"""Bytes around a faulting page of a file mapping that Linux maps too, if they are in the
page cache (``fault_around_bytes``, aligned to its size; a whole folio if it is larger:
spill files are written so that none is, :data:`_WRITE_PIECE`)."""


class _Segment:
    """One anonymous spill file, mapped whole (shared, read and write), handed out a
    result at a time. It lives as long as its mapping: the views of its results."""

    def __init__(self, capacity: int, directory: str | None) -> None:
        with tempfile.TemporaryFile(dir=directory, prefix="stamen-spill-") as file:
            os.ftruncate(file.fileno(), capacity)
            self.mapping = mmap.mmap(file.fileno(), capacity)  # keeps its own descriptor
            # Copies are written through a descriptor (no page of the file is mapped or
            # zero-filled on the way: a 400 MB model in 0.2 s instead of 0.6-1.1 s),
            # kept while results go to this file.
            self.fd = os.dup(file.fileno())
        weakref.finalize(self, os.close, self.fd)
        # Results were written into holes of the sparse file through this mapping: with
        # the kernel's readahead, each write fault zero-filled a large readahead window
        # first (a 10 x 100 MB round received its results in 10 s instead of 3). They
        # are written through the descriptor now (:class:`SpillBuffer`), so no write
        # faults; until a result is whole, readahead stays off for what reads it (its
        # header, decoded). Once whole, a result is read back in order: readahead is
        # turned on again for it (:func:`_readable`).
        _advise(self.mapping, "MADV_RANDOM")
        _register(self.mapping, directory, self)
        self.used = 0

    def take(self, size: int) -> int | None:
        """The offset of ``size`` fresh bytes (page-aligned), or None if they do not fit."""
        offset = self.used
        if offset + size > len(self.mapping):
            return None
        self.used = -(-(offset + size) // _ALIGN) * _ALIGN
        return offset

    def reuse(self) -> None:
        """Hand the file out again from its start, over the pages it has (written into
        without readahead again, as a new file is)."""
        self.used = 0
        _advise(self.mapping, "MADV_RANDOM")


class _Results(np.ndarray[Any, np.dtype[np.uint8]]):
    """The memory of a spill file while it takes one round's results: every result
    in it is a view of this array, so it dies when the last of them is let go (and the
    file can take the next round's)."""


_segments_lock = threading.RLock()  # a finalizer may give a file back on any thread
_segments: dict[str | None, tuple[_Segment, _Results]] = {}
"""The spill file each directory's next results go to, and its memory."""
_spares: dict[str | None, list[_Segment]] = {}
"""Spill files whose results have all been let go, by directory, for the next rounds."""

SPARE_SEGMENTS = 3
"""Spill files kept per directory for the next rounds once their results are let go.
A file written afresh every round takes new page-cache pages every round, which the
kernel must find and zero (on a virtual machine that hands freed memory back to its
host, 0.5-1 s per 100 MB when it has to ask for it back); a file reused writes over
the pages it has. Three files hold a round of up to 3 GiB of spilled results."""


def _space(size: int, directory: str | None) -> tuple[_Segment, _Results, int]:
    """``size`` bytes of spill file in ``directory``: the file, its memory (every view
    of the round's results must come from it) and their offset."""
    with _segments_lock:
        current = _segments.get(directory)
        offset = None if current is None else current[0].take(size)
        if current is None or offset is None:
            capacity = max(SEGMENT_BYTES, -(-size // _ALIGN) * _ALIGN)
            segment = _spare(capacity, directory) or _Segment(capacity, directory)
            memory = np.frombuffer(segment.mapping, dtype=np.uint8).view(_Results)
            weakref.finalize(memory, _keep_spare, segment, directory)
            current = _segments[directory] = (segment, memory)
            offset = segment.take(size)
        assert offset is not None
        return current[0], current[1], offset


def _spare(capacity: int, directory: str | None) -> _Segment | None:
    """A spare spill file of ``directory`` that takes ``capacity`` bytes (reset), if any."""
    spares = _spares.get(directory, [])
    for index, segment in enumerate(spares):
        if capacity <= len(segment.mapping) <= 2 * capacity:
            del spares[index]
            segment.reuse()
            return segment
    return None


def _keep_spare(segment: _Segment, directory: str | None) -> None:
    """The last result in ``segment`` was let go: keep the file for the next rounds."""
    with _segments_lock:
        spares = _spares.setdefault(directory, [])
        spares.append(segment)
        del spares[:-SPARE_SEGMENTS]  # older ones go (with their disk)


def drop_spares(directory: str | None) -> None:
    """Let the spare spill files of ``directory`` go, with their disk (a run has ended)."""
    with _segments_lock:
        _spares.pop(directory, None)


_WRITE_PIECE = 64 << 10
"""Bytes per ``pwrite`` into a spill file. The page cache keeps what one write brings in
one folio (up to 2 MiB for a large write), and a fault on any page of a folio can map
all of it: a result read in parts would map up to a folio around each part, which the
part's release does not reach (a median of twenty 40 MB results kept a quarter of them
mapped). Pieces no larger than the fault-around window keep folios that small; 100 MB
takes 20 ms so, against 12 ms in 4 MiB writes and 74 ms written through the mapping."""


def _write(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` into the file ``fd`` at ``offset``, in pieces of
    :data:`_WRITE_PIECE` bytes."""
    while data.nbytes:
        written = os.pwrite(fd, data[:_WRITE_PIECE], offset)
        data, offset = data[written:], offset + written


def close_segments(directory: str | None) -> None:
    """The next results in ``directory`` go to a new spill file; the current one goes
    (with its disk) once the results in it are let go. Called at the end of a round."""
    with _segments_lock:
        _segments.pop(directory, None)


def spill_parameters(parameters: Parameters, directory: str | None = None) -> Parameters:
    """``parameters`` copied into a spill file in ``directory`` (default: the system's
    temporary directory) and returned as read-only views of it.

    Raises:
        OSError: no spill file can be made (a full disk, say).
    """
    views, offsets, size = _layout(parameters)
    if size == 0:
        return parameters
    segment, memory, base = _space(size, directory)
    tensors = _written(segment, memory.data[base : base + size], views, offsets)
    spilled = Parameters(tensors=tensors, tensor_type=parameters.tensor_type)
    _readable(spilled)
    return spilled


def _layout(parameters: Parameters) -> tuple[list[memoryview], list[int], int]:
    """The tensors of ``parameters`` as byte views, their page-aligned offsets in a spill
    file, and the bytes they take there."""
    views = [memoryview(t).cast("B") for t in parameters.tensors]
    offsets: list[int] = []
    size = 0
    for view in views:
        offsets.append(size)
        size = -(-(size + view.nbytes) // _ALIGN) * _ALIGN
    return views, offsets, size


def _written(
    segment: _Segment, region: memoryview, views: list[memoryview], offsets: list[int]
) -> list[bytes | memoryview]:
    """``views`` written at ``offsets`` into ``region`` (a part of ``segment``'s mapping),
    and read-only views of them there."""
    base = _address(region) - _address(segment.mapping)
    for view, offset in zip(views, offsets, strict=True):
        _write(segment.fd, view, base + offset)  # in the file; no page of it mapped here
    return [
        region[offset : offset + view.nbytes].toreadonly()
        for view, offset in zip(views, offsets, strict=True)
    ]


class _Region(np.ndarray[Any, np.dtype[np.uint8]]):
    """A part of a spill file that holds one parked model: its tensors are views of it,
    so it dies (and its part of the file is free again) when the model is let go."""


class ParkedModels:
    """Spill files for the global models that wait on disk while their round runs
    (:meth:`SpillStore.park`), reused round after round.

    A model parked in a new file every round would take new page-cache pages every
    round, which the kernel must find and zero (and a virtual machine that gives freed
    memory back to its host gets back only slowly: 400 MB took 0.2 s warm, up to 6 s
    cold). A file whose model has been let go (the round replaced it) takes the next
    one, over the same pages. A file is reused only once nothing views its model.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._free: list[_Segment] = []

    def park(self, parameters: Parameters) -> Parameters:
        """``parameters`` written into a free file (or a new one) and returned as
        read-only views of it.

        Raises:
            OSError: no spill file can be made (a full disk, say).
        """
        views, offsets, size = _layout(parameters)
        if size == 0:
            return parameters
        segment = self._take(size)
        region = np.frombuffer(segment.mapping, dtype=np.uint8, count=size).view(_Region)
        weakref.finalize(region, self._give_back, segment)
        tensors = _written(segment, region.data, views, offsets)
        parked = Parameters(tensors=tensors, tensor_type=parameters.tensor_type)
        _readable(parked)
        return parked

    def _take(self, size: int) -> _Segment:
        with self._lock:
            for index, segment in enumerate(self._free):
                if size <= len(segment.mapping) <= 2 * size + _ALIGN:
                    return self._free.pop(index)
        return _Segment(size, self.directory)

    def _give_back(self, segment: _Segment) -> None:
        with self._lock:
            self._free.append(segment)
            del self._free[:-2]  # a model's file and a spare; older ones go


def spilled_like(source: Parameters, parameters: Parameters) -> Parameters:
    """``parameters`` (derived from ``source``: a clipped update, say) spilled where
    ``source`` was if it was spilled; as they are otherwise."""
    for tensor in source.tensors:
        if len(tensor):
            found = _mapping_at(_address(tensor))
            return parameters if found is None else spill_parameters(parameters, found[0].directory)
    return parameters


class SpillBuffer(ReceivedBuffer):
    """A :class:`~stamen.ndarrays.ReceivedBuffer` in a spill file, whose frames are
    written through the file's descriptor (``pwrite``), not through its mapping: no page
    of it is mapped, faulted in or zero-filled on the way, and none is left to let go
    (100 MB in 4 MiB frames: 20 ms, against 75-150 ms written through the mapping and
    released as it landed). Reading it (decoding, aggregating) goes through the mapping,
    from the page cache.

    A frame the file cannot take (a full disk) moves the message to memory, with a
    warning: a result is never lost for want of disk.
    """

    _segment: _Segment | None
    _at: int
    _directory: str | None

    def __array_finalize__(self, obj: object) -> None:
        super().__array_finalize__(obj)
        self._segment = None  # a view of one writes as any buffer does
        self._at = 0
        self._directory = None

    def land(self, offset: int, chunk: bytes | memoryview) -> ReceivedBuffer:
        if self._segment is None:
            return super().land(offset, chunk)
        try:
            _write(self._segment.fd, memoryview(chunk).cast("B"), self._at + offset)
        except OSError as exc:
            _warn_once(self._directory, exc)
            moved = ReceivedBuffer.allocate(len(self))
            np.copyto(moved[:offset], self[:offset])  # what the file took, read back
            release(self[:offset])
            return moved.land(offset, chunk)
        return self


def spill_buffer(size: int, directory: str | None = None) -> ReceivedBuffer:
    """A writable buffer of ``size`` bytes in a spill file in ``directory``: a large
    result is received straight into it (a :class:`SpillBuffer`), its bytes going to the
    file, not to this process's memory.

    Raises:
        OSError: no spill file can be made (a full disk, say).
    """
    segment, memory, offset = _space(size, directory)
    buffer = memory[offset : offset + size].view(SpillBuffer)
    buffer._segment, buffer._at, buffer._directory = segment, offset, directory
    return buffer


def receive_buffer(size: int, directory: str | None = None) -> ReceivedBuffer:
    """:func:`spill_buffer`, or a buffer in memory (and a warning) if no spill file can
    be made: a result is never lost for want of disk."""
    try:
        return spill_buffer(size, directory)
    except OSError as exc:
        _warn_once(directory, exc)
        return ReceivedBuffer.allocate(size)


_warned: set[str | None] = set()


def _warn_once(directory: str | None, exc: OSError) -> None:
    if directory not in _warned:
        _warned.add(directory)
        logger.warning(
            "cannot write spill files in %s (%s): results that would wait on disk are kept "
            "in memory instead",
            directory or tempfile.gettempdir(),
            exc,
        )


def _nbytes(parameters: Parameters) -> int:
    return sum(memoryview(t).nbytes for t in parameters.tensors)


def is_spilled(parameters: Parameters) -> bool:
    """True if ``parameters`` lie in a spill file (received into one, or written out)."""
    return any(len(t) and _mapping_at(_address(t)) is not None for t in parameters.tensors)


@dataclass(frozen=True)
class SpillReport:
    """What one round's results cost: in RAM, and on disk while the round ran."""

    kept: int
    kept_bytes: int
    spilled: int
    spilled_bytes: int


class SpillStore:
    """A round's fit results: in RAM up to ``budget`` bytes, the rest in spill files.

    The server passes each result to :meth:`take` as it arrives (in instruction order)
    and keeps what it returns; :meth:`begin` starts a round's count, :meth:`end` ends it
    and logs what waited on disk.

    Args:
        directory: Where spill files are made (default: the system's temporary
            directory, ``TMPDIR``); a checkpointed server uses its checkpoint directory.
        budget: Bytes of results kept in RAM per round before the next ones spill.
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, budget: int = DEFAULT_BUDGET
    ):
        if budget < 0:
            raise ValueError(f"SpillStore: expected budget >= 0 bytes, received {budget}")
        self.directory = None if directory is None else os.fspath(directory)
        self.budget = budget
        self._report = SpillReport(0, 0, 0, 0)
        self._parked = ParkedModels(self.directory)

    def begin(self) -> None:
        """A new round: nothing kept yet."""
        self._report = SpillReport(0, 0, 0, 0)

    def take(self, _proxy: object, reply: FitRes) -> FitRes:
        """``reply`` as the round keeps it: itself, or its parameters spilled."""
        size = _nbytes(reply.parameters)
        report = self._report
        if is_spilled(reply.parameters):  # received straight into a spill file
            _readable(reply.parameters)
            self._report = replace(
                report, spilled=report.spilled + 1, spilled_bytes=report.spilled_bytes + size
            )
            return reply
        # The receive buffers are the round's now: the receive slot they hold comes back
        # at once, so the next result arrives while this one is written out (two models
        # in memory at most, not one per node).
        for buffer in Lease.over(reply.parameters.tensors).buffers:
            buffer.kept()
        if report.kept_bytes + size <= self.budget:
            self._report = replace(
                report, kept=report.kept + 1, kept_bytes=report.kept_bytes + size
            )
            return reply
        try:
            parameters = spill_parameters(reply.parameters, self.directory)
        except OSError as exc:  # a full disk, say: memory still works
            _warn_once(self.directory, exc)
            self._report = replace(
                report, kept=report.kept + 1, kept_bytes=report.kept_bytes + size
            )
            return reply
        self._report = replace(
            report, spilled=report.spilled + 1, spilled_bytes=report.spilled_bytes + size
        )
        return replace(reply, parameters=parameters)

    def parks(self, parameters: Parameters) -> bool:
        """Whether :meth:`park` would move ``parameters`` to disk (if a file can be
        made): larger than :data:`PARK_FROM` (or the RAM budget if that is smaller), and
        not spilled already."""
        return _nbytes(parameters) > min(PARK_FROM, self.budget) and not is_spilled(parameters)

    def park(self, parameters: Parameters) -> bool:
        """Move the global model of a round whose nodes all have it into a spill file,
        if it is larger than the RAM budget: each tensor in ``parameters.tensors`` is
        replaced, in place, by a view of the same bytes in the file, so every
        instruction that carries this ``Parameters`` object sees it there, and the
        memory it was in can take the results (and the new model) while the old one
        waits on disk in case the round aggregates nothing. False (nothing done) if it
        is small (up to :data:`PARK_FROM`, or the RAM budget if that is smaller),
        spilled already, or no file can be made."""
        if not self.parks(parameters):
            return False
        try:
            spilled = self._parked.park(parameters)
        except OSError as exc:  # a full disk, say: memory still works
            _warn_once(self.directory, exc)
            return False
        parameters.tensors[:] = spilled.tensors
        return True

    def close(self) -> None:
        """The run has ended: the spill files kept for its next rounds go, with their disk
        (files still holding results go once those are let go)."""
        drop_spares(self.directory)

    def end(self, server_round: int) -> SpillReport:
        """The round's report, logged when anything waited on disk."""
        close_segments(self.directory)
        report = self._report
        if report.spilled:
            logger.info(
                "round %d: %d result(s), %.1f MB, waited on disk in %s (reused by the next "
                "rounds once let go, freed when the run ends); %d result(s), %.1f MB, in memory",
                server_round,
                report.spilled,
                report.spilled_bytes / 1e6,
                self.directory or tempfile.gettempdir(),
                report.kept,
                report.kept_bytes / 1e6,
            )
        return report


copy_on_write_with(copy_on_write)
