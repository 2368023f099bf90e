"""Receive slots, sans-IO: how many large replies are received at once, and in which order.

A reply in frames is written into a buffer the size of the model while it arrives. When a
round's nodes all answer at once, receiving them all together would hold every node's
model in memory. The server folds fit results into the aggregate in the order its
instructions were sent (see ``run_instructions``), so the useful order to receive them is
that same order: :class:`SlotLedger` lets ``size`` replies in at a time, and lets a reply
in only when every instruction sent before its own has ended (replied, failed or timed
out), so that each received model is folded and freed before the next one arrives. A
reply that has waited ``patience`` seconds *while the round made no progress* (the
earliest unfinished instruction stayed the same) is let in regardless of order and of
free slots (a slow node, or replies the server holds on to, do not hold up the rest for
ever; the cost is memory, not progress). While replies come in one after the other (every
node answering at once, each reply taking a second to receive), none is let in out of
its turn however long the queue: one model at a time is what bounds the server's
memory. Replies let in late come on slots of its own (``max_late``): a long queue of
replies that all outwaited the patience (50 nodes answering together while each reply
takes a while to fold) goes through a few at a time, not all at once, and replies let in
late never take the slot of the reply whose turn it is (the folding waits for that one).

The ledger only decides; the server's shell (``stamen.server.fleet.slots``) waits, asking
again whenever :attr:`SlotLedger.changes` moves or the patience runs out. Time is the
caller's: ``admit`` is told how long the reply has waited since it arrived or since
:attr:`SlotLedger.head` last moved, whichever came later.

A round can also hold the ordered slots (:meth:`~SlotLedger.hold`): then only so many
more replies are let in in their turn until :meth:`~SlotLedger.open`. The server holds
them while its old global model is still in memory, waiting for the last node to have
it (the model then goes to disk, and its memory receives the replies): a reply received
meanwhile would be one model more at the peak.
"""

from __future__ import annotations

import heapq
from enum import Enum

__all__ = ["Admission", "SlotLedger"]


class Admission(Enum):
    """How a reply was let in, and so which slot its release gives back."""

    ORDERED = "in its turn, on one of the ``size`` slots"
    LATE = "after waiting ``patience`` seconds, on one of the ``max_late`` slots"


class SlotLedger:
    """Receive slots handed out in instruction order (see the module docstring).

    Args:
        size: Replies received at once in their turn.
        patience: Seconds after which a waiting reply may come in out of its turn.
        max_late: Slots of their own for such replies (default: ``size``): a long queue
            of patient replies (50 nodes answering together) goes through a few at a
            time, not all at once. Kept apart from the ordered slots, so replies let in
            late never keep out the reply whose turn it is, which the folding waits for.
    """

    def __init__(self, size: int, patience: float = 10.0, max_late: int | None = None) -> None:
        if size < 1:
            raise ValueError(f"ReceiveSlots: expected size >= 1, received {size}")
        self.patience = patience
        self.free = size
        """Ordered slots not in use."""
        self.late_free = size if max_late is None else max_late
        """Late slots not in use."""
        self.late = 0
        """Replies let in because they had waited ``patience`` seconds."""
        self.changes = 0
        """Counts every change that may let a waiting reply in."""
        self._unfinished: set[int] = set()
        self._order: list[int] = []
        self._held: int | None = None  # replies still let in in their turn before open()

    @property
    def held(self) -> bool:
        """Whether the ordered slots are held (see :meth:`hold`)."""
        return self._held is not None

    def hold(self, ordered: int) -> None:
        """Until :meth:`open`, let at most ``ordered`` more replies in in their turn
        (replies let in late are not held: they are for stalls, and go to disk)."""
        if ordered < 0:
            raise ValueError(f"SlotLedger.hold: expected ordered >= 0, received {ordered}")
        self._held = ordered

    def open(self) -> None:
        """End a :meth:`hold`: replies are let in in their turn as slots free."""
        if self._held is not None:
            self._held = None
            self.changes += 1

    def begin(self, seq: int) -> None:
        """Instruction ``seq`` was sent and has not ended yet."""
        self._unfinished.add(seq)
        heapq.heappush(self._order, seq)

    @property
    def head(self) -> int | None:
        """The earliest instruction that has not ended (None: every one has)."""
        return self._order[0] if self._order else None

    def end(self, seq: int) -> None:
        """Instruction ``seq`` ended (its reply arrived, or it failed)."""
        self._unfinished.discard(seq)
        while self._order and self._order[0] not in self._unfinished:
            heapq.heappop(self._order)
        self.changes += 1

    def admit(self, seq: int, waited: float) -> Admission | None:
        """Take a slot for the reply to instruction ``seq``, which has waited ``waited``
        seconds, if it may enter now: an ordered slot is free and every earlier
        instruction has ended (and the slots are not held: :meth:`hold`), or it has
        waited ``patience`` seconds and a late slot is free. None: not now."""
        first = self._order[0] if self._order else None
        if self.free > 0 and (first is None or first >= seq) and self._held != 0:
            self.free -= 1
            if self._held is not None:
                self._held -= 1
            return Admission.ORDERED
        if waited >= self.patience and self.late_free > 0:
            self.late += 1
            self.late_free -= 1
            return Admission.LATE
        return None

    def release(self, admission: Admission = Admission.ORDERED) -> None:
        """Give back the slot a reply was let in on."""
        if admission is Admission.LATE:
            self.late_free += 1
        else:
            self.free += 1
        self.changes += 1
