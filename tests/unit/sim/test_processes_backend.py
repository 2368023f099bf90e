"""The processes backend: worker processes, one call at a time each, reused across rounds."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pytest

from stamen.client import Client, NumPyClient
from stamen.context import Context, MetricsRecord, RecordSet
from stamen.errors import Timeout
from stamen.messages import Code, EvaluateIns, EvaluateRes, FitIns, FitRes
from stamen.ndarrays import ndarrays_to_parameters
from stamen.simulation.app import DEFAULT_BACKEND, make_backend
from stamen.simulation.backends import ProcessesBackend, fork_available
from stamen.simulation.proxy import VirtualCall

pytestmark = pytest.mark.skipif(not fork_available(), reason="needs the fork start method")

WAIT = 30.0


class Worker(NumPyClient):
    """Reports its process id and a per-node counter kept in context.state."""

    def __init__(self, context: Context) -> None:
        self.context_ = context

    def fit(self, parameters: Any, config: Any) -> Any:
        if config.get("sleep"):
            time.sleep(float(config["sleep"]))
        record = self.context_.state.metrics_records.setdefault("r", MetricsRecord())
        record["fits"] = int(record.get("fits", 0)) + 1
        return list(parameters), 1, {"pid": os.getpid(), "fits": record["fits"]}

    def evaluate(self, parameters: Any, config: Any) -> Any:
        return 1.0 / 3.0, 1, {}


def client_fn(context: Context) -> Client:
    return Worker(context).to_client()


def call(cid: str, ins: Any) -> VirtualCall:
    context = Context(
        node_id=int(cid), node_config={"partition-id": cid}, state=RecordSet(), run_config={}
    )
    return VirtualCall(cid, "fit", client_fn, context, ins)


def fit_ins(**config: Any) -> FitIns:
    return FitIns(ndarrays_to_parameters([np.zeros(2)]), config)


def test_the_default_backend_is_processes() -> None:
    """DEFAULT_BACKEND names the processes backend, and make_backend builds it."""
    assert DEFAULT_BACKEND == "processes"
    backend = make_backend()
    try:
        assert isinstance(backend, ProcessesBackend)
    finally:
        backend.close()


def test_calls_run_in_worker_processes_reused_across_calls_with_state_per_node() -> None:
    """Each node runs in one of the workers (never this process), the same worker every
    time, and its context.state persists there across calls; loss keeps float64."""
    backend = ProcessesBackend(2)
    try:
        replies = []
        for _ in range(2):
            for cid in ("0", "1", "2"):
                result = backend.submit(call(cid, fit_ins()), WAIT).result(WAIT)
                assert isinstance(result[0], FitRes)
                replies.append((cid, result[0].metrics))
        pids = {cid: {m["pid"] for c, m in replies if c == cid} for cid in ("0", "1", "2")}
        assert all(len(p) == 1 for p in pids.values())
        assert os.getpid() not in set().union(*pids.values())
        assert pids["0"] == pids["2"] != pids["1"]  # pinned: partition-id % 2
        assert [m["fits"] for c, m in replies if c == "0"] == [1, 2]
        evaluated = backend.submit(call("1", EvaluateIns(fit_ins().parameters, {})), WAIT)
        reply = evaluated.result(WAIT)[0]
        assert isinstance(reply, EvaluateRes) and reply.loss == 1.0 / 3.0
    finally:
        backend.close()
    assert backend.worker_pids() == []


def test_a_call_past_its_timeout_fails_and_its_worker_is_replaced() -> None:
    """A hung call fails with Timeout; its worker is killed and a new one serves the next
    call of that node."""
    backend = ProcessesBackend(1)
    try:
        first = backend.submit(call("0", fit_ins()), WAIT).result(WAIT)[0]
        assert isinstance(first, FitRes)
        with pytest.raises(Timeout, match="virtual client 0"):
            backend.submit(call("0", fit_ins(sleep=30.0)), 0.2).result(WAIT)
        after = backend.submit(call("0", fit_ins()), WAIT).result(WAIT)[0]
        assert isinstance(after, FitRes) and after.status.code == Code.OK
        assert after.metrics["pid"] != first.metrics["pid"]
        assert after.metrics["fits"] == 1  # the state kept by the killed worker is gone
    finally:
        backend.close()
