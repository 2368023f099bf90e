"""ReceiveSlots: how many large replies are received at once, and in which order."""

from __future__ import annotations

import asyncio
import logging

import pytest

from stamen.protocol.slots import Admission, SlotLedger
from stamen.server.fleet.slots import ReceiveSlots


def test_replies_are_let_in_by_instruction_order() -> None:
    """Replies that arrive out of order wait until every earlier instruction has ended,
    so they are received in the order the server folds them."""

    async def scenario() -> list[int]:
        slots = ReceiveSlots(1, patience=30)
        for seq in (1, 2, 3, 4):
            slots.begin(seq)
        order: list[int] = []

        async def reply(seq: int) -> None:
            await slots.acquire(seq)
            order.append(seq)
            slots.release()
            slots.end(seq)

        tasks = [asyncio.create_task(reply(seq)) for seq in (4, 3, 2)]
        for _ in range(20):
            await asyncio.sleep(0)
        assert order == []  # instruction 1 has not ended: nobody is let in
        slots.end(1)  # e.g. node 1 failed
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    assert asyncio.run(scenario()) == [2, 3, 4]


def test_a_reply_that_waited_too_long_is_let_in() -> None:
    """A node that never answers does not hold up the others beyond ``patience``."""

    async def scenario() -> bool:
        slots = ReceiveSlots(1, patience=0.05)
        slots.begin(1)
        slots.begin(2)
        await asyncio.wait_for(slots.acquire(2), 5)
        return True

    assert asyncio.run(scenario())


def test_one_slot_is_one_reply_at_a_time() -> None:
    """With one slot, a second reply in turn waits until the first is released, and a
    cancelled waiter takes nothing."""

    async def scenario() -> bool:
        slots = ReceiveSlots(1, patience=30)
        await slots.acquire(1)
        gone = asyncio.create_task(slots.acquire(2))
        later = asyncio.create_task(slots.acquire(3))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not later.done()
        gone.cancel()
        slots.release()
        await asyncio.wait_for(later, 5)
        return gone.cancelled()

    assert asyncio.run(scenario())


def test_size_must_be_positive() -> None:
    """Zero slots would block every large reply for ever: refused."""
    with pytest.raises(ValueError, match="expected size >= 1, received 0"):
        ReceiveSlots(0)


def test_a_patient_reply_held_back_by_late_ones_waits_without_spinning() -> None:
    """Past its patience, a reply that the late-reply cap keeps out waits for a change of
    the ledger: it does not ask again and again (which would starve the event loop)."""
    from stamen.testing.clock import FakeClock

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def scenario() -> tuple[int, bool]:
        clock = FakeClock()
        slots = ReceiveSlots(1, patience=10.0, clock=clock)
        asks = 0
        admit = slots.ledger.admit

        def counted(seq: int, waited: float) -> Admission | None:
            nonlocal asks
            asks += 1
            return admit(seq, waited)

        slots.ledger.admit = counted  # type: ignore[method-assign]
        for seq in (1, 2, 3, 4):
            slots.begin(seq)
        await slots.acquire(1)  # in order; 2 will be slow
        third = asyncio.create_task(slots.acquire(3))
        fourth = asyncio.create_task(slots.acquire(4))
        await settle()
        clock.advance(11.0)  # both patient now
        slots.end(99)  # a change: they look again; 3 gets in late, 4 meets the cap
        await asyncio.wait_for(third, 5)
        await settle()
        before = asks
        for _ in range(200):
            await asyncio.sleep(0)
        spun = asks - before
        slots.release(Admission.LATE)  # 3's late slot back: 4 gets in
        await asyncio.wait_for(fourth, 5)
        return spun, fourth.done()

    spun, done = asyncio.run(scenario())
    assert done and spun == 0, f"asked {spun} times while nothing changed"


