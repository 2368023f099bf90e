"""ReceiveSlots: how many large replies are received at once, and in which order."""

from __future__ import annotations

import asyncio

import pytest

from stamen.server.fleet.slots import ReceiveSlots


def test_waiters_get_the_slot_lowest_sequence_first() -> None:
    """With one slot taken, replies that wait are let in by instruction order, not by
    arrival order."""

    async def scenario() -> list[int]:
        slots = ReceiveSlots(1)
        order: list[int] = []
        await slots.acquire(5)

        async def reply(seq: int) -> None:
            await slots.acquire(seq)
            order.append(seq)
            slots.release()

        tasks = [asyncio.create_task(reply(seq)) for seq in (9, 7, 8, 6)]
        while slots.waiting < 4:
            await asyncio.sleep(0)
        slots.release()
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    assert asyncio.run(scenario()) == [6, 7, 8, 9]


def test_a_cancelled_waiter_takes_no_slot() -> None:
    """A node that goes away while waiting does not keep the slot from the others."""

    async def scenario() -> bool:
        slots = ReceiveSlots(1)
        await slots.acquire(1)
        gone = asyncio.create_task(slots.acquire(2))
        later = asyncio.create_task(slots.acquire(3))
        while slots.waiting < 2:
            await asyncio.sleep(0)
        gone.cancel()
        slots.release()
        await asyncio.wait_for(later, 5)
        return gone.cancelled()

    assert asyncio.run(scenario())


def test_size_must_be_positive() -> None:
    """Zero slots would block every large reply for ever: refused."""
    with pytest.raises(ValueError, match="expected size >= 1, received 0"):
        ReceiveSlots(0)
