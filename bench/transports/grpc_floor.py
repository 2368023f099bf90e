"""grpcio alone: a round of C (100 nodes x 400 KB) as grpc-bidi and as grpc-rere move it.

What grpc-rere's round time can be against grpc-bidi's before any framework code runs. A
server process (``grpc.aio``) and client processes (``grpc.aio`` channels, one per node,
nodes as coroutines) exchange exactly the messages of one round, with handlers that do
nothing else:

* ``bidi``: one stream per node; each round the server writes the instruction (``size``
  bytes) and reads the reply (``size`` bytes): one message each way.
* ``rere``: each round a node makes a unary call that the server answers with the
  instruction (the pull) and a unary call carrying the reply (the push): two calls.

Stamen's grpc-bidi and grpc-rere make the same exchanges (grpc-rere's next pull is the
one that the next round answers). The script reports, per mode, the median round time
(the slowest node's, all nodes released together) and the server's CPU per node and
round, and the ratio rere / bidi: the part of grpc-rere's cost that grpcio's own call
machinery sets (docs/performance.md compares it with Stamen's).

With ``--frame``, each message goes as frames of that many bytes, as Stamen sends
models larger than a frame (the server's instruction in 1 MiB frames, a node's reply in
4 MiB ones): what grpcio alone takes for B's exchange, against Stamen's B round.

``make bench`` (``bench/flower_vs_stamen/run.py``) runs it for A's, B's, C's and E500's
exchanges before its runs and reports each point's round against it.

Usage: python bench/transports/grpc_floor.py [--nodes 100] [--size 400000] [--rounds 20]
       [--processes 4] [--repeat 3] [--frame 0] [--out bench/results/grpc_floor.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc

MAX = 1 << 30
OPTIONS = [("grpc.max_send_message_length", MAX), ("grpc.max_receive_message_length", MAX)]
WAIT = 120.0


def _pieces(size: int, frame: int, fill: int) -> list[bytes]:
    """A message of ``size`` bytes as the messages that carry it: frames of at most
    ``frame`` bytes (0: the whole message)."""
    step = frame or size
    return [bytes([fill]) * min(step, size - start) for start in range(0, size, step)]


def _serve(size: int, frame: int, ports: Any, stop: Any) -> None:
    """The server process: pull answers the instruction, push takes a reply, the stream
    does both once per round (each message a frame, with ``frame``)."""
    pieces = _pieces(size, frame, 1)
    instruction = pieces[0]

    async def pull(_request: bytes, _context: Any) -> bytes:
        return instruction

    async def push(request: bytes, _context: Any) -> bytes:
        return b"ok" if 0 < len(request) <= len(pieces[0]) else b"bad"

    async def stream(_requests: Any, context: Any) -> None:
        while True:
            for piece in pieces:
                await context.write(piece)
            for _ in pieces:
                reply = await context.read()
                if reply is grpc.aio.EOF:
                    return

    handlers = {
        "Pull": grpc.unary_unary_rpc_method_handler(pull),
        "Push": grpc.unary_unary_rpc_method_handler(push),
        "Join": grpc.stream_stream_rpc_method_handler(stream),
    }

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("f", handlers),))
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.stop(None)

    asyncio.run(main())


def _nodes(
    mode: str, port: int, count: int, size: int, frame: int, rounds: int, barrier: Any, out: Any
) -> None:
    """A client process: ``count`` nodes; each round starts when every process's nodes
    are ready (``barrier``); reports each round's duration as this process saw it."""
    pieces = _pieces(size, frame, 2)

    async def main() -> None:
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) for _ in range(count)
        ]
        try:
            if mode == "bidi":
                calls = [c.stream_stream("/f/Join")() for c in channels]
            else:
                pulls = [c.unary_unary("/f/Pull") for c in channels]
                pushes = [c.unary_unary("/f/Push") for c in channels]

            async def node(i: int) -> None:
                if mode == "bidi":
                    got = [len(await calls[i].read()) for _ in pieces]
                    assert sum(got) == size
                    for piece in pieces:
                        await calls[i].write(piece)
                else:
                    for piece in pieces:  # each pull answers one frame's worth
                        assert len(await pulls[i](b"")) == len(pieces[0])
                        assert await pushes[i](piece) == b"ok"

            await asyncio.gather(*(node(i) for i in range(count)))  # connect, warm up
            loop = asyncio.get_running_loop()
            times = []
            for _ in range(rounds):
                await loop.run_in_executor(None, barrier.wait, WAIT)
                start = time.perf_counter()
                await asyncio.gather(*(node(i) for i in range(count)))
                times.append(time.perf_counter() - start)
            await loop.run_in_executor(None, barrier.wait, WAIT)
            out.put(times)
            if mode == "bidi":
                for call in calls:
                    await call.done_writing()
        finally:
            for channel in channels:
                await channel.close()

    asyncio.run(main())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run of ``mode``: every round's time (slowest process) and the server's CPU."""
    ctx = mp.get_context("spawn")
    ports, stop, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    server = ctx.Process(target=_serve, args=(args.size, args.frame, ports, stop), daemon=True)
    server.start()
    procs: list[Any] = []
    try:
        port = ports.get(timeout=WAIT)
        barrier = ctx.Barrier(args.processes + 1)
        share = [
            args.nodes // args.processes + (i < args.nodes % args.processes)
            for i in range(args.processes)
        ]
        procs = [
            ctx.Process(
                target=_nodes,
                args=(mode, port, n, args.size, args.frame, args.rounds, barrier, out),
                daemon=True,
            )
            for n in share
        ]
        for proc in procs:
            proc.start()
        barrier.wait(WAIT)  # every node connected and warm
        cpu_before = _cpu_seconds(server.pid)
        for _ in range(args.rounds - 1):
            barrier.wait(WAIT)
        barrier.wait(WAIT)  # the last round done
        cpu = _cpu_seconds(server.pid) - cpu_before
        per_process = [out.get(timeout=WAIT) for _ in procs]
        rounds = [max(times[r] for times in per_process) for r in range(args.rounds)]
        return {
            "round_seconds": rounds,
            "median_round_seconds": statistics.median(rounds),
            "server_cpu_us_per_node_round": 1e6 * cpu / (args.rounds * args.nodes),
        }
    finally:
        stop.set()
        for proc in [*procs, server]:
            proc.join(WAIT)
            if proc.is_alive():
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--size", type=int, default=400_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--frame", type=int, default=0, help="bytes per message: the exchange in frames (0: whole)"
    )
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "results" / "grpc_floor.json")
    )
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"bidi": [], "rere": []}
    for _ in range(args.repeat):
        for mode in results:  # alternating, so that a busy moment hits both
            results[mode].append(run(mode, args))
    summary = {
        mode: {
            "median_round_seconds": statistics.median(r["median_round_seconds"] for r in runs),
            "server_cpu_us_per_node_round": statistics.median(
                r["server_cpu_us_per_node_round"] for r in runs
            ),
        }
        for mode, runs in results.items()
    }
    ratio = summary["rere"]["median_round_seconds"] / summary["bidi"]["median_round_seconds"]
    # A tiny exchange (the bench's --quick sizes) may use less server CPU than the clock
    # ticks: no ratio then.
    cpu_bidi = summary["bidi"]["server_cpu_us_per_node_round"]
    cpu_ratio = summary["rere"]["server_cpu_us_per_node_round"] / cpu_bidi if cpu_bidi else None
    framed = f", in frames of {args.frame:,} bytes" if args.frame else ""
    print(
        f"grpcio alone, {args.nodes} nodes x {args.size:,} bytes{framed}, "
        f"{args.processes} client processes"
    )
    print("| exchange | round (median) | server CPU per node and round |")
    print("|---|---|---|")
    for mode, text in (
        ("bidi", "grpc-bidi: a stream message each way"),
        ("rere", "grpc-rere: pull + push calls"),
    ):
        seconds = summary[mode]["median_round_seconds"]
        cpu_us = summary[mode]["server_cpu_us_per_node_round"]
        print(f"| {text} | {seconds * 1e3:.1f} ms | {cpu_us:.0f} us |")
    cpu_text = "not measurable" if cpu_ratio is None else f"{cpu_ratio:.2f}x"
    print(f"rere / bidi: round {ratio:.2f}x, server CPU {cpu_text}")
    record = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "grpcio": grpc.__version__,
        },
        "args": vars(args),
        "load_average": os.getloadavg()[0],
        "runs": results,
        "summary": summary,
        "rere_over_bidi": {"round": ratio, "server_cpu": cpu_ratio},
    }
    Path(args.out).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
