"""wiretap/frames.py: the struct can_frame / canfd_frame codecs, their flags, and the DLC tables.

Expected kernel bytes are written out by hand (in the machine's byte order, as the kernel uses
it), so a layout mistake in the codec cannot hide behind a round trip.
"""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiretap.frames import (
    CAN_EFF_FLAG,
    CAN_ERR_FLAG,
    CAN_MTU,
    CAN_RTR_FLAG,
    CANFD_BRS,
    CANFD_ESI,
    CANFD_FDF,
    CANFD_FRAME,
    CANFD_MTU,
    FD_LENGTHS,
    ErrorFrame,
    Frame,
    decode,
    decode_from,
    dlc_to_len,
    encode,
    is_valid_fd_length,
    len_to_dlc,
    make_frame,
)
from wiretap.gvret import Dialect, encode_frames

TS = 1_700_000_000_123_456_789


def u32(value: int) -> bytes:
    """A canid_t as the kernel stores it: native byte order."""
    return value.to_bytes(4, sys.byteorder)


def can_frame(can_id: int, length: int, data: bytes = b"", len8_dlc: int = 0) -> bytes:
    return u32(can_id) + bytes((length, 0, 0, len8_dlc)) + data.ljust(8, b"\x00")


def canfd_frame(can_id: int, length: int, flags: int, data: bytes = b"") -> bytes:
    return u32(can_id) + bytes((length, flags, 0, 0)) + data.ljust(64, b"\x00")


# --- encode: exact bytes ------------------------------------------------------------------


def test_encode_standard_frame_is_a_16_byte_can_frame() -> None:
    frame = make_frame(0, 0x123, b"\x11\x22\x33")
    assert encode(frame) == can_frame(0x123, 3, b"\x11\x22\x33")
    assert len(encode(frame)) == CAN_MTU == 16


def test_encode_extended_frame_sets_eff_flag() -> None:
    frame = make_frame(0, 0x1ABCDEF0, bytes(range(8)))
    assert frame.extended is True
    assert encode(frame) == can_frame(0x1ABCDEF0 | CAN_EFF_FLAG, 8, bytes(range(8)))


def test_encode_low_id_can_still_be_extended() -> None:
    frame = make_frame(0, 0x5, b"", extended=True)
    assert encode(frame) == can_frame(0x5 | CAN_EFF_FLAG, 0)


def test_encode_rtr_frame_sets_rtr_flag_with_no_data() -> None:
    frame = make_frame(0, 0x7FF, rtr=True)
    assert encode(frame) == can_frame(0x7FF | CAN_RTR_FLAG, 0)


@pytest.mark.parametrize(
    ("brs", "esi", "flags"),
    [
        (False, False, CANFD_FDF),
        (True, False, CANFD_FDF | CANFD_BRS),
        (False, True, CANFD_FDF | CANFD_ESI),
        (True, True, CANFD_FDF | CANFD_BRS | CANFD_ESI),
    ],
)
def test_encode_fd_frame_is_a_72_byte_canfd_frame(brs: bool, esi: bool, flags: int) -> None:
    data = bytes(range(64))
    frame = make_frame(2, 0x12345678, data, fd=True, brs=brs, esi=esi)
    assert encode(frame) == canfd_frame(0x12345678 | CAN_EFF_FLAG, 64, flags, data)
    assert len(encode(frame)) == CANFD_MTU == 72


def test_encode_short_fd_frame_stays_canfd() -> None:
    frame = make_frame(0, 0x10, b"\xaa", fd=True)
    assert encode(frame) == canfd_frame(0x10, 1, CANFD_FDF, b"\xaa")


def test_encode_more_than_8_bytes_without_fd_flag_is_written_as_canfd() -> None:
    frame = make_frame(0, 0x10, bytes(12))
    assert encode(frame) == canfd_frame(0x10, 12, CANFD_FDF, bytes(12))


# --- decode: exact fields -----------------------------------------------------------------


