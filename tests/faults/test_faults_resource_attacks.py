"""Replies built to exhaust the server: millions of tiny tensors or metrics, frames that
announce more than any model, frames of one byte.

A registered node (a raw grpc-bidi stream in this process, speaking Stamen's frames)
answers its FitIns with such a reply while an honest node process on rest (pull-based,
heartbeating) serves the same round. A probe task on the fleet's event loop records its
largest lag: the loop every transport shares must not stall (< 100 ms), the process must
not grow by the reply's object count, and the honest node's result must make the round.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fault_tools import WAIT, FaultFedAvg, WatchedClientManager, node_processes

from stamen.errors import DecodeError
from stamen.messages import FitIns
from stamen.server import ServerConfig
from stamen.server.fleet.handler import FleetTiming
from stamen.testing import running_server
from stamen.wire import (
    BIDI_METHOD_NAME,
    BIDI_SERVICE_NAME,
    FRAMES_METADATA,
    FrameReader,
    Payload,
    _fast,
    decode_instruction,
    frame_size,
)

TIMING = FleetTiming(heartbeat_interval=0.5, heartbeat_timeout=4.0, poll_timeout=2.0)
MAX_STALL = 0.1
MAX_GROWTH = 400 << 20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


def empty_tensors(count: int) -> bytes:
    """A ClientMessage{FitRes} whose Parameters hold ``count`` empty tensors."""
    parameters = b"\x0a\x00" * count
    fit = _fast.length_delimited(2, len(parameters)) + parameters + b"\x18\x01"
    return _fast.length_delimited(4, len(fit)) + fit


def small_metrics(count: int) -> bytes:
    """A ClientMessage{FitRes} with ``count`` metrics (distinct keys, double values)."""
    value = b"\x12\x09\x09" + bytes(8)
    entries = []
    for i in range(count):
        key = str(i).encode()
        entry = b"\x0a" + _fast.varint(len(key)) + key + value
        entries.append(_fast.length_delimited(4, len(entry)) + entry)
    fit = b"".join(entries) + b"\x18\x01"
    return _fast.length_delimited(4, len(fit)) + fit


def frame(total: int, offset: int, data: bytes) -> bytes:
    """A Frame message announcing ``total`` bytes, carrying ``data`` at ``offset``."""
    head = (
        _fast.varint(1 << 3)
        + _fast.varint(total)
        + _fast.varint(2 << 3)
        + _fast.varint(offset)
        + _fast.length_delimited(3, len(data))
    )
    inner = head + data
    return _fast.length_delimited(16, len(inner)) + inner


class LoopProbe:
    """A task on ``loop`` that sleeps 2 ms at a time and records its largest lag."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.max_lag = 0.0
        self._stop = False
        self._future = asyncio.run_coroutine_threadsafe(self._run(), loop)

    async def _run(self) -> None:
        while not self._stop:
            before = time.perf_counter()
            await asyncio.sleep(0.002)
            self.max_lag = max(self.max_lag, time.perf_counter() - before - 0.002)

    def stop(self) -> float:
        self._stop = True
        self._future.result(WAIT)
        return self.max_lag


class BidiAttacker:
    """A raw grpc-bidi node with frames: answers its first instruction with ``messages``."""

    def __init__(self, address: str, messages: list[bytes]) -> None:
        self._channel = grpc.insecure_channel(address)
        self._out: queue.Queue[bytes | None] = queue.Queue()
        self._messages = messages
        self.sent = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _requests(self) -> Iterator[bytes]:
        while (item := self._out.get()) is not None:
            yield item

    def _run(self) -> None:
        join = self._channel.stream_stream(f"/{BIDI_SERVICE_NAME}/{BIDI_METHOD_NAME}")
        call = join(self._requests(), metadata=((FRAMES_METADATA, str(1 << 30)),))
        reader = FrameReader()
        try:
            for message in call:
                whole = reader.feed(message)
                if whole is None:
                    continue
                if isinstance(decode_instruction(whole), FitIns):
                    for out in self._messages:
                        self._out.put(out)
                    self.sent.set()
        except grpc.RpcError as exc:
            self.error = exc

    def close(self) -> None:
        self._out.put(None)
        self._channel.close()
        self._thread.join(WAIT)


def _framed(data: bytes) -> list[bytes]:
    return list(Payload([data]).messages(frame_size(1 << 30)))


ATTACKS = {
    "1e6-empty-tensors": lambda: _framed(empty_tensors(10**6)),
    "1e7-empty-tensors": lambda: _framed(empty_tensors(10**7)),
    "1e6-small-metrics": lambda: _framed(small_metrics(10**6)),
    # A frame header announcing a quarter of the machine's memory for a 2-tensor model.
    "huge-frame-header": lambda: [frame(1 << 34, 0, bytes(1 << 20))],
    # Frames of one byte each.
    "one-byte-frames": lambda: [frame(1 << 20, i, b"\x00") for i in range(2000)],
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_hostile_reply_does_not_stall_the_loop_and_the_honest_round_completes(
    tmp_path: Path, attack: str
) -> None:
    messages = ATTACKS[attack]()
    strategy = FaultFedAvg(
        start_with=2, min_fit_clients=2, min_available_clients=1, fraction_evaluate=0.0
    )
    config = ServerConfig(num_rounds=1)
    manager = WatchedClientManager()
    rss_before = _rss()
    with (
        running_server(
            config=config, strategy=strategy, client_manager=manager, rest=True, timing=TIMING
        ) as srv,
        node_processes(tmp_path) as start,
    ):
        probe = LoopProbe(srv.service.fleet.loop)
        start(srv.address_for("rest"), "rest", 1)
        attacker = BidiAttacker(srv.address, messages)
        try:
            strategy.wait_round(1, timeout=60)
            lag = probe.stop()
            rss_growth = _rss() - rss_before
        finally:
            attacker.close()
            with contextlib.suppress(Exception):
                probe.stop()
    print(f"{attack}: max loop lag {lag * 1000:.1f} ms, RSS growth {rss_growth >> 20} MiB")
    assert strategy.ks(1) == [1], "the honest node's result makes the round"
    failures = strategy.failures(1)
    assert len(failures) == 1
    assert isinstance(failures[0], DecodeError), failures
    assert lag < MAX_STALL, f"the fleet loop stalled for {lag * 1000:.0f} ms"
    assert rss_growth < MAX_GROWTH, f"RSS grew by {rss_growth >> 20} MiB"
