"""Bus metering: frames, payload bytes and bits on the wire per bus, for the bus load.

Owns :func:`frame_bits`, the length of a frame on the wire (ISO 11898-1 field by field, bit
stuffing estimated), and :class:`BusMeter`, the broker consumer that adds them up per bus.
Bus load is the bits a bus carried in an interval divided by what its bit rate allows; the rate
and the interval are the reader's business (``status``), the counting is done here.

Bit stuffing depends on the bits themselves (the CRC included), which are not worth computing per
frame in Python; it is estimated as half the worst case, ``(n - 1) / 8`` for ``n`` stuffable
bits (the worst case, ``(n - 1) // 4``, is Davis et al., "Controller Area Network (CAN)
schedulability analysis", 2007). Real traffic lies between no stuffing and the worst case, so the
load is good to about ±8 % of its value. The estimate is kept fractional, which makes a classic
frame's length linear in its ID kind and payload length: the meter sums a batch of classic frames
with a few C-level passes instead of a Python step per frame.
"""

from __future__ import annotations

import collections
import functools
import itertools
import operator
import threading
from typing import Dict, List, NamedTuple, Sequence

from .frames import Frame

# Field lengths in bits (ISO 11898-1:2015 §10.4).
CLASSIC_STUFFED = 34  # SOF, 11-bit ID, RTR, IDE, r0, DLC, 15-bit CRC (before the payload's 8n)
CLASSIC_EXTENDED_EXTRA = 20  # SRR, IDE moved, 18-bit ID extension, r1
TRAILER = 13  # CRC delimiter, ACK slot and delimiter, 7-bit EOF, 3-bit intermission
FD_ARBITRATION = 17  # SOF, 11-bit ID, RRS, IDE, FDF, res, BRS: at the nominal bit rate
FD_EXTENDED_EXTRA = 19  # SRR, 18-bit ID extension
FD_CONTROL = 5  # ESI, DLC: at the data bit rate when BRS is set
FD_STUFF_COUNT = 4  # 3-bit stuff count and its parity
FD_CRC_SHORT, FD_CRC_LONG = 17, 21  # CRC-17 up to 16 payload bytes, CRC-21 above
FD_TRAILER_FAST = 1  # CRC delimiter (the bit rate switches back at its sample point)
FD_TRAILER = 12  # ACK slot and delimiter, EOF, intermission


def _stuff_estimate(stuffable_bits: int) -> float:
    return (stuffable_bits - 1) / 8


class FrameBits(NamedTuple):
    """A frame's length on the wire: bits sent at the nominal bit rate, and bits sent at the
    data bit rate (non-zero only for CAN FD frames with BRS). Fractional: stuffing is an
    expected value."""

    nominal: float
    fast: float


