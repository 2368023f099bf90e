"""Backends: where the calls of virtual client nodes run.

* :class:`ThreadsBackend` (``"threads"``, the default): a bounded pool of threads in this
  process. No extra dependency; NumPy, PyTorch and most native code release the GIL, so
  the calls of a round overlap.
* :class:`SequentialBackend` (``"sequential"``): every call runs at once in the server's
  thread, one after the other. For debugging: breakpoints work, logs come in order, and
  a run is reproducible call by call.
* :class:`~stamen.simulation.RayBackend` (``"ray"``, extra ``stamen[ray]``): every call
  runs on a Ray actor holding ``client_resources``, on this machine or on a Ray cluster.

A backend turns a :class:`~stamen.simulation.proxy.VirtualCall` into a future of its
:data:`~stamen.simulation.proxy.CallResult`. Every backend enforces the instruction
timeout from the moment a call starts running (time spent queued for a free worker is
the simulator's, not the simulated node's) and fails the future with
:class:`~stamen.errors.Timeout`, which the server counts as a failure, as over the network.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from types import TracebackType

from .._ast_guard import serialize_ast_parse
from ..errors import ConfigError, ConnectionLost, DecodeError, Timeout
from ..messages import Code, Reply
from ..wire import decode_reply
from ._deadlines import Deadline, Deadlines
from .proxy import CallResult, VirtualCall, named_error, run_virtual_call

__all__ = ["Backend", "SequentialBackend", "ThreadsBackend", "timeout_error"]

logger = logging.getLogger("stamen.simulation")


def timeout_error(call: VirtualCall, timeout: float) -> Timeout:
    """The error of a call that ran longer than ``timeout`` seconds."""
    return Timeout(f"virtual client {call.cid}: {call.stage} ran longer than {timeout:g} s")


class Backend(ABC):
    """Runs the calls of virtual client nodes. Use as a context manager, or start/close."""

    name: str = ""
    """The name ``start_simulation(backend=...)`` knows the backend by."""

    @property
    @abstractmethod
    def concurrency(self) -> int:
        """How many calls run at once (after :meth:`start`)."""

    def start(self) -> None:  # noqa: B027  (optional hook)
        """Acquire resources (threads, a Ray connection); idempotent."""

    @abstractmethod
    def submit(self, call: VirtualCall, timeout: float | None) -> Future[CallResult]:
        """Queue ``call``; the future resolves to its result.

        The future fails with :class:`~stamen.errors.Timeout` once the call has run for
        ``timeout`` seconds, and with :class:`~stamen.errors.ConnectionLost` if the
        backend closes first.
        """

    def close(self) -> None:  # noqa: B027  (optional hook)
        """Release resources; calls still queued fail with ConnectionLost."""

    def __enter__(self) -> Backend:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SequentialBackend(Backend):
    """Runs each call at once, in the caller's thread (the server's round loop).

    For debugging: breakpoints in client code work, and when a client raises, the log
    shows its traceback followed by a line naming the virtual client and the stage. A
    failure still counts as a failure of the round, exactly as on the other backends.

    A call cannot be interrupted here: the timeout is checked when the call returns, and a
    call that took too long fails with :class:`~stamen.errors.Timeout` (its reply is
    dropped), exactly as the other backends would have counted it.
    """

    name = "sequential"

    @property
    def concurrency(self) -> int:
        """One call at a time."""
        return 1

    def submit(self, call: VirtualCall, timeout: float | None) -> Future[CallResult]:
        """Run ``call`` now; return its already completed future."""
        future: Future[CallResult] = Future()
        future.set_running_or_notify_cancel()
        started = time.monotonic()
        try:
            result = run_virtual_call(call.client_fn, call.context, call.instruction)
        except Exception as exc:  # not user code (handle() catches that): report on the future
            future.set_exception(named_error(call.cid, call.stage, exc))
            return future
        if timeout is not None and time.monotonic() - started > timeout:
            future.set_exception(timeout_error(call, timeout))
        else:
            _log_client_error(call, result[0])
            future.set_result(result)
        return future


def _log_client_error(call: VirtualCall, reply: Reply | bytes) -> None:
    """Name the client and stage right after dispatch logged the user's traceback."""
    if isinstance(reply, bytes):
        try:
            reply = decode_reply(reply)
        except DecodeError:
            return  # the proxy reports it
    status = getattr(reply, "status", None)
    if status is not None and status.code == Code.CLIENT_ERROR:
        logger.error("virtual client %s failed in %s: %s", call.cid, call.stage, status.message)


_QUEUED, _RUNNING, _DONE, _ABANDONED = range(4)


