"""A large reply's receive slot comes back as the server's ReplyUse says: at once for a
reply kept until the round ends, when its memory is freed for one folded and dropped."""

from __future__ import annotations

import asyncio
import gc

import pytest

from stamen.messages import GetPropertiesIns
from stamen.ndarrays import ReceivedBuffer
from stamen.protocol.mailbox import ReplyUse
from stamen.server.client_manager import SimpleClientManager
from stamen.server.fleet.handler import RECEIVE_SLOTS, Fleet

LIMIT = 1 << 20


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def _free_slots_after_receiving(replies: ReplyUse, *, as_bytes: bool) -> list[int]:
    """Free slots right after a large reply is passed on, then after its memory is freed."""
    loop = asyncio.get_running_loop()
    fleet = Fleet(SimpleClientManager(), loop, max_message_length=LIMIT)
    node = fleet.open_node("grpc-bidi", "peer", frames=True)
    mailbox = node.mailbox
    fleet.slots.begin(1)
    task_id = mailbox.post(GetPropertiesIns({}), b"", lambda outcome: None, 1, replies=replies)
    assert mailbox.take() is not None
    await fleet.take_slot(node, 1, None)
    buffer = ReceivedBuffer.allocate(64)
    whole: bytes | memoryview = bytes(64) if as_bytes else buffer.data.toreadonly()
    fleet.pass_slot(node, task_id, whole)
    await _settle()
    free = [fleet.slots.free]
    del whole, buffer
    gc.collect()
    await _settle()
    free.append(fleet.slots.free)
    return free


@pytest.mark.parametrize(
    ("replies", "as_bytes", "expected"),
    [
        (ReplyUse.KEPT, False, [RECEIVE_SLOTS, RECEIVE_SLOTS]),
        (ReplyUse.FOLDED, False, [RECEIVE_SLOTS - 1, RECEIVE_SLOTS]),
        (ReplyUse.FOLDED, True, [RECEIVE_SLOTS, RECEIVE_SLOTS]),  # in no buffer of ours
    ],
    ids=["kept", "folded", "folded-bytes"],
)
def test_the_slot_of_a_large_reply_follows_its_reply_use(
    replies: ReplyUse, as_bytes: bool, expected: list[int]
) -> None:
    got = asyncio.run(_free_slots_after_receiving(replies, as_bytes=as_bytes))
    assert got == expected
