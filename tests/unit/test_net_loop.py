"""The client event loop keeps a coroutine's own errors: a Timeout raised inside (a gRPC
deadline) is not relabelled as the wait on the loop timing out."""

from __future__ import annotations

import asyncio

import pytest

from stamen.errors import Timeout
from stamen.net.loop import run_on_client_loop


def test_a_timeout_raised_by_the_coroutine_keeps_its_message() -> None:
    async def deadline() -> None:
        raise Timeout("PullInstruction: no response within 25 s")

    with pytest.raises(Timeout, match="PullInstruction: no response within 25 s"):
        run_on_client_loop(deadline(), timeout=5.0)


def test_a_coroutine_that_outlasts_the_wait_is_a_loop_timeout() -> None:
    async def forever() -> None:
        await asyncio.sleep(3600)

    with pytest.raises(Timeout, match=r"no answer from the event loop within 0\.05 s"):
        run_on_client_loop(forever(), timeout=0.05)
