"""The replay source: candump log parsing, the shipped demo log, and paced playback."""

from __future__ import annotations

import logging
import pathlib
import subprocess
import sys
import threading
import time
from typing import List, Tuple

import pytest
from harness import wait_until

from wiretap.frames import Frame, make_frame
from wiretap.sources import BusInfo, TransmitResult
from wiretap.sources.replay import (
    MAX_GAP_NS,
    MIN_FRAME_GAP_NS,
    LogLine,
    ReplaySource,
    parse_line,
    read_log,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
DEMO_LOG = REPO / "examples" / "demo.log"
TS = 1_700_000_000_123_456_000


class Collector:
    """A ``publish`` callable that keeps every batch with its wall-clock arrival time."""

    def __init__(self) -> None:
        self.batches: List[Tuple[int, List[Frame]]] = []
        self._lock = threading.Lock()

    def __call__(self, frames: List[Frame]) -> None:
        with self._lock:
            self.batches.append((time.time_ns(), list(frames)))

    @property
    def frames(self) -> List[Frame]:
        with self._lock:
            return [frame for _, batch in self.batches for frame in batch]


def write_log(tmp_path: pathlib.Path, lines: List[str]) -> str:
    path = tmp_path / "capture.log"
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def play(source: ReplaySource, count: int) -> Collector:
    collector = Collector()
    source.start(collector)
    try:
        wait_until(lambda: len(collector.frames) >= count)
    finally:
        source.stop()
        source.join(5)
    return collector


# --- parsing ---------------------------------------------------------------------------------


def frame(can_id, data=b"", extended=False, rtr=False, fd=False, brs=False, esi=False) -> Frame:
    return make_frame(0, can_id, data, extended=extended, rtr=rtr, fd=fd, brs=brs, esi=esi)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("123#11223344", frame(0x123, b"\x11\x22\x33\x44")),
        ("18DAF110#0102", frame(0x18DAF110, b"\x01\x02", extended=True)),
        ("00000123#AA", frame(0x123, b"\xaa", extended=True)),
        ("7FF#1122334455667788", frame(0x7FF, bytes.fromhex("1122334455667788"))),
        ("123##311223344", frame(0x123, b"\x11\x22\x33\x44", fd=True, brs=True, esi=True)),
        ("123##1" + "AB" * 12, frame(0x123, b"\xab" * 12, fd=True, brs=True)),
        ("123##2", frame(0x123, fd=True, esi=True)),
        ("1FFFFFFF##0" + "00" * 64, frame(0x1FFFFFFF, bytes(64), extended=True, fd=True)),
        ("123#R", frame(0x123, rtr=True)),
        ("123#R5", frame(0x123, rtr=True)),
        ("123#R#5", frame(0x123, rtr=True)),
        ("12345678#R", frame(0x12345678, extended=True, rtr=True)),
        ("123#", frame(0x123)),
        ("123#11.22.33", frame(0x123, b"\x11\x22\x33")),
        ("123#1122334455667788_C", frame(0x123, bytes.fromhex("1122334455667788"))),
    ],
)
def test_parse_every_frame_form(text: str, expected: Frame) -> None:
    parsed = parse_line(f"(1700000000.123456) can0 {text}")
    assert parsed == LogLine(TS, "can0", expected, False)


def test_parse_lower_case_hex_and_direction_markers() -> None:
    assert parse_line("(1700000000.123456) vcan3 1ab#de") == LogLine(
        TS, "vcan3", frame(0x1AB, b"\xde"), False
    )
    assert parse_line("(1700000000.123456) can1 123#11 T").marked_tx is True
    assert parse_line("(1700000000.123456) can1 123#11 R").marked_tx is False


def test_timestamp_keeps_every_digit() -> None:
    assert parse_line("(0000000001.000001) can0 123#").ts_ns == 1_000_001_000
    assert parse_line("(1.5) can0 123#").ts_ns == 1_500_000_000


def test_blank_lines_and_error_frames_are_not_frames() -> None:
    assert parse_line("") is None
    assert parse_line("   \n") is None
    assert parse_line("(1700000000.123456) can0 20000004#0004000000000000") is None


