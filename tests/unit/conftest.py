"""Fixtures shared by the unit tests."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from stamen import memory


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Stamen's collector tuning undone and Python's thresholds restored after the test;
    yields the young-generation threshold before it."""
    saved = gc.get_threshold()
    monkeypatch.setattr(memory, "_collector", None)
    monkeypatch.delenv("STAMEN_GC_TUNING", raising=False)
    try:
        yield saved[0]
    finally:
        gc.set_threshold(*saved)
