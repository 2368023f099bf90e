"""ReceiveSlots: how many large replies are received at once, and in which order."""

from __future__ import annotations

import asyncio

import pytest

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
