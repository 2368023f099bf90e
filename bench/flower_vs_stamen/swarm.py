"""Many lightweight nodes in one asyncio loop (Stamen venv), for E and the E10k workloads.

Usage: ``swarm.py --address HOST:PORT --first K --count N [--streams-per-channel S]
[--timeout S] [--transport grpc-bidi|grpc-rere|rest]``

With ``--transport grpc-rere`` or ``rest`` the nodes speak Stamen's Fleet protocol
(``fleet_swarm.py``); the rest of this docstring is about grpc-bidi, the default.

Each node is one ``FlowerService/Join`` stream (``S`` nodes share a channel, so a TCP
connection), speaking the wire protocol with ``stamen.wire`` directly: no thread and no
``start_client`` per node, and the same bytes as Flower's and Stamen's own nodes, so it
drives either framework's server. It answers FitIns exactly as ``clients.py`` does
(``parameters + k``, one example) and ReconnectIns with DisconnectRes. A stream the server
ends before its first instruction is opened again (see ``RETRIES``). At the end prints
``RETRIES <n>``, ``CLIENTS ok=<n> failed=<n> stuck=<n>``, ``PEAK_RSS <bytes>`` and ``CPU``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
from typing import Any

import grpc
import numpy as np
import workload
from fleet_swarm import fleet_swarm, raise_descriptor_limit

from stamen.messages import Code, DisconnectRes, FitIns, FitRes, ReconnectIns, Status
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.wire import BIDI_JOIN_METHOD, decode_instruction, encode_reply

MAX_MESSAGE = 536_870_912
TRANSPORTS = ("grpc-bidi", "grpc-rere", "rest")
RETRIES = 10
"""Times a node opens a new stream after the server ended one before sending anything (a
grpc.aio server cancels calls it cannot take in time when thousands arrive at once; a
real node retries too)."""


def message_options() -> list[tuple[str, Any]]:
    """The channels' gRPC options: messages up to :data:`MAX_MESSAGE`."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]


async def swarm(address: str, first: int, count: int, channels_count: int, timeout: float) -> int:
    """Run the nodes until the server ends their streams; return how many ended cleanly."""
    options = message_options()
    channels = [
        grpc.aio.insecure_channel(address, options=[*options, ("grpc.channel_id", i)])
        for i in range(channels_count)
    ]
    ended: list[int] = []
    retries: list[int] = [0]

    async def session(k: int, call: Any) -> bool:
        """Serve one stream; False if it broke before the first instruction."""
        offset = np.float32(k)
        served = False
        while True:
            try:
                data = await call.read()
            except grpc.aio.AioRpcError:
                if served:
                    raise
                return False
            if data is grpc.aio.EOF:
                return True
            served = True
            instruction = decode_instruction(data)
            if isinstance(instruction, ReconnectIns):
                await call.write(encode_reply(DisconnectRes(reason="ACK")))
                await call.done_writing()
                ended.append(k)
                return True
            if not isinstance(instruction, FitIns):
                raise RuntimeError(f"node {k}: unexpected {type(instruction).__name__}")
            arrays = [a + offset for a in parameters_to_ndarrays(instruction.parameters)]
            reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})
            await call.write(encode_reply(reply))

    async def node(k: int) -> None:
        for attempt in range(RETRIES + 1):
            call = channels[k % channels_count].stream_stream(BIDI_JOIN_METHOD)()
            if await session(k, call):
                return
            retries[0] += 1
            await asyncio.sleep(random.uniform(0.5, 1.0) * min(2**attempt, 8))
        raise RuntimeError(f"node {k}: the server refused its stream {RETRIES + 1} times")

    try:
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(node(k) for k in range(first, first + count)), return_exceptions=True),
            timeout=timeout,
        )
    finally:
        for channel in channels:
            await channel.close()
    for error in [o for o in outcomes if isinstance(o, BaseException)][:5]:
        print(f"node failed: {error!r}", file=sys.stderr, flush=True)
    print(f"RETRIES {retries[0]}", flush=True)
    return len(ended)


def main() -> int:
    """Run the swarm; report how it ended and the process's peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--streams-per-channel", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--transport", choices=TRANSPORTS, default="grpc-bidi")
    args = parser.parse_args()
    channels = max(1, math.ceil(args.count / args.streams_per_channel))
    if args.transport == "grpc-bidi":
        ok = asyncio.run(swarm(args.address, args.first, args.count, channels, args.timeout))
    else:
        print(f"DESCRIPTORS {raise_descriptor_limit()}", flush=True)
        counters = asyncio.run(
            fleet_swarm(
                args.transport,
                args.address,
                args.first,
                args.count,
                channels,
                args.timeout,
                MAX_MESSAGE,
                message_options(),
            )
        )
        print(f"RETRIES {counters.retries}", flush=True)
        for why, times in counters.reasons.most_common(5):
            print(f"retried {times} x: {why}", file=sys.stderr, flush=True)
        ok = counters.ended
    print(f"CLIENTS ok={ok} failed={args.count - ok} stuck=0", flush=True)
    print(f"PEAK_RSS {workload.peak_rss_bytes()}", flush=True)
    print(f"CPU {json.dumps(workload.cpu_seconds())}", flush=True)
    return 0 if ok == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
