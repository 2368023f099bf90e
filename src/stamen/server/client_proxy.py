"""``ClientProxy``: the server's handle on one client node.

:class:`ClientProxy` has one primitive, :meth:`ClientProxy.send` (and
:meth:`ClientProxy.submit`, the same without saying what the server does with the reply),
which returns a future. A subclass implements either that primitive or Flower's blocking
methods (``get_properties``, ``get_parameters``, ``fit``, ``evaluate``, ``reconnect``);
each half is built on the other (see the class docstring).
:class:`RemoteClientProxy` is the one implementation for every network transport: it posts
the encoded instruction into the node's mailbox on the fleet event loop, and the reply
resolves the future. Nothing polls and no thread waits per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from abc import ABC
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any, TypeVar, cast

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
from ..wire import Payload, RefusedResult, encode_instruction_payload, with_refused_result

if TYPE_CHECKING:
    from .fleet.slots import ReceiveSlots

__all__ = [
    "ClientProxy",
    "Deliveries",
    "EncodeCache",
    "RemoteClientProxy",
    "expected_reply_type",
    "tracking",
]

_R = TypeVar("_R", bound=Reply)


def expected_reply_type(instruction: Instruction) -> type:
    """The reply class that answers ``instruction`` (:data:`stamen.messages.EXCHANGES`)."""
    return exchange_for(instruction).reply


_BLOCKING_METHODS: dict[type, str] = {
    GetPropertiesIns: "get_properties",
    GetParametersIns: "get_parameters",
    FitIns: "fit",
    EvaluateIns: "evaluate",
    ReconnectIns: "reconnect",
}
"""Flower's blocking method that answers each kind of instruction."""


