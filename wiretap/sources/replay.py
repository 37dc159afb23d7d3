"""The replay source: a ``candump -l`` log played back as if it came from live buses.

Owns the parsing of candump log lines and their paced playback. A log line is::

    (1700000000.123456) can0 123#11223344          classic, standard ID (3 hex digits)
    (1700000000.123456) can1 18DAF110#0102         classic, extended ID (8 hex digits)
    (1700000000.123456) can1 123##311223344        CAN FD: flags nibble (BRS=1, ESI=2), data
    (1700000000.123456) can0 123#R                 RTR (also ``123#R5`` / ``123#R#5``)
    (1700000000.123456) can0 123#                  no data
    (1700000000.123456) can0 123#11223344 T        candump -x direction marker (T or R)

Data bytes may be separated by ``.`` and an 8-byte classic frame may carry candump's ``_<dlc>``
suffix. Error frames (an 8-digit ID with ``CAN_ERR_FLAG``) are valid lines but not data: skipped.
A malformed line is skipped, never stopping the replay; the first few are logged with their line
numbers, and one summary line counts them all.

Loggers without a real-time clock write timestamps that jump (1970 to 2023 once the network comes
up), repeat or run backwards. Playback stays sane and says so once, at start: a gap longer than
:data:`MAX_GAP_NS` is played as that long, a step backwards as no gap, and a ``--replay-loop`` pass
lasts at least :data:`MIN_FRAME_GAP_NS` per frame (a full 1 Mbit/s bus), however little time the
timestamps span.

Each distinct interface name becomes its own bus, numbered from ``first_bus`` in order of first
appearance. A frame's ``ts_ns`` is its *scheduled* time (wall clock at start plus the log offset
divided by the speed), so timestamp differences match the log's exactly whatever the thread's
wake-up jitter.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Tuple

from ..frames import (
    CAN_EFF_MASK,
    CAN_ERR_FLAG,
    CAN_SFF_MASK,
    CANFD_BRS,
    CANFD_ESI,
    RX,
    TX,
    Frame,
    is_valid_fd_length,
)
from . import BusInfo, Source, TransmitResult

log = logging.getLogger("wiretap.replay")

REPLAY_BITRATE = 500_000
"""What ``F1 06`` reports for a replayed bus: the log does not say, this is the common rate."""

MIN_LOOP_GAP_NS = 1_000_000
"""Gap between the last frame of a pass and the first of the next when the log gives none."""

MAX_GAP_NS = 10_000_000_000
"""Longest pause played between two frames (log time): a longer one is a clock that jumped or a
bus that slept, and waiting it out (54 years for a 1970 -> 2023 jump) helps nobody."""

MIN_FRAME_GAP_NS = 50_000
"""Shortest mean time a frame takes in a ``--replay-loop`` pass (log time): a classic frame on a
1 Mbit/s bus takes 47 bits or more, so no real bus is faster. It bounds a loop over a log whose
timestamps are all equal, instead of replaying it as fast as the CPU allows."""

BAD_LINES_SHOWN = 3
"""Malformed lines logged one by one; the rest are only counted in the summary line."""

_LINE = re.compile(r"\((\d+)\.(\d{1,9})\)\s+(\S+)\s+(\S+)(?:\s+([TR]))?")
_HEX = re.compile(r"[0-9A-Fa-f]*")


class LogLine(NamedTuple):
    """One parsed log line. ``frame`` has bus 0 and ``ts_ns`` 0: the source assigns both."""

    ts_ns: int
    iface: str
    frame: Frame
    marked_tx: bool
    line_number: int = 0


def _parse_hex_bytes(text: str) -> bytes:
    digits = text.replace(".", "")
    if not _HEX.fullmatch(digits):
        raise ValueError(f"data {text!r} is not hex")
    if len(digits) % 2:
        raise ValueError(f"data {text!r} has an odd number of hex digits")
    return bytes.fromhex(digits)


def _parse_id(text: str) -> Tuple[int, bool]:
    """The ID and whether it is extended; candump decides by the number of digits (3 or 8)."""
    if len(text) not in (3, 8) or not _HEX.fullmatch(text):
        raise ValueError(f"CAN ID {text!r} is not 3 or 8 hex digits")
    return int(text, 16), len(text) == 8


def parse_frame(text: str) -> Optional[Frame]:
    """Parse candump's compact frame form (``123#11223344``, ``123##1…``, ``123#R``).

    Returns ``None`` for an error frame; raises ``ValueError`` with the reason when malformed.
    """
    id_text, sep, body = text.partition("#")
    if not sep:
        raise ValueError(f"frame {text!r} has no '#'")
    can_id, extended = _parse_id(id_text)
    if extended and can_id & CAN_ERR_FLAG:
        return None
    limit = CAN_EFF_MASK if extended else CAN_SFF_MASK
    if can_id > limit:
        raise ValueError(f"CAN ID {id_text} is out of range")

    if body.startswith("#"):  # CAN FD
        if len(body) < 2 or not _HEX.fullmatch(body[1]):
            raise ValueError(f"CAN FD frame {text!r} has no flags nibble")
        flags = int(body[1], 16)
        data = _parse_hex_bytes(body[2:])
        if not is_valid_fd_length(len(data)):
            raise ValueError(f"{len(data)} bytes is not a CAN FD payload length")
        return Frame(
            0, can_id, extended, False, True, bool(flags & CANFD_BRS), bool(flags & CANFD_ESI),
            data, 0,
        )  # fmt: skip

    if body.startswith("R"):
        length = body[2:] if body.startswith("R#") else body[1:]
        if length and not (len(length) == 1 and length in "012345678"):
            raise ValueError(f"RTR length {body[1:]!r} is not 0..8")
        return Frame(0, can_id, extended, True, False, False, False, b"", 0)

    data_text, underscore, dlc = body.partition("_")
    data = _parse_hex_bytes(data_text)
    if underscore and (len(data) != 8 or not re.fullmatch(r"[9A-Fa-f]", dlc)):
        raise ValueError(f"'_{dlc}' is only valid as DLC 9..F after 8 data bytes")
    if len(data) > 8:
        raise ValueError(f"classic frame with {len(data)} data bytes (CAN FD needs '##')")
    return Frame(0, can_id, extended, False, False, False, False, data, 0)


def parse_line(line: str) -> Optional[LogLine]:
    """Parse one log line; ``None`` for a blank line or an error frame, ``ValueError`` if bad."""
    stripped = line.strip()
    if not stripped:
        return None
    match = _LINE.fullmatch(stripped)
    if match is None:
        raise ValueError("not '(SECONDS.MICROS) IFACE FRAME'")
    seconds, fraction, iface, frame_text, marker = match.groups()
    frame = parse_frame(frame_text)
    if frame is None:
        return None
    ts_ns = int(seconds) * 1_000_000_000 + int(fraction.ljust(9, "0"))
    return LogLine(ts_ns, iface, frame, marker == "T")


def read_log(path: str) -> List[LogLine]:
    """Every good line of the log at ``path``. Bad ones are skipped: the first
    :data:`BAD_LINES_SHOWN` logged as warnings with their line numbers, and all of them counted in
    one summary line when there were more."""
    lines: List[LogLine] = []
    bad = 0
    with open(path, encoding="ascii", errors="replace") as log_file:
        for line_number, line in enumerate(log_file, 1):
            try:
                parsed = parse_line(line)
            except ValueError as error:
                bad += 1
                if bad <= BAD_LINES_SHOWN:
                    log.warning("replay %s:%d: %s", path, line_number, error)
                continue
            if parsed is not None:
                lines.append(parsed._replace(line_number=line_number))
    if bad > BAD_LINES_SHOWN:
        log.warning(
            "replay %s: %d malformed lines skipped in all (the first %d shown above)",
            path, bad, BAD_LINES_SHOWN,
        )  # fmt: skip
    return lines


class Schedule(NamedTuple):
    """When each line plays, in log time since the first frame, and what had to be mended: how
    many gaps were cut short and steps backwards flattened, the first of each (its line number,
    and for a gap its length)."""

    offsets_ns: List[int]
    long_gaps: int
    first_long_gap: Tuple[int, int]
    backward_steps: int
    first_backward_step: int


def schedule(lines: List[LogLine]) -> Schedule:
    """Offsets that follow the log's timestamps, except that a gap longer than
    :data:`MAX_GAP_NS` becomes that long and a step backwards becomes no gap."""
    offsets: List[int] = []
    long_gaps = backward_steps = 0
    first_long = (0, 0)
    first_backward = 0
    offset = 0
    previous_ts = lines[0].ts_ns if lines else 0
    for line in lines:
        gap = line.ts_ns - previous_ts
        previous_ts = line.ts_ns
        if gap > MAX_GAP_NS:
            long_gaps += 1
            first_long = first_long if long_gaps > 1 else (line.line_number, gap)
            gap = MAX_GAP_NS
        elif gap < 0:
            backward_steps += 1
            first_backward = first_backward if backward_steps > 1 else line.line_number
            gap = 0
        offset += gap
        offsets.append(offset)
    return Schedule(offsets, long_gaps, first_long, backward_steps, first_backward)


def _seconds(ns: int) -> str:
    seconds = ns / 1e9
    if seconds >= 2 * 365.25 * 86400:
        return f"{seconds / (365.25 * 86400):,.1f} years"
    return f"{seconds:,.3f} s"


class ReplaySource(Source):
    """Plays a candump log on buses ``first_bus`` … with the log's timing divided by ``speed``."""

    def __init__(
        self,
        path: str,
        first_bus: int,
        can_fd: bool,
        speed: float = 1.0,
        loop: bool = False,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"replay speed must be positive, not {speed}")
        self.name = f"replay:{path}"
        self.path = path
        self.first_bus = first_bus
        self.can_fd = can_fd
        self.speed = speed
        self.loop = loop

        buses: Dict[str, int] = {}
        lines = read_log(path)
        plan = schedule(lines)
        self._warn_about(plan)
        self._entries: List[Tuple[int, Frame]] = []
        for line, offset in zip(lines, plan.offsets_ns):
            bus = buses.setdefault(line.iface, first_bus + len(buses))
            direction = TX if line.marked_tx else RX
            self._entries.append((offset, line.frame._replace(bus=bus, direction=direction)))
        if not self._entries:
            log.warning("replay %s: no frames in the log", path)
        self.bus_count = max(len(buses), 1)
        self.interfaces = list(buses)

        span = plan.offsets_ns[-1] if lines else 0
        mean_gap = span // (len(lines) - 1) if len(lines) > 1 else 0
        period = span + max(mean_gap, MIN_LOOP_GAP_NS)
        shortest = len(lines) * MIN_FRAME_GAP_NS
        if loop and lines and period < shortest:
            log.warning(
                "replay %s: %d frames span only %s of log time: each --replay-loop pass lasts %s "
                "(%d us a frame, a full 1 Mbit/s bus) rather than replaying them as fast as the "
                "CPU allows",
                path, len(lines), _seconds(span), _seconds(shortest), MIN_FRAME_GAP_NS // 1000,
            )  # fmt: skip
            period = shortest
        self._loop_period_ns = period

        self._init_thread("reader-replay")
        self._lock = threading.Lock()
        self._tx = 0
        self._fd_skipped = 0
        self._replayed = 0

    def _warn_about(self, plan: Schedule) -> None:
        if plan.long_gaps:
            line_number, gap = plan.first_long_gap
            log.warning(
                "replay %s: %d gaps longer than %s between frames played as %s (the first: %s "
                "before line %d, a clock that jumped or a bus that slept)",
                self.path, plan.long_gaps, _seconds(MAX_GAP_NS), _seconds(MAX_GAP_NS),
                _seconds(gap), line_number,
            )  # fmt: skip
        if plan.backward_steps:
            log.warning(
                "replay %s: timestamps run backwards %d times (the first at line %d): those "
                "frames play without a pause",
                self.path, plan.backward_steps, plan.first_backward_step,
            )  # fmt: skip

    def transmit(self, frame: Frame, origin: int) -> TransmitResult:
        """No wire to send on: confirm the frame as the kernel would, as a ``tx`` frame now."""
        if not self.first_bus <= frame.bus < self.first_bus + self.bus_count:
            return TransmitResult.REFUSED
        if (frame.fd or len(frame.data) > 8) and not self.can_fd:
            return TransmitResult.REFUSED
        publish = self._publish
        if publish is None:
            return TransmitResult.DOWN
        with self._lock:
            self._tx += 1
        publish([frame._replace(ts_ns=time.time_ns(), direction=TX, origin=origin)])
        return TransmitResult.SENT

    def bus_names(self) -> List[str]:
        return [f"{self.name}:{iface}" for iface in self.interfaces] or [self.name]

    def bus_info(self, bus: int) -> BusInfo:
        return BusInfo(enabled=True, listen_only=False, bitrate=REPLAY_BITRATE)

    def counters(self) -> dict:
        with self._lock:
            return {"tx": self._tx, "fd_skipped": self._fd_skipped, "replayed": self._replayed}

    def _run(self) -> None:
        publish = self._publish
        assert publish is not None
        entries = self._entries
        speed = self.speed
        start_wall_ns = time.time_ns()
        start_mono_ns = time.monotonic_ns()
        base_ns = 0  # log-time offset of the current pass
        index = 0
        while not self._stop.is_set():
            if index == len(entries):
                if not self.loop or not entries:
                    log.info("replay %s: end of log, %d frames", self.path, self._replayed)
                    self._stop.wait()
                    return
                base_ns += self._loop_period_ns
                index = 0
            now_ns = time.monotonic_ns() - start_mono_ns
            due_ns = round((base_ns + entries[index][0]) / speed)
            if due_ns > now_ns:
                self._stop.wait((due_ns - now_ns) / 1e9)
                continue
            batch: List[Frame] = []
            skipped = 0
            while index < len(entries):
                offset_ns, frame = entries[index]
                scheduled_ns = round((base_ns + offset_ns) / speed)
                if scheduled_ns > now_ns:
                    break
                index += 1
                if frame.fd and not self.can_fd:
                    skipped += 1
                    continue
                batch.append(frame._replace(ts_ns=start_wall_ns + scheduled_ns))
            self._count(len(batch), skipped)
            if batch:
                publish(batch)

    def _count(self, replayed: int, fd_skipped: int) -> None:
        with self._lock:
            first_skip = fd_skipped and not self._fd_skipped
            self._replayed += replayed
            self._fd_skipped += fd_skipped
        if first_skip:
            log.warning(
                "replay %s: skipping CAN FD frames, as a classic interface would (--can-fd plays "
                "them)",
                self.path,
            )
