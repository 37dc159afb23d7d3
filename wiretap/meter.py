"""Bus metering: frames, payload bytes and bits on the wire per bus, for the bus load.

Owns :func:`frame_bits`, the length of a frame on the wire (ISO 11898-1 field by field, bit
stuffing estimated), and :class:`BusMeter`, the broker consumer that adds them up per bus.
Bus load is the bits a bus carried in an interval divided by what its bit rate allows; the rate
and the interval are the reader's business (``status``), the counting is done here.

Bit stuffing depends on the bits themselves (the CRC included), which are not worth computing per
frame in Python; it is estimated as half the worst case, ``(n - 1) // 8`` for ``n`` stuffable
bits (the worst case, ``(n - 1) // 4``, is Davis et al., "Controller Area Network (CAN)
schedulability analysis", 2007). Real traffic lies between no stuffing and the worst case, so the
load is good to about ±8 % of its value.
"""

from __future__ import annotations

import collections
import functools
import operator
import threading
from typing import Dict, NamedTuple, Sequence, Tuple

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


def _stuff_estimate(stuffable_bits: int) -> int:
    return max(stuffable_bits - 1, 0) // 8


class FrameBits(NamedTuple):
    """A frame's length on the wire: bits sent at the nominal bit rate, and bits sent at the
    data bit rate (non-zero only for CAN FD frames with BRS)."""

    nominal: int
    fast: int


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
    fixed_stuff = -(-(FD_STUFF_COUNT + crc) // 4)
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


_KEY = operator.itemgetter(0, 2, 4, 5)  # Frame.bus, .extended, .fd, .brs
_DATA = operator.itemgetter(7)  # Frame.data


class BusMeter:
    """The broker consumer that counts each bus's frames, payload bytes and bits on the wire.

    ``deliver`` groups a batch by frame shape in C (``collections.Counter`` over item getters),
    so the Python work is per shape (a handful per batch), not per frame.
    """

    def __init__(self) -> None:
        self._totals: Dict[int, list] = {}
        self._lock = threading.Lock()

    def deliver(self, frames: Sequence[Frame]) -> None:
        shapes = collections.Counter(zip(map(_KEY, frames), map(len, map(_DATA, frames))))
        with self._lock:
            for ((bus, extended, fd, brs), length), count in shapes.items():
                bits = frame_bits(extended, fd, brs, length)
                totals = self._totals.get(bus)
                if totals is None:
                    totals = self._totals[bus] = [0, 0, 0, 0]
                totals[0] += count
                totals[1] += count * length
                totals[2] += count * bits.nominal
                totals[3] += count * bits.fast

    def totals(self, bus: int) -> BusTotals:
        with self._lock:
            return BusTotals(*self._totals.get(bus, (0, 0, 0, 0)))

    def all_totals(self) -> Dict[int, Tuple[int, int, int, int]]:
        with self._lock:
            return {bus: BusTotals(*values) for bus, values in self._totals.items()}
