"""``ClientProxy``: the server's handle on one client node.

The abstract :class:`ClientProxy` has one primitive, :meth:`ClientProxy.submit`, which
returns a future; Flower's blocking methods (``fit``, ``evaluate``, ...) are built on it.
:class:`RemoteClientProxy` is the one implementation for every network transport: it posts
the encoded instruction into the node's mailbox on the fleet event loop, and the reply
resolves the future. Nothing polls and no thread waits per client.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

from ..errors import ConnectionLost, MessageTooLarge, ProtocolError, Timeout
from ..messages import (
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    ReconnectIns,
    Reply,
    exchange_for,
)
from ..protocol.mailbox import Mailbox, ReplyUse
from ..typing import Properties
from ..wire import Payload, encode_instruction_payload

if TYPE_CHECKING:
    from .fleet.slots import ReceiveSlots

__all__ = ["ClientProxy", "EncodeCache", "RemoteClientProxy", "expected_reply_type"]

_R = TypeVar("_R", bound=Reply)


def expected_reply_type(instruction: Instruction) -> type:
    """The reply class that answers ``instruction`` (:data:`stamen.messages.EXCHANGES`)."""
    return exchange_for(instruction).reply


class ClientProxy(ABC):
    """The server's handle on one client node.

    Attributes:
        cid: Unique id of the node within this server.
        properties: Free-form properties (Flower compatibility).
    """

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.properties: Properties = {}

    @abstractmethod
    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        """Send ``ins`` without blocking; the future resolves to the reply.

        The future fails with :class:`~stamen.errors.Timeout` after ``timeout`` seconds,
        with :class:`~stamen.errors.ConnectionLost` if the node goes away, and with
        :class:`~stamen.errors.ProtocolError` on a reply of the wrong kind.
        """

    def send(self, ins: Instruction, timeout: float | None, replies: ReplyUse) -> Future[Reply]:
        """:meth:`submit`, saying what the server does with the reply (``replies``: kept
        until the round ends, or folded and dropped at once), which tells a proxy that
        receives large replies into memory of its own how long that memory is in use.

        This default ignores ``replies`` and calls :meth:`submit`, so that a subclass
        need only implement :meth:`submit`.
        """
        return self.submit(ins, timeout)

    def _call(self, ins: Instruction, timeout: float | None, expected: type[_R]) -> _R:
        reply = self.submit(ins, timeout).result()
        if not isinstance(reply, expected):  # submit already checks; keeps mypy honest
            raise ProtocolError(f"expected {expected.__name__}, received {type(reply).__name__}")
        return reply

    def get_properties(
        self, ins: GetPropertiesIns, timeout: float | None, group_id: int | None = None
    ) -> GetPropertiesRes:
        """Ask the node for its properties (blocking)."""
        return self._call(ins, timeout, GetPropertiesRes)

    def get_parameters(
        self, ins: GetParametersIns, timeout: float | None, group_id: int | None = None
    ) -> GetParametersRes:
        """Ask the node for its parameters (blocking)."""
        return self._call(ins, timeout, GetParametersRes)

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None = None) -> FitRes:
        """Train on the node (blocking)."""
        return self._call(ins, timeout, FitRes)

    def evaluate(
        self, ins: EvaluateIns, timeout: float | None, group_id: int | None = None
    ) -> EvaluateRes:
        """Evaluate on the node (blocking)."""
        return self._call(ins, timeout, EvaluateRes)

    def reconnect(
        self, ins: ReconnectIns, timeout: float | None, group_id: int | None = None
    ) -> DisconnectRes:
        """Tell the node to leave, and come back after ``ins.seconds`` (blocking)."""
        return self._call(ins, timeout, DisconnectRes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cid={self.cid!r})"


class EncodeCache:
    """Remembers the encodings of the last ``size`` instruction objects, by identity.

    A strategy sends one ``FitIns`` object to every node it samples in a round: it is
    encoded once, for the network proxies (one cache in the process) and for a
    simulation's serializing proxies (one cache per run). An entry keeps its
    instruction's parameters alive, so the cache is small: the round's instruction is
    the one that matters.

    Args:
        size: Number of instructions remembered.
    """

    def __init__(self, size: int = 1) -> None:
        self._lock = threading.Lock()
        self._entries: list[tuple[Instruction, Payload]] = []
        self._size = size

    def encode(self, instruction: Instruction) -> Payload:
        """The wire encoding of ``instruction``, its tensors not copied.

        ``Payload.tobytes()`` joins it once and keeps the result for the next caller.
        """
        with self._lock:
            for cached, payload in self._entries:
                if cached is instruction:
                    return payload
        payload = encode_instruction_payload(instruction)
        with self._lock:
            self._entries.insert(0, (instruction, payload))
            del self._entries[self._size :]
        return payload

    def clear(self) -> None:
        """Forget every entry (and the models they hold)."""
        with self._lock:
            self._entries.clear()


_encode_cache = EncodeCache()
_sequence = itertools.count(1)  # next() is atomic under the GIL: instructions in submit order


class RemoteClientProxy(ClientProxy):
    """A node reached over the network, on any transport, through its mailbox."""

    def __init__(
        self,
        cid: str,
        mailbox: Mailbox,
        loop: asyncio.AbstractEventLoop,
        *,
        max_message_length: int,
        frames: bool = True,
        slots: ReceiveSlots | None = None,
    ) -> None:
        super().__init__(cid)
        self.mailbox = mailbox
        self._loop = loop
        self._max_message_length = max_message_length
        self._frames = frames
        self._slots = slots

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        """Encode ``ins`` here, post it on the fleet loop, return the reply's future (the
        reply is kept until the round ends: see :meth:`send`)."""
        return self.send(ins, timeout, ReplyUse.KEPT)

    def send(self, ins: Instruction, timeout: float | None, replies: ReplyUse) -> Future[Reply]:
        """:meth:`submit`; ``replies`` goes with the task to the fleet, which gives a
        large reply's receive slot back as ``replies`` says."""
        future: Future[Reply] = Future()
        future.set_running_or_notify_cancel()
        expected = expected_reply_type(ins)
        seq = next(_sequence)
        payload = _encode_cache.encode(ins)
        if not self._frames and len(payload) > self._max_message_length:
            future.set_exception(
                MessageTooLarge(
                    f"{type(ins).__name__} for node {self.cid} is {len(payload)} bytes, over "
                    f"grpc_max_message_length={self._max_message_length}, and the node "
                    "cannot receive it in frames (a Flower node)"
                )
            )
            return future

        def on_done(outcome: Reply | BaseException) -> None:
            if self._slots is not None:
                self._slots.end(seq)
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            elif not isinstance(outcome, expected):
                future.set_exception(
                    ProtocolError(
                        f"node {self.cid}: expected {expected.__name__} in reply to "
                        f"{type(ins).__name__}, received {type(outcome).__name__}"
                    )
                )
            else:
                future.set_result(outcome)

        def post() -> None:
            if self._slots is not None:
                self._slots.begin(seq)
            task_id = self.mailbox.post(ins, payload, on_done, seq, replies=replies)
            if timeout is not None and not future.done():
                self._loop.call_later(
                    timeout,
                    self.mailbox.fail,
                    task_id,
                    Timeout(
                        f"node {self.cid}: no reply to {type(ins).__name__} within {timeout:g} s"
                    ),
                )

        try:
            self._loop.call_soon_threadsafe(post)
        except RuntimeError:  # the loop is closed: the server is shutting down
            future.set_exception(ConnectionLost(f"node {self.cid}: server is shutting down"))
        return future
