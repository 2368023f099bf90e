"""An asyncio event loop in a thread of its own, and the process's shared client loop.

The server keeps all fleet state on one :class:`LoopThread`. Client nodes share one per
process (:func:`run_on_client_loop`): gRPC's synchronous API waits for each message in
slices of 0.1 s (so that the main thread can see signals), so every node blocked on its
stream would wake ten times a second. A thousand nodes run as threads of one process woke
10,000 times a second and spent their CPU in the kernel; rounds of 1,000 such nodes took
27-120 s on the benchmark machine. Here the streams live on one event loop (``grpc.aio``)
in a daemon thread, and a node's thread waits on a future, which sleeps until it
resolves. CPU work on the messages (framing, copying, decoding) stays in the node's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..errors import ConnectionLost, Timeout

__all__ = ["LoopThread", "post_on_client_loop", "run_on_client_loop"]

_T = TypeVar("_T")

_CLOSING_TURNS = 5
"""Loop turns given to transports closing when the loop's last tasks are cancelled."""


class LoopThread:
    """Runs an asyncio loop in a daemon thread; other threads submit work to it.

    Args:
        name: The thread's name.
    """

    def __init__(self, name: str = "stamen-fleet") -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def start(self, timeout: float = 10.0) -> None:
        """Start the thread and wait until its loop runs.

        Raises:
            Timeout: the loop did not start within ``timeout`` seconds.
        """
        self._thread.start()
        if not self._started.wait(timeout):
            raise Timeout(f"event loop thread did not start within {timeout:g} s")

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        """Run ``coro`` on the loop; wait (without polling) for its result.

        Raises:
            Timeout: it did not finish within ``timeout`` seconds (it is cancelled).
            ConnectionLost: it was cancelled meanwhile (e.g. its stream was closed).
            Whatever the coroutine raises.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                # The coroutine's own Timeout (a TimeoutError too), or a result that came
                # just then: its outcome, with its own message.
                return future.result()
            future.cancel()
            raise Timeout(f"no answer from the event loop within {timeout:g} s") from None
        except concurrent.futures.CancelledError:
            raise ConnectionLost("cancelled while waiting on it (its link was closed)") from None
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the waiting thread
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is left on the loop, stop it and join the thread."""
        if self.loop.is_closed():
            return
        if self._thread.is_alive():

            async def cancel_rest() -> None:
                current = asyncio.current_task()
                tasks = [t for t in asyncio.all_tasks() if t is not current]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                # A cancelled task may have closed a transport (an accept under way, say),
                # which closes its socket in a callback of a later turn: let those run, or
                # the socket outlives the loop, held open, and its peer waits for nothing.
                for _ in range(_CLOSING_TURNS):
                    await asyncio.sleep(0)

            try:
                self.run(cancel_rest(), timeout)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout)
        if not self._thread.is_alive():
            # Callbacks scheduled as the loop stopped (a connection accepted at the last
            # moment being told, a transport closing its socket) run now, on this thread,
            # so that no socket outlives the loop, held open with its peer waiting.
            for _ in range(_CLOSING_TURNS):
                self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()


_lock = threading.Lock()
_client: LoopThread | None = None


def _client_loop() -> LoopThread:
    """The process's client loop, started on first use (a daemon thread; it lives as
    long as the process, as gRPC's own threads do)."""
    global _client
    with _lock:
        if _client is None or _client.loop.is_closed():
            thread = LoopThread("stamen-client-loop")
            thread.start(30.0)
            _client = thread
        return _client


def run_on_client_loop(coroutine: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
    """Run ``coroutine`` on the process's client loop; wait for its result.

    Raises:
        Timeout: it did not finish within ``timeout`` seconds (it is cancelled).
        ConnectionLost: it was cancelled (its stream was closed meanwhile).
        Whatever the coroutine raises.
    """
    return _client_loop().run(coroutine, timeout)


def post_on_client_loop(callback: Callable[[], object]) -> None:
    """Schedule ``callback`` on the process's client loop without waiting for it. It
    runs before anything submitted to that loop afterwards (:func:`run_on_client_loop`
    included): the loop takes work in the order it is handed."""
    _client_loop().loop.call_soon_threadsafe(callback)
