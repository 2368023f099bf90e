"""The async shell of the receive slots: waits for :class:`~stamen.protocol.slots.SlotLedger`.

The ledger decides who is let in (see its module for why replies are received one at a
time, in instruction order); this shell makes a reply's receiver wait until it is.
Waiting costs the node nothing: its sender is held by flow control (grpc-bidi) or by its
pending request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ...clock import SystemClock
from ...protocol.clock import Clock
from ...protocol.slots import Admission, SlotLedger

__all__ = ["ReceiveSlots"]

logger = logging.getLogger(__name__)


class ReceiveSlots:
    """Receive slots handed out in instruction order, waited for on the event loop.

    Args:
        size: Replies received at once.
        patience: Seconds after which a waiting reply is let in regardless.
        clock: Where the waits' time comes from.
    """

    def __init__(self, size: int, patience: float = 10.0, clock: Clock | None = None) -> None:
        self.ledger = SlotLedger(size, patience)
        self._clock = clock or SystemClock()
        self._changed = asyncio.Event()
        self._moved = self._clock.monotonic()
        """When :attr:`SlotLedger.head` last moved: a reply's patience runs from then at
        the earliest (replies that keep coming in turn are progress; only a stall lets a
        reply in out of its turn)."""
        self._held_until = 0.0
        self._held_for = 0.0

    def hold(self, ordered: int, seconds: float) -> None:
        """Let at most ``ordered`` more replies in in their turn until :meth:`open`, or
        for ``seconds`` at most (:meth:`SlotLedger.hold`)."""
        self.ledger.hold(ordered)
        self._held_for = seconds
        self._held_until = self._clock.monotonic() + seconds

    def open(self) -> None:
        """End a :meth:`hold` (nothing if none)."""
        if self.ledger.held:
            self.ledger.open()
            self._notify()

    def _hold_left(self) -> float | None:
        """Seconds the hold may last yet; it ends here once they have passed."""
        if not self.ledger.held:
            return None
        left = self._held_until - self._clock.monotonic()
        if left <= 0:
            logger.info(
                "receive slots held for %g s (the round's nodes did not all have their "
                "instruction yet): letting replies in with the old model still in memory",
                self._held_for,
            )
            self.open()
            return None
        return left

    @property
    def free(self) -> int:
        """Slots not in use (below 0 while late replies hold more than ``size``)."""
        return self.ledger.free

    @property
    def late(self) -> int:
        """Replies let in because they had waited ``patience`` seconds."""
        return self.ledger.late

    def begin(self, seq: int) -> None:
        """Instruction ``seq`` was sent and has not ended yet."""
        self.ledger.begin(seq)

    def end(self, seq: int) -> None:
        """Instruction ``seq`` ended (its reply arrived, or it failed)."""
        head = self.ledger.head
        self.ledger.end(seq)
        if self.ledger.head != head:
            self._moved = self._clock.monotonic()
        self._notify()

    def release(self, admission: Admission = Admission.ORDERED) -> None:
        """Give back the slot a reply was let in on."""
        self.ledger.release(admission)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def acquire(self, seq: int) -> Admission:
        """Wait for a slot and for the turn of instruction ``seq`` (cancellable); how it
        was let in (give it back with :meth:`release`). Its patience runs from its
        arrival or from the last move of the ledger's head, whichever came later."""
        arrived = self._clock.monotonic()
        while True:
            hold_left = self._hold_left()
            since = max(arrived, self._moved)
            admission = self.ledger.admit(seq, self._clock.monotonic() - since)
            if admission is not None:
                return admission
            changed = self._changed
            patience_left = since + self.ledger.patience - self._clock.monotonic()
            waits = [w for w in (patience_left, hold_left) if w is not None and w > 0]
            if not waits:  # patient already: only a change of the ledger lets it in
                await changed.wait()
                continue
            # asyncio.TimeoutError: not the builtin TimeoutError on Python 3.10
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(waits))
