"""The CAN frame value and the kernel's frame layouts.

Owns: the :class:`Frame` value every other module passes around, the ``struct can_frame`` /
``struct canfd_frame`` codecs (``<linux/can.h>``), the flag constants named as in that header, and
the CAN FD DLC <-> length tables. Imports nothing from the project.
"""

from __future__ import annotations

import struct
from typing import NamedTuple, Optional, Union

# <linux/can.h>
CAN_EFF_FLAG = 0x80000000  # extended (29-bit) frame format
CAN_RTR_FLAG = 0x40000000  # remote transmission request
CAN_ERR_FLAG = 0x20000000  # error message frame
CAN_SFF_MASK = 0x000007FF
CAN_EFF_MASK = 0x1FFFFFFF
CAN_ERR_MASK = 0x1FFFFFFF
CANFD_BRS = 0x01  # bit rate switch
CANFD_ESI = 0x02  # error state indicator of the transmitting node
CANFD_FDF = 0x04  # marks a canfd_frame (set by the kernel since 5.14)

CAN_MTU = 16
CANFD_MTU = 72

# <linux/can/error.h>: the classes a reader logs as state transitions.
CAN_ERR_CRTL = 0x00000004  # controller problems, details in data[1]
CAN_ERR_BUSOFF = 0x00000040
CAN_ERR_CRTL_RX_PASSIVE = 0x10
CAN_ERR_CRTL_TX_PASSIVE = 0x20

RX = "rx"
TX = "tx"

CAN_FRAME = struct.Struct("=IB2xB8s")
"""``struct can_frame`` (16 bytes)::

    struct can_frame {
        canid_t can_id;   /* 32 bit CAN_ID + EFF/RTR/ERR flags */
        __u8    len;      /* frame payload length in byte (0 .. 8), a.k.a. can_dlc */
        __u8    __pad;
        __u8    __res0;
        __u8    len8_dlc; /* optional DLC for 8 byte payload length (9 .. 15) */
        __u8    data[8] __attribute__((aligned(8)));
    };
"""

CANFD_FRAME = struct.Struct("=IBB2x64s")
"""``struct canfd_frame`` (72 bytes)::

    struct canfd_frame {
        canid_t can_id;   /* 32 bit CAN_ID + EFF/RTR/ERR flags */
        __u8    len;      /* frame payload length in byte (0 .. 64) */
        __u8    flags;    /* additional flags for CAN FD (CANFD_BRS, CANFD_ESI, CANFD_FDF) */
        __u8    __res0;
        __u8    __res1;
        __u8    data[64] __attribute__((aligned(8)));
    };
"""

FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)
"""Payload length in bytes for each CAN FD DLC code 0..15 (ISO 11898-1)."""

_LEN_TO_DLC = {length: dlc for dlc, length in enumerate(FD_LENGTHS)}
FD_DLC_OF_LENGTH = _LEN_TO_DLC
"""DLC code of each valid CAN FD payload length (0-8, 12, 16, 20, 24, 32, 48, 64)."""

_FD_PADDED_LENGTH = tuple(min(n for n in FD_LENGTHS if n >= length) for length in range(65))


def dlc_to_len(dlc: int) -> int:
    """Payload length in bytes for a CAN FD DLC code (0..15)."""
    return FD_LENGTHS[dlc]


def len_to_dlc(length: int) -> int:
    """The DLC code of a valid CAN FD payload length; ``ValueError`` for others (e.g. 9)."""
    try:
        return _LEN_TO_DLC[length]
    except KeyError:
        raise ValueError(f"{length} is not a CAN FD payload length") from None


def is_valid_fd_length(length: int) -> bool:
    return length in _LEN_TO_DLC


class Frame(NamedTuple):
    """One CAN or CAN FD data frame, as read from (or confirmed on) a bus.

    ``can_id`` carries no flag bits. ``ts_ns`` is the kernel receive time in ns since the Unix
    epoch. ``direction`` is ``tx`` for a frame this host sent, else ``rx``; ``default_dir``
    relabels the ``rx`` ones where a label is shown or stored (echo, database). ``origin`` is
    non-zero only for the kernel's confirmation of a frame that a GVRET client transmitted: the
    token of that client, so it is not sent its own frame back.
    """

    bus: int
    can_id: int
    extended: bool
    rtr: bool
    fd: bool
    brs: bool
    esi: bool
    data: bytes
    ts_ns: int
    direction: str = RX
    origin: int = 0