@functools.lru_cache(maxsize=1024)
def frame_bits(extended: bool, fd: bool, brs: bool, length: int) -> FrameBits:
    """Bits a data frame with a ``length``-byte payload occupies on the bus, intermission
    included, stuffing estimated. An RTR frame is ``length`` 0 (it carries no data field)."""
    payload = 8 * length
    if not fd:
        stuffed = CLASSIC_STUFFED + payload + (CLASSIC_EXTENDED_EXTRA if extended else 0)
        return FrameBits(stuffed + _stuff_estimate(stuffed) + TRAILER, 0)
    arbitration = FD_ARBITRATION + (FD_EXTENDED_EXTRA if extended else 0)
    data_phase = FD_CONTROL + payload
    crc = FD_CRC_SHORT if length <= 16 else FD_CRC_LONG
    # One fixed stuff bit ahead of the stuff count and after every 4 bits of count and CRC.
    fixed_stuff = -(-(FD_STUFF_COUNT + crc) // 4)  # ceil
    fast = (
        data_phase
        + _stuff_estimate(arbitration + data_phase)
        - _stuff_estimate(arbitration)
        + FD_STUFF_COUNT
        + crc
        + fixed_stuff
        + FD_TRAILER_FAST
    )
    nominal = arbitration + _stuff_estimate(arbitration) + FD_TRAILER
    return FrameBits(nominal, fast) if brs else FrameBits(nominal + fast, 0)


def load_ratio(nominal_bits: int, fast_bits: int, seconds: float, bitrate: int,
               data_bitrate: int = 0) -> float:  # fmt: skip
    """The share of ``seconds`` the bus was busy carrying these bits (0.0 … 1.0 and above if
    the estimate overshoots); ``data_bitrate`` 0 counts the fast bits at the nominal rate."""
    if seconds <= 0 or bitrate <= 0:
        return 0.0
    busy_s = nominal_bits / bitrate + fast_bits / (data_bitrate or bitrate)
    return busy_s / seconds


class BusTotals(NamedTuple):
    frames: int
    bytes: int
    nominal_bits: int
    fast_bits: int


# A classic frame, in eighths of a bit: 8 * (stuffed + (stuffed - 1) / 8 + TRAILER) with
# stuffed = CLASSIC_STUFFED + CLASSIC_EXTENDED_EXTRA * extended + 8 * length.
CLASSIC_EIGHTHS_BASE = 9 * CLASSIC_STUFFED - 1 + 8 * TRAILER
CLASSIC_EIGHTHS_EXTENDED = 9 * CLASSIC_EXTENDED_EXTRA
CLASSIC_EIGHTHS_PER_BYTE = 9 * 8

_BUS = operator.itemgetter(0)  # Frame.bus
_EXTENDED = operator.itemgetter(2)
_FD = operator.itemgetter(4)
_KEY = operator.itemgetter(2, 4, 5)  # Frame.extended, .fd, .brs
_DATA = operator.itemgetter(7)  # Frame.data


class BusMeter:
    """The broker consumer that counts each bus's frames, payload bytes and bits on the wire.

    ``deliver`` works per bus and batch in C-level passes (``map`` over item getters, ``sum``),
    not per frame in Python; only batches with CAN FD frames are grouped by frame shape.
    """

    def __init__(self) -> None:
        self._totals: Dict[int, List[float]] = {}
        self._lock = threading.Lock()

    def deliver(self, frames: Sequence[Frame]) -> None:
        if not frames:
            return
        buses = list(map(_BUS, frames))
        first = buses[0]
        if buses.count(first) == len(buses):
            self._add(first, frames)
            return
        for bus in set(buses):
            self._add(bus, list(itertools.compress(frames, map(bus.__eq__, buses))))

    def _add(self, bus: int, frames: Sequence[Frame]) -> None:
        count = len(frames)
        lengths = list(map(len, map(_DATA, frames)))
        payload = sum(lengths)
        if not any(map(_FD, frames)):
            extended = sum(map(_EXTENDED, frames))
            nominal = (
                CLASSIC_EIGHTHS_BASE * count
                + CLASSIC_EIGHTHS_EXTENDED * extended
                + CLASSIC_EIGHTHS_PER_BYTE * payload
            ) / 8
            fast = 0.0
        else:
            nominal = fast = 0.0
            shapes = collections.Counter(zip(map(_KEY, frames), lengths))
            for (extended, fd, brs), length in shapes:
                bits = frame_bits(extended, fd, brs, length)
                times = shapes[(extended, fd, brs), length]
                nominal += times * bits.nominal
                fast += times * bits.fast
        with self._lock:
            totals = self._totals.get(bus)
            if totals is None:
                totals = self._totals[bus] = [0, 0, 0.0, 0.0]
            totals[0] += count
            totals[1] += payload
            totals[2] += nominal
            totals[3] += fast

    def totals(self, bus: int) -> BusTotals:
        """Counts so far; bits rounded to whole bits."""
        with self._lock:
            frames, payload, nominal, fast = self._totals.get(bus, (0, 0, 0.0, 0.0))
        return BusTotals(frames, payload, round(nominal), round(fast))
