"""The console echo: exact line format, and a stalled terminal costing echo lines only."""

from __future__ import annotations

import io
import logging
import threading
from typing import List

import pytest
from harness import wait_until

from wiretap.console import ConsoleEcho, format_frame
from wiretap.frames import make_frame

START = 1_700_000_000_000_000_000


@pytest.mark.parametrize(
    "frame, line",
    [
        (
            make_frame(0, 0x123, bytes.fromhex("1122334455667788"), ts_ns=START + 12_345_678_000),
            'B0 (12.345_678) 123 S [8] 11 22 33 44 55 66 77 88 | ."3DUfw.',
        ),
        (
            make_frame(1, 0x18FEF100, b"\x01A", ts_ns=START + 1_000),
            "B1 (0.000_001) 18FEF100 E [2] 01 41 | .A",
        ),
        (
            make_frame(2, 0x005, b"\x7f~ ", extended=True, ts_ns=START + 999),
            "B2 (0.000_000) 00000005 E [3] 7F 7E 20 | .~ ",
        ),
        (
            make_frame(1, 0x123, bytes(range(0x40, 0x4C)), fd=True, brs=True, ts_ns=START),
            "B1 (0.000_000) 123 S FD BRS [12] 40 41 42 43 44 45 46 47 48 49 4A 4B | @ABCDEFGHIJK",
        ),
        (
            make_frame(1, 0x456, b"\x00", fd=True, esi=True, ts_ns=START),
            "B1 (0.000_000) 456 S FD ESI [1] 00 | .",
        ),
        (
            make_frame(0, 0x1FFFFFFF, b"", fd=True, brs=True, esi=True, ts_ns=START),
            "B0 (0.000_000) 1FFFFFFF E FD BRS ESI [0]",
        ),
        (
            make_frame(0, 0x5A1, rtr=True, ts_ns=START + 3_600_000_000_000),
            "B0 (3600.000_000) 5A1 S R [0]",
        ),
        (
            make_frame(15, 0x7E0, b"\x02\x01\x0c", direction="tx", ts_ns=START + 100_000_000),
            "B15 (0.100_000) 7E0 S TX [3] 02 01 0C | ...",
        ),
        (make_frame(3, 0x7FF, ts_ns=START + 2_000_001_000), "B3 (2.000_001) 7FF S [0]"),
        (
            make_frame(0, 0x001, b"\xff", ts_ns=START - 1_500_000),
            "B0 (-0.001_500) 001 S [1] FF | .",
        ),
    ],
)
def test_line_format(frame, line: str) -> None:
    assert format_frame(frame, START, colour=False) == line


def test_colour_highlights_the_bus_tag_and_printable_bytes() -> None:
    frame = make_frame(1, 0x123, b"A\x00", ts_ns=START)
    assert format_frame(frame, START, colour=True) == (
        "\x1b[1;36mB1\x1b[0m (0.000_000) 123 S [2] \x1b[32m41\x1b[0m 00 | \x1b[32mA\x1b[0m."
    )


def test_echo_writes_one_line_per_frame() -> None:
    stream = io.StringIO()
    echo = ConsoleEcho(stream, colour=False, start_ns=START)
    echo.start()
    echo.deliver([make_frame(0, 0x100 + i, bytes([i]), ts_ns=START) for i in range(3)])
    echo.deliver([make_frame(1, 0x200, ts_ns=START)])
    wait_until(lambda: stream.getvalue().count("\n") == 4)
    echo.stop()
    assert stream.getvalue().splitlines() == [
        "B0 (0.000_000) 100 S [1] 00 | .",
        "B0 (0.000_000) 101 S [1] 01 | .",
        "B0 (0.000_000) 102 S [1] 02 | .",
        "B1 (0.000_000) 200 S [0]",
    ]
    assert echo.dropped == 0


class StalledStream(io.StringIO):
    """A terminal that stops taking output until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(text)


def test_a_stalled_terminal_drops_echo_lines_and_counts_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = StalledStream()
    echo = ConsoleEcho(stream, colour=False, start_ns=START, capacity=10)
    echo.start()
    frames = [make_frame(0, 0x100, bytes([i]), ts_ns=START) for i in range(16)]
    with caplog.at_level(logging.WARNING, logger="wiretap.broker"):
        echo.deliver(frames[:1])
        assert stream.entered.wait(10)  # the echo thread holds frame 0 and is stuck writing it
        for batch_start in range(1, 16, 5):
            echo.deliver(frames[batch_start : batch_start + 5])  # returns at once, stalled or not
    assert echo.dropped == 5
    assert caplog.messages == ["console echo is not keeping up, dropped 5 frames"]
    stream.release.set()
    wait_until(lambda: stream.getvalue().count("\n") == 11)
    echo.stop()
    assert [line.split()[-1] for line in stream.getvalue().splitlines()] == ["."] * 11
    assert [line.split()[5] for line in stream.getvalue().splitlines()] == [
        f"{i:02X}" for i in range(11)
    ]


class BrokenPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_broken_terminal_turns_the_echo_off(caplog: pytest.LogCaptureFixture) -> None:
    echo = ConsoleEcho(BrokenPipe(), colour=False, start_ns=START, capacity=10)
    with caplog.at_level(logging.WARNING):
        echo.start()
        echo.deliver([make_frame(0, 0x100, ts_ns=START)])
        wait_until(lambda: any("echo is off" in message for message in caplog.messages))
        echo.deliver([make_frame(0, 0x100, ts_ns=START)] * 50)
    echo.stop()
    assert echo.dropped == 0
    assert len(echo.mailbox) == 0
    lines: List[str] = [m for m in caplog.messages if "console echo" in m]
    assert lines == ["console echo: cannot write ([Errno 32] Broken pipe), echo is off"]


def test_default_dir_tx_marks_bus_frames_tx() -> None:
    frame = make_frame(1, 0x123, b"\x41", ts_ns=START)
    assert format_frame(frame, START, False) == "B1 (0.000_000) 123 S [1] 41 | A"
    assert (
        format_frame(frame, START, False, default_dir="tx") == "B1 (0.000_000) 123 S TX [1] 41 | A"
    )
