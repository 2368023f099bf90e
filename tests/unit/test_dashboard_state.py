"""The dashboard's model: run events in, JSON-ready snapshots out, bounded and thread-safe."""

from __future__ import annotations

import json
import threading
from typing import Any

from stamen.server.dashboard import DashboardState
from stamen.server.dashboard import state as state_module
from stamen.server.events import (
    NodeJoined,
    NodeLeft,
    ReplyArrived,
    RoundEnded,
    RoundStarted,
    RunEnded,
    RunEvents,
    RunStarted,
    WaitingForClients,
)


class Ticks:
    """A clock that advances one second per reading."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def _run_two_rounds(state: DashboardState) -> None:
    for cid in ("a", "b", "c"):
        state(NodeJoined(cid, "grpc-bidi", f"ipv4:10.0.0.1:{ord(cid)}"))
    state(RunStarted(2, "FedAvg"))
    state(RoundStarted(1, "fit", 3))
    state(ReplyArrived(1, "fit", "a", True))
    state(ReplyArrived(1, "fit", "c", False, "CLIENT_ERROR: fit raised RuntimeError: boom"))
    state(ReplyArrived(1, "fit", "b", True))
    state(RoundEnded(1, "fit", 2, 1, 0.5, metrics={"lr": 0.1, "note": "text", "blob": b"x"}))
    state(RoundStarted(1, "evaluate", 3))
    for cid in ("a", "b", "c"):
        state(ReplyArrived(1, "evaluate", cid, True))
    state(RoundEnded(1, "evaluate", 3, 0, 0.2, loss=0.75, metrics={"accuracy": 0.5}))
    state(RoundStarted(2, "fit", 3))
    state(ReplyArrived(2, "fit", "c", False, "CLIENT_ERROR: again"))


def test_events_become_the_state_the_page_shows() -> None:
    state = DashboardState(clock=Ticks())
    _run_two_rounds(state)
    snap = state.snapshot()
    assert snap["run"]["status"] == "running"
    assert snap["run"]["strategy"] == "FedAvg"
    assert snap["run"]["num_rounds"] == 2
    assert snap["round"] == {
        "round": 2,
        "phase": "fit",
        "expected": 3,
        "results": 0,
        "failures": 1,
        "failed": [{"id": "c", "reason": "CLIENT_ERROR: again"}],
        "started_at": snap["round"]["started_at"],
        "ended": None,
    }
    assert snap["rounds_done"] == 1
    assert snap["failures_total"] == 2
    assert snap["nodes"]["connected"] == 3
    nodes = {n["id"]: n for n in snap["nodes"]["list"]}
    assert nodes["a"]["transport"] == "grpc-bidi"
    assert nodes["a"]["peer"] == "ipv4:10.0.0.1:97"
    assert nodes["a"]["outcome"] == "ok" and nodes["a"]["last_round"] == 1
    assert nodes["a"]["last_heard"] > nodes["a"]["connected_since"]
    assert nodes["c"]["outcome"] == "failed"
    assert nodes["c"]["failed_round"] == 2 and nodes["c"]["failures"] == 2
    assert nodes["c"]["last_failure"] == "CLIENT_ERROR: again"
    json.dumps(snap, allow_nan=False)  # what the endpoint sends

    history = state.history()["rounds"]
    assert len(history) == 1
    fit, evaluate = history[0]["fit"], history[0]["evaluate"]
    assert history[0]["round"] == 1
    assert (fit["results"], fit["failures"], fit["loss"]) == (2, 1, None)
    assert fit["metrics"] == {"lr": 0.1}  # numeric metrics only: no text, no bytes
    assert fit["failed"] == [{"id": "c", "reason": "CLIENT_ERROR: fit raised RuntimeError: boom"}]
    assert evaluate["loss"] == 0.75 and evaluate["metrics"] == {"accuracy": 0.5}
    json.dumps(state.history(), allow_nan=False)


def test_the_run_ends_and_nodes_leave() -> None:
    state = DashboardState(clock=Ticks())
    _run_two_rounds(state)
    state(NodeLeft("b", "heartbeat timeout"))
    state(NodeLeft("a", None))
    state(NodeLeft("zz", None))  # never seen: ignored
    state(RunEnded(False, 2, 3.5, "RunError: nothing aggregated"))
    snap = state.snapshot()
    assert snap["run"]["status"] == "failed"
    assert snap["run"]["reason"] == "RunError: nothing aggregated"
    assert snap["run"]["seconds"] == 3.5
    assert snap["nodes"]["connected"] == 1
    assert snap["nodes"]["left_total"] == 2
    nodes = {n["id"]: n for n in snap["nodes"]["list"]}
    assert nodes["b"]["status"] == "left" and nodes["b"]["left_reason"] == "heartbeat timeout"
    assert nodes["a"]["left_reason"] == "said goodbye"
    assert [n["id"] for n in snap["nodes"]["list"]] == ["c", "a", "b"]  # connected first


def test_waiting_for_clients_is_shown_until_the_first_round() -> None:
    state = DashboardState(clock=Ticks())
    state(WaitingForClients(1, 3))
    assert state.snapshot()["run"]["status"] == "waiting"
    assert state.snapshot()["waiting"] == {"connected": 1, "needed": 3}
    state(RunStarted(1, "FedAvg"))
    state(RoundStarted(1, "fit", 3))
    assert state.snapshot()["waiting"] is None


def test_values_json_cannot_carry_are_left_out() -> None:
    state = DashboardState(clock=Ticks())
    state(RunStarted(1, "FedAvg"))
    state(RoundStarted(1, "evaluate", 1))
    metrics: dict[str, Any] = {"nan": float("nan"), "inf": float("inf"), "ok": True, "n": 3}
    state(RoundEnded(1, "evaluate", 1, 0, 0.1, loss=float("nan"), metrics=metrics))
    row = state.history()["rounds"][0]["evaluate"]
    assert row["loss"] is None
    assert row["metrics"] == {"ok": 1, "n": 3}
    json.dumps(state.history(), allow_nan=False)


def test_memory_is_bounded(monkeypatch: Any) -> None:
    monkeypatch.setattr(state_module, "MAX_NODES", 10)
    monkeypatch.setattr(state_module, "MAX_LEFT_NODES", 3)
    monkeypatch.setattr(state_module, "MAX_FAILURES", 2)
    monkeypatch.setattr(state_module, "MAX_ROUNDS", 5)
    state = DashboardState(clock=Ticks())
    for i in range(20):
        state(NodeJoined(f"n{i:02}", "rest", "p"))
    assert state.snapshot()["nodes"]["shown"] == 10
    assert state.snapshot()["nodes"]["joined_total"] == 20
    for i in range(10, 20):
        state(NodeLeft(f"n{i:02}", "gone"))
    snap = state.snapshot()
    assert sum(n["status"] == "left" for n in snap["nodes"]["list"]) == 3
    state(RunStarted(50, "FedAvg"))
    state(RoundStarted(1, "fit", 10))
    for i in range(10):
        state(ReplyArrived(1, "fit", f"n{i:02}", False, "x" * 10_000))
    current = state.snapshot()["round"]
    assert current["failures"] == 10 and len(current["failed"]) == 2
    assert len(current["failed"][0]["reason"]) == state_module.MAX_REASON
    for r in range(1, 21):
        state(RoundEnded(r, "fit", 1, 0, 0.1))
    rounds = state.history()["rounds"]
    assert [row["round"] for row in rounds] == [16, 17, 18, 19, 20]


def test_versions_and_watchers_follow_changes() -> None:
    state = DashboardState(clock=Ticks())
    calls: list[int] = []
    unwatch = state.watch(lambda: calls.append(state.version))
    state(RunStarted(1, "FedAvg"))
    assert (state.version, state.history_version, calls) == (1, 0, [1])
    state(RoundEnded(1, "fit", 1, 0, 0.1))
    assert (state.version, state.history_version, calls) == (2, 1, [1, 2])
    unwatch()
    state(RunEnded(True, 1, 1.0))
    assert calls == [1, 2]


def test_events_from_several_threads_while_reading() -> None:
    """Node events (fleet loop) and replies (round loop) at once, read meanwhile."""
    bus = RunEvents()
    state = DashboardState()
    bus.subscribe(state)
    bus.publish(RunStarted(1, "FedAvg"))
    bus.publish(RoundStarted(1, "fit", 4000))
    stop = threading.Event()

    def joins() -> None:
        for i in range(2000):
            bus.publish(NodeJoined(f"j{i}", "grpc-rere", "p"))

    def replies() -> None:
        for i in range(4000):
            bus.publish(ReplyArrived(1, "fit", f"j{i % 2000}", i % 2 == 0, "r"))

    def reads() -> None:
        while not stop.is_set():
            json.dumps(state.snapshot())
            json.dumps(state.history())

    threads = [threading.Thread(target=f) for f in (joins, replies)]
    reader = threading.Thread(target=reads)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    reader.join(60)
    snap = state.snapshot()
    assert snap["round"]["results"] + snap["round"]["failures"] == 4000
    assert snap["nodes"]["connected"] == 2000
    assert snap["version"] == 2 + 2000 + 4000