def test_a_queue_that_moves_lets_nobody_in_out_of_turn() -> None:
    """Replies queued behind replies that keep coming in their turn are not let in late,
    however long they have waited (one model at a time bounds the server's memory); once
    the head of the queue stalls for ``patience``, they are."""
    from stamen.testing.clock import FakeClock

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def scenario() -> None:
        clock = FakeClock()
        slots = ReceiveSlots(1, patience=10.0, clock=clock)
        for seq in range(1, 6):
            slots.begin(seq)
        waiting = {seq: asyncio.create_task(slots.acquire(seq)) for seq in range(2, 6)}
        assert await asyncio.wait_for(slots.acquire(1), 5) is Admission.ORDERED
        for seq in (1, 2):  # each reply takes 6 s: the queue moves, slower than patience
            clock.advance(6.0)
            slots.release()
            slots.end(seq)
            await settle()
            assert await asyncio.wait_for(waiting[seq + 1], 5) is Admission.ORDERED
            assert not any(waiting[later].done() for later in range(seq + 2, 6))
        assert slots.late == 0  # 4 and 5 waited 12 s, but the queue moved every 6 s
        clock.advance(10.5)  # reply 3 stalls in its slot: past patience, 4 gets in late
        await asyncio.sleep(0)
        slots.end(99)  # any change of the ledger makes the waiters look again
        await settle()
        assert waiting[4].done() and waiting[4].result() is Admission.LATE
        assert not waiting[5].done()  # the one late slot is taken
        waiting[5].cancel()

    asyncio.run(scenario())


def test_a_held_ledger_lets_so_many_replies_in_in_their_turn_until_it_opens() -> None:
    """While the server's old model is still in memory it holds the slots: the first
    reply comes in (it becomes the running sum), the next waits in its turn with a slot
    free until ``open``; a stall still lets a reply in late (its patience)."""
    ledger = SlotLedger(1, patience=10.0)
    for seq in (1, 2, 3):
        ledger.begin(seq)
    ledger.hold(1)
    assert ledger.held
    assert ledger.admit(1, 0.0) is Admission.ORDERED
    ledger.release()
    ledger.end(1)
    assert ledger.free == 1 and ledger.admit(2, 0.0) is None  # its turn, a free slot: held
    changes = ledger.changes
    ledger.open()
    assert not ledger.held and ledger.changes > changes  # the waiters look again
    assert ledger.admit(2, 0.0) is Admission.ORDERED
    ledger.hold(0)
    assert ledger.admit(3, 10.0) is Admission.LATE  # held, but past patience
    ledger.open()
    ledger.open()  # twice: nothing more
    with pytest.raises(ValueError, match="expected ordered >= 0, received -1"):
        ledger.hold(-1)


def test_held_slots_let_the_next_reply_in_when_opened() -> None:
    async def scenario() -> Admission:
        slots = ReceiveSlots(1, patience=30)
        for seq in (1, 2):
            slots.begin(seq)
        slots.hold(1, seconds=30)
        assert await asyncio.wait_for(slots.acquire(1), 5) is Admission.ORDERED
        slots.release()
        slots.end(1)
        second = asyncio.create_task(slots.acquire(2))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not second.done()
        slots.open()
        return await asyncio.wait_for(second, 5)

    assert asyncio.run(scenario()) is Admission.ORDERED


def test_a_hold_ends_by_itself_after_its_seconds(caplog: pytest.LogCaptureFixture) -> None:
    """A round whose last node never gets its instruction does not hold its replies for
    ever: after ``seconds`` the reply in its turn comes in, and the log says why."""

    async def scenario() -> Admission:
        slots = ReceiveSlots(1, patience=30)
        slots.begin(1)
        slots.hold(0, seconds=0.05)
        return await asyncio.wait_for(slots.acquire(1), 5)

    with caplog.at_level(logging.INFO, logger="stamen.server.fleet.slots"):
        assert asyncio.run(scenario()) is Admission.ORDERED
    assert "receive slots held for 0.05 s" in caplog.text
