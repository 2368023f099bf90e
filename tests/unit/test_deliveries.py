"""When every node has its instruction (Deliveries, Task.sent), and where a reply let
in out of its turn is received (_spilled_on_arrival)."""

from __future__ import annotations

import asyncio

from stamen.messages import FitIns, Parameters
from stamen.protocol.mailbox import SENT, Mailbox, ReplyUse, Task
from stamen.protocol.slots import Admission
from stamen.server.client_proxy import Deliveries
from stamen.server.fleet.handler import _spilled_on_arrival
from stamen.server.fleet.slots import ReceiveSlots
from stamen.wire import Payload


def _deliveries() -> tuple[Deliveries, list[int]]:
    told: list[int] = []
    return Deliveries(lambda: told.append(1)), told


def test_told_once_every_instruction_is_sent_and_one_is_still_worked_on() -> None:
    deliveries, told = _deliveries()
    tracked = [deliveries.track() for _ in range(3)]
    deliveries.seal(3)
    tracked[0][0]()
    tracked[1][1]()  # ended before it was sent (a node that left): counts as done
    assert told == []
    tracked[2][0]()
    assert told == [1]
    tracked[2][0]()  # again, and the ends: nothing more
    for _, ended in tracked:
        ended()
    assert told == [1]


def test_not_told_when_every_instruction_has_ended() -> None:
    """Nothing is left to free once every reply is in (pull-based nodes, whose tasks keep
    their instruction until the reply): saying so then would only cost a write."""
    deliveries, told = _deliveries()
    tracked = [deliveries.track() for _ in range(2)]
    deliveries.seal(2)
    for _, ended in tracked:
        ended()
        ended()
    assert told == []


def test_not_told_unless_every_instruction_of_the_round_was_tracked() -> None:
    """A round with a proxy that cannot tell (simulated, a user's) never hears it."""
    deliveries, told = _deliveries()
    sent, _ = deliveries.track()
    sent()
    assert told == []  # not sealed yet: more may come
    deliveries.seal(2)  # two instructions, one tracked
    assert told == []


def test_told_at_the_seal_when_every_instruction_was_sent_before() -> None:
    deliveries, told = _deliveries()
    for _ in range(2):
        deliveries.track()[0]()
    assert told == []
    deliveries.seal(2)
    assert told == [1]


def test_a_sent_task_lets_its_encoding_go_and_says_so_once() -> None:
    calls: list[int] = []
    mailbox = Mailbox("n1")
    ins = FitIns(Parameters([b"\x01" * 10], "numpy.ndarray"), {})
    mailbox.post(ins, Payload.of(b"x" * 10), lambda _: None, on_sent=lambda: calls.append(1))
    task = mailbox.take()
    assert task is not None and len(task.payload) == 10
    task.sent()
    task.sent()
    assert calls == [1]
    assert task.payload is SENT and len(task.payload) == 0
    assert task.instruction is ins  # what the reply is checked against stays


def test_a_reply_let_in_out_of_its_turn_is_received_into_a_spill_file() -> None:
    """In a streaming round the results fold in instruction order: a reply let in late
    would wait in a model-sized buffer for the ones before it; it waits on disk."""

    def task(replies: ReplyUse) -> Task:
        return Task(1, FitIns(Parameters([], ""), {}), Payload.of(b""), lambda _: None, 1, replies)

    assert _spilled_on_arrival(task(ReplyUse.FOLDED), Admission.LATE)
    assert not _spilled_on_arrival(task(ReplyUse.FOLDED), Admission.ORDERED)
    assert not _spilled_on_arrival(task(ReplyUse.FOLDED), None)
    assert _spilled_on_arrival(task(ReplyUse.SPILLED), Admission.ORDERED)
    assert not _spilled_on_arrival(task(ReplyUse.KEPT), Admission.LATE)


def test_a_holding_round_holds_each_fleets_slots_once_and_opens_them_on_their_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        first, second = ReceiveSlots(1), ReceiveSlots(1)
        deliveries = Deliveries(lambda: None, hold=1)
        hold = deliveries.hold_of(loop, first)
        assert hold is not None
        assert deliveries.hold_of(loop, first) is None  # held once a round
        assert deliveries.hold_of(loop, None) is None  # a proxy without slots
        other = deliveries.hold_of(loop, second)
        assert other is not None
        hold()
        other()
        assert first.ledger.held and second.ledger.held
        deliveries.release_hold()
        assert first.ledger.held  # opened on its loop, not on the caller's thread
        loop.run_until_complete(asyncio.sleep(0))
        assert not first.ledger.held and not second.ledger.held
        assert deliveries.hold_of(loop, ReceiveSlots(1)) is None  # released: no more
        deliveries.release_hold()  # again: nothing
    finally:
        loop.close()
    assert Deliveries(lambda: None).hold_of(loop, first) is None  # no hold asked


def test_told_when_the_last_instruction_not_with_its_node_ends() -> None:
    """An instruction that fails before its node has it (the node left) does not keep
    the round from saying that every other node has its own."""
    deliveries, told = _deliveries()
    tracked = [deliveries.track() for _ in range(2)]
    deliveries.seal(2)
    tracked[0][0]()
    assert told == []
    tracked[1][1]()
    assert told == [1]
