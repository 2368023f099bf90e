"""Tools of the fault-injection suite: node processes, a faulty TCP proxy, strategies.

Every wait here is bounded, and everything started (processes, threads, sockets) is
stopped by its owner's ``close`` (called from fixtures and ``finally`` blocks).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np

from stamen.messages import Parameters
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server.client_manager import ClientManager, SimpleClientManager
from stamen.server.client_proxy import ClientProxy
from stamen.server.fleet.handler import FleetTiming
from stamen.server.strategy.strategy import FitFailures, FitResults
from stamen.testing.conformance import AddClient, RecordingFedAvg
from stamen.typing import Config, NDArrays, Scalar
from stamen.wire import (
    BIDI_METHOD_NAME,
    BIDI_SERVICE_NAME,
    FLEET_SERVICE_NAME,
    REST_CONTENT_TYPE,
    Verb,
)

NODE_SCRIPT = Path(__file__).resolve().parent / "fault_node.py"

WAIT = 30.0
"""Bound of any wait that only stops a broken test (a passing test never gets near it)."""

FUZZ_TIMING = FleetTiming(
    heartbeat_interval=0.2,
    heartbeat_timeout=1.0,
    poll_timeout=0.5,
    create_node_rate=None,
    create_node_global_rate=None,
)
"""Fleet timing of the servers the fuzzers feed: short beats and polls, and no
registration rate limit (a fuzzer registers hundreds of nodes from one address within
seconds; tests/security/test_resource_limits.py tests the limit)."""


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a ``time.monotonic()`` value), never negative."""
    return max(0.0, deadline - time.monotonic())


def initial_parameters() -> Parameters:
    """The global model every run here starts from (AddClient's layout, zeros)."""
    return ndarrays_to_parameters(AddClient(0).get_parameters({}))


def expected_parameters(rounds: list[list[int]]) -> NDArrays:
    """The FedAvg model after rounds whose results came from AddClient nodes ``k``.

    Each round adds the weighted mean ``sum(k * k) / sum(k)`` of its nodes' ``k``.
    """
    params = parameters_to_ndarrays(initial_parameters())
    for ks in rounds:
        step = sum(k * k for k in ks) / sum(ks)
        params = [p + np.float32(step) for p in params]
    return params


# --- strategy ---------------------------------------------------------------------------------


