"""Sans-IO protocol core: retry policy, backoff, node session machine, server mailbox."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from stamen.errors import ConfigError, ConnectionLost, ProtocolError, Timeout
from stamen.messages import (
    Code,
    DisconnectRes,
    GetParametersIns,
    GetPropertiesIns,
    GetPropertiesRes,
    Status,
)
from stamen.protocol import Backoff, Mailbox, NodeSession, RetryPolicy, State

# --- RetryPolicy ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 2.0}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"max_retries": "3"}, "max_retries"),
        ({"max_wait_time": -0.1}, "max_wait_time"),
        ({"max_wait_time": "3"}, "max_wait_time"),
        ({"max_wait_time": True}, "max_wait_time"),
        ({"max_wait_time": float("nan")}, "max_wait_time"),
        ({"base_delay": 0.0}, "base_delay"),
        ({"base_delay": -1.0}, "base_delay"),
        ({"base_delay": 30.0, "max_delay": 20.0}, "max_delay"),
    ],
    ids=repr,
)
def test_retry_policy_rejects_bad_values(kwargs: dict[str, Any], field: str) -> None:
    """RetryPolicy refuses negative, non-numeric or inconsistent limits, naming the field."""
    with pytest.raises(ConfigError, match=field):
        RetryPolicy(**kwargs)


def test_retry_policy_defaults() -> None:
    """Defaults: no limits; waits start at 1 s and are capped at 20 s."""
    policy = RetryPolicy()
    assert (policy.max_retries, policy.max_wait_time) == (None, None)
    assert (policy.base_delay, policy.max_delay) == (1.0, 20.0)


@pytest.mark.parametrize("kwargs", [{"max_retries": 0}, {"max_wait_time": 0}, {"max_wait_time": 1}])
def test_retry_policy_accepts_zero_and_ints(kwargs: dict[str, Any]) -> None:
    """0 is a valid limit, and max_wait_time may be an int."""
    RetryPolicy(**kwargs)


# --- Backoff -------------------------------------------------------------------------------


def _delays(backoff: Backoff, count: int, now: float = 0.0) -> list[float | None]:
    return [backoff.next_delay(now) for _ in range(count)]


def test_backoff_full_jitter_with_a_fixed_rng() -> None:
    """With rng() == 0.5 the k-th delay is 0.5 * min(20, 2**(k-1))."""
    backoff = RetryPolicy().start(0.0, lambda: 0.5)
    assert _delays(backoff, 9) == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]


def test_backoff_full_jitter_with_a_seeded_rng() -> None:
    """Delays are rng()*min(max_delay, base*2**(k-1)) draw by draw, capped at 20 s."""
    draws = random.Random(7)
    replay = random.Random(7)
    backoff = RetryPolicy(base_delay=0.3).start(0.0, draws.random)
    for k in range(1, 80):
        expected = replay.random() * min(20.0, 0.3 * 2 ** (k - 1))
        delay = backoff.next_delay(0.0)
        assert delay == pytest.approx(expected, rel=1e-12), k
        assert delay is not None
        assert 0.0 <= delay <= 20.0
    assert backoff.failures == 79


def test_backoff_max_retries_two_gives_two_delays_then_none() -> None:
    """max_retries=2: two waits (3 attempts in all), then give up, and stay given up."""
    backoff = RetryPolicy(max_retries=2).start(0.0, lambda: 0.5)
    assert _delays(backoff, 4) == [0.5, 1.0, None, None]


def test_backoff_max_retries_zero_gives_up_at_once() -> None:
    """max_retries=0: the first failure ends it."""
    backoff = RetryPolicy(max_retries=0).start(0.0, lambda: 0.5)
    assert backoff.next_delay(0.0) is None
    assert backoff.failures == 1


def test_backoff_max_wait_time_cuts_the_delay_then_gives_up() -> None:
    """max_wait_time: the wait shrinks to the time left; None once it has elapsed."""
    backoff = RetryPolicy(max_wait_time=3.0).start(10.0, lambda: 0.9)
    assert backoff.next_delay(10.0) == pytest.approx(0.9)  # 3 s left
    assert backoff.next_delay(12.5) == pytest.approx(0.5)  # 1.8 wanted, 0.5 left
    assert backoff.next_delay(13.0) is None  # 3 s elapsed
    assert backoff.next_delay(14.0) is None
    assert backoff.elapsed(14.0) == pytest.approx(4.0)


def test_backoff_max_wait_time_zero_gives_up_at_once() -> None:
    """max_wait_time=0: no time to retry at all."""
    assert RetryPolicy(max_wait_time=0).start(5.0, lambda: 0.5).next_delay(5.0) is None


def test_backoff_both_limits_the_first_reached_wins() -> None:
    """With max_retries and max_wait_time, whichever runs out first ends the outage."""
    by_count = RetryPolicy(max_retries=1, max_wait_time=100).start(0.0, lambda: 0.5)
    assert _delays(by_count, 2) == [0.5, None]
    by_time = RetryPolicy(max_retries=100, max_wait_time=1).start(0.0, lambda: 0.5)
    assert by_time.next_delay(0.0) == 0.5
    assert by_time.next_delay(1.0) is None


# --- NodeSession ---------------------------------------------------------------------------

EVENTS: dict[str, Callable[[NodeSession], Any]] = {
    "connect": lambda s: s.connect(),
    "connected": lambda s: s.connected(),
    "instruction": lambda s: s.instruction(),
    "replied": lambda s: s.replied(),
    "reconnect_later": lambda s: s.reconnect(5),
    "shutdown": lambda s: s.reconnect(0),
    "link_failed": lambda s: s.link_failed(0.0),
    "fatal": lambda s: s.fatal(),
}

PATHS: dict[State, list[str]] = {
    State.DISCONNECTED: [],
    State.CONNECTING: ["connect"],
    State.CONNECTED: ["connect", "connected"],
    State.HANDLING: ["connect", "connected", "instruction"],
    State.BACKING_OFF: ["connect", "link_failed"],
    State.DONE: ["connect", "connected", "instruction", "shutdown"],
    State.FAILED: ["fatal"],
}

# The whole transition table (module docstring of stamen.protocol.session).
LEGAL: dict[tuple[State, str], State] = {
    (State.DISCONNECTED, "connect"): State.CONNECTING,
    (State.DISCONNECTED, "fatal"): State.FAILED,
    (State.CONNECTING, "connected"): State.CONNECTED,
    (State.CONNECTING, "link_failed"): State.BACKING_OFF,
    (State.CONNECTING, "fatal"): State.FAILED,
    (State.CONNECTED, "instruction"): State.HANDLING,
    (State.CONNECTED, "link_failed"): State.BACKING_OFF,
    (State.CONNECTED, "fatal"): State.FAILED,
    (State.HANDLING, "replied"): State.CONNECTED,
    (State.HANDLING, "reconnect_later"): State.DISCONNECTED,
    (State.HANDLING, "shutdown"): State.DONE,
    (State.HANDLING, "link_failed"): State.BACKING_OFF,
    (State.HANDLING, "fatal"): State.FAILED,
    (State.BACKING_OFF, "connect"): State.CONNECTING,
    (State.BACKING_OFF, "fatal"): State.FAILED,
}


def _session_in(state: State, policy: RetryPolicy | None = None) -> NodeSession:
    session = NodeSession(policy or RetryPolicy(), lambda: 0.5)
    for event in PATHS[state]:
        EVENTS[event](session)
    assert session.state is state
    return session


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(EVENTS))
def test_session_transition_table(state: State, event: str) -> None:
    """Every (state, event) pair either moves as the table says or raises ProtocolError
    leaving the state unchanged."""
    session = _session_in(state)
    if (state, event) in LEGAL:
        EVENTS[event](session)
        assert session.state is LEGAL[(state, event)]
    else:
        with pytest.raises(ProtocolError, match=event.split("_")[0]):
            EVENTS[event](session)
        assert session.state is state


def test_session_starts_disconnected() -> None:
    """A new session is DISCONNECTED with no failures and no outage."""
    session = NodeSession(RetryPolicy(), lambda: 0.5)
    assert session.state is State.DISCONNECTED
    assert session.failures == 0
    assert session.outage_seconds(100.0) == 0.0


@pytest.mark.parametrize(
    ("seconds", "state", "back"),
    [(0, State.DONE, False), (None, State.DONE, False), (5, State.DISCONNECTED, True)],
)
def test_reconnect_zero_is_done_positive_comes_back(
    seconds: int | None, state: State, back: bool
) -> None:
    """reconnect(0 or None) ends the session (DONE); reconnect(5) goes DISCONNECTED."""
    session = _session_in(State.HANDLING)
    assert session.reconnect(seconds) is back
    assert session.state is state


def test_link_failed_returns_the_backoff_delay_and_gives_up_to_failed() -> None:
    """link_failed gives the policy's delay; when the policy gives up the state is FAILED."""
    session = _session_in(State.CONNECTING, RetryPolicy(max_retries=1))
    assert session.link_failed(0.0) == 0.5
    assert session.state is State.BACKING_OFF
    assert session.failures == 1
    session.connect()
    assert session.link_failed(0.5) is None
    assert session.state is State.FAILED
    assert session.failures == 2


