"""RateLimitedLog: one line per key per interval, with the count of what it held back."""

from __future__ import annotations

import logging

from wiretap.ratelimit import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_per_interval_and_the_next_says_how_many_were_held(caplog):
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t.rl"), interval=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="t.rl"):
        emitted = [limited.log(("a", "cmd"), logging.INFO, "bad %s", i) for i in range(1000)]
        assert limited.log(("b", "cmd"), logging.INFO, "bad %s", "b") is True
        clock.now = 10.0
        assert limited.log(("a", "cmd"), logging.INFO, "bad %s", "late") is True
    assert emitted.count(True) == 1
    assert limited.suppressed_total == 999
    assert [r.getMessage() for r in caplog.records] == [
        "bad 0",
        "bad b",
        "bad late (999 more suppressed)",
    ]


def test_forget_drops_every_key_of_an_owner_and_returns_what_it_held():
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t.rl2"), interval=10.0, clock=clock)
    for kind in ("x", "y"):
        for _ in range(3):
            limited.log(("client", kind), logging.INFO, "m")
    limited.log(("other", "x"), logging.INFO, "m")
    assert limited.forget("client") == 4
    assert limited.forget("client") == 0
    assert limited.log(("client", "x"), logging.INFO, "m") is True
