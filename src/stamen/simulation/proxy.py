"""``VirtualClientProxy``: the server's handle on a client node that lives in a simulation.

A virtual node is a :class:`~stamen.context.Context` (node id, ``partition-id`` and
``num-partitions`` in ``node_config``, the ``state`` that persists across rounds), nothing
more. For each instruction the proxy hands a :class:`VirtualCall` to a backend, which runs
:func:`run_virtual_call` -- :func:`stamen.client.dispatch.handle`, the one function through
which every transport reaches user code -- so ``client_fn`` builds a fresh client for the
call and drops it afterwards: memory does not grow with the number of virtual nodes.

With ``serialize=True`` the instruction is encoded by the proxy and decoded by the
backend, and the reply the other way round, with the wire codec of the network
transports: whatever could not travel over the network fails here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from ..client.dispatch import ClientFn, handle
from ..context import Context, RecordSet
from ..errors import ClientAppError, ConnectionLost, DecodeError, ProtocolError, StamenError
from ..messages import EXCHANGES, DisconnectRes, Instruction, ReconnectIns, Reply
from ..server.client_proxy import ClientProxy, EncodeCache, expected_reply_type
from ..typing import UserConfig, UserConfigValue
from ..wire import decode_instruction, decode_reply, encode_instruction, encode_reply

if TYPE_CHECKING:
    from .backends import Backend

__all__ = [
    "NUM_PARTITIONS_KEY",
    "PARTITION_ID_KEY",
    "CallResult",
    "EncodeCache",
    "PartitionConfig",
    "VirtualCall",
    "VirtualClientProxy",
    "named_error",
    "run_virtual_call",
    "stage_of",
]

PARTITION_ID_KEY = "partition-id"
"""Key of the node's partition index in ``Context.node_config`` (as in Flower)."""

NUM_PARTITIONS_KEY = "num-partitions"
"""Key of the number of partitions (virtual nodes) in ``Context.node_config``."""

_EMPTY = RecordSet()
"""What a fresh context's state equals (compared with, never handed out)."""

CallResult: TypeAlias = tuple[Reply | bytes, RecordSet]
"""What a backend returns for a call: the reply (encoded if serialized) and the state."""


def stage_of(instruction: Instruction) -> str:
    """The client method that handles ``instruction`` (``"fit"``, ``"evaluate"``, ...)."""
    exchange = EXCHANGES.get(type(instruction))
    method = None if exchange is None else exchange.method
    return type(instruction).__name__ if method is None else method


@dataclass(frozen=True, slots=True)
class VirtualCall:
    """One instruction for one virtual node: the unit of work of a backend.

    Attributes:
        cid: The node's cid, for error messages.
        stage: The client method that will handle the instruction, for error messages.
        client_fn: Builds the node's client (``client_fn(context)``).
        context: The node's context; its ``state`` is what persists between calls.
        instruction: The instruction, or its wire encoding when serializing.
    """

    cid: str
    stage: str
    client_fn: ClientFn
    context: Context
    instruction: Instruction | bytes


def run_virtual_call(
    client_fn: ClientFn, context: Context, instruction: Instruction | bytes
) -> CallResult:
    """Run one instruction on a freshly built client: what a backend executes.

    An encoded instruction is decoded first and the reply encoded, as a network node does.
    Errors of user code never escape: :func:`~stamen.client.dispatch.handle` turns them
    into a ``CLIENT_ERROR`` reply.

    Returns:
        The reply (encoded if the instruction was) and ``context.state``, which a backend
        running in another process sends back to the proxy.

    Raises:
        DecodeError: ``instruction`` is bytes that are not a valid instruction.
    """
    if isinstance(instruction, bytes):
        reply = handle(client_fn, context, decode_instruction(instruction))
        return encode_reply(reply), context.state
    return handle(client_fn, context, instruction), context.state


class PartitionConfig(Mapping[str, UserConfigValue]):
    """``{"partition-id": str(index), "num-partitions": str(count)}``, built when read:
    the ``node_config`` of a node of ``start_simulation``, two ints instead of a dict and
    two strings per registered node."""

    __slots__ = ("_count", "_index")

    def __init__(self, index: int, count: int) -> None:
        self._index, self._count = index, count

    def __getitem__(self, key: str) -> UserConfigValue:
        if key == PARTITION_ID_KEY:
            return str(self._index)
        if key == NUM_PARTITIONS_KEY:
            return str(self._count)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter((PARTITION_ID_KEY, NUM_PARTITIONS_KEY))

    def __len__(self) -> int:
        return 2