class FaultFedAvg(RecordingFedAvg):
    """RecordingFedAvg for fault tests: starts when ``start_with`` nodes are connected,
    records when each round's fit was configured and aggregated, and can run a hook before
    a round picks its clients (where a test injects a fault between rounds).

    Rounds are numbered from 1; ``round_done(n)`` is set once round n is aggregated.
    """

    def __init__(
        self,
        *,
        start_with: int,
        before_fit: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("initial_parameters", initial_parameters())
        super().__init__(**kwargs)
        self.start_with = start_with
        self.before_fit = before_fit
        self.fit_started: dict[int, float] = {}
        self.fit_ended: dict[int, float] = {}
        self._done: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def _event(self, server_round: int) -> threading.Event:
        with self._lock:
            return self._done.setdefault(server_round, threading.Event())

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        if not client_manager.wait_for(self.start_with, WAIT):
            raise AssertionError(f"{self.start_with} node(s) did not connect within {WAIT} s")
        return super().initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> Any:
        if self.before_fit is not None:
            self.before_fit(server_round)
        self.fit_started[server_round] = time.monotonic()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.fit_ended[server_round] = time.monotonic()
        try:
            return super().aggregate_fit(server_round, results, failures)
        finally:
            self._event(server_round).set()

    def wait_round(self, server_round: int, timeout: float = WAIT) -> None:
        """Wait until round ``server_round`` is aggregated.

        Raises:
            AssertionError: it was not within ``timeout`` seconds.
        """
        if not self._event(server_round).wait(timeout):
            raise AssertionError(f"round {server_round} was not aggregated within {timeout} s")

    def round_seconds(self, server_round: int) -> float:
        """How long round ``server_round``'s fit took, configure to aggregate."""
        return self.fit_ended[server_round] - self.fit_started[server_round]

    def ks(self, server_round: int) -> list[int]:
        """The ``k`` of the nodes whose fit results round ``server_round`` aggregated."""
        results, _ = self.rounds[server_round - 1]
        return sorted(int(res.metrics["k"]) for _, res in results)

    def failures(self, server_round: int) -> FitFailures:
        """Round ``server_round``'s fit failures."""
        return self.rounds[server_round - 1][1]


class HoldingClient(AddClient):
    """AddClient whose ``hold_in_fit``-th fit sets ``entered`` and then waits (bounded) for
    ``release`` before it answers: a slow node, in-process."""

    def __init__(self, k: int, hold_in_fit: int = 1) -> None:
        super().__init__(k)
        self.hold_in_fit = hold_in_fit
        self.entered = threading.Event()
        self.release = threading.Event()

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        if self.fits + 1 == self.hold_in_fit:
            self.entered.set()
            self.release.wait(WAIT)
        return super().fit(parameters, config)


class WatchedClientManager(SimpleClientManager):
    """SimpleClientManager whose tests can wait for any condition on the node count."""

    def __init__(self, wait_timeout: float = WAIT, seed: int | None = None) -> None:
        super().__init__(wait_timeout=wait_timeout, seed=seed)
        self._changed = threading.Condition()

    def register(self, client: ClientProxy) -> bool:
        added = super().register(client)
        with self._changed:
            self._changed.notify_all()
        return added

    def unregister(self, client: ClientProxy) -> None:
        super().unregister(client)
        with self._changed:
            self._changed.notify_all()

    def wait_count(self, predicate: Callable[[int], bool], timeout: float, what: str) -> None:
        """Wait until ``predicate(num_available())`` holds.

        Raises:
            AssertionError: it did not within ``timeout`` seconds.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.num_available()), timeout):
                raise AssertionError(
                    f"{what}: not within {timeout} s ({self.num_available()} node(s) connected)"
                )


# --- node processes ---------------------------------------------------------------------------


class NodeProcess:
    """``start_client`` in a process of its own (``fault_node.py``), driven by its stdout.

    Args:
        address: The server (or proxy) address for ``transport``.
        transport: ``grpc-bidi``, ``grpc-rere`` or ``rest``.
        k: The node's AddClient ``k``.
        log: Where the process's stderr goes.
        hang_in_fit: Block for good in this fit (1-based; 0: never).
        hold_in_fit: Wait in this fit until :meth:`release` (0: never).
    """

    def __init__(
        self,
        address: str,
        transport: str,
        k: int,
        *,
        log: Path,
        hang_in_fit: int = 0,
        hold_in_fit: int = 0,
        max_retries: int | None = None,
    ) -> None:
        command = [sys.executable, "-u", str(NODE_SCRIPT), address, transport, str(k)]
        command += ["--hang-in-fit", str(hang_in_fit), "--hold-in-fit", str(hold_in_fit)]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        self.k = k
        self.log = log
        self._stderr: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"node-{k}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, prefix: str, timeout: float = WAIT) -> str:
        """Wait for the next stdout line starting with ``prefix``; return it.

        Raises:
            AssertionError: no such line within ``timeout`` s, or the process ended first.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=remaining(deadline))
            except queue.Empty:
                raise AssertionError(
                    f"node k={self.k}: no {prefix!r} line within {timeout} s; saw {self.lines}; "
                    f"stderr: {self.stderr_tail()}"
                ) from None
            if line is None:
                raise AssertionError(
                    f"node k={self.k} ended before printing {prefix!r}; saw {self.lines}; "
                    f"stderr: {self.stderr_tail()}"
                )
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def release(self) -> None:
        """Let a node waiting in ``--hold-in-fit`` answer."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the process (no clean-up runs in it) and reap it."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)

    def wait_exit(self, timeout: float = WAIT) -> str:
        """Wait for the process to end; return its ``EXIT ...`` line.

        Raises:
            AssertionError: it did not end within ``timeout`` s, or without an EXIT line.
        """
        line = self.wait_line("EXIT", timeout)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node k={self.k} printed {line!r} but did not exit") from None
        return line

    def stderr_tail(self, size: int = 2000) -> str:
        """The end of the process's stderr (for failure messages)."""
        self._stderr.flush()
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return "?"

    def close(self) -> None:
        """Kill the process if it still runs; release pipes and the reader thread."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(WAIT)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._reader.join(WAIT)
        self._stderr.close()


@contextlib.contextmanager
def node_processes(log_dir: Path) -> Iterator[Callable[..., NodeProcess]]:
    """A factory of :class:`NodeProcess`; every process is killed and reaped on exit."""
    started: list[NodeProcess] = []

    def start(address: str, transport: str, k: int, **kwargs: Any) -> NodeProcess:
        node = NodeProcess(
            address, transport, k, log=log_dir / f"node-{len(started)}-k{k}.log", **kwargs
        )
        started.append(node)
        return node

    try:
        yield start
    finally:
        for node in started:
            node.close()


# --- a TCP proxy that fails on demand ---------------------------------------------------------


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset, waking any thread blocked on it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One proxied connection: the node's socket, the server's, and bytes held back."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket, stalled: bool) -> None:
        self.sockets = (downstream, upstream)
        self.lock = threading.Lock()
        self.stalled = stalled
        self.closed = False
        self.held: list[tuple[socket.socket, bytes]] = []
        self.threads: list[threading.Thread] = []

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            with self.lock:
                if self.closed:
                    break
                if not data:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    break
                if self.stalled:
                    self.held.append((dst, data))
                    continue
                try:
                    dst.sendall(data)
                except OSError:
                    break

    def flush(self) -> None:
        """Send what was held back, in order, and forward from now on (caller holds lock)."""
        for dst, data in self.held:
            with contextlib.suppress(OSError):
                dst.sendall(data)
        self.held.clear()
        self.stalled = False

    def reset(self) -> None:
        with self.lock:
            self.closed = True
            self.held.clear()
        for sock in self.sockets:
            _reset(sock)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 (port 0) in front of ``target`` that fails on demand.

    * :meth:`cut` resets every connection and resets new ones at once (a refused
      connection, as far as a node can tell) until :meth:`heal`;
    * :meth:`stall` accepts and keeps connections, but holds every byte, both ways, until
      :meth:`heal` sends them on (a link that went silent);
    * :meth:`heal` goes back to forwarding.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._lock = threading.Lock()
        self._mode = "pass"
        self._links: list[_Link] = []
        self.accepted = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` of the proxy."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port`` (for a rest node)."""
        return f"http://{self.address}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed or self._mode == "cut":
                    _reset(downstream)
                    continue
                self.accepted += 1
                try:
                    upstream = socket.create_connection(self._target, timeout=5)
                except OSError:
                    _reset(downstream)
                    continue
                upstream.settimeout(None)
                link = _Link(downstream, upstream, stalled=self._mode == "stall")
                self._links.append(link)
                for src, dst in ((downstream, upstream), (upstream, downstream)):
                    thread = threading.Thread(
                        target=link.pump, args=(src, dst), name="fault-proxy-pump", daemon=True
                    )
                    link.threads.append(thread)
                    thread.start()

    def cut(self) -> None:
        """Reset every connection; reset new ones until :meth:`heal`."""
        with self._lock:
            self._mode = "cut"
            links, self._links = self._links, []
        for link in links:
            link.reset()
        for link in links:
            for thread in link.threads:
                thread.join(WAIT)

    def stall(self) -> None:
        """Hold every byte, both ways, on every connection until :meth:`heal`."""
        with self._lock:
            self._mode = "stall"
            for link in self._links:
                with link.lock:
                    link.stalled = True

    def heal(self) -> None:
        """Forward again (sending on what a stall held back)."""
        with self._lock:
            self._mode = "pass"
            for link in self._links:
                with link.lock:
                    link.flush()

    def close(self) -> None:
        """Stop accepting, reset every connection and join every thread."""
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._acceptor.join(WAIT)
        self.cut()