def _overridden(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(ClientProxy, name)


def _resolve(future: Future[Reply], outcome: Reply | BaseException) -> None:
    """Complete ``future`` with ``outcome`` unless it is already done (a timeout won)."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass


class ClientProxy(ABC):
    """The server's handle on one client node.

    **The contract.** A subclass implements one of two halves, and gets the other:

    * the primitive :meth:`send` (or :meth:`submit`): send an instruction without
      blocking and return a future of the reply. Flower's blocking methods are then
      built on it (``fit(ins, timeout)`` is ``send(ins, timeout).result()``).
      :class:`RemoteClientProxy` (every network transport) and the simulation's
      ``VirtualClientProxy`` do so.
    * or Flower's blocking methods ``get_properties``, ``get_parameters``, ``fit``,
      ``evaluate`` and ``reconnect`` (each ``(ins, timeout, group_id) -> Res``), as
      Flower's ``ClientProxy`` subclasses do. :meth:`send` then runs the method that
      answers the instruction on a thread of its own, off the round's thread, so the
      clients of a round work at once; the future fails with
      :class:`~stamen.errors.Timeout` after ``timeout`` seconds even if the method has
      not returned (its late reply is dropped), with the method's exception if it
      raises, and with :class:`~stamen.errors.ProtocolError` for an instruction whose
      method the subclass does not implement or a reply of the wrong kind.
      ``group_id`` is None.

    A subclass that implements neither half cannot be instantiated (``TypeError``
    naming the methods), so the two halves never call each other in a loop.

    Attributes:
        cid: Unique id of the node within this server.
        properties: Free-form properties (Flower compatibility; the dict is made on first
            use, so that 100,000 simulated nodes do not hold 100,000 empty dicts).
    """

    __slots__ = ("__weakref__", "_properties", "cid")
    """Compact instances (a simulation registers one per virtual node); subclasses that
    declare no ``__slots__`` of their own get a ``__dict__`` as usual."""

    def __new__(cls, *args: Any, **kwargs: Any) -> ClientProxy:
        primitive = _overridden(cls, "send") or _overridden(cls, "submit")
        if not primitive and not any(_overridden(cls, m) for m in _BLOCKING_METHODS.values()):
            raise TypeError(
                f"Can't instantiate {cls.__name__}: a ClientProxy implements send() or "
                "submit() (returning a future of the reply), or Flower's blocking methods "
                "get_properties, get_parameters, fit, evaluate and reconnect"
            )
        return super().__new__(cls)

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self._properties: Properties | None = None

    @property
    def properties(self) -> Properties:
        """Free-form properties (Flower compatibility)."""
        if self._properties is None:
            self._properties = {}
        return self._properties

    @properties.setter
    def properties(self, value: Properties) -> None:
        self._properties = value

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        """Send ``ins`` without blocking; the future resolves to the reply.

        The future fails with :class:`~stamen.errors.Timeout` after ``timeout`` seconds,
        with :class:`~stamen.errors.ConnectionLost` if the node goes away, and with
        :class:`~stamen.errors.ProtocolError` on a reply of the wrong kind.

        This default is :meth:`send` with the reply kept until the round ends.
        """
        return self.send(ins, timeout, ReplyUse.KEPT)

    def send(self, ins: Instruction, timeout: float | None, replies: ReplyUse) -> Future[Reply]:
        """:meth:`submit`, saying what the server does with the reply (``replies``: kept
        until the round ends, or folded and dropped at once), which tells a proxy that
        receives large replies into memory of its own how long that memory is in use.

        This default calls the subclass's :meth:`submit` if it has one, and otherwise
        runs the subclass's blocking method for ``ins`` on a thread (see the class
        docstring); ``replies`` is not used.
        """
        if _overridden(type(self), "submit"):
            return self.submit(ins, timeout)
        return self._run_blocking(ins, timeout)

    def _run_blocking(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        future: Future[Reply] = Future()
        future.set_running_or_notify_cancel()
        name = _BLOCKING_METHODS.get(type(ins))
        if name is None or not _overridden(type(self), name):
            future.set_exception(
                ProtocolError(
                    f"client {self.cid}: {type(self).__name__} implements no "
                    f"{name or 'method'} for {type(ins).__name__}"
                )
            )
            return future
        expected = expected_reply_type(ins)
        method = getattr(self, name)

        def run() -> None:
            try:
                reply = method(ins, timeout, None)
            except BaseException as exc:  # reported on the future, like a network failure
                _resolve(future, exc)
                return
            if not isinstance(reply, expected):
                _resolve(
                    future,
                    ProtocolError(
                        f"client {self.cid}: {type(self).__name__}.{name} returned "
                        f"{type(reply).__name__}, expected {expected.__name__}"
                    ),
                )
                return
            _resolve(future, cast(Reply, reply))

        if timeout is not None:
            error = Timeout(f"client {self.cid}: no reply to {type(ins).__name__} in {timeout:g} s")
            timer = threading.Timer(timeout, _resolve, (future, error))
            timer.daemon = True
            timer.start()
            future.add_done_callback(lambda _: timer.cancel())
        threading.Thread(target=run, name=f"stamen-proxy-{self.cid}-{name}", daemon=True).start()
        return future

    def _call(self, ins: Instruction, timeout: float | None, expected: type[_R]) -> _R:
        reply = self.send(ins, timeout, ReplyUse.KEPT).result()
        if not isinstance(reply, expected):  # send already checks; keeps mypy honest
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

    def result_refused(self, server_round: int, reason: str) -> None:
        """The server refused this node's fit result of ``server_round`` for ``reason``.

        Called by the server after the round. This default does nothing: a proxy that can
        tell its node (:class:`RemoteClientProxy` towards a Stamen node) overrides it.
        """
        return None

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


def forget_encodings() -> None:
    """Drop the network proxies' encoding of the last instruction (and the model it
    holds): once every node has its instruction, only the server's own copy is needed."""
    _encode_cache.clear()


_batch = threading.local()
"""The posts of :func:`batched_posts` under way on this thread (``pending``)."""