class _Job:
    __slots__ = ("call", "deadline", "future", "state", "thread", "timeout")

    def __init__(self, call: VirtualCall, timeout: float | None) -> None:
        self.call = call
        self.timeout = timeout
        self.future: Future[CallResult] = Future()
        self.state = _QUEUED
        self.deadline: Deadline | None = None
        self.thread: threading.Thread | None = None


class ThreadsBackend(Backend):
    """Runs calls on at most ``max_workers`` threads of this process.

    Threads are started on demand, up to ``max_workers``, and live until :meth:`close`.
    A call that outlives its timeout cannot be stopped (Python threads cannot be killed):
    its future fails with :class:`~stamen.errors.Timeout` at once, its thread is written
    off and replaced, and its reply is dropped when it comes. So a hung client costs one
    thread, never the progress of the run.

    On CPython < 3.11.8 and 3.12.0-3.12.1, two threads parsing Python source at once can
    make one parse fail (python/cpython#106905), and NumPy parses every ``.npy`` header it
    reads, so every decoding of parameters parses: the backend makes ``ast.parse`` take a
    process-wide lock there (see :mod:`stamen._ast_guard`).

    Args:
        max_workers: Upper bound of concurrent calls (>= 1).
    """

    name = "threads"

    def __init__(self, max_workers: int) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers: expected an int >= 1, received {max_workers!r}")
        self._max_workers = max_workers
        serialize_ast_parse()  # before any call runs on a second thread
        self._queue: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._live = 0  # workers counted against max_workers (not the written-off ones)
        self._idle = 0
        self._threads: set[threading.Thread] = set()
        self._written_off: set[threading.Thread] = set()  # still running a timed-out call
        self._closed = False
        self._names = itertools.count()
        self._deadlines = Deadlines("stamen-sim-threads-deadlines")

    @property
    def concurrency(self) -> int:
        """``max_workers``."""
        return self._max_workers

    def submit(self, call: VirtualCall, timeout: float | None) -> Future[CallResult]:
        """Queue ``call`` for the next free thread."""
        job = _Job(call, timeout)
        with self._cv:
            if self._closed:
                raise RuntimeError("the threads backend is closed")
            self._queue.append(job)
            if len(self._queue) > self._idle and self._live < self._max_workers:
                self._spawn()
            else:
                self._cv.notify()
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Fail queued calls, let running ones finish, join the threads (bounded).

        Threads written off after a timeout are not waited for: they are daemons, and end
        when the user code they run returns.
        """
        with self._cv:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
            threads = list(self._threads)
            written_off = len(self._written_off)
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(
                    ConnectionLost(
                        f"virtual client {job.call.cid}: the simulation ended before "
                        f"{job.call.stage} ran"
                    )
                )
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck or written_off:
            logger.warning(
                "simulation threads still running user code: %s, and %d timed-out call(s)",
                stuck,
                written_off,
            )
        self._deadlines.close()

    def _spawn(self) -> None:  # with self._cv held
        self._live += 1
        thread = threading.Thread(
            target=self._work, name=f"stamen-sim-worker-{next(self._names)}", daemon=True
        )
        self._threads.add(thread)
        thread.start()

    def _next_job(self) -> _Job | None:
        with self._cv:
            self._idle += 1
            while not self._queue and not self._closed:
                self._cv.wait()
            self._idle -= 1
            if not self._queue:
                self._live -= 1
                self._threads.discard(threading.current_thread())
                return None
            job = self._queue.popleft()
            job.state = _RUNNING
            job.thread = threading.current_thread()
            return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.timeout is not None:
                job.deadline = self._deadlines.schedule(
                    job.timeout, functools.partial(self._expire, job)
                )
            outcome: CallResult | BaseException
            try:
                outcome = run_virtual_call(
                    job.call.client_fn, job.call.context, job.call.instruction
                )
            except BaseException as exc:  # reported on the future; the thread goes on
                outcome = named_error(job.call.cid, job.call.stage, exc)
            with self._cv:
                abandoned = job.state == _ABANDONED
                job.state = _DONE
                if job.deadline is not None:
                    job.deadline.cancel()
                if abandoned:  # written off by _expire, which started a replacement
                    self._written_off.discard(threading.current_thread())
            if abandoned:
                return
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _expire(self, job: _Job) -> None:
        """On the deadline thread: fail the call, write its thread off, replace it."""
        with self._cv:
            if job.state != _RUNNING:
                return
            job.state = _ABANDONED
            self._live -= 1
            if job.thread is not None:
                self._threads.discard(job.thread)
                self._written_off.add(job.thread)
            if self._queue and not self._closed and len(self._queue) > self._idle:
                self._spawn()
        assert job.timeout is not None
        job.future.set_exception(timeout_error(job.call, job.timeout))
