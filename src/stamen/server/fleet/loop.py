"""A private asyncio event loop on its own thread: where all fleet state lives."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ...errors import Timeout

__all__ = ["LoopThread"]

_T = TypeVar("_T")


class LoopThread:
    """Runs an asyncio loop in a daemon thread; other threads submit work to it."""

    def __init__(self, name: str = "stamen-fleet") -> None:
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()

    def start(self, timeout: float = 10.0) -> None:
        """Start the thread and wait until its loop runs."""
        self._thread.start()
        if not self._started.wait(timeout):
            raise Timeout(f"event loop thread did not start within {timeout:g} s")

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        """Run ``coro`` on the loop and wait for its result, at most ``timeout`` seconds."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError as exc:
            future.cancel()
            raise Timeout(f"fleet operation did not finish within {timeout:g} s") from exc

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

            try:
                self.run(cancel_rest(), timeout)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