class VirtualClientProxy(ClientProxy):
    """A simulated client node, run by a backend in this process or on a Ray cluster.

    A registered node costs only this object (slotted, with its cid and node id): the
    :class:`~stamen.context.Context` is created at the node's first instruction and kept
    while its ``state`` holds records (a context whose state is empty after a call is
    dropped and made afresh for the next one: nothing is lost), and the client object is
    not kept. ``ReconnectIns`` (the end of the run) is answered with
    ``DisconnectRes(reason="ACK")`` without calling user code.

    Args:
        cid: The node's id within the server.
        client_fn: ``client_fn(context) -> Client``, already normalized
            (:func:`stamen.client.dispatch.normalize_client_fn`).
        backend: Runs the calls (a :class:`~stamen.simulation.Backend`).
        node_id: ``Context.node_id``.
        node_config: ``Context.node_config`` (``partition-id``, ``num-partitions``),
            copied into each context made.
        run_config: ``Context.run_config`` (None: empty), copied likewise.
        serialize: Round-trip every instruction and reply through the wire codec.
        encode_cache: Shared by the proxies of one run, so that an instruction sent to
            many nodes is encoded once (only with ``serialize``).
    """

    __slots__ = (
        "_backend",
        "_client_fn",
        "_context",
        "_encode_cache",
        "_run_config",
        "node_config",
        "node_id",
        "serialize",
    )

    def __init__(
        self,
        cid: str,
        *,
        client_fn: ClientFn,
        backend: Backend,
        node_id: int,
        node_config: Mapping[str, UserConfigValue],
        run_config: UserConfig | None = None,
        serialize: bool = False,
        encode_cache: EncodeCache | None = None,
    ) -> None:
        super().__init__(cid)
        self.node_id = node_id
        self.node_config = node_config
        self.serialize = serialize
        self._client_fn = client_fn
        self._backend = backend
        self._run_config = run_config
        self._encode_cache = encode_cache
        self._context: Context | None = None

    @property
    def context(self) -> Context:
        """The node's context (created on first use; its ``state`` persists)."""
        if self._context is None:
            self._context = Context(
                node_id=self.node_id,
                node_config=dict(self.node_config),
                state=RecordSet(),
                run_config=dict(self._run_config or {}),
            )
        return self._context

    def _keep(self, state: RecordSet) -> None:
        """Keep the node's state after a call; drop a context a fresh one would equal."""
        context = self.context
        context.state = state  # a copy when the call ran in another process
        fresh = (
            state == _EMPTY
            and context.node_config == dict(self.node_config)
            and context.run_config == dict(self._run_config or {})
        )
        if fresh:
            self._context = None

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        """Run ``ins`` on the backend; the future resolves to the reply.

        The future fails with :class:`~stamen.errors.Timeout` when the call runs longer
        than ``timeout`` seconds (counted from when the backend starts it), with
        :class:`~stamen.errors.ConnectionLost` when the backend loses the call (a Ray
        worker died, the simulation is shutting down), and with
        :class:`~stamen.errors.ProtocolError` when a serialized message does not decode.
        """
        if isinstance(ins, ReconnectIns):
            return _ACKNOWLEDGED  # the end of the run: nothing to do for a virtual node
        future: Future[Reply] = Future()
        future.set_running_or_notify_cancel()
        stage = stage_of(ins)
        try:
            expected = expected_reply_type(ins)
            payload: Instruction | bytes = ins
            if self.serialize:
                cache = self._encode_cache
                payload = (
                    cache.encode(ins).tobytes() if cache is not None else encode_instruction(ins)
                )
            call = VirtualCall(self.cid, stage, self._client_fn, self.context, payload)
            inner = self._backend.submit(call, timeout)
        except RuntimeError as exc:  # the backend is closed
            future.set_exception(ConnectionLost(f"virtual client {self.cid}, {stage}: {exc}"))
            return future
        except StamenError as exc:
            future.set_exception(named_error(self.cid, stage, exc))
            return future

        def complete(done: Future[CallResult]) -> None:
            try:
                out, state = done.result()
                reply = decode_reply(out) if isinstance(out, bytes) else out
            except CancelledError:
                future.set_exception(
                    ConnectionLost(f"virtual client {self.cid}: {stage} was cancelled")
                )
                return
            except DecodeError as exc:
                future.set_exception(named_error(self.cid, stage, exc))
                return
            except BaseException as exc:  # the backend's verdict, already named
                future.set_exception(exc)
                return
            if not isinstance(reply, expected):
                future.set_exception(
                    ProtocolError(
                        f"virtual client {self.cid}: expected {expected.__name__} in reply to "
                        f"{type(ins).__name__}, received {type(reply).__name__}"
                    )
                )
                return
            self._keep(state)
            future.set_result(reply)

        inner.add_done_callback(complete)
        return future


def _acknowledged() -> Future[Reply]:
    future: Future[Reply] = Future()
    future.set_running_or_notify_cancel()
    future.set_result(DisconnectRes(reason="ACK"))
    return future


# One completed, immutable future answers every ReconnectIns: ending a run of 10,000
# virtual nodes then costs no future per node.
_ACKNOWLEDGED = _acknowledged()


def named_error(cid: str, stage: str, exc: BaseException) -> BaseException:
    """``exc`` as an error whose message names the virtual client and the stage.

    A Stamen error keeps its type; anything else (what escapes
    :func:`~stamen.client.dispatch.handle`, such as a ``SystemExit`` raised by user code)
    becomes a :class:`~stamen.errors.ClientAppError`. The original is the ``__cause__``.
    """
    message = f"virtual client {cid}, {stage}: {exc}"
    named: BaseException
    if isinstance(exc, StamenError):
        try:
            named = type(exc)(message)
        except TypeError:  # an exception type with another constructor
            return exc
    else:
        named = ClientAppError(f"virtual client {cid}, {stage}: {type(exc).__name__}: {exc}")
    named.__cause__ = exc
    return named
