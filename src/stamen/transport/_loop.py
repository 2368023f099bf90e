"""One asyncio event loop per process for the node side of gRPC streams.

gRPC's synchronous API waits for each message in slices of 0.1 s (so that the main
thread can see signals): every node blocked on its stream wakes ten times a second.
A thousand nodes run as threads of one process woke 10,000 times a second and spent
their CPU in the kernel; rounds of 1,000 such nodes took 27-120 s on the benchmark
machine. Here the streams live on one event loop (``grpc.aio``) in a daemon thread of
the process, and a node's thread waits on a future, which sleeps until it resolves.
CPU work on the messages (framing, copying, decoding) stays in the node's thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import ConnectionLost, Timeout

__all__ = ["run_on_client_loop"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _client_loop() -> asyncio.AbstractEventLoop:
    """The process's client loop, started on first use (a daemon thread; it lives as
    long as the process, as gRPC's own threads do)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            thread = threading.Thread(target=run, name="stamen-client-loop", daemon=True)
            thread.start()
            if not ready.wait(30.0):  # pragma: no cover - a machine this slow fails anyway
                raise RuntimeError("the client event loop did not start within 30 s")
            _loop = loop
        return _loop


def run_on_client_loop(coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coroutine`` on the client loop; wait (without polling) for its result.

    Raises:
        Timeout: it did not finish within ``timeout`` seconds (it is cancelled).
        ConnectionLost: it was cancelled (its stream was closed meanwhile).
        Whatever the coroutine raises.
    """
    future = asyncio.run_coroutine_threadsafe(coroutine, _client_loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise Timeout(f"no answer within {timeout:g} s") from None
    except concurrent.futures.CancelledError:
        raise ConnectionLost("the stream was closed while waiting on it") from None
    except BaseException:
        future.cancel()  # e.g. KeyboardInterrupt in the waiting thread
        raise