def test_backoff_resets_after_an_instruction_arrives() -> None:
    """An instruction proves the link works: the next failure starts a fresh budget."""
    session = _session_in(State.CONNECTING, RetryPolicy(max_retries=1))
    assert session.link_failed(0.0) is not None
    session.connect()
    session.connected()
    session.instruction()
    assert session.failures == 0
    assert session.outage_seconds(50.0) == 0.0
    session.replied()
    assert session.link_failed(50.0) is not None  # 1st failure of a new outage
    assert session.failures == 1
    assert session.outage_seconds(52.0) == pytest.approx(2.0)


def test_backoff_does_not_reset_on_connect_alone() -> None:
    """A server that accepts connections but breaks every stream still exhausts retries."""
    session = _session_in(State.CONNECTING, RetryPolicy(max_retries=1))
    assert session.link_failed(0.0) is not None
    session.connect()
    session.connected()  # connected, but no instruction
    assert session.link_failed(1.0) is None
    assert session.state is State.FAILED


# --- Mailbox -------------------------------------------------------------------------------

OK = Status(code=Code.OK, message="")


class Recorder:
    """Collects on_done outcomes per task."""

    def __init__(self) -> None:
        self.outcomes: dict[str, list[Any]] = {}

    def __call__(self, name: str) -> Callable[[Any], None]:
        self.outcomes[name] = []
        return self.outcomes[name].append


