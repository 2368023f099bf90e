"""The grpc-bidi server's send window: the frames of large instructions made and written
at once, on every stream together, and slow nodes let out of it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from stamen.server.fleet import grpc_bidi


class Stream:
    """A stream's context whose writes end when the test says (``finish``)."""

    def __init__(self, board: Board, name: str) -> None:
        self.board, self.name = board, name
        self.written: list[bytes] = []

    async def write(self, message: bytes) -> None:
        self.board.pending += 1
        self.board.most = max(self.board.most, self.board.pending)
        try:
            await self.board.gate(self.name).wait()
            self.written.append(message)
        finally:
            self.board.pending -= 1


class Board:
    """Counts the writes under way; opens each stream's gate."""

    def __init__(self) -> None:
        self.pending = 0
        self.most = 0
        self.made = 0
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def frames(self, name: str, count: int) -> Iterator[bytes]:
        for k in range(count):
            self.made += 1  # made only when its place is held
            yield f"{name}:{k}".encode()


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_frames_of_every_stream_together_stay_within_the_window() -> None:
    async def main() -> tuple[Board, list[Stream]]:
        board = Board()
        window = asyncio.Semaphore(3)
        streams = [Stream(board, f"n{k}") for k in range(8)]
        for stream in streams:
            board.gate(stream.name).set()  # fast nodes: writes end as soon as they run
        writers = [grpc_bidi._write_paced(s, board.frames(s.name, 5), window) for s in streams]
        await asyncio.gather(*writers)
        return board, streams

    board, streams = _run(main())
    assert board.most <= 3 and board.made == 40
    for stream in streams:  # every frame, in order
        assert stream.written == [f"{stream.name}:{k}".encode() for k in range(5)]


def test_frames_are_made_only_once_they_have_a_place() -> None:
    async def main() -> tuple[int, int]:
        board = Board()
        window = asyncio.Semaphore(2)
        streams = [Stream(board, f"n{k}") for k in range(6)]
        tasks = [
            asyncio.ensure_future(grpc_bidi._write_paced(s, board.frames(s.name, 4), window))
            for s in streams
        ]
        while board.pending < 2:  # two writes hold the two places, the rest wait
            await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)
        made = board.made
        for stream in streams:
            board.gate(stream.name).set()
        await asyncio.gather(*tasks)
        return made, board.made

    made_while_full, made = _run(main())
    assert made_while_full == 2  # the waiting streams made no frame (no copy of the model)
    assert made == 24


def test_a_slow_node_leaves_the_window_to_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that outlasts SEND_PATIENCE gives its place back: the other streams go on,
    and the slow stream sends the rest of its frames outside the window when it can."""
    monkeypatch.setattr(grpc_bidi, "SEND_PATIENCE", 0.05)

    async def main() -> tuple[list[bytes], list[bytes], int]:
        board = Board()
        window = asyncio.Semaphore(1)
        slow, fast = Stream(board, "slow"), Stream(board, "fast")
        board.gate("fast").set()
        slow_task = asyncio.ensure_future(
            grpc_bidi._write_paced(slow, board.frames("slow", 3), window)
        )
        while board.pending < 1:
            await asyncio.sleep(0)
        # The window's one place is the slow node's: the fast one still gets through.
        await grpc_bidi._write_paced(fast, board.frames("fast", 3), window)
        fast_done = list(fast.written)
        board.gate("slow").set()
        await slow_task
        return fast_done, slow.written, window._value

    fast_done, slow_written, places = _run(main())
    assert fast_done == [b"fast:0", b"fast:1", b"fast:2"]
    assert slow_written == [b"slow:0", b"slow:1", b"slow:2"]
    assert places == 1  # every place given back, none twice


def test_a_cancelled_stream_cancels_its_write_and_gives_its_place_back() -> None:
    async def main() -> tuple[int, int]:
        board = Board()
        window = asyncio.Semaphore(1)
        stuck = Stream(board, "stuck")
        task = asyncio.ensure_future(
            grpc_bidi._write_paced(stuck, board.frames("stuck", 3), window)
        )
        while board.pending < 1:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(5):
            await asyncio.sleep(0)
        return board.pending, window._value

    pending, places = _run(main())
    assert pending == 0  # the write was cancelled with it
    assert places == 1
