"""Round time and bytes on the wire per round, for each transport.

Workloads (float32 models, 3 FedAvg rounds, clients as threads in this process): A 10
clients x 4 MB, C 100 x 400 KB (the default), B 10 x 100 MB and D 2 x 400 MB (``--workloads
A,B,C,D``; B and D need a few GB of memory). Every byte between the nodes and the server passes
through a counting TCP relay on 127.0.0.1, so "bytes per round" is what crossed the
loopback (HTTP/2 or HTTP/1.1 framing included), both directions.

CPU seconds per round are the process's (every thread: server, relay and clients), which
other programs on a shared machine disturb less than the round's wall time.

Usage: python bench/transports/run.py [--rounds N] [--workloads A,C] [--transports rest,...]
                                     [--out bench/results/transports.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import stamen as fl
from stamen.memory import tune_allocator
from stamen.testing import NodeThread, running_server

WORKLOADS = {
    "A": ("A: 10 x 4 MB", 10, 4_000_000),
    "B": ("B: 10 x 100 MB", 10, 100_000_000),
    "C": ("C: 100 x 400 KB", 100, 400_000),
    "D": ("D: 2 x 400 MB", 2, 400_000_000),
}
TRANSPORTS = ("grpc-bidi", "grpc-rere", "rest")


class Relay:
    """A TCP relay on 127.0.0.1 that counts the bytes it forwards."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.bytes = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 20)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 20):
                self.bytes += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> Relay:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start")
        return self

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class Bench(fl.server.strategy.FedAvg):
    """FedAvg that timestamps each round and snapshots the relay's byte counter.

    The round ends in :meth:`evaluate`, which the server calls right after aggregation:
    overriding ``aggregate_fit`` instead would turn FedAvg's streaming aggregation off
    (the server would then keep every result, on disk beyond its RAM budget, and B and D
    would measure file writes).
    """

    def __init__(self, relay_ref: list[Relay], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.relay_ref = relay_ref
        self.marks: list[tuple[float, float, int]] = []
        self.rounds: list[tuple[float, float, int]] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        instructions = super().configure_fit(server_round, parameters, client_manager)
        # Clients are connected now (sampling waited for them): the round starts here.
        self.marks.append((time.perf_counter(), time.process_time(), self.relay_ref[0].bytes))
        return instructions

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        if server_round > 0:  # round 0 evaluates the initial model: no fit before it
            start, cpu, sent = self.marks[-1]
            elapsed = time.perf_counter() - start
            self.rounds.append((elapsed, time.process_time() - cpu, self.relay_ref[0].bytes - sent))
        return super().evaluate(server_round, parameters)


class Client(fl.client.NumPyClient):
    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, parameters: Any, config: Any) -> Any:
        return [p + np.float32(self.k) for p in parameters], 1, {}


def run_one(transport: str, clients: int, model_bytes: int, rounds: int) -> dict[str, Any]:
    model = [np.zeros(model_bytes // 4, dtype=np.float32)]
    relay_ref: list[Relay] = []
    strategy = Bench(
        relay_ref,
        min_fit_clients=clients,
        min_available_clients=clients,
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters(model),
    )
    config = fl.server.ServerConfig(num_rounds=rounds)
    with running_server(config=config, strategy=strategy, rest=True) as srv:
        target = srv.rest_port if transport == "rest" else srv.port
        assert target is not None
        relay = Relay(target).start()
        relay_ref.append(relay)
        try:
            address = f"{'http://' if transport == 'rest' else ''}127.0.0.1:{relay.port}"
            nodes = [
                NodeThread(
                    {
                        "server_address": address,
                        "transport": transport,
                        "client": Client(k).to_client(),
                    }
                ).start()
                for k in range(clients)
            ]
            srv.result(600)
            for node in nodes:
                assert node.join(60) is None
        finally:
            relay.stop()
    # Every client adds k with weight 1: the mean adds (clients - 1) / 2 per round (so no
    # client's result was missing from any round).
    expected = rounds * (clients - 1) / 2
    final = fl.common.parameters_to_ndarrays(srv.server.parameters)[0]
    assert np.allclose(final, expected), (final[:3], expected)
    times = [t for t, _, _ in strategy.rounds]
    cpus = [c for _, c, _ in strategy.rounds]
    sizes = [b for _, _, b in strategy.rounds]
    return {
        "transport": transport,
        "clients": clients,
        "model_bytes": model_bytes,
        "rounds": rounds,
        "round_seconds_median": statistics.median(times),
        "round_seconds": times,
        "round_cpu_seconds_median": statistics.median(cpus),
        "bytes_per_round_median": statistics.median(sizes),
        "payload_bytes_per_round": 2 * clients * model_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default="A,C", help="comma-separated, of A,B,C,D")
    parser.add_argument("--transports", default=",".join(TRANSPORTS))
    parser.add_argument("--out", default="bench/results/transports.json")
    args = parser.parse_args(argv)
    tune_allocator()  # before the node threads exist: malloc settings are process-wide
    results = []
    for key in args.workloads.split(","):
        name, clients, size = WORKLOADS[key.strip()]
        for transport in args.transports.split(","):
            result = run_one(transport, clients, size, args.rounds)
            result["workload"] = name
            results.append(result)
            print(
                f"{name:18} {transport:10} round {result['round_seconds_median']:7.3f} s   "
                f"CPU {result['round_cpu_seconds_median']:7.3f} s   "
                f"wire {result['bytes_per_round_median'] / 1e6:8.1f} MB/round   "
                f"(payload {result['payload_bytes_per_round'] / 1e6:.1f} MB)  "
                f"rounds {' '.join(f'{t:.3f}' for t in result['round_seconds'])}",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