_Post = tuple[asyncio.AbstractEventLoop, Callable[[], None], Callable[[], None]]


def _post(
    loop: asyncio.AbstractEventLoop, post: Callable[[], None], closed: Callable[[], None]
) -> None:
    """Run ``post`` on ``loop`` (``closed`` if the loop is closed), or queue it in the
    thread's :func:`batched_posts`."""
    pending: list[_Post] | None = getattr(_batch, "pending", None)
    if pending is not None:
        pending.append((loop, post, closed))
        return
    try:
        loop.call_soon_threadsafe(post)
    except RuntimeError:
        closed()


def _run_posts(loop: asyncio.AbstractEventLoop, posts: list[Callable[[], None]]) -> None:
    for post in posts:
        try:
            post()
        except Exception as exc:  # one node's post must not stop the others'
            loop.call_exception_handler({"message": "posting a task failed", "exception": exc})


@contextlib.contextmanager
def batched_posts() -> Iterator[None]:
    """Within it, :meth:`RemoteClientProxy.send` on this thread posts its tasks to the
    fleet loop in one wake-up per loop, at the end, in order, instead of one each: a
    round of 1,000 nodes wakes the loop once, not 1,000 times."""
    pending: list[_Post] = []
    _batch.pending = pending
    try:
        yield
    finally:
        _batch.pending = None
        by_loop: dict[asyncio.AbstractEventLoop, list[_Post]] = {}
        for entry in pending:
            by_loop.setdefault(entry[0], []).append(entry)
        for loop, entries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_run_posts, loop, [post for _, post, _ in entries])
            except RuntimeError:
                for _, _, closed in entries:
                    closed()


HOLD_PATIENCE = 10.0
"""Seconds at most that a round holds its receive slots (:meth:`Deliveries.hold_of`)
waiting for every node to have its instruction: as long as a reply waits for its turn
before it is let in regardless (``ReceiveSlots``' patience)."""


class Deliveries:
    """Says once (``on_all``, from any thread) when every instruction of a round is with
    its node or has ended, and some node is still working on one: then only the
    server's own copy of the model is needed for the rest of the round.

    :meth:`RemoteClientProxy.send` within :func:`tracking` tracks each instruction it
    posts: its task's :meth:`~stamen.protocol.mailbox.Task.sent` (a stream's) or
    :meth:`~stamen.protocol.mailbox.Task.delivered` (a pull-based node's, which may ask
    for a frame again, so its task keeps the encoding, reading the model where it lies)
    and its end.
    Other proxies track nothing, so the round's :meth:`seal` says how many instructions
    it sent, and nothing is said unless every one was tracked.

    With ``hold``, the receive slots of the round's proxies are held meanwhile: at most
    ``hold`` large replies are let in in their turn until the round has done what it
    does once every node has its instruction (put the old model on disk) and calls
    :meth:`release_hold`.
    """

    def __init__(self, on_all: Callable[[], None], hold: int | None = None) -> None:
        self._lock = threading.Lock()
        self._on_all: Callable[[], None] | None = on_all
        self._tracked = 0
        self._open = 0  # neither with its node nor ended
        self._working = 0  # with its node, not ended
        self._expected: int | None = None
        self._hold = hold
        self._held: dict[ReceiveSlots, asyncio.AbstractEventLoop] = {}

    def hold_of(
        self, loop: asyncio.AbstractEventLoop, slots: ReceiveSlots | None
    ) -> Callable[[], None] | None:
        """With ``hold``: what holds ``slots`` (to run on ``loop``, before the first of the
        round's instructions that use them is posted): at most ``hold`` replies are let
        in in their turn until :meth:`release_hold`, or for :data:`HOLD_PATIENCE`
        seconds. None: nothing to hold, or held already."""
        if self._hold is None or slots is None:  # most rounds: no lock to take
            return None
        with self._lock:
            if self._hold is None or slots in self._held:  # released, or held
                return None
            self._held[slots] = loop
            ordered = self._hold
        return lambda: slots.hold(ordered, HOLD_PATIENCE)

    def release_hold(self) -> None:
        """Open every receive slot held for the round (from any thread; once)."""
        with self._lock:
            self._hold = None
            held, self._held = self._held, {}
        for slots, loop in held.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: the server has stopped
                loop.call_soon_threadsafe(slots.open)

    def track(self) -> tuple[Callable[[], None], Callable[[], None]]:
        """Count one more instruction; returns the functions that say it is with its
        node and that it has ended (each counts once, in either order)."""
        with self._lock:
            self._tracked += 1
            self._open += 1
        state = ["open"]

        def sent() -> None:
            with self._lock:
                if state[0] != "open":
                    return
                state[0] = "sent"
                self._open -= 1
                self._working += 1
            self._check()

        def ended() -> None:
            with self._lock:
                if state[0] == "open":
                    self._open -= 1
                elif state[0] == "sent":
                    self._working -= 1
                state[0] = "ended"
            self._check()  # the last one not with its node may have failed

        return sent, ended

    def seal(self, expected: int) -> None:
        """The round sent ``expected`` instructions in all: no more will be tracked."""
        with self._lock:
            self._expected = expected
        self._check()

    def _check(self) -> None:
        with self._lock:
            ready = self._open == 0 and self._working > 0 and self._expected == self._tracked
            on_all = self._on_all if ready else None
            if on_all is not None:
                self._on_all = None
        if on_all is not None:
            on_all()


