"""How many large replies the server receives at once, and in which order.

A reply in frames is written into a buffer the size of the model while it arrives. When a
round's nodes all answer at once, receiving them all together would hold every node's
model in memory; :class:`ReceiveSlots` lets ``size`` of them in at a time, and hands a
freed slot to the waiting reply whose instruction was sent first. The server folds fit
results in that same order (see ``run_instructions``), so each received model is folded
into the aggregate and freed before the next one is let in. Waiting costs the node
nothing: its sender is held by flow control (grpc-bidi) or by its pending request.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

__all__ = ["ReceiveSlots"]


class ReceiveSlots:
    """At most ``size`` holders at once; waiters are served lowest ``seq`` first."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"ReceiveSlots: expected size >= 1, received {size}")
        self._free = size
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()

    @property
    def waiting(self) -> int:
        """How many are waiting for a slot."""
        return sum(1 for _, _, f in self._waiters if not f.done())

    async def acquire(self, seq: int) -> None:
        """Wait for a slot (cancellable: a cancelled waiter takes no slot)."""
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._tiebreak), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was granted just as we were cancelled
            raise

    def release(self) -> None:
        """Give the slot to the first waiter, or back to the pool."""
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1