@pytest.mark.parametrize(
    "line, reason",
    [
        ("1700000000.123456 can0 123#11", "not '(SECONDS.MICROS) IFACE FRAME'"),
        ("(1700000000.123456) can0", "not '(SECONDS.MICROS) IFACE FRAME'"),
        ("(1700000000.123456) can0 123#11 X", "not '(SECONDS.MICROS) IFACE FRAME'"),
        ("(17000x0000.123456) can0 123#11", "not '(SECONDS.MICROS) IFACE FRAME'"),
        ("(1700000000.123456) can0 12311", "frame '12311' has no '#'"),
        ("(1700000000.123456) can0 1234#11", "CAN ID '1234' is not 3 or 8 hex digits"),
        ("(1700000000.123456) can0 12G#11", "CAN ID '12G' is not 3 or 8 hex digits"),
        ("(1700000000.123456) can0 800#11", "CAN ID 800 is out of range"),
        ("(1700000000.123456) can0 123#112", "data '112' has an odd number of hex digits"),
        ("(1700000000.123456) can0 123#11ZZ", "data '11ZZ' is not hex"),
        (
            "(1700000000.123456) can0 123#112233445566778899",
            "classic frame with 9 data bytes (CAN FD needs '##')",
        ),
        ("(1700000000.123456) can0 123##", "CAN FD frame '123##' has no flags nibble"),
        ("(1700000000.123456) can0 123##0" + "00" * 9, "9 bytes is not a CAN FD payload length"),
        ("(1700000000.123456) can0 123#R9", "RTR length '9' is not 0..8"),
        ("(1700000000.123456) can0 123#11_C", "'_C' is only valid as DLC 9..F after 8 data bytes"),
    ],
)
def test_malformed_lines_say_why(line: str, reason: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_line(line)
    assert str(raised.value) == reason


def test_read_log_reports_bad_lines_with_their_number_and_skips_them(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_log(
        tmp_path,
        [
            "(1700000000.000000) can0 123#01",
            "",
            "(1700000000.001000) can0 123#0",
            "garbage",
            "(1700000000.002000) can0 123#03",
        ],
    )
    with caplog.at_level(logging.WARNING, logger="wiretap.replay"):
        lines = read_log(path)
    assert [line.frame.data for line in lines] == [b"\x01", b"\x03"]
    assert [record.getMessage() for record in caplog.records] == [
        f"replay {path}:3: data '0' has an odd number of hex digits",
        f"replay {path}:4: not '(SECONDS.MICROS) IFACE FRAME'",
    ]


# --- the demo log ----------------------------------------------------------------------------


def test_demo_log_parses_cleanly_with_every_kind_of_frame(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wiretap.replay"):
        lines = read_log(str(DEMO_LOG))
    assert caplog.records == []
    assert len(lines) == len(DEMO_LOG.read_text().splitlines())
    assert {line.iface for line in lines} == {"can0", "can1"}
    assert sorted(len(line.frame.data) for line in lines if line.frame.fd) == [12, 32, 64]
    assert sum(line.frame.rtr for line in lines) == 1
    assert any(line.frame.extended for line in lines)
    assert any(line.frame.can_id == 0x7DF for line in lines)
    assert any(line.frame.can_id == 0x7E8 for line in lines)
    assert all(a.ts_ns <= b.ts_ns for a, b in zip(lines, lines[1:]))
    assert (lines[-1].ts_ns - lines[0].ts_ns) // 1_000_000_000 == 59


def test_demo_log_is_what_the_script_generates(tmp_path: pathlib.Path) -> None:
    output = tmp_path / "demo.log"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make-demo-log.py"), str(output)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert output.read_bytes() == DEMO_LOG.read_bytes()


# --- playback --------------------------------------------------------------------------------


def test_buses_follow_first_appearance_of_each_interface(tmp_path: pathlib.Path) -> None:
    path = write_log(
        tmp_path,
        [
            "(1700000000.000000) can1 123#01",
            "(1700000000.000000) can0 123#02",
            "(1700000000.000000) can1 123#03",
        ],
    )
    source = ReplaySource(path, first_bus=2, can_fd=False)
    assert source.bus_count == 2
    assert source.name == f"replay:{path}"
    assert source.bus_info(3) == BusInfo(enabled=True, listen_only=False, bitrate=500000)
    collector = play(source, 3)
    assert [(f.bus, f.data) for f in collector.frames] == [(2, b"\x01"), (3, b"\x02"), (2, b"\x03")]


def test_every_frame_in_order_with_the_log_timing_divided_by_speed(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    offsets_us = [0, 1_000, 1_000, 50_000, 50_013, 200_000, 200_500, 1_000_000, 1_000_007]
    lines = [
        "({}.{:06d}) can{} {:03X}#{:02X}".format(
            *divmod(TS // 1000 + offset, 10**6), i % 2, 0x100 + i, i
        )
        for i, offset in enumerate(offsets_us)
    ]
    path = write_log(tmp_path, lines)
    source = ReplaySource(path, first_bus=0, can_fd=False, speed=50)
    with caplog.at_level(logging.INFO, logger="wiretap.replay"):
        collector = play(source, len(lines))
        wait_until(lambda: f"replay {path}: end of log, {len(lines)} frames" in caplog.messages)
    frames = collector.frames
    assert [f.can_id for f in frames] == [0x100 + i for i in range(len(lines))]
    assert [f.bus for f in frames] == [i % 2 for i in range(len(lines))]
    assert all(f.direction == "rx" and not f.fd for f in frames)
    assert [f.ts_ns - frames[0].ts_ns for f in frames] == [o * 1000 // 50 for o in offsets_us]
    assert source.counters() == {"tx": 0, "fd_skipped": 0, "replayed": len(lines)}
    # Pacing: no batch is published before its frames' scheduled (wall-clock) time has come.
    for arrival, batch in collector.batches:
        assert arrival >= batch[-1].ts_ns - 1_000_000


def test_demo_log_replays_completely(tmp_path: pathlib.Path) -> None:
    lines = read_log(str(DEMO_LOG))
    source = ReplaySource(str(DEMO_LOG), first_bus=0, can_fd=True, speed=400)
    frames = play(source, len(lines)).frames
    assert len(frames) == len(lines)
    assert [f.data for f in frames] == [line.frame.data for line in lines]
    assert [f.bus for f in frames] == [int(line.iface[-1]) for line in lines]
    expected = [round((line.ts_ns - lines[0].ts_ns) / 400) for line in lines]
    assert [f.ts_ns - frames[0].ts_ns for f in frames] == expected


def test_direction_marker(tmp_path: pathlib.Path) -> None:
    path = write_log(
        tmp_path,
        [
            "(1700000000.000000) can0 123#01 T",
            "(1700000000.000000) can0 123#02 R",
            "(1700000000.000000) can0 123#03",
        ],
    )
    frames = play(ReplaySource(path, 0, can_fd=False), 3).frames
    assert [f.direction for f in frames] == ["tx", "rx", "rx"]


def test_loop_restarts_after_the_last_frame_plus_the_mean_gap(tmp_path: pathlib.Path) -> None:
    path = write_log(
        tmp_path,
        [
            "(1700000000.000000) can0 123#01",
            "(1700000000.010000) can0 123#02",
            "(1700000000.020000) can0 123#03",
        ],
    )
    source = ReplaySource(path, 0, can_fd=False, speed=10, loop=True)
    frames = play(source, 9).frames[:9]
    assert [f.data for f in frames] == [b"\x01", b"\x02", b"\x03"] * 3
    # One pass = 20 ms of log + the 10 ms mean gap = 30 ms of log time = 3 ms at speed 10.
    assert [f.ts_ns - frames[0].ts_ns for f in frames] == [
        pass_ * 3_000_000 + offset for pass_ in range(3) for offset in (0, 1_000_000, 2_000_000)
    ]


def test_fd_frames_are_counted_not_delivered_on_a_classic_bus(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_log(
        tmp_path,
        [
            "(1700000000.000000) can0 123#01",
            "(1700000000.001000) can0 123##1" + "00" * 12,
            "(1700000000.002000) can0 123#02",
            "(1700000000.003000) can0 124##0" + "11" * 64,
            "(1700000000.004000) can0 123#03",
        ],
    )
    classic = ReplaySource(path, 0, can_fd=False, speed=20)
    with caplog.at_level(logging.WARNING, logger="wiretap.replay"):
        collector = Collector()
        classic.start(collector)
        wait_until(lambda: classic.counters()["replayed"] + classic.counters()["fd_skipped"] == 5)
        classic.stop()
        classic.join(5)
    assert [f.data for f in collector.frames] == [b"\x01", b"\x02", b"\x03"]
    assert classic.counters() == {"tx": 0, "fd_skipped": 2, "replayed": 3}
    assert sum("skipping CAN FD frames" in message for message in caplog.messages) == 1

    fd_frames = play(ReplaySource(path, 0, can_fd=True, speed=20), 5).frames
    assert [len(f.data) for f in fd_frames] == [1, 12, 1, 64, 1]
    assert [f.fd for f in fd_frames] == [False, True, False, True, False]
    assert fd_frames[1].brs is True


def test_transmit_is_looped_back_as_a_tx_frame(tmp_path: pathlib.Path) -> None:
    path = write_log(tmp_path, ["(1700000000.000000) can0 123#01"])
    source = ReplaySource(path, first_bus=4, can_fd=False)
    sent = make_frame(4, 0x7E0, b"\x02\x01\x0c")
    assert source.transmit(sent, origin=7) is TransmitResult.DOWN  # not started: nowhere to go
    collector = Collector()
    source.start(collector)
    try:
        wait_until(lambda: len(collector.frames) == 1)
        before = time.time_ns()
        assert source.transmit(sent, origin=7) is TransmitResult.SENT
        after = time.time_ns()
        fd_frame = make_frame(4, 0x7E0, bytes(12), fd=True)
        assert source.transmit(fd_frame, origin=7) is TransmitResult.REFUSED
        assert source.transmit(make_frame(5, 0x7E0, b"\x01"), origin=7) is TransmitResult.REFUSED
    finally:
        source.stop()
        source.join(5)
    echo = collector.frames[1]
    assert echo._replace(ts_ns=0) == sent._replace(direction="tx", origin=7)
    assert before <= echo.ts_ns <= after
    assert len(collector.frames) == 2
    assert source.counters() == {"tx": 1, "fd_skipped": 0, "replayed": 1}


def test_stop_ends_a_long_wait_promptly(tmp_path: pathlib.Path) -> None:
    path = write_log(
        tmp_path, ["(1700000000.000000) can0 123#01", "(1700003600.000000) can0 123#02"]
    )
    source = ReplaySource(path, 0, can_fd=False)
    collector = Collector()
    source.start(collector)
    wait_until(lambda: len(collector.frames) == 1)
    source.stop()
    source.join(5)
    assert not source._thread.is_alive()
    assert len(collector.frames) == 1


def test_an_empty_log_still_offers_one_bus(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_log(tmp_path, ["not a frame"])
    with caplog.at_level(logging.WARNING, logger="wiretap.replay"):
        source = ReplaySource(path, 1, can_fd=False)
    assert source.bus_count == 1
    assert f"replay {path}: no frames in the log" in caplog.messages


# --- pathological timestamps and junk --------------------------------------------------------


def replay_warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_jump_of_30000_years_is_played_as_the_longest_gap(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    # At speed 100 the raw jump would still be a wait longer than threading.TIMEOUT_MAX.
    years = 30_000 * 365 * 86400
    path = write_log(tmp_path, ["(1700000000.000000) can0 123#01",
                                f"({1700000000 + years}.000000) can0 123#02",
                                f"({1700000000 + years}.000500) can0 123#03"])  # fmt: skip
    with caplog.at_level(logging.INFO, logger="wiretap.replay"):
        source = ReplaySource(path, 0, can_fd=False, speed=100)
        frames = play(source, 3).frames
    assert [f.data for f in frames] == [b"\x01", b"\x02", b"\x03"]
    gap = MAX_GAP_NS // 100
    assert [f.ts_ns - frames[0].ts_ns for f in frames] == [0, gap, gap + 5_000]
    assert replay_warnings(caplog) == [
        f"replay {path}: 1 gaps longer than 10.000 s between frames played as 10.000 s (the first:"
        " 29,979.5 years before line 2, a clock that jumped or a bus that slept)"
    ]


def test_a_clock_jumping_from_1970_to_2023_costs_one_long_gap_not_54_years(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_log(tmp_path, ["(0.000000) can0 123#01", "(0.010000) can0 123#02",
                                "(1700000000.000000) can0 123#03",
                                "(1700000000.020000) can0 123#04"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="wiretap.replay"):
        frames = play(ReplaySource(path, 0, can_fd=False, speed=100), 4).frames
    gap = MAX_GAP_NS // 100
    assert [f.ts_ns - frames[0].ts_ns for f in frames] == [0, 100_000, 100_000 + gap,
                                                           300_000 + gap]  # fmt: skip
    assert len(replay_warnings(caplog)) == 1
    assert "1 gaps longer than 10.000 s" in replay_warnings(caplog)[0]
    assert "53.9 years before line 3" in replay_warnings(caplog)[0]


def test_a_loop_over_equal_timestamps_plays_no_faster_than_a_full_bus(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_log(tmp_path, [f"(1700000000.000000) can0 123#{i:02X}" for i in range(100)])
    with caplog.at_level(logging.WARNING, logger="wiretap.replay"):
        source = ReplaySource(path, 0, can_fd=False, loop=True)
        collector = play(source, 300)
    frames = collector.frames[:300]
    # A pass: 100 frames x 50 us = 5 ms (it was the 1 ms minimum gap: 100,000 frames/s).
    assert [f.ts_ns - frames[0].ts_ns for f in frames] == [
        pass_ * 100 * MIN_FRAME_GAP_NS for pass_ in range(3) for _ in range(100)
    ]
    assert [f.data[0] for f in frames] == list(range(100)) * 3
    for arrival, batch in collector.batches:  # and no pass starts before its time
        assert arrival >= batch[-1].ts_ns - 1_000_000
    assert replay_warnings(caplog) == [
        f"replay {path}: 100 frames span only 0.000 s of log time: each --replay-loop pass lasts "
        "0.005 s (50 us a frame, a full 1 Mbit/s bus) rather than replaying them as fast as the "
        "CPU allows"
    ]


def test_a_loop_over_backward_timestamps_plays_each_pass_at_a_bus_pace(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_log(tmp_path, [f"(1700000000.{999_000 - i * 1000:06d}) can0 123#{i:02X}"
                                for i in range(200)])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="wiretap.replay"):
        source = ReplaySource(path, 0, can_fd=False, loop=True)
        frames = play(source, 400).frames[:400]
    assert [f.ts_ns - frames[0].ts_ns for f in frames] == [
        pass_ * 200 * MIN_FRAME_GAP_NS for pass_ in range(2) for _ in range(200)
    ]
    assert replay_warnings(caplog)[0] == (
        f"replay {path}: timestamps run backwards 199 times (the first at line 2): those frames "
        "play without a pause"
    )
    assert "each --replay-loop pass lasts 0.010 s" in replay_warnings(caplog)[1]
    assert len(replay_warnings(caplog)) == 2


def test_200000_junk_lines_give_three_examples_and_one_count(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    junk = ["(1700000000.000000) can0 123#0"] * 100_000 + ["\x00\xffgarbage"] * 100_000
    path = write_log(tmp_path, ["(1700000000.000000) can0 123#01", *junk,
                                "(1700000000.001000) can0 123#02"])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="wiretap.replay"):
        lines = read_log(path)
    assert [line.frame.data for line in lines] == [b"\x01", b"\x02"]
    assert [line.line_number for line in lines] == [1, 200_002]
    assert replay_warnings(caplog) == [
        f"replay {path}:2: data '0' has an odd number of hex digits",
        f"replay {path}:3: data '0' has an odd number of hex digits",
        f"replay {path}:4: data '0' has an odd number of hex digits",
        f"replay {path}: 200000 malformed lines skipped in all (the first 3 shown above)",
    ]
