"""Many lightweight grpc-rere or rest nodes in one asyncio loop (E10k-rere, E10k-rest).

Each node is a coroutine over Stamen's sans-IO node state
(:class:`stamen.protocol.fleet_client.FleetClientState`) and the Fleet codecs: register,
long-poll, push the reply, long-poll again, until the server's ReconnectIns. Only the IO
differs between the transports, behind one ``call(verb, body, timeout) -> bytes``:

* grpc-rere: unary calls on ``grpc.aio`` channels, ``streams`` nodes per channel (one TCP
  connection multiplexes their calls, as for the grpc-bidi swarm);
* rest: one HTTP/1.1 keep-alive connection per node (h11 over asyncio streams), as a real
  node has: a long-poll holds its connection for up to the server's poll timeout, so
  nodes cannot share a few connections without queueing behind each other's polls.
  5,000 nodes per process need 5,000 descriptors: :func:`raise_descriptor_limit`.

A refused or failed call (rate limit, overload, a dropped connection) is sent again after
a random backoff (``RETRIES`` times at most), as a real node's retry policy does.
Heartbeats are not sent: a node is busy (not long-polling) only while it adds and pushes,
well under the server's heartbeat timeout.
"""

from __future__ import annotations

import asyncio
import collections
import random
import resource
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import h11
import numpy as np

from stamen.messages import (
    Code,
    DisconnectRes,
    FitIns,
    FitRes,
    Instruction,
    ReconnectIns,
    Reply,
    Status,
)
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.protocol.fleet_client import FleetClientState
from stamen.wire import (
    FRAMING,
    REST_CONTENT_TYPE,
    Verb,
    decode_server_message,
    encode_reply_payload,
)
from stamen.wire import fleet_codec as codec

RETRIES = 20
REQUEST_TIMEOUT = 60.0
CONNECTS_AT_ONCE = 256
"""Registrations in flight per process: 5,000 SYNs at once overflow the listen backlog
(the kernel drops them and the client resends 1 s, 3 s, ... later)."""

Call = Callable[[Verb, bytes, float], Awaitable[bytes]]


class Retry(Exception):
    """A call failed in a way sending it again may fix (overload, a dropped connection)."""


class Gone(Exception):
    """The server no longer knows the node (it closed its session) or no longer listens."""


def answer(k: int, instruction: Instruction) -> Reply:
    """Node ``k``'s reply: ``parameters + k`` with one example, or the end of the session."""
    if isinstance(instruction, ReconnectIns):
        return DisconnectRes(reason="ACK")
    if not isinstance(instruction, FitIns):
        raise RuntimeError(f"node {k}: unexpected {type(instruction).__name__}")
    offset = np.float32(k)
    arrays = [a + offset for a in parameters_to_ndarrays(instruction.parameters)]
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit of open files to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


class Counters:
    """What the swarm reports: retried calls, and nodes whose session ended cleanly."""

    def __init__(self) -> None:
        self.retries = 0
        self.ended = 0
        self.reasons: collections.Counter[str] = collections.Counter()


async def retried(call: Call, verb: Verb, body: bytes, timeout: float, counters: Counters) -> bytes:
    """``call`` until it succeeds, sent again after a :class:`Retry` (random backoff)."""
    for attempt in range(RETRIES + 1):
        try:
            return await call(verb, body, timeout)
        except Retry as exc:
            if attempt == RETRIES:
                raise RuntimeError(f"{verb.name} failed {RETRIES + 1} times: {exc}") from exc
            counters.retries += 1
            counters.reasons[f"{verb.name} {str(exc)[:80]}"] += 1
            await asyncio.sleep(random.uniform(0.5, 1.0) * min(2**attempt, 8))
    raise AssertionError("unreachable")


async def fleet_node(
    k: int, call: Call, gate: asyncio.Semaphore, counters: Counters, max_message: int
) -> None:
    """One node's whole session: register, then pull and answer until ReconnectIns."""
    state = FleetClientState(FRAMING, max_message)
    async with gate:
        body = codec.encode_create_node_request(state.create_request())
        response = await retried(call, Verb.CREATE_NODE, body, REQUEST_TIMEOUT, counters)
    state.registered(codec.decode_create_node_response(response))
    while True:
        state.start_receiving()
        whole = None
        while whole is None:
            body = codec.encode_pull_request(state.pull_request())
            try:
                data = await retried(call, Verb.PULL, body, state.pull_timeout, counters)
            except Gone:  # the server ended the run without this node's acknowledgement
                counters.ended += 1
                return
            whole = state.pulled(codec.decode_pull_response(data))
        instruction, _ = decode_server_message(whole)
        reply = answer(k, instruction)
        for push in state.push_requests(encode_reply_payload(reply)):
            body = codec.encode_push_request(push)
            await retried(call, Verb.PUSH, body, REQUEST_TIMEOUT, counters)
        state.replied()
        if isinstance(reply, DisconnectRes):  # the server closed the node on receiving it
            counters.ended += 1
            return


