"""The console echo (``--echo``): every frame printed as one candump-style line.

Owns the line format and the consumer that writes it. A line is::

    B0 (12.345_678) 123 S [8] 11 22 33 44 55 66 77 88 | ."3DUfw.
    B1 (12.400_001) 18FEF100 E [2] 01 02 | ..
    B1 (12.500_000) 123 S FD BRS [12] 00 01 … 0B | ............
    B0 (13.000_000) 5A1 S R [0]
    B0 (13.100_000) 7E0 S TX [3] 02 01 0C | ...

Fields: ``B<bus>``; seconds since the server started as ``s.mmm_uuu``; the ID in upper-case hex,
3 digits for a standard (``S``) and 8 for an extended (``E``) frame; ``FD`` with ``BRS`` / ``ESI``
when set, ``R`` for a remote request, ``TX`` for a frame this host sent; ``[length]``; the data
bytes in hex; then `` | `` and the data as ASCII, printable bytes (0x20..0x7E) as themselves and
others as ``.`` (no ASCII part when there is no data). With ``colour``, the bus tag and the
printable bytes are highlighted with ANSI colours.

The echo is a consumer like any other: :meth:`ConsoleEcho.deliver` only queues into a bounded
mailbox, and a thread named ``console`` writes. A slow terminal loses echo lines, never frames.
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence, TextIO

from .broker import Mailbox
from .frames import RX, TX, Frame

log = logging.getLogger("wiretap.console")

BUS_COLOUR = "\x1b[1;36m"
PRINTABLE_COLOUR = "\x1b[32m"
RESET = "\x1b[0m"

LINES_PER_WRITE = 256


def _seconds(delta_ns: int) -> str:
    sign = "-" if delta_ns < 0 else ""
    seconds, micros = divmod(abs(delta_ns) // 1000, 1_000_000)
    return f"{sign}{seconds}.{micros // 1000:03d}_{micros % 1000:03d}"


def _is_printable(byte: int) -> bool:
    return 0x20 <= byte <= 0x7E


def format_frame(frame: Frame, start_ns: int, colour: bool, default_dir: str = RX) -> str:
    """One echo line for ``frame`` (no newline); ``start_ns`` is time zero."""
    bus_tag = f"B{frame.bus}"
    parts = [
        f"{BUS_COLOUR}{bus_tag}{RESET}" if colour else bus_tag,
        f"({_seconds(frame.ts_ns - start_ns)})",
        f"{frame.can_id:08X}" if frame.extended else f"{frame.can_id:03X}",
        "E" if frame.extended else "S",
    ]
    if frame.fd:
        parts.append("FD")
        if frame.brs:
            parts.append("BRS")
        if frame.esi:
            parts.append("ESI")
    if frame.rtr:
        parts.append("R")
    if frame.direction == TX or default_dir == TX:
        parts.append("TX")
    data = frame.data
    parts.append(f"[{len(data)}]")
    if not data:
        return " ".join(parts)
    if colour:
        parts.extend(
            f"{PRINTABLE_COLOUR}{byte:02X}{RESET}" if _is_printable(byte) else f"{byte:02X}"
            for byte in data
        )
        ascii_text = "".join(
            f"{PRINTABLE_COLOUR}{chr(byte)}{RESET}" if _is_printable(byte) else "." for byte in data
        )
    else:
        parts.extend(f"{byte:02X}" for byte in data)
        ascii_text = "".join(chr(byte) if _is_printable(byte) else "." for byte in data)
    parts.append("|")
    parts.append(ascii_text)
    return " ".join(parts)


class ConsoleEcho:
    """Writes each delivered frame to ``stream``; drops (and counts) what the stream cannot take."""

    def __init__(
        self,
        stream: TextIO,
        colour: bool,
        start_ns: int,
        capacity: int = 10000,
        default_dir: str = RX,
    ) -> None:
        self.stream = stream
        self.default_dir = default_dir
        self.colour = colour
        self.start_ns = start_ns
        self.mailbox = Mailbox("console echo", capacity)
        self._stop = threading.Event()
        self._broken = False
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)

    @property
    def dropped(self) -> int:
        return self.mailbox.drops.total

    def deliver(self, frames: Sequence[Frame]) -> None:
        if not self._broken:
            self.mailbox.put(frames)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is already queued, then end the thread (waiting at most ``timeout`` s)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            frames = self.mailbox.get(LINES_PER_WRITE, timeout=0.2)
            if not frames:
                if self._stop.is_set():
                    return
                continue
            start_ns, colour, default_dir = self.start_ns, self.colour, self.default_dir
            text = "".join(
                format_frame(frame, start_ns, colour, default_dir) + "\n" for frame in frames
            )
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError) as error:
                # A closed terminal or a pipe whose reader left (`| head`): echo off, frames go on.
                self._broken = True
                log.warning("console echo: cannot write (%s), echo is off", error)
                return
