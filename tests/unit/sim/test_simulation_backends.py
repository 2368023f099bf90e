"""Simulation backends: bounded threads, sequential, the deadline timer, Ray's bookkeeping."""

from __future__ import annotations

import ast
import gc
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

import stamen.simulation
from stamen._ast_guard import AST_PARSE_IS_THREAD_UNSAFE, _thread_unsafe
from stamen.client import Client, NumPyClient
from stamen.context import Context, RecordSet
from stamen.errors import ClientAppError, ConnectionLost, Timeout
from stamen.messages import Code, FitIns, FitRes
from stamen.ndarrays import ndarrays_to_parameters
from stamen.simulation import SequentialBackend, ThreadsBackend
from stamen.simulation._deadlines import Deadlines
from stamen.simulation._ray import RAY_MISSING, _actor_options, _capacity
from stamen.simulation.app import threads_for
from stamen.simulation.proxy import CallResult, VirtualCall

FIT = FitIns(parameters=ndarrays_to_parameters([np.zeros(2)]), config={})
WAIT = 10.0  # bound of every wait in these tests
# What NumPy parses for every .npy header it reads, 200 times over.
HEADERS = "\n".join(
    f"h{i} = {{'descr': '<f8', 'fortran_order': False, 'shape': ({i},)}}" for i in range(200)
)


class Named(NumPyClient):
    """Reports the thread it ran on; blocks while ``gate`` is closed; exits on ``exit``;
    parses Python source on ``parse``."""

    gate: threading.Event | None = None
    started: threading.Event | None = None

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict]:
        if config.get("exit"):
            sys.exit(3)
        if config.get("parse"):
            ast.parse(HEADERS)
        if config.get("block") and self.gate is not None:
            assert self.started is not None
            self.started.set()
            assert self.gate.wait(WAIT), "the test never opened the gate"
        return parameters, 1, {"thread": threading.current_thread().name}


def named_fn(context: Context) -> Client:
    return Named().to_client()


def call(cid: str = "3", ins: FitIns = FIT) -> VirtualCall:
    context = Context(node_id=int(cid), node_config={}, state=RecordSet(), run_config={})
    return VirtualCall(cid, "fit", named_fn, context, ins)


def fit_reply(future: Future[CallResult]) -> FitRes:
    """The successful FitRes of ``future``; a failure names what came back instead."""
    reply, _ = future.result(timeout=WAIT)
    assert isinstance(reply, FitRes), f"expected a FitRes, received {reply!r}"
    assert reply.status.code == Code.OK, (
        f"the call failed: {reply.status.code.name}: {reply.status.message}"
    )
    assert "thread" in reply.metrics, f"the reply lacks the client's metrics: {reply!r}"
    return reply


@pytest.fixture
def gate() -> Iterator[tuple[threading.Event, threading.Event]]:
    """(gate, started): blocking clients wait on the gate, which opens at teardown."""
    Named.gate, Named.started = threading.Event(), threading.Event()
    yield Named.gate, Named.started
    Named.gate.set()
    Named.gate = Named.started = None


def test_deadlines_run_due_callbacks_and_skip_cancelled_ones() -> None:
    """A cancelled deadline never fires; later ones fire in order, on one timer thread."""
    deadlines = Deadlines()
    fired: list[str] = []
    done = threading.Event()
    try:
        deadlines.schedule(0.01, lambda: fired.append("cancelled")).cancel()
        deadlines.schedule(0.02, lambda: fired.append("first"))
        deadlines.schedule(0.03, done.set)
        assert done.wait(WAIT)
    finally:
        deadlines.close()
    assert fired == ["first"]


def test_threads_backend_never_runs_more_threads_than_max_workers() -> None:
    """2,000 calls on ThreadsBackend(3) all succeed on at most 3 distinct threads."""
    backend = ThreadsBackend(3)
    try:
        futures = [backend.submit(call(str(i)), None) for i in range(2000)]
        threads = {fit_reply(f).metrics["thread"] for f in futures}
    finally:
        backend.close()
    assert 1 <= len(threads) <= 3


@pytest.fixture
def python_gc_callback() -> Iterator[None]:
    """A gc callback written in Python, such as Hypothesis installs for the rest of a run."""

    def callback(phase: str, info: dict[str, int]) -> None:
        sum(range(100))

    gc.callbacks.append(callback)
    yield
    gc.callbacks.remove(callback)


@pytest.mark.usefixtures("python_gc_callback")
def test_threads_backend_runs_clients_that_parse_python_at_once() -> None:
    """Clients parsing Python source on 3 threads (as NumPy does for each .npy header, so
    each decoding of parameters) all succeed. Unguarded, CPython < 3.11.8 fails a few of
    these 60 calls with "SystemError: AST constructor recursion depth mismatch"."""
    backend = ThreadsBackend(3)
    try:
        parse = FitIns(FIT.parameters, {"parse": True})
        futures = [backend.submit(call(str(i), parse), None) for i in range(60)]
        for future in futures:
            fit_reply(future)
    finally:
        backend.close()