# --- grpc-rere ----------------------------------------------------------------------------

RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


class RereChannels:
    """Unary Fleet calls on a few shared ``grpc.aio`` channels."""

    def __init__(self, address: str, channels: int, options: list[tuple[str, Any]]) -> None:
        self._channels = [
            grpc.aio.insecure_channel(address, options=[*options, ("grpc.channel_id", i)])
            for i in range(channels)
        ]
        self._methods = [
            {verb: channel.unary_unary(verb.grpc_method) for verb in Verb}
            for channel in self._channels
        ]

    def caller(self, k: int) -> Call:
        """Node ``k``'s calls (on channel ``k mod channels``)."""
        methods = self._methods[k % len(self._methods)]

        async def call(verb: Verb, body: bytes, timeout: float) -> bytes:
            try:
                response: bytes = await methods[verb](body, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                if exc.code() == grpc.StatusCode.NOT_FOUND or "Connection refused" in details:
                    raise Gone(f"{verb.name}: {exc.code().name}: {details}") from exc
                if exc.code() in RETRY_CODES:
                    raise Retry(f"{exc.code().name}: {exc.details()}") from exc
                raise RuntimeError(f"{verb.name}: {exc.code().name}: {exc.details()}") from exc
            return response

        return call

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels:
            await channel.close()


# --- rest ---------------------------------------------------------------------------------

RETRY_STATUSES = (429, 503)


class HttpNodeConnection:
    """One node's HTTP/1.1 keep-alive connection (h11 over asyncio streams), opened on
    its first request and again after it breaks."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._h11 = h11.Connection(h11.CLIENT)

    async def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        """POST ``body`` to the verb's path; the response body."""
        try:
            status, content = await asyncio.wait_for(self._post(verb.rest_path, body), timeout)
        except ConnectionRefusedError as exc:
            raise Gone(f"{verb.name}: {exc}") from exc
        except (OSError, asyncio.TimeoutError, h11.ProtocolError, EOFError) as exc:
            self.close()
            raise Retry(f"{verb.name}: {type(exc).__name__}: {exc}") from exc
        if status == 404:
            raise Gone(f"{verb.name}: HTTP 404: {content[:200]!r}")
        if status in RETRY_STATUSES:
            raise Retry(f"{verb.name}: HTTP {status}: {content[:200]!r}")
        if status != 200:
            raise RuntimeError(f"{verb.name}: HTTP {status}: {content[:200]!r}")
        return content

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
            self._h11 = h11.Connection(h11.CLIENT)
        reader, writer = self._streams
        headers = [
            ("host", f"{self._host}:{self._port}"),
            ("content-type", REST_CONTENT_TYPE),
            ("accept", REST_CONTENT_TYPE),
            ("content-length", str(len(body))),
        ]
        out = self._h11.send(h11.Request(method="POST", target=path, headers=headers)) or b""
        out += (self._h11.send(h11.Data(data=body)) or b"") + (
            self._h11.send(h11.EndOfMessage()) or b""
        )
        writer.write(out)
        await writer.drain()
        status, chunks = 0, []
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    raise EOFError("the server closed the connection")
                self._h11.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("the server closed the connection")
        if (self._h11.our_state, self._h11.their_state) == (h11.DONE, h11.DONE):
            self._h11.start_next_cycle()
        else:  # the server said connection: close
            self.close()
        return status, b"".join(chunks)

    def close(self) -> None:
        """Drop the connection (the next call opens a new one)."""
        if self._streams is not None:
            self._streams[1].close()
            self._streams = None


def rest_host_port(address: str) -> tuple[str, int]:
    """``http://host:port`` or ``host:port`` -> (host, port)."""
    host, port = address.removeprefix("http://").rstrip("/").rsplit(":", 1)
    return host, int(port)


async def fleet_swarm(
    transport: str,
    address: str,
    first: int,
    count: int,
    channels: int,
    timeout: float,
    max_message: int,
    options: list[tuple[str, Any]],
) -> Counters:
    """Run ``count`` Fleet nodes (``first``, ``first + 1``, ...) until the server ends
    their sessions; print the first failures."""
    counters = Counters()
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    rere = RereChannels(address, channels, options) if transport == "grpc-rere" else None
    connections: list[HttpNodeConnection] = []

    def caller(k: int) -> Call:
        if rere is not None:
            return rere.caller(k)
        connections.append(HttpNodeConnection(*rest_host_port(address)))
        return connections[-1].call

    nodes = [
        fleet_node(k, caller(k), gate, counters, max_message) for k in range(first, first + count)
    ]
    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*nodes, return_exceptions=True), timeout=timeout
        )
    finally:
        for connection in connections:
            connection.close()
        if rere is not None:
            await rere.close()
    for error in [o for o in outcomes if isinstance(o, BaseException)][:5]:
        print(f"node failed: {error!r}", flush=True)
    return counters