@contextlib.contextmanager
def tracking(deliveries: Deliveries) -> Iterator[None]:
    """Within it, :meth:`RemoteClientProxy.send` on this thread tracks the delivery of
    each instruction it posts in ``deliveries``."""
    _batch.deliveries = deliveries
    try:
        yield
    finally:
        _batch.deliveries = None


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
        self._refused: RefusedResult | None = None
        self._refused_untold = False
        self._refused_lock = threading.Lock()

    def result_refused(self, server_round: int, reason: str) -> None:
        """Tell a Stamen node (``frames=True``) why its result was refused: with the next
        instruction sent to it, and again with the ``ReconnectIns`` that ends the run
        (field ``17`` of ``ServerMessage``, docs/protocol.md). A Flower node is told
        nothing."""
        if not self._frames:
            return
        with self._refused_lock:
            self._refused = RefusedResult(server_round, reason)
            self._refused_untold = True

    def _with_notice(self, ins: Instruction, payload: Payload) -> Payload:
        """``payload`` for this node: followed by the refusal notice when it is due."""
        with self._refused_lock:
            refused = self._refused
            if refused is None or not (self._refused_untold or isinstance(ins, ReconnectIns)):
                return payload
            self._refused_untold = False
        return with_refused_result(payload, refused)

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
        deliveries: Deliveries | None = getattr(_batch, "deliveries", None)
        delivered = hold = None
        if deliveries is not None:
            delivered, ended = deliveries.track()
            future.add_done_callback(lambda _: ended())
            hold = deliveries.hold_of(self._loop, self._slots)
        payload = self._with_notice(ins, _encode_cache.encode(ins))
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
            if hold is not None:
                hold()
            if self._slots is not None:
                self._slots.begin(seq)
            task_id = self.mailbox.post(
                ins, payload, on_done, seq, replies=replies, on_sent=delivered
            )
            if timeout is not None and not future.done():
                self._loop.call_later(
                    timeout,
                    self.mailbox.fail,
                    task_id,
                    Timeout(
                        f"node {self.cid}: no reply to {type(ins).__name__} within {timeout:g} s"
                    ),
                )

        def closed() -> None:  # the loop is closed: the server is shutting down
            future.set_exception(ConnectionLost(f"node {self.cid}: server is shutting down"))

        _post(self._loop, post, closed)
        return future
