"""The server's per-node mailbox (sans-IO, single-threaded).

The server posts instructions; the transport takes them in order and delivers the replies.
Every posted task ends exactly once through its ``on_done`` callback: with the reply, or
with the error that ended it (timeout, node gone). The mailbox is owned by one thread (the
server's fleet event loop); other threads reach it through that loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from ..errors import ConnectionLost
from ..messages import Instruction, Reply

__all__ = ["SENT", "Mailbox", "Payload", "ReplyUse", "Task"]

DoneCallback = Callable[[Reply | BaseException], None]


class ReplyUse(Enum):
    """What the server does with the replies to its instructions, and so when the memory
    of a large reply it received (in frames) stops counting against its receive slots."""

    KEPT = "kept in the round's results until the round ends: the slot comes back at once"
    FOLDED = (
        "folded into a running aggregate and dropped at once (streaming aggregation): the "
        "slot goes with the reply's memory, so received models cannot pile up ahead of "
        "the folding"
    )
    SPILLED = (
        "kept in the round's results, a large one written into a spill file as it arrives "
        "(a strategy that needs every result at once): the slot comes back once it is whole"
    )


Trailer = Callable[[Sequence[bytes | memoryview]], bytes]
"""What follows each message sent, computed from its buffers (a session's MAC)."""


class Payload(Protocol):
    """An encoded instruction as the transports send it (``stamen.wire.Payload``)."""

    def __len__(self) -> int:
        """Size of the whole message, in bytes."""
        ...

    def tobytes(self) -> bytes:
        """The whole message."""
        ...

    def frame_payload(self, offset: int, size: int) -> Payload:
        """The frame holding ``size`` bytes of the message from ``offset``, as a payload
        of views, joined once with the message that carries it."""
        ...

    def preceded_by(self, part: bytes) -> Payload:
        """A new payload: ``part``, then this one's buffers (not copied)."""
        ...

    def messages(
        self, size: int, frame: int | None = None, trailer: Trailer | None = None
    ) -> Iterator[bytes]:
        """The whole message if it fits in ``size`` bytes, else its frames of ``frame``
        bytes (at most ``size``; default ``size``), each followed by ``trailer(its
        parts)`` if given."""
        ...


class _Sent:
    """The payload of a task whose instruction the node has whole: nothing to send."""

    def __len__(self) -> int:
        return 0

    def tobytes(self) -> bytes:
        raise RuntimeError("the instruction was sent and its encoding let go")

    def frame_payload(self, offset: int, size: int) -> Payload:
        raise RuntimeError("the instruction was sent and its encoding let go")

    def preceded_by(self, part: bytes) -> Payload:
        raise RuntimeError("the instruction was sent and its encoding let go")

    def messages(
        self, size: int, frame: int | None = None, trailer: Trailer | None = None
    ) -> Iterator[bytes]:
        raise RuntimeError("the instruction was sent and its encoding let go")


SENT: Payload = _Sent()
"""What :meth:`Task.sent` leaves in place of the payload."""


@dataclass(slots=True)
class Task:
    """One instruction for a node and what to do when it ends."""

    task_id: int
    instruction: Instruction
    payload: Payload
    on_done: DoneCallback
    seq: int = 0
    """Order of the instruction among all the server sent (large replies are received in
    this order when they compete)."""
    replies: ReplyUse = ReplyUse.KEPT
    """What the server does with the reply (kept until the round ends, or folded and
    dropped at once): says when a large reply's receive slot comes back."""
    on_sent: Callable[[], None] | None = None
    """Called once the node has the whole instruction (:meth:`sent`, :meth:`delivered`)."""

    def sent(self) -> None:
        """The node has the whole instruction, and no transport will send it again (a
        stream's): its encoding is let go, so the model it holds is not kept alive by
        this task while the node works, and ``on_sent`` is told."""
        self.payload = SENT
        self.delivered()

    def delivered(self) -> None:
        """The node has been given the whole instruction but may ask for a frame of it
        again after a lost response (a pull-based node's): the encoding stays, and
        ``on_sent`` is told (once). The model's tensors are read through the encoding
        (:class:`~stamen.wire.frames.TensorPart`), so a model moved to disk meanwhile is
        sent from there."""
        on_sent, self.on_sent = self.on_sent, None
        if on_sent is not None:
            on_sent()


class Mailbox:
    """Pending and in-flight tasks of one node."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._pending: deque[Task] = deque()
        self._in_flight: dict[int, Task] = {}
        self._next_id = 1
        self._closed: BaseException | None = None
        self._wakeup: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        """True once the node is gone; posting then fails at once."""
        return self._closed is not None

    def set_wakeup(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` whenever a task is posted (the transport's waiter)."""
        self._wakeup = callback

    def post(
        self,
        instruction: Instruction,
        payload: Payload,
        on_done: DoneCallback,
        seq: int = 0,
        *,
        replies: ReplyUse = ReplyUse.KEPT,
        on_sent: Callable[[], None] | None = None,
    ) -> int:
        """Queue an instruction (``payload`` is its encoded form); return the task id."""
        task_id = self._next_id
        self._next_id += 1
        if self._closed is not None:
            on_done(self._closed)
            return task_id
        self._pending.append(Task(task_id, instruction, payload, on_done, seq, replies, on_sent))
        if self._wakeup is not None:
            self._wakeup()
        return task_id

    def take(self) -> Task | None:
        """Return the next task to deliver, or None.

        A node handles one instruction at a time, so a node that asks for work while a task
        is still in flight never got it (its response was lost with a broken connection):
        that task is delivered again. Otherwise the oldest pending task moves in flight.
        """
        if self._in_flight:
            return next(iter(self._in_flight.values()))
        if not self._pending:
            return None
        task = self._pending.popleft()
        self._in_flight[task.task_id] = task
        return task

    def in_flight(self, task_id: int) -> Task | None:
        """The in-flight task ``task_id``, or None if it is not (or no longer) in flight."""
        return self._in_flight.get(task_id)

    def deliver(self, task_id: int, reply: Reply) -> bool:
        """End an in-flight task with its reply; False if it had already ended (late reply)."""
        task = self._in_flight.pop(task_id, None)
        if task is None:
            return False
        task.on_done(reply)
        return True

    def fail(self, task_id: int, error: BaseException) -> bool:
        """End a pending or in-flight task with ``error``; False if it had already ended."""
        task = self._in_flight.pop(task_id, None)
        if task is None:
            for index, pending in enumerate(self._pending):
                if pending.task_id == task_id:
                    task = pending
                    del self._pending[index]
                    break
        if task is None:
            return False
        task.on_done(error)
        return True

    def close(self, error: BaseException | None = None) -> None:
        """The node is gone: end every task with ``error`` and refuse new ones."""
        if self._closed is not None:
            return
        self._closed = error or ConnectionLost(f"node {self.node_id} disconnected")
        tasks = [*self._in_flight.values(), *self._pending]
        self._in_flight.clear()
        self._pending.clear()
        for task in tasks:
            task.on_done(self._closed)

    def __repr__(self) -> str:
        return (
            f"Mailbox({self.node_id!r}, pending={len(self._pending)}, "
            f"in_flight={len(self._in_flight)}, closed={self.closed})"
        )