def test_decode_standard_frame() -> None:
    frame = decode(can_frame(0x123, 3, b"\x11\x22\x33\x44\x55"), 1, TS)
    assert frame == Frame(1, 0x123, False, False, False, False, False, b"\x11\x22\x33", TS)
    assert frame.direction == "rx"
    assert frame.origin == 0


def test_decode_passes_direction_and_origin_through() -> None:
    frame = decode(can_frame(0x1, 0), 0, TS, "tx", 42)
    assert (frame.direction, frame.origin) == ("tx", 42)


def test_decode_extended_frame_strips_eff_flag() -> None:
    frame = decode(can_frame(0x1FFFFFFF | CAN_EFF_FLAG, 8, bytes(range(8))), 0, TS)
    assert frame.extended is True
    assert frame.can_id == 0x1FFFFFFF
    assert frame.data == bytes(range(8))


def test_decode_standard_id_is_masked_to_11_bits() -> None:
    frame = decode(can_frame(0x1923, 0), 0, TS)
    assert frame.extended is False
    assert frame.can_id == 0x123


def test_decode_rtr_frame_has_no_data_whatever_its_length() -> None:
    frame = decode(can_frame(0x123 | CAN_RTR_FLAG, 4, b"\x01\x02\x03\x04"), 0, TS)
    assert frame.rtr is True
    assert frame.data == b""
    assert frame.can_id == 0x123


def test_decode_rtr_flag_on_fd_frame_is_not_rtr() -> None:
    frame = decode(canfd_frame(0x123 | CAN_RTR_FLAG, 2, CANFD_FDF, b"\x01\x02"), 0, TS)
    assert frame.rtr is False
    assert frame.data == b"\x01\x02"


def test_decode_classic_length_above_8_is_clipped() -> None:
    frame = decode(can_frame(0x123, 15, bytes(range(1, 9))), 0, TS)
    assert frame.data == bytes(range(1, 9))


def test_decode_fd_length_above_64_is_clipped() -> None:
    frame = decode(canfd_frame(0x123, 200, CANFD_FDF, bytes(range(64))), 0, TS)
    assert frame.data == bytes(range(64))


@pytest.mark.parametrize(
    ("flags", "brs", "esi"),
    [(0, False, False), (CANFD_FDF | CANFD_BRS, True, False), (CANFD_ESI, False, True)],
)
def test_decode_fd_frame_flags(flags: int, brs: bool, esi: bool) -> None:
    frame = decode(canfd_frame(0x80000042, 12, flags, bytes(range(12))), 3, TS)
    assert frame == Frame(3, 0x42, True, False, True, brs, esi, bytes(range(12)), TS)


def test_decode_error_frame_classic() -> None:
    data = bytes((0, 0x10, 0, 0, 0, 0, 0, 0))
    decoded = decode(can_frame(CAN_ERR_FLAG | 0x04, 8, data), 2, TS)
    assert decoded == ErrorFrame(2, 0x04, data, TS)
    assert not isinstance(decoded, Frame)


def test_decode_error_frame_fd_size() -> None:
    decoded = decode(canfd_frame(CAN_ERR_FLAG | 0x40, 8, 0, bytes(8)), 0, TS)
    assert decoded == ErrorFrame(0, 0x40, bytes(8), TS)


@pytest.mark.parametrize("size", [0, 1, 8, 15, 17, 64, 71, 73, 144])
def test_decode_other_sizes_are_not_frames(size: int) -> None:
    assert decode(bytes(size), 0, TS) is None


# --- DLC tables ---------------------------------------------------------------------------


def test_fd_length_table() -> None:
    assert [dlc_to_len(dlc) for dlc in range(16)] == [
        0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64,
    ]  # fmt: skip
    assert tuple(dlc_to_len(dlc) for dlc in range(16)) == FD_LENGTHS


def test_len_to_dlc_inverts_the_table() -> None:
    assert [len_to_dlc(length) for length in FD_LENGTHS] == list(range(16))


