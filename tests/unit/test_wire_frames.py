"""Frames: a message cut to a size bound and put back together, and every way that fails."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stamen as fl
from stamen.errors import DecodeError
from stamen.messages import FitIns, FitRes, Parameters, Status
from stamen.wire import (
    FrameReader,
    Payload,
    decode_instruction,
    decode_reply,
    encode_instruction,
    encode_instruction_payload,
    encode_reply_payload,
    frame_size,
)
from stamen.wire.frames import FRAME_SIZE, SHARED_FRAMES, read_frame


def _fit_ins(floats: int) -> FitIns:
    arrays = [np.arange(floats, dtype=np.float32), np.ones((3, 2), dtype=np.float64)]
    return FitIns(fl.common.ndarrays_to_parameters(arrays), {"round": 3, "lr": 0.5})


def _reassemble(payload: Payload, size: int) -> bytes | memoryview:
    reader = FrameReader()
    out = None
    for message in payload.messages(size):
        assert out is None, "a whole message came back before the last frame"
        assert len(message) <= size + 64
        out = reader.feed(message)
    assert out is not None
    return out


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=8),
    size=st.integers(min_value=1, max_value=400),
)
def test_any_payload_comes_back_byte_for_byte(parts: list[bytes], size: int) -> None:
    """Whatever the parts and the frame size, the frames reassemble the joined bytes."""
    payload = Payload(parts)
    joined = b"".join(parts)
    if not joined:
        return
    assert bytes(_reassemble(payload, size)) == joined


def test_a_large_instruction_decodes_the_same_from_frames() -> None:
    """A FitIns cut into 100 frames decodes to what the whole message decodes to."""
    ins = _fit_ins(100_000)
    payload = encode_instruction_payload(ins)
    assert payload.tobytes() == encode_instruction(ins)
    whole = _reassemble(payload, len(payload) // 100 + 1)
    decoded = decode_instruction(whole)
    assert isinstance(decoded, FitIns)
    assert decoded.config == ins.config
    for got, sent in zip(
        fl.common.parameters_to_ndarrays(decoded.parameters),
        fl.common.parameters_to_ndarrays(ins.parameters),
        strict=True,
    ):
        np.testing.assert_array_equal(got, sent)


def test_a_reply_in_frames_decodes() -> None:
    """FitRes metrics, num_examples and tensors survive frames."""
    params = fl.common.ndarrays_to_parameters([np.arange(5000, dtype=np.int32)])
    reply = FitRes(Status(fl.common.Code.OK, ""), params, 17, {"loss": 0.25})
    decoded = decode_reply(_reassemble(encode_reply_payload(reply), 1000))
    assert isinstance(decoded, FitRes)
    assert decoded.num_examples == 17 and decoded.metrics == {"loss": 0.25}
    assert decoded.parameters.tensors == params.tensors


def test_small_messages_are_sent_whole() -> None:
    """A message within the bound is one whole message, not a frame (what Flower reads)."""
    payload = Payload([b"abc", b"def"])
    assert list(payload.messages(6)) == [b"abcdef"]
    assert read_frame(b"abcdef") is None


def test_frames_may_be_smaller_than_the_message_bound() -> None:
    """A message over the bound goes in frames of the size asked for (never over the
    bound); one within it still goes whole."""
    payload = Payload([bytes(range(256)) * 40])  # 10,240 bytes
    frames = list(payload.messages(4096, 1000))
    assert [read_frame(f)[1] for f in frames] == list(range(0, 10_240, 1000))  # type: ignore[index]
    reader = FrameReader()
    assembled = [reader.feed(f) for f in frames]
    assert assembled[-1] is not None and bytes(assembled[-1]) == payload.tobytes()
    assert len(list(payload.messages(4096, 10_000))) == 3  # capped at the bound
    assert list(payload.messages(20_000, 1000)) == [payload.tobytes()]


def test_nodes_sent_one_payload_together_share_its_frames() -> None:
    """A payload sent to several nodes at once makes each frame once: the node that asks
    for a frame first makes it, the others are given the same bytes; one that falls more
    than SHARED_FRAMES behind makes its own (equal) frames; nothing is kept once every
    node is done."""
    payload = Payload([bytes(range(256)) * 40])  # 10 frames of 1,024 bytes
    lead, second, late = (payload.messages(4096, 1024) for _ in range(3))
    starts = [next(lead), next(second), next(late)]  # the first, alone: not kept
    assert starts[0] is not starts[1] and starts[1] is starts[2]
    led = [next(lead) for _ in range(SHARED_FRAMES)]  # frames 1-4: all kept
    assert all(next(second) is frame for frame in led)
    ahead = [next(lead), next(lead)]  # frames 5 and 6: frames 1 and 2 are let go
    behind = next(late)
    assert behind == led[0] and behind is not led[0]  # too far behind: its own copy
    assert next(late) is not led[1] and next(late) is led[2]
    reader = FrameReader()
    whole = [reader.feed(f) for f in [starts[0], *led, *ahead, *lead]][-1]
    assert whole is not None and bytes(whole) == payload.tobytes()
    assert (len(list(second)), len(list(late))) == (10 - 1 - SHARED_FRAMES, 10 - 4)
    assert payload._shared == {}  # every node is done: nothing kept


def test_a_payload_sent_to_one_node_keeps_no_frame() -> None:
    """Frames are kept only while another node may want them; sealed frames (a node's
    own MAC) are never shared."""
    payload = Payload([bytes(1000) * 10])
    alone = payload.messages(4096, 1024)
    next(alone)
    assert payload._shared == {}
    sealed = [payload.messages(4096, 1024, lambda parts, n=n: bytes([n])) for n in range(2)]
    a, b = next(sealed[0]), next(sealed[1])
    assert a[:-1] == b[:-1] and a[-1:] == b"\x00" and b[-1:] == b"\x01"
    assert payload._shared == {}


def test_frame_size_respects_the_message_bound() -> None:
    """Frames stay under grpc_max_message_length with room for their headers."""
    assert frame_size(512 << 20) == FRAME_SIZE
    assert frame_size(4096) < 4096
    assert frame_size(1) == 1


def _frames(data: bytes, size: int) -> list[bytes]:
    return list(Payload([data]).messages(size))


def test_a_frame_sent_again_is_ignored() -> None:
    """A retried frame (its response was lost) does not corrupt the message."""
    frames = _frames(bytes(range(256)) * 4, 100)
    reader = FrameReader()
    assert reader.feed(frames[0]) is None
    assert reader.feed(frames[1]) is None
    assert reader.feed(frames[1]) is None
    assert reader.received == 200
    out = None
    for frame in frames[2:]:
        out = reader.feed(frame)
    assert out is not None and bytes(out) == bytes(range(256)) * 4


@pytest.mark.parametrize(
    ("sequence", "match"),
    [
        ([1], "expected the first frame"),
        ([0, 2], "expected the frame at offset 100, received 200"),
    ],
)
def test_out_of_order_frames_are_refused(sequence: list[int], match: str) -> None:
    """A gap in the frames is a DecodeError naming the offsets; the partial is dropped."""
    frames = _frames(bytes(1000), 100)
    reader = FrameReader()
    for index in sequence[:-1]:
        assert reader.feed(frames[index]) is None
    with pytest.raises(DecodeError, match=match):
        reader.feed(frames[sequence[-1]])
    assert not reader.in_progress


def test_a_whole_message_inside_a_framed_one_is_refused() -> None:
    """A whole message while frames are expected is an error, not silently mixed in."""
    reader = FrameReader()
    reader.feed(_frames(bytes(1000), 100)[0])
    with pytest.raises(DecodeError, match="received a whole message"):
        reader.feed(encode_instruction(_fit_ins(2)))


def test_a_total_size_that_changes_is_refused() -> None:
    """Frames of one message must agree on its size."""
    reader = FrameReader()
    reader.feed(_frames(bytes(1000), 100)[0])
    other = _frames(bytes(2000), 100)[1]
    with pytest.raises(DecodeError, match="2000 bytes, earlier frames said 1000"):
        reader.feed(other)


def test_a_frame_that_overruns_its_message_is_refused() -> None:
    """A frame whose data goes past the announced total is refused before any copy."""
    # total_size=50 (field 1), offset=0 (field 2), 100 bytes of data (field 3).
    body = b"\x08\x32\x10\x00\x1a\x64" + bytes(100)
    message = b"\x82\x01" + bytes([len(body)]) + body
    with pytest.raises(DecodeError, match="overrun"):
        FrameReader().feed(message)


def test_an_impossible_size_is_refused_before_allocating() -> None:
    """A first frame announcing more bytes than the machine has is refused at once."""
    body = b"\x08" + bytes([0xFF] * 8) + b"\x7f" + b"\x10\x00\x1a\x01\x00"
    message = b"\x82\x01" + bytes([len(body)]) + body
    with pytest.raises(DecodeError, match="more than this machine"):
        FrameReader().feed(message)


def test_unknown_frame_fields_are_refused() -> None:
    """A frame with a field it does not define is malformed."""
    body = b"\x08\x01\x10\x00\x1a\x01\x00\x20\x01"
    message = b"\x82\x01" + bytes([len(body)]) + body
    with pytest.raises(DecodeError, match="unexpected field 4"):
        FrameReader().feed(message)


def test_empty_parameters_message_roundtrips() -> None:
    """Parameters with no tensors still encode as one small whole message."""
    ins = FitIns(Parameters([], ""), {})
    payload = encode_instruction_payload(ins)
    assert list(payload.messages(frame_size(4096))) == [encode_instruction(ins)]