def _reply(n: int = 0) -> GetPropertiesRes:
    return GetPropertiesRes(status=OK, properties={"n": n})


def test_mailbox_is_fifo_one_task_at_a_time() -> None:
    """Tasks are handed out in the order they were posted, one in flight at a time."""
    box = Mailbox("node")
    done = Recorder()
    ids = [box.post(GetPropertiesIns({"i": i}), b"%d" % i, done(str(i))) for i in range(3)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    taken = []
    while (task := box.take()) is not None:
        taken.append(task)
        assert box.deliver(task.task_id, _reply(len(taken))) is True
    assert [t.task_id for t in taken] == ids
    assert [t.payload for t in taken] == [b"0", b"1", b"2"]
    assert [t.instruction for t in taken] == [GetPropertiesIns({"i": i}) for i in range(3)]
    assert [done.outcomes[str(i)] for i in range(3)] == [[_reply(1)], [_reply(2)], [_reply(3)]]


def test_take_while_a_task_is_in_flight_redelivers_it() -> None:
    """A node asking again before replying lost the instruction: the same task comes back."""
    box = Mailbox("node")
    done = Recorder()
    first = box.post(GetPropertiesIns({"i": 1}), b"1", done("1"))
    second = box.post(GetPropertiesIns({"i": 2}), b"2", done("2"))
    task = box.take()
    assert task is not None
    assert task.task_id == first
    again = box.take()
    assert again is not None
    assert again.task_id == first
    assert box.deliver(first, _reply()) is True
    nxt = box.take()
    assert nxt is not None
    assert nxt.task_id == second
    assert done.outcomes == {"1": [_reply()], "2": []}


def test_deliver_ends_a_task_exactly_once() -> None:
    """deliver() calls on_done once with the reply; a late second reply returns False."""
    box = Mailbox("node")
    done = Recorder()
    task_id = box.post(GetPropertiesIns({}), b"", done("a"))
    assert done.outcomes["a"] == []
    box.take()
    assert box.deliver(task_id, _reply(1)) is True
    assert box.deliver(task_id, _reply(2)) is False
    assert box.fail(task_id, Timeout("late")) is False
    box.close()
    assert done.outcomes["a"] == [_reply(1)]


def test_fail_ends_pending_or_in_flight_task_once_and_late_reply_is_refused() -> None:
    """fail() ends a task (pending or in flight) with the error; a later reply is refused."""
    box = Mailbox("node")
    done = Recorder()
    in_flight = box.post(GetPropertiesIns({}), b"", done("in_flight"))
    pending = box.post(GetParametersIns({}), b"", done("pending"))
    failed_pending = box.post(GetPropertiesIns({}), b"", done("failed_pending"))
    task = box.take()
    assert task is not None
    assert task.task_id == in_flight
    error = Timeout("no reply")
    assert box.fail(in_flight, error) is True
    assert box.deliver(in_flight, _reply()) is False  # the late reply
    assert box.fail(failed_pending, error) is True  # still pending
    task = box.take()
    assert task is not None
    assert task.task_id == pending
    assert box.deliver(pending, _reply()) is True
    assert box.take() is None  # the failed pending task is never handed out
    assert done.outcomes == {
        "in_flight": [error],
        "pending": [_reply()],
        "failed_pending": [error],
    }


def test_reply_to_a_task_never_taken_is_refused() -> None:
    """A reply can only end a task in flight: one for a pending task returns False."""
    box = Mailbox("node")
    done = Recorder()
    task_id = box.post(GetPropertiesIns({}), b"", done("a"))
    assert box.deliver(task_id, _reply()) is False
    assert box.deliver(999, _reply()) is False
    assert done.outcomes["a"] == []


def test_close_ends_every_task_once_with_connection_lost() -> None:
    """close() ends pending and in-flight tasks with ConnectionLost naming the node."""
    box = Mailbox("node-7")
    done = Recorder()
    box.post(GetPropertiesIns({}), b"", done("a"))
    box.post(GetPropertiesIns({}), b"", done("b"))
    box.take()
    box.close()
    assert box.closed
    for name in ("a", "b"):
        (outcome,) = done.outcomes[name]
        assert isinstance(outcome, ConnectionLost)
        assert "node-7" in str(outcome)
    box.close(Timeout("again"))  # a second close changes nothing
    assert all(len(v) == 1 for v in done.outcomes.values())
    assert box.take() is None


def test_close_with_an_error_uses_it() -> None:
    """close(error) ends the tasks with that error."""
    box = Mailbox("node")
    done = Recorder()
    box.post(GetPropertiesIns({}), b"", done("a"))
    error = ProtocolError("bad peer")
    box.close(error)
    assert done.outcomes["a"] == [error]


def test_post_after_close_fails_at_once() -> None:
    """A task posted to a closed mailbox ends immediately with the closing error."""
    box = Mailbox("node")
    box.close()
    done = Recorder()
    box.post(GetPropertiesIns({}), b"", done("late"))
    (outcome,) = done.outcomes["late"]
    assert isinstance(outcome, ConnectionLost)
    assert box.take() is None


def test_wakeup_is_called_on_each_post() -> None:
    """The transport's wakeup callback runs on every post, and not once removed or closed."""
    box = Mailbox("node")
    wakeups: list[int] = []
    box.set_wakeup(lambda: wakeups.append(1))
    done = Recorder()
    box.post(GetPropertiesIns({}), b"", done("a"))
    box.post(GetPropertiesIns({}), b"", done("b"))
    assert len(wakeups) == 2
    box.set_wakeup(None)
    box.post(GetPropertiesIns({}), b"", done("c"))
    assert len(wakeups) == 2
    box.set_wakeup(lambda: wakeups.append(1))
    box.close()
    box.post(GetPropertiesIns({}), b"", done("d"))
    assert len(wakeups) == 2


def test_every_task_ends_exactly_once_under_a_random_schedule() -> None:
    """Whatever mix of post/take/deliver/fail/close happens, each task ends exactly once."""
    rng = random.Random(1)
    for _ in range(200):
        box = Mailbox("n")
        done = Recorder()
        posted: list[int] = []
        for step in range(rng.randint(1, 30)):
            op = rng.random()
            if op < 0.4:
                posted.append(box.post(GetPropertiesIns({}), b"", done(str(step))))
            elif op < 0.6:
                box.take()
            elif op < 0.8 and posted:
                box.deliver(rng.choice(posted), DisconnectRes(reason="ACK"))
            elif op < 0.97 and posted:
                box.fail(rng.choice(posted), Timeout("t"))
            else:
                box.close()
        box.close()
        assert all(len(outcomes) == 1 for outcomes in done.outcomes.values())