class ErrorFrame(NamedTuple):
    """A ``CAN_ERR_FLAG`` frame: bus state, never data. ``err_class`` is the ID's error bits."""

    bus: int
    err_class: int
    data: bytes
    ts_ns: int


_new_frame = tuple.__new__  # Frame(...) through its __new__ costs ~3x more; this is the hot path.
_unpack_can_frame = CAN_FRAME.unpack_from
_unpack_canfd_frame = CANFD_FRAME.unpack_from


def decode(
    buf: bytes, bus: int, ts_ns: int, direction: str = RX, origin: int = 0
) -> Optional[Frame | ErrorFrame]:
    """Decode a ``can_frame`` (16 bytes) or ``canfd_frame`` (72 bytes) read from a raw socket.

    Returns ``None`` for a buffer of any other size (not a CAN frame). The payload is cut to
    ``len`` bytes; RTR frames carry no data whatever their length field says.
    """
    return decode_from(buf, 0, len(buf), bus, ts_ns, direction, origin)


def decode_from(
    buffer: Union[bytes, memoryview],
    offset: int,
    size: int,
    bus: int,
    ts_ns: int,
    direction: str,
    origin: int,
) -> Optional[Frame | ErrorFrame]:
    """:func:`decode` of the ``size`` bytes at ``offset`` in ``buffer`` (a batch's receive
    buffer), read in place."""
    if size == CAN_MTU:
        can_id, length, _len8_dlc, payload = _unpack_can_frame(buffer, offset)
        fd = brs = esi = False
        if length > 8:
            length = 8
    elif size == CANFD_MTU:
        can_id, length, flags, payload = _unpack_canfd_frame(buffer, offset)
        fd = True
        brs = flags & CANFD_BRS != 0
        esi = flags & CANFD_ESI != 0
        # A local raw socket may send any len (vcan passes 9 on); a controller would pad it to
        # the next DLC length (can_fd_len2dlc), and the encoders count on valid lengths.
        length = _FD_PADDED_LENGTH[min(length, 64)]
    else:
        return None
    if can_id & CAN_ERR_FLAG:
        return ErrorFrame(bus, can_id & CAN_ERR_MASK, payload[:length], ts_ns)
    if can_id & CAN_EFF_FLAG:
        extended, arbitration_id = True, can_id & CAN_EFF_MASK
    else:
        extended, arbitration_id = False, can_id & CAN_SFF_MASK
    rtr = can_id & CAN_RTR_FLAG != 0 and not fd
    data = b"" if rtr else payload[:length]
    return _new_frame(
        Frame, (bus, arbitration_id, extended, rtr, fd, brs, esi, data, ts_ns, direction, origin)
    )


def encode(frame: Frame) -> bytes:
    """The ``can_frame`` or ``canfd_frame`` bytes to write to a raw socket for ``frame``.

    A frame is written as ``canfd_frame`` when it is FD or carries more than 8 bytes.
    """
    can_id = frame.can_id
    if frame.extended:
        can_id |= CAN_EFF_FLAG
    if frame.rtr:
        can_id |= CAN_RTR_FLAG
    length = len(frame.data)
    if frame.fd or length > 8:
        flags = CANFD_FDF | (CANFD_BRS if frame.brs else 0) | (CANFD_ESI if frame.esi else 0)
        return CANFD_FRAME.pack(can_id, length, flags, frame.data)
    return CAN_FRAME.pack(can_id, length, 0, frame.data)


def make_frame(
    bus: int,
    can_id: int,
    data: bytes = b"",
    *,
    extended: Optional[bool] = None,
    rtr: bool = False,
    fd: bool = False,
    brs: bool = False,
    esi: bool = False,
    ts_ns: int = 0,
    direction: str = RX,
    origin: int = 0,
) -> Frame:
    """A :class:`Frame` with sensible defaults; ``extended`` defaults to ``can_id > 0x7FF``."""
    if extended is None:
        extended = can_id > CAN_SFF_MASK
    return Frame(bus, can_id, extended, rtr, fd, brs, esi, bytes(data), ts_ns, direction, origin)
