"""The fleet's budget of request bytes: takes up to its limit, refuses (and counts) past
it, gives back what was taken, and asks for a WARNING at most once per 10 s."""

from __future__ import annotations

import pytest

from stamen.protocol.budget import WARN_EVERY, ByteBudget


def test_takes_up_to_the_limit_and_refuses_past_it() -> None:
    budget = ByteBudget(100)
    assert budget.take(60) and budget.take(40)
    assert not budget.take(1)
    assert budget.refused == 1 and budget.held == 100
    budget.give(40)
    assert budget.take(40) and budget.held == 100


def test_giving_back_more_than_was_taken_is_an_error() -> None:
    budget = ByteBudget(10)
    budget.take(5)
    with pytest.raises(ValueError, match="more than were taken"):
        budget.give(6)
    with pytest.raises(ValueError, match="positive number of bytes"):
        ByteBudget(0)


def test_warnings_are_rate_limited() -> None:
    budget = ByteBudget(10)
    assert budget.should_warn(100.0)
    assert not budget.should_warn(100.0 + WARN_EVERY - 0.1)
    assert budget.should_warn(100.0 + WARN_EVERY)
