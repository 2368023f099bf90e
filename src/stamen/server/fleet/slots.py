"""How many large replies the server receives at once, and in which order.

A reply in frames is written into a buffer the size of the model while it arrives. When a
round's nodes all answer at once, receiving them all together would hold every node's
model in memory. The server folds fit results into the aggregate in the order its
instructions were sent (see ``run_instructions``), so the useful order to receive them is
that same order: :class:`ReceiveSlots` lets ``size`` replies in at a time, and lets a
reply in only when every instruction sent before its own has ended (replied, failed or
timed out), so that each received model is folded and freed before the next one arrives.
A reply that has waited ``patience`` seconds is let in regardless of order and of free
slots (a slow node, or replies the server holds on to, do not hold up the rest for ever;
the cost is memory, not progress). Waiting costs the node
nothing: its sender is held by flow control (grpc-bidi) or by its pending request.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq

__all__ = ["ReceiveSlots"]


class ReceiveSlots:
    """Receive slots handed out in instruction order (see the module docstring)."""

    def __init__(self, size: int, patience: float = 10.0) -> None:
        if size < 1:
            raise ValueError(f"ReceiveSlots: expected size >= 1, received {size}")
        self._free = size
        self._patience = patience
        self._unfinished: set[int] = set()
        self._order: list[int] = []
        self._changed = asyncio.Event()
        self.late = 0
        """Replies let in because they had waited ``patience`` seconds."""

    @property
    def free(self) -> int:
        """Slots not in use (below 0 while late replies hold more than ``size``)."""
        return self._free

    def begin(self, seq: int) -> None:
        """Instruction ``seq`` was sent and has not ended yet."""
        self._unfinished.add(seq)
        heapq.heappush(self._order, seq)

    def end(self, seq: int) -> None:
        """Instruction ``seq`` ended (its reply arrived, or it failed)."""
        self._unfinished.discard(seq)
        while self._order and self._order[0] not in self._unfinished:
            heapq.heappop(self._order)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _first(self) -> int | None:
        return self._order[0] if self._order else None

    async def acquire(self, seq: int) -> None:
        """Wait for a slot and for the turn of instruction ``seq`` (cancellable)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._patience
        while True:
            first = self._first()
            late = loop.time() >= deadline
            if self._free > 0 and (first is None or first >= seq):
                self._free -= 1
                return
            if late:
                self.late += 1
                self._free -= 1  # may go below 0: released slots even it out
                return
            changed = self._changed
            remaining = deadline - loop.time()
            if remaining > 0:
                # asyncio.TimeoutError: not the builtin TimeoutError on Python 3.10
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)
            else:
                await changed.wait()

    def release(self) -> None:
        """Give the slot back."""
        self._free += 1
        self._notify()