def test_ast_parse_is_serialized_only_where_cpython_needs_it() -> None:
    """python/cpython#106905: fixed in 3.11.8 and 3.12.2; other implementations unaffected."""
    assert _thread_unsafe("CPython", (3, 11, 7))
    assert _thread_unsafe("CPython", (3, 12, 1))
    assert _thread_unsafe("CPython", (3, 10, 14))
    assert not _thread_unsafe("CPython", (3, 11, 8))
    assert not _thread_unsafe("CPython", (3, 12, 2))
    assert not _thread_unsafe("CPython", (3, 13, 0))
    assert not _thread_unsafe("PyPy", (3, 10, 14))
    ThreadsBackend(1).close()
    serialized = getattr(ast.parse, "_stamen_serialized", False)
    assert serialized == AST_PARSE_IS_THREAD_UNSAFE
    assert ast.literal_eval("{'shape': (2,)}") == {"shape": (2,)}


def test_threads_backend_times_out_a_hung_call_and_replaces_its_thread(
    gate: tuple[threading.Event, threading.Event],
) -> None:
    """A call running past its timeout fails with Timeout naming client and stage; the calls
    queued behind it on the single worker still run, on a replacement thread."""
    backend = ThreadsBackend(1)
    try:
        hung = backend.submit(call("1", FitIns(FIT.parameters, {"block": True})), 0.05)
        queued = [backend.submit(call(str(i)), 5.0) for i in range(2, 5)]
        with pytest.raises(Timeout, match=r"virtual client 1: fit ran longer than 0\.05 s"):
            hung.result(timeout=WAIT)
        assert all(fit_reply(f).status.code == Code.OK for f in queued)
    finally:
        gate[0].set()
        backend.close()


def test_threads_backend_close_fails_queued_calls(
    gate: tuple[threading.Event, threading.Event],
) -> None:
    """Closing the backend fails calls that never started with ConnectionLost."""
    opened, started = gate
    backend = ThreadsBackend(1)
    running = backend.submit(call("1", FitIns(FIT.parameters, {"block": True})), None)
    assert started.wait(WAIT)
    queued = backend.submit(call("2"), None)
    backend.close(timeout=0.0)
    with pytest.raises(ConnectionLost, match="virtual client 2: the simulation ended"):
        queued.result(timeout=WAIT)
    opened.set()
    assert fit_reply(running).status.code == Code.OK
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.submit(call("3"), None)


def test_a_system_exit_in_user_code_fails_the_call_not_the_worker() -> None:
    """sys.exit in fit (which dispatch does not catch) fails that call with ClientAppError;
    the worker thread goes on serving."""
    backend = ThreadsBackend(1)
    try:
        exited = backend.submit(call("4", FitIns(FIT.parameters, {"exit": True})), None)
        after = backend.submit(call("5"), None)
        with pytest.raises(ClientAppError, match="virtual client 4, fit: SystemExit: 3"):
            exited.result(timeout=WAIT)
        assert fit_reply(after).status.code == Code.OK
    finally:
        backend.close()


def test_sequential_backend_runs_in_the_callers_thread() -> None:
    """The sequential backend has finished the call when submit returns, in this thread."""
    future = SequentialBackend().submit(call(), None)
    assert future.done()
    assert fit_reply(future).metrics["thread"] == threading.current_thread().name


def test_sequential_backend_counts_a_slow_call_as_a_timeout() -> None:
    """A call that took longer than the timeout fails with Timeout once it returns."""
    future = SequentialBackend().submit(call("9"), 1e-9)
    with pytest.raises(Timeout, match="virtual client 9: fit ran longer than"):
        future.result(timeout=WAIT)


def test_threads_for_divides_the_cpus_by_num_cpus() -> None:
    """Threads = floor(total CPUs / num_cpus), at least 1; num_cpus 0 means one per CPU."""
    assert threads_for({"num_cpus": 1}, 8) == 8
    assert threads_for({"num_cpus": 0.5}, 2) == 4
    assert threads_for({"num_cpus": 0.1}, 1) == 10
    assert threads_for({"num_cpus": 4}, 2) == 1
    assert threads_for({"num_cpus": 0}, 3) == 3
    assert threads_for({}, 5) == 5


def test_ray_capacity_counts_what_fits_on_each_live_node() -> None:
    """Per live node, the most calls its CPUs, GPUs and custom resources all allow."""
    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0, "big": 1.0}},
        {"Alive": True, "Resources": {"CPU": 4.0}},
        {"Alive": False, "Resources": {"CPU": 64.0}},
    ]
    assert _capacity(nodes, {"num_cpus": 1}) == 12
    assert _capacity(nodes, {"num_cpus": 2, "num_gpus": 0.5}) == 4
    assert _capacity(nodes, {"num_cpus": 1, "big": 1}) == 1
    assert _capacity(nodes, {"num_cpus": 16}) == 0


def test_ray_actor_options_map_client_resources() -> None:
    """num_cpus and num_gpus become actor options, other keys custom resources; a failed
    call is never retried nor its actor restarted."""
    options = _actor_options({"num_cpus": 2, "num_gpus": 0.25, "big": 1})
    assert options == {
        "num_cpus": 2,
        "num_gpus": 0.25,
        "max_restarts": 0,
        "max_task_retries": 0,
        "resources": {"big": 1},
    }


def test_missing_ray_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """backend='ray' without Ray raises ImportError naming stamen[ray], before any run."""
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'stamen\[ray\]'"):
        stamen.simulation.start_simulation(client_fn=named_fn, num_clients=2, backend="ray")
    assert "stamen[ray]" in RAY_MISSING