@pytest.mark.parametrize("length", [9, 10, 11, 13, 15, 17, 25, 33, 49, 63, 65, -1])
def test_invalid_fd_lengths(length: int) -> None:
    assert is_valid_fd_length(length) is False
    with pytest.raises(ValueError):
        len_to_dlc(length)


def test_valid_fd_lengths() -> None:
    assert [n for n in range(70) if is_valid_fd_length(n)] == list(FD_LENGTHS)


def test_make_frame_defaults() -> None:
    assert make_frame(0, 0x7FF).extended is False
    assert make_frame(0, 0x800).extended is True
    frame = make_frame(1, 0x10, bytearray(b"\x01"))
    assert frame == Frame(1, 0x10, False, False, False, False, False, b"\x01", 0, "rx", 0)
    assert type(frame.data) is bytes


# --- round trips --------------------------------------------------------------------------


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    extended = draw(st.booleans())
    can_id = draw(st.integers(0, 0x1FFFFFFF if extended else 0x7FF))
    kind = draw(st.sampled_from(["classic", "rtr", "fd"]))
    bus = draw(st.integers(0, 255))
    ts_ns = draw(st.integers(0, 2**63))
    if kind == "fd":
        length = draw(st.sampled_from(FD_LENGTHS))
        return make_frame(
            bus, can_id, draw(st.binary(min_size=length, max_size=length)), extended=extended,
            fd=True, brs=draw(st.booleans()), esi=draw(st.booleans()), ts_ns=ts_ns,
        )  # fmt: skip
    if kind == "rtr":
        return make_frame(bus, can_id, extended=extended, rtr=True, ts_ns=ts_ns)
    return make_frame(bus, can_id, draw(st.binary(max_size=8)), extended=extended, ts_ns=ts_ns)


@settings(deadline=None, max_examples=200)
@given(frames())
def test_encode_decode_round_trip(frame: Frame) -> None:
    raw = encode(frame)
    assert len(raw) == (CANFD_MTU if frame.fd else CAN_MTU)
    assert decode(raw, frame.bus, frame.ts_ns) == frame


@pytest.mark.parametrize("length", range(9))
@pytest.mark.parametrize("extended", [False, True])
def test_classic_round_trip_every_length(length: int, extended: bool) -> None:
    frame = make_frame(0, 0x7F1, bytes(range(0xF1, 0xF1 + length)), extended=extended)
    assert decode(encode(frame), 0, 0) == frame


@pytest.mark.parametrize("length", FD_LENGTHS)
def test_fd_round_trip_every_length(length: int) -> None:
    frame = make_frame(1, 0x1E7, bytes(range(length)), fd=True, brs=True)
    assert decode(encode(frame), 1, 0) == frame


def test_fd_frame_with_a_length_no_dlc_has_is_padded_to_the_next_dlc_length() -> None:
    # A local raw socket may send len 9; a controller would put DLC 9 (12 bytes) on the wire.
    raw = CANFD_FRAME.pack(0x123, 9, CANFD_FDF, bytes(range(1, 65)))
    frame = decode(raw, 0, 0)
    assert frame.data == bytes(range(1, 13))
    stream, encoded, _ = encode_frames([frame], Dialect.WIRETAP, 0)
    assert encoded == 1 and stream[10] == 9  # low nibble: DLC 9 = 12 bytes


def test_decode_from_reads_a_frame_in_place_in_a_larger_buffer() -> None:
    classic = encode(make_frame(2, 0x123, b"\x01\x02", ts_ns=5))
    fd = encode(make_frame(2, 0x1ABCDEF, bytes(range(12)), fd=True, brs=True))
    buffer = memoryview(b"\xff" * 3 + classic + fd + b"\xff" * 5)
    assert decode_from(buffer, 3, CAN_MTU, 2, 5, "tx", 7) == decode(classic, 2, 5, "tx", 7)
    assert decode_from(buffer, 3 + CAN_MTU, CANFD_MTU, 2, 9, "rx", 0) == decode(fd, 2, 9)
    assert decode_from(buffer, 0, 15, 2, 9, "rx", 0) is None
