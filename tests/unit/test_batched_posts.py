"""batched_posts: a round's tasks reach the fleet loop in one wake-up, in order."""

from __future__ import annotations

from typing import Any

import pytest

from stamen.server import client_proxy


def _post(loop: Any, post: Any, closed: Any) -> None:
    client_proxy._post(loop, post, closed)


class CountingLoop:
    """Stands in for the fleet's event loop: counts wake-ups, runs what they carry."""

    def __init__(self, closed: bool = False) -> None:
        self.wakeups = 0
        self.closed = closed
        self.errors: list[dict[str, Any]] = []

    def call_soon_threadsafe(self, callback: Any, *args: Any) -> None:
        if self.closed:
            raise RuntimeError("Event loop is closed")
        self.wakeups += 1
        callback(*args)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)


def test_posts_in_a_batch_wake_each_loop_once_and_keep_their_order() -> None:
    first, second = CountingLoop(), CountingLoop()
    ran: list[int] = []
    with client_proxy.batched_posts():
        for i in range(5):
            loop = first if i % 2 == 0 else second
            _post(loop, lambda i=i: ran.append(i), lambda: None)
        assert ran == []  # nothing posted before the batch ends
    assert (first.wakeups, second.wakeups) == (1, 1)
    assert ran == [0, 2, 4, 1, 3]


def test_outside_a_batch_each_post_wakes_the_loop() -> None:
    loop = CountingLoop()
    for _ in range(3):
        _post(loop, lambda: None, lambda: None)
    assert loop.wakeups == 3


def test_a_closed_loop_tells_every_post_of_the_batch() -> None:
    closed: list[int] = []
    with client_proxy.batched_posts():
        for i in range(3):
            _post(CountingLoop(closed=True), lambda: None, lambda i=i: closed.append(i))
    assert closed == [0, 1, 2]


def test_one_failing_post_does_not_stop_the_others() -> None:
    loop = CountingLoop()
    ran: list[str] = []

    def boom() -> None:
        raise ValueError("boom")

    with client_proxy.batched_posts():
        _post(loop, boom, lambda: None)
        _post(loop, lambda: ran.append("after"), lambda: None)
    assert ran == ["after"]
    assert [type(e["exception"]) for e in loop.errors] == [ValueError]


def test_the_batch_ends_even_when_its_body_raises() -> None:
    loop = CountingLoop()
    ran: list[int] = []

    def round_that_fails() -> None:
        with client_proxy.batched_posts():
            _post(loop, lambda: ran.append(1), lambda: None)
            raise KeyError("stop")

    with pytest.raises(KeyError):
        round_that_fails()
    _post(loop, lambda: ran.append(2), lambda: None)
    assert ran == [1, 2] and loop.wakeups == 2
