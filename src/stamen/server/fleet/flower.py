"""The async shell of Flower 1.12's Fleet API: Flower nodes beside Stamen's, in one fleet.

:class:`FlowerFleet` decodes a request (``wire.flower_codec``), checks Flower's node
authentication, hands it to the sans-IO :class:`~stamen.protocol.flower_server.FlowerLink`
over the fleet's own :class:`~stamen.protocol.fleet_server.FleetState`, and carries out
the step: encode the response, or long-poll for the node's next task and send it as a
TaskIns. The gRPC servicer (:mod:`.flower_grpc`) and the REST routes (:mod:`.rest`) are
thin adapters over :meth:`FlowerFleet.handle`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping

from ...errors import AuthError, ConfigError, ConnectionLost, DecodeError, MessageTooLarge
from ...protocol.fleet import ErrorKind, FleetError
from ...protocol.fleet_server import AwaitTask, Caller, NodeRecord
from ...protocol.flower_fleet import (
    CreateNodeResponse,
    DeleteNodeResponse,
    GetRunResponse,
    PingResponse,
    PullTaskInsResponse,
    PushTaskResResponse,
    ReconnectTask,
)
from ...protocol.flower_server import FlowerLink, FlowerRespond, FlowerResponse
from ...protocol.mailbox import Task
from ...protocol.record_limits import RecordLimits, check_push_task_res, push_task_res_node_id
from ...wire import FlowerCall
from ...wire import flower_codec as codec
from .auth import FlowerAuthenticator
from .handler import DECODE_OFF_LOOP, Fleet, reply_limits

__all__ = ["FlowerFleet", "Metadata"]

logger = logging.getLogger("stamen.server")

Metadata = tuple[tuple[str, str], ...]
"""Response metadata (gRPC initial metadata) to send with an answer."""

_DECODERS: dict[FlowerCall, Callable[[bytes], object]] = {
    FlowerCall.CREATE_NODE: codec.decode_create_node_request,
    FlowerCall.DELETE_NODE: codec.decode_delete_node_request,
    FlowerCall.PING: codec.decode_ping_request,
    FlowerCall.PULL_TASK_INS: codec.decode_pull_task_ins_request,
    FlowerCall.PUSH_TASK_RES: codec.decode_push_task_res_request,
    FlowerCall.GET_RUN: codec.decode_get_run_request,
    FlowerCall.GET_FAB: codec.decode_get_fab_request,
}


def _checked_push(body: bytes, limits: RecordLimits) -> object:
    """Decode a PushTaskResRequest once its records are counted within ``limits``."""
    check_push_task_res(body, limits)
    return codec.decode_push_task_res_request(body)


def _encode(response: FlowerResponse) -> bytes:
    if isinstance(response, CreateNodeResponse):
        return codec.encode_create_node_response(response)
    if isinstance(response, DeleteNodeResponse):
        return codec.encode_delete_node_response(response)
    if isinstance(response, PingResponse):
        return codec.encode_ping_response(response)
    if isinstance(response, PushTaskResResponse):
        return codec.encode_push_task_res_response(response)
    assert isinstance(response, GetRunResponse)
    return codec.encode_get_run_response(response)


class FlowerFleet:
    """Flower 1.12's Fleet API on the same :class:`Fleet` as Stamen's nodes.

    Args:
        fleet: The fleet (its state, client manager and event loop).
        authenticator: Flower's node authentication (grpc-rere); None: nodes are not
            authenticated. With node authentication on, requests that cannot carry it
            (Flower 1.12's REST node) are refused.
        wall: The wall clock (seconds since the epoch) that TaskIns ``created_at`` reads.
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        authenticator: FlowerAuthenticator | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.link = FlowerLink(fleet.state)
        self.authenticator = authenticator
        self._wall = wall

    def precheck(self, call: FlowerCall, transport: str, headers: Mapping[str, str]) -> None:
        """Refuse, before its body is read, a request that cannot be authenticated: any
        with node authentication on but Flower's scheme off or not possible (REST), one
        naming no authorized key.

        Raises:
            FleetError: UNAUTHENTICATED, saying why.
        """
        if self.authenticator is None and self.fleet.authenticator is None:
            return
        if self.authenticator is None or transport != "grpc-rere":
            raise FleetError(
                ErrorKind.UNAUTHENTICATED,
                "node authentication is on and Flower 1.12 nodes authenticate on grpc-rere "
                f"only: {transport} requests of Flower's Fleet API are refused",
            )
        try:
            self.authenticator.precheck(headers)
        except AuthError as exc:
            logger.warning("refused a Flower request to %s: %s", call.method_name, exc)
            raise FleetError(ErrorKind.UNAUTHENTICATED, str(exc)) from exc

    def _authenticate(
        self, call: FlowerCall, body: bytes, transport: str, headers: Mapping[str, str]
    ) -> tuple[str | None, Metadata]:
        if self.authenticator is None and self.fleet.authenticator is None:
            return None, ()
        if self.authenticator is None or transport != "grpc-rere":
            raise FleetError(
                ErrorKind.UNAUTHENTICATED,
                "node authentication is on and Flower 1.12 nodes authenticate on grpc-rere "
                f"only: {transport} requests of Flower's Fleet API are refused",
            )
        try:
            return self.authenticator.verify(
                call is FlowerCall.CREATE_NODE,
                body,
                lambda: codec.deterministic_request(call.method_name, body),
                headers,
            )
        except AuthError as exc:
            logger.warning("refused a Flower request to %s: %s", call.method_name, exc)
            raise FleetError(ErrorKind.UNAUTHENTICATED, str(exc)) from exc

    async def handle(
        self,
        call: FlowerCall,
        body: bytes,
        transport: str,
        peer: str,
        *,
        headers: Mapping[str, str],
    ) -> tuple[bytes, Metadata]:
        """Serve one request of Flower's Fleet API; return the response body and the
        metadata to send with it.

        Raises:
            FleetError: the request is refused; the adapter maps its kind to a status.
        """
        if self.fleet.closing:
            raise FleetError(ErrorKind.UNAVAILABLE, "server is shutting down")
        limit = self.fleet.max_message_length
        if len(body) > limit:
            raise FleetError(
                ErrorKind.TOO_LARGE,
                f"request of {len(body)} bytes is over the server's max message length {limit}",
            )
        decode = _DECODERS[call]
        if call is FlowerCall.PUSH_TASK_RES:  # its records are counted before they are built
            decode = functools.partial(_checked_push, limits=self.record_limits(body))
        try:
            if len(body) > DECODE_OFF_LOOP:  # a TaskRes of many records: not on the loop
                loop = asyncio.get_running_loop()
                request = await loop.run_in_executor(None, decode, body)
            else:
                request = decode(body)
            key, metadata = self._authenticate(call, body, transport, headers)
        except DecodeError as exc:
            raise FleetError.from_decode(exc) from exc
        if call is FlowerCall.CREATE_NODE:
            self.fleet.admit_registration(peer)
        step = self.link.request(call.name, request, Caller(transport, peer, key))
        if isinstance(step, FlowerRespond):
            return _encode(step.response), metadata
        return await self._long_poll(step), metadata

    def record_limits(self, body: bytes) -> RecordLimits:
        """What the PushTaskResRequest ``body`` may hold: as many arrays as a reply to the
        pushing node's task in flight may have tensors (:func:`.handler.reply_limits`: the
        model's tensor count with slack), as many metrics and configs entries as a reply
        may have metrics; the defaults when the node or its task is unknown."""
        node = self.fleet.state.get(str(push_task_res_node_id(body)))
        tasks = () if node is None else tuple(node.flower_tasks)
        in_flight = [node.mailbox.in_flight(t) for t in tasks if node is not None]
        limits = [reply_limits(task.instruction) for task in in_flight if task is not None]
        if not limits:
            limits = [reply_limits(None)]
        return RecordLimits(
            max_arrays=max(limit.max_tensors for limit in limits),
            max_entries=max(limit.max_metrics for limit in limits),
        )

    async def _long_poll(self, step: AwaitTask) -> bytes:
        node = step.node
        deadline = asyncio.get_running_loop().time() + step.timeout
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    task = await asyncio.wait_for(self.fleet.next_task(node), max(left, 0.0))
                except asyncio.TimeoutError:  # not the builtin TimeoutError on Python 3.10
                    return codec.encode_pull_task_ins_response(PullTaskInsResponse())
                except ConnectionLost as exc:
                    raise FleetError(ErrorKind.UNKNOWN_NODE, str(exc)) from exc
                encoded = self._encode_task(node, task)
                if encoded is not None:
                    return encoded
        finally:
            self.fleet.state.poll_ended(node)

    def _encode_task(self, node: NodeRecord, task: Task) -> bytes | None:
        """The PullTaskInsResponse that carries ``task``; None if it cannot be sent (the
        task then fails: too large for one message, or no Flower form)."""
        try:
            outgoing = self.link.outgoing(node, task, self._wall())
            if isinstance(outgoing, ReconnectTask):
                data = codec.encode_reconnect_pull_response(outgoing)
            else:
                data = codec.encode_pull_task_ins_response(PullTaskInsResponse((outgoing,)))
        except (ConfigError, ValueError, TypeError) as exc:  # no form in Flower's Fleet API
            name = type(task.instruction).__name__
            logger.warning("node %s: cannot send %s: %s", node.cid, name, exc)
            self.link.fail(node, task.task_id, exc)
            return None
        if len(data) > node.max_message_length:
            self.link.fail(
                node,
                task.task_id,
                MessageTooLarge(
                    f"{type(task.instruction).__name__} for Flower node {node.cid} is "
                    f"{len(data)} bytes as a TaskIns, over grpc_max_message_length="
                    f"{node.max_message_length}; Flower's Fleet API has no frames"
                ),
            )
            return None
        return data
