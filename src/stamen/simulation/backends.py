"""Backends: where the calls of virtual client nodes run.

* :class:`ProcessesBackend` (``"processes"``, the default): a pool of worker processes,
  each running one call at a time and reused across rounds, as Ray's actors are. Each
  worker has its own copy of the user's modules, so a model or data set kept in a module
  global (common in Flower's examples) is never shared by two clients at once.
* :class:`ThreadsBackend` (``"threads"``, opt-in): a bounded pool of threads in this
  process. No extra dependency; NumPy, PyTorch and most native code release the GIL, so
  the calls of a round overlap -- but the clients share this process's module globals.
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

(The module is longer than most: it holds the three in-process backends side by side, so
that they keep one behaviour.)
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import multiprocessing
import queue
import threading
import time
import warnings
import zlib
from abc import ABC, abstractmethod
from concurrent.futures import Future
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from .._ast_guard import serialize_ast_parse
from ..client.dispatch import ClientFn, handle
from ..context import Context, RecordSet
from ..errors import ClientAppError, ConfigError, ConnectionLost, DecodeError, Timeout
from ..messages import Code, EvaluateRes, Reply
from ..server.client_proxy import EncodeCache
from ..wire import decode_instruction, decode_reply, encode_reply
from ._deadlines import Deadline, Deadlines
from .proxy import CallResult, VirtualCall, named_error, run_virtual_call

__all__ = [
    "Backend",
    "ProcessesBackend",
    "SequentialBackend",
    "ThreadsBackend",
    "fork_available",
    "timeout_error",
]

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


# --- worker processes ---------------------------------------------------------------------
#
# A worker is forked from this process when the first call of a run arrives, so it starts
# with the user's modules already imported and ``client_fn`` in memory: nothing about the
# user's code is pickled, and a script without an ``if __name__ == "__main__"`` guard works.
# Each virtual node is pinned to one worker, which keeps the node's Context (its state
# persists there across rounds, as on a real node). A call travels as one message: a
# 4-byte header length, a JSON header (the node's ids and configs) and the instruction in
# the wire codec; the reply comes back the same way (with an EvaluateRes's loss in the
# header at full precision: the wire carries it as a 32-bit float).


def fork_available() -> bool:
    """True where worker processes can be forked (Linux, macOS; not Windows)."""
    return "fork" in multiprocessing.get_all_start_methods()


def _frame(header: dict[str, Any], body: bytes | memoryview) -> list[bytes | memoryview]:
    encoded = json.dumps(header).encode()
    return [len(encoded).to_bytes(4, "big"), encoded, body]


def _unframe(data: bytes) -> tuple[dict[str, Any], memoryview]:
    size = int.from_bytes(data[:4], "big")
    view = memoryview(data)
    return json.loads(bytes(view[4 : 4 + size])), view[4 + size :]


def _send(conn: Connection, parts: list[bytes | memoryview]) -> None:
    conn.send_bytes(b"".join(parts))


def _worker_main(conn: Connection, client_fn: ClientFn, inherited: list[Connection]) -> None:
    """The loop of a worker process: one call at a time until the pipe closes.

    ``inherited`` are the server's ends of the pipes, copied by the fork: closed here, so
    that a worker sees its pipe close when the server closes its end.
    """
    for other in inherited:
        other.close()
    contexts: dict[str, Context] = {}
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        header, body = _unframe(data)
        cid = header["cid"]
        context = contexts.get(cid)
        if context is None:
            context = Context(
                node_id=header["node_id"],
                node_config=header["node_config"],
                state=RecordSet(),
                run_config=header["run_config"],
            )
            contexts[cid] = context
        out: dict[str, Any] = {}
        encoded: bytes = b""
        try:
            reply = handle(client_fn, context, decode_instruction(body))
            encoded = encode_reply(reply)
            if isinstance(reply, EvaluateRes) and not header["serialize"]:
                out["loss"] = reply.loss
        except BaseException as exc:  # reported to the server: the call failed
            out = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            _send(conn, _frame(out, encoded))
        except (OSError, ValueError):
            return


class _WorkerSlot:
    """One worker process and the thread of this process that feeds it, one call at a time."""

    def __init__(self, backend: ProcessesBackend, index: int) -> None:
        self.backend = backend
        self.index = index
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.process: Any = None  # a multiprocessing Process (the fork context's)
        self.conn: Connection | None = None
        self.client_fn: ClientFn | None = None
        self.nodes: set[str] = set()
        self.thread = threading.Thread(
            target=self._serve, name=f"stamen-sim-process-{index}", daemon=True
        )

    def fork(self, client_fn: ClientFn) -> None:
        """Start (or restart) the worker process with ``client_fn``."""
        self.stop_process()
        parent, child = multiprocessing.Pipe()
        # The worker closes its copies of the server's ends of every pipe (its own too),
        # so that it sees its pipe close when the server closes it.
        inherited = [s.conn for s in self.backend.slots if s is not self and s.conn is not None]
        inherited.append(parent)
        context = multiprocessing.get_context("fork")
        process = context.Process(
            target=_worker_main,
            args=(child, client_fn, inherited),
            name=f"stamen-sim-worker-{self.index}",
            daemon=True,
        )
        with warnings.catch_warnings():  # Python 3.12+ warns of fork with threads running:
            warnings.simplefilter("ignore", DeprecationWarning)  # the child runs only our loop
            process.start()
        child.close()
        self.process, self.conn, self.client_fn = process, parent, client_fn
        self.nodes = set()

    def stop_process(self, kill: bool = False) -> None:
        """End the worker process: close its pipe (it exits), or kill it."""
        process, conn = self.process, self.conn
        self.process = self.conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return
        if kill:
            process.kill()
        process.join(5.0)
        if process.is_alive():
            process.kill()
            process.join(5.0)

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                outcome: CallResult | BaseException = self._run(job)
            except BaseException as exc:  # reported on the future; the slot goes on
                outcome = named_error(job.call.cid, job.call.stage, exc)
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _run(self, job: _Job) -> CallResult | BaseException:
        call = job.call
        if self.conn is None or self.client_fn is not call.client_fn:
            self.fork(call.client_fn)
        assert self.conn is not None
        instruction = call.instruction
        serialize = isinstance(instruction, bytes)
        body = instruction if isinstance(instruction, bytes) else self.backend.encode(instruction)
        header = {
            "cid": call.cid,
            "node_id": call.context.node_id,
            "node_config": call.context.node_config,
            "run_config": call.context.run_config,
            "serialize": serialize,
        }
        try:
            _send(self.conn, _frame(header, body))
            if not self.conn.poll(job.timeout):
                self._lose_nodes(call, "it ran longer than its timeout")
                self.stop_process(kill=True)
                assert job.timeout is not None
                return timeout_error(call, job.timeout)
            data = self.conn.recv_bytes()
        except (EOFError, OSError) as exc:
            code = None if self.process is None else self.process.exitcode
            self._lose_nodes(call, f"its worker process ended (exit code {code})")
            self.stop_process(kill=True)
            return ConnectionLost(
                f"virtual client {call.cid}: {call.stage}: the worker process running it "
                f"ended (exit code {code}): {type(exc).__name__}"
            )
        self.nodes.add(call.cid)
        out, reply_bytes = _unframe(data)
        if "error" in out:
            return ClientAppError(f"virtual client {call.cid}, {call.stage}: {out['error']}")
        if serialize:
            return bytes(reply_bytes), call.context.state
        reply = decode_reply(reply_bytes)
        if "loss" in out and isinstance(reply, EvaluateRes):
            reply = EvaluateRes(reply.status, float(out["loss"]), reply.num_examples, reply.metrics)
        _log_client_error(call, reply)
        return reply, call.context.state

    def _lose_nodes(self, call: VirtualCall, why: str) -> None:
        lost = sorted(self.nodes - {call.cid})
        if lost:
            logger.warning(
                "worker process %d restarts because virtual client %s's %s failed (%s): "
                "the state kept there by %d other virtual client(s) is lost",
                self.index,
                call.cid,
                call.stage,
                why,
                len(lost),
            )


class ProcessesBackend(Backend):
    """Runs calls on ``max_workers`` worker processes, one call at a time each.

    The isolation Flower's users get from Ray's actors, without Ray: each worker is a
    process of its own (forked from this one when the run's first call arrives, so with
    the user's modules and ``client_fn`` already loaded), runs one client at a time, and
    is reused across rounds. Two clients never share a module-level model or data set at
    the same time; clients on one worker use it in turn, as on one of Flower's actors.

    Each virtual node is pinned to one worker (``partition-id % max_workers``), which
    keeps its ``context.state`` across rounds. A call that outlives its timeout fails
    with :class:`~stamen.errors.Timeout` and its worker is killed and replaced (the
    states kept there are lost; a WARNING says so). A worker that dies fails its call
    with :class:`~stamen.errors.ConnectionLost`.

    Instructions and replies travel in the wire codec of the network transports (no
    pickle), so a reply must be what a network node could send: metrics of wire scalar
    types, for instance. An ``EvaluateRes`` loss keeps its full precision.

    Needs the ``fork`` start method (Linux, macOS); see :func:`fork_available`.

    Args:
        max_workers: Number of worker processes (>= 1).
    """

    name = "processes"

    def __init__(self, max_workers: int) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ConfigError(f"max_workers: expected an int >= 1, received {max_workers!r}")
        if not fork_available():
            raise ConfigError(
                "backend='processes' needs the fork start method, which this platform "
                "lacks; pass backend='threads'"
            )
        self._max_workers = max_workers
        self.slots = [_WorkerSlot(self, i) for i in range(max_workers)]
        """The workers (one slot each), in the order nodes are pinned to them."""
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._encode_cache = EncodeCache(size=2)

    @property
    def concurrency(self) -> int:
        """``max_workers``."""
        return self._max_workers

    def encode(self, instruction: Any) -> bytes:
        """The wire encoding of ``instruction`` (once per instruction object)."""
        return self._encode_cache.encode(instruction).tobytes()

    def _slot_of(self, cid: str) -> _WorkerSlot:
        number = int(cid) if cid.isdigit() else zlib.crc32(cid.encode())
        return self.slots[number % self._max_workers]

    def submit(self, call: VirtualCall, timeout: float | None) -> Future[CallResult]:
        """Queue ``call`` for the worker its node is pinned to."""
        job = _Job(call, timeout)
        with self._lock:
            if self._closed:
                raise RuntimeError("the processes backend is closed")
            if not self._started:
                self._started = True
                for slot in self.slots:  # fork every worker now, from the submitting thread
                    slot.fork(call.client_fn)
                for slot in self.slots:
                    slot.thread.start()
        self._slot_of(call.cid).jobs.put(job)
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Fail queued calls, let running ones finish (bounded), end the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        for slot in self.slots:
            while True:
                try:
                    job = slot.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job.future.set_running_or_notify_cancel():
                    job.future.set_exception(
                        ConnectionLost(
                            f"virtual client {job.call.cid}: the simulation ended before "
                            f"{job.call.stage} ran"
                        )
                    )
            slot.jobs.put(None)
        deadline = time.monotonic() + timeout
        for slot in self.slots:
            if started and slot.thread is not threading.current_thread():
                slot.thread.join(max(0.0, deadline - time.monotonic()))
            slot.stop_process(kill=slot.thread.is_alive())
        self._encode_cache.clear()

    def worker_pids(self) -> list[int]:
        """The process ids of the live workers (for tests and diagnostics)."""
        return [
            slot.process.pid
            for slot in self.slots
            if slot.process is not None and slot.process.pid is not None
        ]
