"""One thread that runs callbacks at deadlines: the timeouts of virtual client calls.

A simulation may have thousands of calls in flight; a timer thread per call would cost a
thread each. :class:`Deadlines` keeps them in one heap served by one daemon thread, started
on first use. A cancelled entry drops its callback at once, so whatever the callback holds
(a future, a reply) is freed when the call ends, not when its deadline would have passed.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["Deadline", "Deadlines"]

_MIN_COMPACT = 256


class Deadline:
    """A scheduled callback; :meth:`cancel` it when the work finished in time."""

    __slots__ = ("_callback", "at")

    def __init__(self, at: float, callback: Callable[[], None]) -> None:
        self.at = at
        self._callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        """Forget the callback (no effect once it has run)."""
        self._callback = None

    def _take(self) -> Callable[[], None] | None:
        callback, self._callback = self._callback, None
        return callback


class Deadlines:
    """Runs callbacks at ``time.monotonic()`` deadlines on one daemon thread.

    Args:
        name: Name of the thread (shown in tracebacks and debuggers).
    """

    def __init__(self, name: str = "stamen-sim-deadlines") -> None:
        self._name = name
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._compact_at = _MIN_COMPACT

    def schedule(self, seconds: float, callback: Callable[[], None]) -> Deadline:
        """Run ``callback`` on the timer thread after ``seconds`` unless cancelled first.

        The callback must not block: it runs on the one thread that serves every deadline.
        """
        entry = Deadline(time.monotonic() + seconds, callback)
        with self._cv:
            if self._closed:
                raise RuntimeError("Deadlines: schedule() after close()")
            heapq.heappush(self._heap, (entry.at, next(self._seq), entry))
            if len(self._heap) > self._compact_at:
                self._compact()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cv.notify()
        return entry

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; pending callbacks are dropped."""
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _compact(self) -> None:
        # Drop cancelled entries; the next compaction waits until the heap has doubled,
        # so the cost stays linear in the number of scheduled deadlines.
        self._heap = [item for item in self._heap if item[2]._callback is not None]
        heapq.heapify(self._heap)
        self._compact_at = max(_MIN_COMPACT, 2 * len(self._heap))

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed:
                    if not self._heap:
                        self._cv.wait()
                        continue
                    delay = self._heap[0][0] - time.monotonic()
                    if delay <= 0:
                        break
                    self._cv.wait(delay)
                if self._closed:
                    return
                _, _, entry = heapq.heappop(self._heap)
                callback = entry._take()
            if callback is not None:
                callback()
