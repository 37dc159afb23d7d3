"""Shared fixtures: an in-process server fed through the socket-pair seam."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bus, Harness  # noqa: E402


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop_all()


@pytest.fixture
def bus_factory():
    made: List[Bus] = []

    def make() -> Bus:
        bus = Bus()
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.test_end.close()