@contextlib.contextmanager
def fault_proxy(target: tuple[str, int]) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` in front of ``target``, closed on exit."""
    proxy = FaultProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()


# --- servers that misbehave -------------------------------------------------------------------

UnaryBehaviour = Callable[[bytes], bytes]
"""A fake Fleet method: request bytes -> response bytes (may raise to end the call)."""


class FakeGrpcServer:
    """A gRPC server (threads) playing a broken or malicious Stamen server.

    Args:
        join: Serves the grpc-bidi ``Join`` stream: given the request iterator and the
            server's ``stop`` event, yields the bytes to send.
        fleet: Serves grpc-rere verbs: request bytes -> response bytes.
    """

    def __init__(
        self,
        *,
        join: Callable[[Iterator[bytes], threading.Event], Iterator[bytes]] | None = None,
        fleet: dict[Verb, UnaryBehaviour] | None = None,
    ) -> None:
        self.stop = threading.Event()
        self.joined = threading.Event()
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8), options=options)
        handlers = []
        if join is not None:

            def serve_join(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
                self.joined.set()
                yield from join(requests, self.stop)

            handlers.append(
                grpc.method_handlers_generic_handler(
                    BIDI_SERVICE_NAME,
                    {BIDI_METHOD_NAME: grpc.stream_stream_rpc_method_handler(serve_join)},
                )
            )
        if fleet is not None:

            def unary(behaviour: UnaryBehaviour) -> Any:
                return grpc.unary_unary_rpc_method_handler(lambda request, _: behaviour(request))

            handlers.append(
                grpc.method_handlers_generic_handler(
                    FLEET_SERVICE_NAME, {verb.method_name: unary(b) for verb, b in fleet.items()}
                )
            )
        self._server.add_generic_rpc_handlers(tuple(handlers))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:port``."""
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        """Stop at once (every open call is cancelled) and wait for the threads."""
        self.stop.set()
        self._server.stop(grace=None).wait(WAIT)


HttpBehaviour = Callable[[BaseHTTPRequestHandler, bytes, threading.Event], None]
"""A fake REST verb: writes the whole response itself (handler, request body, stop)."""


def http_reply(handler: BaseHTTPRequestHandler, body: bytes, status: int = 200) -> None:
    """Write a complete response with ``body``."""
    handler.send_response(status)
    handler.send_header("content-type", REST_CONTENT_TYPE)
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class FakeHttpServer:
    """An HTTP/1.1 server (threads) playing a broken or malicious Stamen REST server.

    ``verbs`` maps each Fleet verb to its behaviour; other paths get 404.
    """

    def __init__(self, verbs: dict[Verb, HttpBehaviour]) -> None:
        self.stop = threading.Event()
        stop = self.stop
        by_path = {verb.rest_path: behaviour for verb, behaviour in verbs.items()}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 5  # an idle keep-alive connection ends, so close() can join its thread

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                behaviour = by_path.get(self.path)
                if behaviour is None:
                    http_reply(self, b"no such path", 404)
                    return
                try:
                    behaviour(self, body, stop)
                except OSError:
                    self.close_connection = True  # the node hung up: fine

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = False
        self._server.block_on_close = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-http", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port``."""
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        """Release waiting behaviours, stop serving and join every handler thread."""
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(WAIT)


# --- connections that drip bytes and never make a call ----------------------------------------

DRIP_EVERY = 0.3
"""Seconds between two bytes of a dripping connection."""


def _grpc_head() -> bytes:
    """HTTP/2 preface, an empty SETTINGS frame, and the start of a HEADERS frame on stream
    1 whose one literal header's value is announced ~16,000 bytes long."""
    value = 16_000
    block = b"\x00\x01x\x7f"  # literal, new name "x", value length >= 127 ...
    rest, varint = value - 127, bytearray()
    while rest >= 0x80:
        varint.append(rest & 0x7F | 0x80)
        rest >>= 7
    varint.append(rest)
    block += bytes(varint)
    length = len(block) + value
    frame = length.to_bytes(3, "big") + b"\x01\x04" + (1).to_bytes(4, "big")  # END_HEADERS
    settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + frame + block


GRPC_HEAD = _grpc_head()
"""The start of a gRPC call that never ends: the server never hands it to Stamen."""


@dataclass
class DripSlot:
    """One dripping connection: to ``target`` from ``source``, beginning with ``head``."""

    target: tuple[str, int]
    source: str
    head: bytes
    sock: socket.socket | None = None
    started: bool = False  # the head is sent


@dataclass
class Drippers:
    """Connections that each drip a byte per tick, reopened when the server closes them
    (a thread; :meth:`stop` closes every socket)."""

    slots: list[DripSlot]
    reopened: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="drippers", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "the dripper thread did not stop"
        for slot in self.slots:
            self._close(slot)

    def wait_reopened(self, count: int, timeout: float) -> None:
        """Wait until the server has closed ``count`` connections (bounded)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.reopened >= count, timeout):
                raise AssertionError(
                    f"expected the server to close {count} dripping connections within "
                    f"{timeout} s, it closed {self.reopened}"
                )

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for slot in self.slots:
                    self._tick(slot)
                self._stop.wait(DRIP_EVERY)
        finally:
            for slot in self.slots:
                self._close(slot)

    def _tick(self, slot: DripSlot) -> None:
        if slot.sock is None:
            self._open(slot)
            return
        try:
            while slot.sock.recv(65536):  # what the server says is read and dropped
                pass
            self._closed_by_server(slot)  # b"": the server closed it
            return
        except BlockingIOError:
            pass
        except OSError:
            self._closed_by_server(slot)
            return
        try:
            slot.sock.send(b"a" if slot.started else slot.head)
            slot.started = True
        except BlockingIOError:
            pass  # still connecting (a full accept queue), or the buffer is full
        except OSError:
            self._closed_by_server(slot)

    def _open(self, slot: DripSlot) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((slot.source, 0))
            sock.connect_ex(slot.target)
        except OSError:
            sock.close()
            return
        slot.sock, slot.started = sock, False

    def _closed_by_server(self, slot: DripSlot) -> None:
        self._close(slot)
        with self._changed:
            self.reopened += 1
            self._changed.notify_all()

    @staticmethod
    def _close(slot: DripSlot) -> None:
        if slot.sock is not None:
            with contextlib.suppress(OSError):
                slot.sock.close()
            slot.sock = None
