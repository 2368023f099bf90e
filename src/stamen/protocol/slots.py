"""Receive slots, sans-IO: how many large replies are received at once, and in which order.

A reply in frames is written into a buffer the size of the model while it arrives. When a
round's nodes all answer at once, receiving them all together would hold every node's
model in memory. The server folds fit results into the aggregate in the order its
instructions were sent (see ``run_instructions``), so the useful order to receive them is
that same order: :class:`SlotLedger` lets ``size`` replies in at a time, and lets a reply
in only when every instruction sent before its own has ended (replied, failed or timed
out), so that each received model is folded and freed before the next one arrives. A
reply that has waited ``patience`` seconds is let in regardless of order and of free
slots (a slow node, or replies the server holds on to, do not hold up the rest for ever;
the cost is memory, not progress), but only ``max_late`` such replies at once: a long
queue of replies that all outwaited the patience (50 nodes answering together while each
reply takes a while to fold) goes through a few at a time, not all at once. The reply of
the first unfinished instruction always gets in: the folding waits for it, so replies let
in late that hold every slot must not keep it out.

The ledger only decides; the server's shell (``stamen.server.fleet.slots``) waits, asking
again whenever :attr:`SlotLedger.changes` moves or the patience runs out. Time is the
caller's: ``admit`` is told how long the reply has waited.
"""

from __future__ import annotations

import heapq

__all__ = ["SlotLedger"]


class SlotLedger:
    """Receive slots handed out in instruction order (see the module docstring).

    Args:
        size: Replies received at once.
        patience: Seconds after which a waiting reply is let in regardless of order and of
            free slots.
        max_late: Replies let in that way at once, beyond ``size`` (default: ``size``):
            a long queue of patient replies (50 nodes answering together) goes through
            ``size + max_late`` at a time, not all at once, so memory stays bounded.
    """

    def __init__(self, size: int, patience: float = 10.0, max_late: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"ReceiveSlots: expected size >= 1, received {size}")
        self.patience = patience
        self.max_late = size if max_late is None else max_late
        self.free = size
        """Slots not in use (below 0 while late replies hold more than ``size``)."""
        self.late = 0
        """Replies let in because they had waited ``patience`` seconds."""
        self.changes = 0
        """Counts every change that may let a waiting reply in."""
        self._unfinished: set[int] = set()
        self._order: list[int] = []

    def begin(self, seq: int) -> None:
        """Instruction ``seq`` was sent and has not ended yet."""
        self._unfinished.add(seq)
        heapq.heappush(self._order, seq)

    def end(self, seq: int) -> None:
        """Instruction ``seq`` ended (its reply arrived, or it failed)."""
        self._unfinished.discard(seq)
        while self._order and self._order[0] not in self._unfinished:
            heapq.heappop(self._order)
        self.changes += 1

    def admit(self, seq: int, waited: float) -> bool:
        """Take a slot for the reply to instruction ``seq``, which has waited ``waited``
        seconds, if it may enter now: a slot is free and every earlier instruction has
        ended, or it has waited ``patience`` seconds."""
        first = self._order[0] if self._order else None
        if self.free > 0 and (first is None or first >= seq):
            self.free -= 1
            return True
        if first == seq:
            # The first unfinished instruction's reply is what the folding waits for: if
            # replies let in late hold every slot, it still comes in (one more buffer),
            # or they would wait for it, and it for them, for ever.
            self.free -= 1
            return True
        if waited >= self.patience and self.free > -self.max_late:
            self.late += 1
            self.free -= 1  # may go below 0: released slots even it out
            return True
        return False

    def release(self) -> None:
        """Give a slot back."""
        self.free += 1
        self.changes += 1
