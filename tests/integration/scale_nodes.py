"""NODES lightweight grpc-bidi nodes on a few channels, in one asyncio loop.

Run as a separate process by test_scale.py (grpc.aio must not share a process with the
server's own grpc.aio loop thread). Usage: scale_nodes.py ADDRESS NODES CHANNELS
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc

from stamen.messages import Code, DisconnectRes, GetPropertiesRes, ReconnectIns, Status
from stamen.wire import BIDI_JOIN_METHOD, decode_instruction, encode_reply

RETRIES = 5


async def fake_nodes(address: str, nodes: int, channels_count: int) -> int:
    """Run the nodes until the server ends each stream; return how many answered.

    nodes lightweight grpc-bidi nodes on a few channels, answering GetPropertiesIns."""
    answered: list[int] = []
    channels = [grpc.aio.insecure_channel(address) for _ in range(channels_count)]

    async def node(index: int) -> None:
        # A grpc.aio server cancels calls it cannot take in time when a thousand arrive at
        # once on a busy machine; such a stream is opened again, as a real node reconnects.
        for attempt in range(RETRIES + 1):
            call = channels[index % channels_count].stream_stream(BIDI_JOIN_METHOD)()
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED or attempt == RETRIES:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            await serve(index, call, first)
            return

    async def serve(index: int, call: Any, data: Any) -> None:
        while True:
            if data is grpc.aio.EOF:
                return
            instruction = decode_instruction(data)
            if isinstance(instruction, ReconnectIns):
                await call.write(encode_reply(DisconnectRes(reason="ACK")))
                await call.done_writing()
                return
            reply = GetPropertiesRes(Status(Code.OK, ""), {"index": index})
            await call.write(encode_reply(reply))
            answered.append(index)
            data = await call.read()

    try:
        await asyncio.wait_for(asyncio.gather(*(node(i) for i in range(nodes))), timeout=120)
    finally:
        for channel in channels:
            await channel.close()
    return len(answered)


if __name__ == "__main__":
    count = asyncio.run(fake_nodes(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    print(f"ANSWERED {count}", flush=True)
