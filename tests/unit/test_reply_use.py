"""A large reply's receive slot comes back as the server's ReplyUse says: at once for a
reply kept until the round ends, when its memory is freed for one folded and dropped."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import pytest

from stamen.messages import Code, FitIns, FitRes, GetPropertiesIns, Status
from stamen.ndarrays import ReceivedBuffer, ndarrays_to_parameters, parameters_to_views
from stamen.protocol.mailbox import ReplyUse
from stamen.protocol.slots import Admission
from stamen.server.client_manager import SimpleClientManager
from stamen.server.fleet.handler import RECEIVE_SLOTS, Fleet
from stamen.server.spill import is_spilled
from stamen.wire import decode_reply, encode_instruction_payload, encode_reply_payload

OK = Status(Code.OK, "")

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


async def _late_reply_of_a_folding_round() -> tuple[bool, int, int, float]:
    """A framed FitRes fed to the fleet after its node was let in out of its turn: whether
    it landed in a spill file, the late slots free before and after, and a value."""
    loop = asyncio.get_running_loop()
    fleet = Fleet(SimpleClientManager(), loop, max_message_length=LIMIT)
    fleet.slots.ledger.patience = 0.0
    node = fleet.open_node("grpc-bidi", "peer", frames=True)
    model = ndarrays_to_parameters([np.zeros(300_000, np.float32)])
    fleet.slots.begin(1)  # an instruction before it, still out: its turn has not come
    fleet.slots.begin(2)
    ins = FitIns(model, {})
    task_id = node.mailbox.post(
        ins, encode_instruction_payload(ins), lambda _: None, 2, replies=ReplyUse.FOLDED
    )
    assert node.mailbox.take() is not None
    await fleet.take_slot(node, 2, None)
    assert node.slot is Admission.LATE
    late_free = fleet.slots.ledger.late_free
    reply = FitRes(OK, ndarrays_to_parameters([np.full(300_000, 3, np.float32)]), 1, {})
    whole = None
    for frame in encode_reply_payload(reply).messages(LIMIT // 4):
        whole = fleet.feed(node, task_id, frame)
    assert whole is not None
    await _settle()
    decoded = decode_reply(whole)
    assert isinstance(decoded, FitRes)
    spilled = is_spilled(decoded.parameters)
    value = float(parameters_to_views(decoded.parameters)[0][-1])
    return spilled, late_free, fleet.slots.ledger.late_free, value


def test_a_reply_let_in_out_of_its_turn_waits_on_disk_not_in_a_slot() -> None:
    """A streaming round folds in instruction order: a reply let in before its turn
    (after the slots' patience) is received into a spill file, and its late slot comes
    back as soon as it is whole, not when the folding reaches it."""
    spilled, before, after, value = asyncio.run(_late_reply_of_a_folding_round())
    assert spilled
    assert after == before + 1
    assert value == 3.0
