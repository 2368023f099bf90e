"""A counting TCP relay on 127.0.0.1 that moves bytes in the kernel (``splice``).

Every byte between the client nodes and the server crosses it; the counts (both
directions, all framing included) are kept in a memory-mapped file that the server
process reads at the start and end of each round (``workload.WireCounter``).

``bench/transports/run.py`` relays with asyncio reads and writes; at 2 GB a round (workload
B) that costs a CPU-second per round on a 2-core machine and would be charged to both
frameworks' round times. Here data goes socket -> pipe -> socket with ``os.splice``
(never copied into Python), from one thread with an epoll loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import socket
import threading

from workload import SharedCounter

CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class _Flow:
    """One direction of one connection: ``src`` -> pipe -> ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        self.src = src
        self.dst = dst
        self.upstream = upstream
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # the default size works, in smaller steps
            fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, CHUNK)
        self.pending = 0
        self.eof = False
        self.closed = False
        self.wants_read = True
        self.wants_write = False

    def pump(self, counter: SharedCounter) -> None:
        """Move what can be moved now; set what to wait for next."""
        self.wants_read = self.wants_write = False
        while not self.closed:
            if self.pending:
                try:
                    moved = os.splice(
                        self.pipe_r, self.dst.fileno(), self.pending, flags=SPLICE_FLAGS
                    )
                except BlockingIOError:
                    self.wants_write = True
                    return
                except OSError:
                    self.close()
                    return
                self.pending -= moved
                counter.add(self.upstream, moved)
                continue
            if self.eof:
                self.close()
                return
            try:
                moved = os.splice(self.src.fileno(), self.pipe_w, CHUNK, flags=SPLICE_FLAGS)
            except BlockingIOError:
                self.wants_read = True
                return
            except OSError:
                moved = 0
            if moved == 0:
                self.eof = True
            self.pending += moved

    def close(self) -> None:
        """Pass the end of the stream on; release the pipe."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        os.close(self.pipe_r)
        os.close(self.pipe_w)


class SpliceRelay:
    """Listens on 127.0.0.1 (a free port) and relays each connection to ``target_port``.

    Use as ``relay = SpliceRelay(port, SharedCounter(path)).start()`` ...
    ``relay.stop()`` (which closes the counter too); ``relay.port`` is where clients
    connect.
    """

    def __init__(self, target_port: int, counter: SharedCounter) -> None:
        self.target_port = target_port
        self.counter = counter
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._flows: dict[int, tuple[_Flow, _Flow]] = {}  # socket fd -> (reads it, writes it)
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="splice-relay", daemon=True)

    def start(self) -> SpliceRelay:
        """Start relaying in a background thread."""
        self._thread.start()
        return self

    @property
    def bytes(self) -> int:
        """Bytes relayed so far, both directions."""
        return self.counter.up + self.counter.down

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, close every socket and the counter file."""
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        for sock in [self._listener, *self._sockets]:
            sock.close()
        for flows in {id(pair): pair for pair in self._flows.values()}.values():
            for flow in flows:
                flow.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._selector.close()
        self.counter.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            for sock in (client, upstream):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(sock)
            to_server = _Flow(client, upstream, upstream=True)
            to_client = _Flow(upstream, client, upstream=False)
            self._flows[client.fileno()] = (to_server, to_client)
            self._flows[upstream.fileno()] = (to_client, to_server)
            for flow in (to_server, to_client):
                flow.pump(self.counter)
            self._watch(client.fileno())
            self._watch(upstream.fileno())

    def _watch(self, fd: int) -> None:
        """(Re)register ``fd`` for what its two flows wait for."""
        reader, writer = self._flows[fd]
        events = (selectors.EVENT_READ if reader.wants_read and not reader.closed else 0) | (
            selectors.EVENT_WRITE if writer.wants_write and not writer.closed else 0
        )
        registered = fd in self._selector.get_map()
        if events and registered:
            self._selector.modify(fd, events)
        elif events:
            self._selector.register(fd, events)
        elif registered:
            self._selector.unregister(fd)

    def _run(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        listener_fd = self._listener.fileno()
        while not self._stopping:
            for key, _ in self._selector.select():
                fd = key.fd
                if fd == self._wake_r:
                    continue
                if fd == listener_fd:
                    self._accept()
                    continue
                reader, writer = self._flows[fd]
                touched = set()
                for flow in (reader, writer):
                    flow.pump(self.counter)
                    touched.update((flow.src.fileno(), flow.dst.fileno()))
                for other in touched:
                    if other in self._flows:
                        self._watch(other)
