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
A malformed line is logged with its line number and skipped; it never stops the replay.

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

_LINE = re.compile(r"\((\d+)\.(\d{1,9})\)\s+(\S+)\s+(\S+)(?:\s+([TR]))?")
_HEX = re.compile(r"[0-9A-Fa-f]*")


class LogLine(NamedTuple):
    """One parsed log line. ``frame`` has bus 0 and ``ts_ns`` 0: the source assigns both."""

    ts_ns: int
    iface: str
    frame: Frame
    marked_tx: bool


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
    """Every good line of the log at ``path``; each bad one is logged as a warning and skipped."""
    lines: List[LogLine] = []
    with open(path, encoding="ascii", errors="replace") as log_file:
        for line_number, line in enumerate(log_file, 1):
            try:
                parsed = parse_line(line)
            except ValueError as error:
                log.warning("replay %s:%d: %s", path, line_number, error)
                continue
            if parsed is not None:
                lines.append(parsed)
    return lines


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
        first_ts = lines[0].ts_ns if lines else 0
        self._entries: List[Tuple[int, Frame]] = []
        for line in lines:
            bus = buses.setdefault(line.iface, first_bus + len(buses))
            direction = TX if line.marked_tx else RX
            self._entries.append(
                (line.ts_ns - first_ts, line.frame._replace(bus=bus, direction=direction))
            )
        if not self._entries:
            log.warning("replay %s: no frames in the log", path)
        self.bus_count = max(len(buses), 1)
        self.interfaces = list(buses)

        span = lines[-1].ts_ns - first_ts if lines else 0
        mean_gap = span // (len(lines) - 1) if len(lines) > 1 else 0
        self._loop_period_ns = span + max(mean_gap, MIN_LOOP_GAP_NS)

        self._init_thread("reader-replay")
        self._lock = threading.Lock()
        self._tx = 0
        self._fd_skipped = 0
        self._replayed = 0

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
