"""wiretap/gvret.py against docs/gvret.md, byte for byte.

The byte strings here are copied from the contract (§2 replies, §3 frame example) or built from
its tables by hand; the property tests at the end check what no list of examples can (any
chunking, any garbage, round trips of the frame encoders through an independent decoder).
"""

from __future__ import annotations

import random
import struct
import sys
from typing import List, NamedTuple, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiretap.frames import CAN_RTR_FLAG, FD_LENGTHS, Frame, decode, make_frame
from wiretap.gvret import (
    DISABLED_BUS,
    BadTransmit,
    BinaryMode,
    BusParams,
    ClientParser,
    Device,
    Dialect,
    Event,
    FlowControlStarted,
    Query,
    Reply,
    Setting,
    StreamingStarted,
    TimeSync,
    Transmit,
    encode_frames,
    reply_for,
    timestamp_us,
    transmit_frame,
)

PROPERTY_SETTINGS = settings(deadline=None, max_examples=200)

START_NS = 1_700_000_000_000_000_000
NOW_US = 0x12345678
BITRATE = 500_000

FD_ONLY_LENGTHS = [length for length in FD_LENGTHS if length > 8]
BAD_FD_LENGTHS = [9, 10, 11, 13, 14, 15, 17, 23, 25, 31, 33, 47, 49, 63]


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def parse(data: bytes) -> List[Event]:
    return ClientParser().feed(data)


def parse_chunks(chunks: List[bytes]) -> List[Event]:
    parser = ClientParser()
    events: List[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events


def device(
    bus_count: int = 2,
    buses: Optional[List[BusParams]] = None,
    now_us: int = NOW_US,
) -> Device:
    if buses is None:
        buses = [BusParams(True, False, BITRATE)] * bus_count
    return Device(
        bus_count,
        lambda bus: buses[bus] if bus < len(buses) else DISABLED_BUS,
        lambda: now_us,
    )


def transmit_bytes(can_id: int, bus: int, data: bytes, cmd: int = 0x00, length: int = -1) -> bytes:
    """A client's ``F1 00`` (or ``F1 0B``) request; ``can_id`` carries bit 31 itself."""
    if length < 0:
        length = len(data)
    return bytes((0xF1, cmd)) + struct.pack("<IBB", can_id, bus, length) + data + b"\x00"


# --- §2 replies, byte-exact -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [
        ("F1 0C", "F1 0C 02"),
        ("F1 06", "F1 06 01 20 A1 07 00 01 20 A1 07 00"),
        ("F1 07", "F1 07 6A 02 20 00 00 00"),
        ("F1 09", "F1 09 DE AD"),
        ("F1 0D", "F1 0D 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00"),
        ("F1 02", "F1 02 00 00"),
        ("F1 01", "F1 01 78 56 34 12"),
    ],
)
def test_reply_for_two_bus_server_at_500k(request_bytes: str, reply: str) -> None:
    events = parse(h(request_bytes))
    assert len(events) == 1
    assert reply_for(events[0], device()) == h(reply)


def test_extended_buses_reply_is_17_bytes() -> None:
    assert len(reply_for(Query(0x0D), device())) == 17


@pytest.mark.parametrize("cmd", [0x03, 0x16])
def test_analog_inputs_and_fd_settings_are_never_answered(cmd: int) -> None:
    events = parse(bytes((0xF1, cmd)))
    assert events == [Query(cmd)]
    assert reply_for(events[0], device()) is None


def test_bus_params_one_bus_server_reports_bus_1_disabled() -> None:
    reply = reply_for(Query(0x06), device(bus_count=1))
    assert reply == h("F1 06 01 20 A1 07 00 00 00 00 00 00")


def test_bus_params_listen_only_is_bit_4() -> None:
    dev = device(buses=[BusParams(True, True, 250_000), BusParams(True, False, 1_000_000)])
    assert reply_for(Query(0x06), dev) == h("F1 06 11 90 D0 03 00 01 40 42 0F 00")


def test_bus_params_missing_bus_reports_bitrate_0() -> None:
    dev = device(buses=[DISABLED_BUS, DISABLED_BUS])
    assert reply_for(Query(0x06), dev) == h("F1 06 00 00 00 00 00 00 00 00 00 00")


def test_bus_params_switched_off_bus_keeps_its_bitrate() -> None:
    dev = device(buses=[BusParams(False, False, BITRATE), DISABLED_BUS])
    assert reply_for(Query(0x06), dev) == h("F1 06 00 20 A1 07 00 00 00 00 00 00")


def test_extended_buses_reply_describes_bus_2() -> None:
    dev = device(buses=[DISABLED_BUS, DISABLED_BUS, BusParams(True, True, 125_000)])
    assert reply_for(Query(0x0D), dev) == h("F1 0D 11 48 E8 01 00") + bytes(10)


def test_bus_params_asks_the_device_for_bus_0_then_bus_1() -> None:
    asked: List[int] = []

    def bus_params(bus: int) -> BusParams:
        asked.append(bus)
        return BusParams(True, False, 125_000 * (bus + 1))

    reply = reply_for(Query(0x06), Device(2, bus_params, lambda: 0))
    assert asked == [0, 1]
    assert reply == h("F1 06 01 48 E8 01 00 01 90 D0 03 00")


@pytest.mark.parametrize(
    ("bus_count", "reply"), [(0, "F1 0C 01"), (1, "F1 0C 01"), (3, "F1 0C 03")]
)
def test_bus_count_is_never_0(bus_count: int, reply: str) -> None:
    assert reply_for(Query(0x0C), device(bus_count=bus_count)) == h(reply)


@pytest.mark.parametrize(
    ("now_us", "reply"),
    [
        (0, "F1 01 00 00 00 00"),
        (0xFFFFFFFF, "F1 01 FF FF FF FF"),
        (2**32, "F1 01 00 00 00 00"),
        (2**32 + 0x01020304, "F1 01 04 03 02 01"),
        (5 * 2**32 + 7, "F1 01 07 00 00 00"),
    ],
)
def test_time_sync_reply_is_the_device_clock_mod_2_32(now_us: int, reply: str) -> None:
    assert reply_for(TimeSync(), device(now_us=now_us)) == h(reply)


def test_time_sync_reads_the_clock_at_reply_time() -> None:
    clock = iter([10, 20])
    dev = Device(2, lambda bus: DISABLED_BUS, lambda: next(clock))
    assert reply_for(TimeSync(), dev) == h("F1 01 0A 00 00 00")
    assert reply_for(TimeSync(), dev) == h("F1 01 14 00 00 00")


@pytest.mark.parametrize(
    "event",
    [
        BinaryMode(),
        Setting(0x05, bytes(8)),
        Transmit(0, 0x123, False, b"\x01", False),
        Transmit(0, 0x123, False, b"\x01", True),
        BadTransmit("length 9 is not a CAN FD length"),
    ],
)
def test_events_without_a_reply(event: Event) -> None:
    assert reply_for(event, device()) is None


def test_events_compare_with_their_types() -> None:
    assert BinaryMode() != TimeSync()
    assert [BinaryMode()] != [TimeSync()]
    assert Query(1) == Query(1)
    assert Query(1) != Query(2)
    assert Setting(0x05, bytes(8)) != Setting(0x0E, bytes(8))
    assert BadTransmit("x") != Reply(b"x")
    assert len({BinaryMode(), TimeSync(), StreamingStarted(None), FlowControlStarted()}) == 4


def test_savvycan_handshake_events_and_replies() -> None:
    events = parse(h("E7 E7 F1 0C F1 06 F1 07 F1 01 F1 09"))
    assert events == [
        BinaryMode(),
        BinaryMode(),
        Query(0x0C),
        Query(0x06),
        Query(0x07),
        TimeSync(),
        Query(0x09),
    ]
    replies = [reply_for(event, device()) for event in events]
    assert replies == [
        None,
        None,
        h("F1 0C 02"),
        h("F1 06 01 20 A1 07 00 01 20 A1 07 00"),
        h("F1 07 6A 02 20 00 00 00"),
        h("F1 01 78 56 34 12"),
        h("F1 09 DE AD"),
    ]


def test_wiretap_desktop_handshake() -> None:
    assert parse(h("E7 E7 F1 07 F1 0C")) == [BinaryMode(), BinaryMode(), Query(7), Query(0x0C)]


# --- parsing: idle, unknown commands, time sync ---------------------------------------------


def test_time_sync_swallows_the_next_byte_unless_it_is_f1() -> None:
    assert parse(h("F1 01 00 F1 09")) == [TimeSync(), Query(0x09)]
    assert parse(h("F1 01 F1 09")) == [TimeSync(), Query(0x09)]
    assert parse(h("F1 01 09")) == [TimeSync()]
    assert parse(h("F1 01 E7")) == [TimeSync()]
    assert parse(h("F1 01 F1 01 F1 01 00 E7")) == [TimeSync(), TimeSync(), TimeSync(), BinaryMode()]


def test_time_sync_is_reported_before_its_swallowed_byte_arrives() -> None:
    parser = ClientParser()
    assert parser.feed(h("F1 01")) == [TimeSync()]
    assert parser.feed(h("09")) == []
    assert parser.feed(h("F1 09")) == [Query(0x09)]


def test_stray_bytes_in_idle_are_ignored() -> None:
    assert parse(h("00 00 F1 09 00 F1 0C 00 00")) == [Query(0x09), Query(0x0C)]
    assert parse(b"help\r\n" + h("0D 0A FF 09 0C F1 07")) == [Query(0x07)]


def test_e7_while_idle_is_binary_mode_every_time() -> None:
    assert parse(h("E7 00 E7 E7")) == [BinaryMode()] * 3


@pytest.mark.parametrize(
    "request_bytes",
    ["F1 F1 0C", "F1 55 0C", "F1 14 0C", "F1 E7 0C", "F1 FF 10 11 12 13 15 0C", "F1 0F 0C"],
)
def test_unknown_command_byte_reads_the_next_byte_as_command(request_bytes: str) -> None:
    assert parse(h(request_bytes)) == [Query(0x0C)]


def test_unknown_command_then_keepalive() -> None:
    assert parse(h("F1 55 09")) == [Query(0x09)]


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(("cmd", "size"), [(0x04, 1), (0x05, 8), (0x08, 1), (0x0A, 1), (0x0E, 12)])
def test_setting_consumes_exactly_its_argument(cmd: int, size: int) -> None:
    payload = (h("F1 09 E7 0C F1 01") * 3)[:size]
    events = parse(bytes((0xF1, cmd)) + payload + h("F1 0C"))
    assert events == [Setting(cmd, payload), Query(0x0C)]


def test_savvycan_bus_setup_with_its_trailing_00() -> None:
    words = struct.pack("<II", 0xC0000000 | BITRATE, 0x80000000 | 250_000)
    events = parse(h("F1 05") + words + h("00 F1 09"))
    assert events == [Setting(0x05, words), Query(0x09)]


def test_savvycan_extended_bus_setup_with_its_trailing_00() -> None:
    payload = bytes(range(0xE7, 0xE7 + 12))
    assert parse(h("F1 0E") + payload + h("00 F1 09")) == [Setting(0x0E, payload), Query(0x09)]


# --- transmit --------------------------------------------------------------------------------


def test_transmit_example_bytes() -> None:
    events = parse(h("F1 00 23 01 00 00 01 03 11 22 33 00"))
    assert events == [Transmit(1, 0x123, False, h("11 22 33"), False)]


def test_transmit_extended_example_bytes() -> None:
    events = parse(h("F1 00 F0 DE BC 9A 00 02 F1 E7 00"))
    assert events == [Transmit(0, 0x1ABCDEF0, True, h("F1 E7"), False)]


@pytest.mark.parametrize("length", list(range(9)) + FD_ONLY_LENGTHS)
@pytest.mark.parametrize(
    ("raw_id", "can_id", "extended"),
    [
        (0x7F1, 0x7F1, False),
        (0x0E7, 0x0E7, False),
        (0x000, 0x000, False),
        (0x80000000 | 0x1EF1E7F1, 0x1EF1E7F1, True),
        (0x80000000 | 0x000000F1, 0xF1, True),
        (0x80000000 | 0x1FFFFFFF, 0x1FFFFFFF, True),
    ],
)
def test_transmit_every_length(length: int, raw_id: int, can_id: int, extended: bool) -> None:
    data = (h("F1 E7 F1 09 00 E7 F1 0C") * 8)[:length]
    events = parse(transmit_bytes(raw_id, 1, data) + h("F1 09"))
    assert events == [Transmit(1, can_id, extended, data, False), Query(0x09)]


def test_echo_frame() -> None:
    events = parse(transmit_bytes(0x123, 0, h("F1 0B"), cmd=0x0B) + h("F1 09"))
    assert events == [Transmit(0, 0x123, False, h("F1 0B"), True), Query(0x09)]


def test_transmit_bus_byte_is_passed_through() -> None:
    assert parse(transmit_bytes(0x1, 0xF1, b"")) == [Transmit(0xF1, 0x1, False, b"", False)]


def test_transmit_trailing_byte_is_consumed_whatever_it_is() -> None:
    message = transmit_bytes(0x123, 0, b"\x01")[:-1] + h("F1")
    assert parse(message + h("F1 09")) == [Transmit(0, 0x123, False, b"\x01", False), Query(0x09)]


def test_transmit_is_acted_on_only_after_its_trailing_byte() -> None:
    parser = ClientParser()
    message = transmit_bytes(0x123, 0, h("11 22"))
    assert parser.feed(message[:-1]) == []
    assert parser.feed(message[-1:]) == [Transmit(0, 0x123, False, h("11 22"), False)]


@pytest.mark.parametrize("length", BAD_FD_LENGTHS)
def test_transmit_non_fd_length_is_refused_and_stream_stays_in_step(length: int) -> None:
    data = (h("F1 09 E7") * 22)[:length]
    events = parse(transmit_bytes(0x123, 0, data) + h("F1 0C"))
    assert len(events) == 2
    assert isinstance(events[0], BadTransmit)
    assert events[1] == Query(0x0C)


@pytest.mark.parametrize("length", [65, 100, 255])
def test_transmit_length_over_64_is_refused_and_next_command_parses(length: int) -> None:
    # The length still says where the message ends: its payload is skipped, never parsed as
    # commands, even when it holds F1 09.
    header = h("F1 00") + struct.pack("<IBB", 0x123, 0, length)
    payload = (h("F1 09") * 128)[:length] + h("00")
    events = parse(header + payload + h("F1 0C"))
    assert len(events) == 2
    assert isinstance(events[0], BadTransmit)
    assert events[1] == Query(0x0C)
    assert parse(header + payload[:-1]) == []


@pytest.mark.parametrize(
    "raw_id",
    [0x800, 0xFFFF, 0x1FFFFFFF, 0x20000123, 0x40000123, 0x80000000 | 0x20000000, 0xFFFFFFFF],
)
def test_transmit_id_too_big_is_refused_and_stream_stays_in_step(raw_id: int) -> None:
    events = parse(transmit_bytes(raw_id, 0, h("F1 09 F1 09")) + h("F1 0C"))
    assert len(events) == 2
    assert isinstance(events[0], BadTransmit)
    assert events[1] == Query(0x0C)


def test_largest_ids_are_accepted() -> None:
    assert parse(transmit_bytes(0x7FF, 0, b"")) == [Transmit(0, 0x7FF, False, b"", False)]
    events = parse(transmit_bytes(0x9FFFFFFF, 0, b""))
    assert events == [Transmit(0, 0x1FFFFFFF, True, b"", False)]


def test_bad_transmit_does_not_hide_its_neighbours() -> None:
    good = transmit_bytes(0x10, 0, h("01"))
    bad = transmit_bytes(0x10, 0, bytes(9))
    events = parse(good + bad + good)
    assert events[0] == events[2] == Transmit(0, 0x10, False, h("01"), False)
    assert isinstance(events[1], BadTransmit)
    assert len(events) == 3


@pytest.mark.parametrize(
    "message",
    [
        transmit_bytes(0x80000000 | 0x1EF1E7F1, 1, bytes(range(0xE0, 0xF4))),
        transmit_bytes(0x123, 0, h("F1 09 F1 0C"), cmd=0x0B),
        h("F1 05") + bytes(8),
        h("F1 0E") + bytes(12),
        h("F1 04 01"),
    ],
)
def test_command_cut_short_emits_nothing(message: bytes) -> None:
    for cut in range(len(message)):
        assert parse(message[:cut]) == [], cut


def test_transmit_frame_builds_a_tx_frame() -> None:
    classic = transmit_frame(Transmit(1, 0x123, False, h("11 22"), False), ts_ns=5)
    assert classic == Frame(1, 0x123, False, False, False, False, False, h("11 22"), 5, "tx", 0)
    fd = transmit_frame(Transmit(0, 0x1ABCDEF0, True, bytes(12), True))
    assert fd == Frame(0, 0x1ABCDEF0, True, False, True, True, False, bytes(12), 0, "tx", 0)


# --- chunking --------------------------------------------------------------------------------

CORPUS = b"".join(
    [
        h("00 E7 E7 F1 0C F1 06 F1 07 F1 01 F1 09"),
        h("F1 0D 00 F1 01 00 F1 01 F1 02 F1 03 F1 16"),
        h("F1 F1 0C F1 55 09 F1 E7 07"),
        h("F1 05") + struct.pack("<II", 0xC0000000 | BITRATE, 0) + h("00"),
        h("F1 0E") + bytes(range(0xE7, 0xF3)) + h("00"),
        h("F1 04 F1 F1 08 E7 F1 0A 09"),
        transmit_bytes(0x80000000 | 0x1EF1E7F1, 1, h("F1 E7 F1 09 00 E7 F1 0C")),
        transmit_bytes(0x7F1, 0, bytes(range(0xC0, 0x100))),
        transmit_bytes(0xE7, 0, h("F1 0C F1 09"), cmd=0x0B),
        transmit_bytes(0x123, 0, bytes(9)),
        transmit_bytes(0x800, 0, h("F1 09")),
        h("F1 00") + struct.pack("<IBB", 0x123, 0, 200) + h("F1 09") * 100 + h("00"),
        h("F1 09"),
        transmit_bytes(0x10, 0, b""),
    ]
)
CORPUS_EVENTS = parse(CORPUS)


def test_corpus_events() -> None:
    transmits = [event for event in CORPUS_EVENTS if isinstance(event, Transmit)]
    bad = [event for event in CORPUS_EVENTS if isinstance(event, BadTransmit)]
    queries = [event.cmd for event in CORPUS_EVENTS if isinstance(event, Query)]
    assert transmits == [
        Transmit(1, 0x1EF1E7F1, True, h("F1 E7 F1 09 00 E7 F1 0C"), False),
        Transmit(0, 0x7F1, False, bytes(range(0xC0, 0x100)), False),
        Transmit(0, 0xE7, False, h("F1 0C F1 09"), True),
        Transmit(0, 0x10, False, b"", False),
    ]
    assert len(bad) == 3
    assert queries == [0x0C, 0x06, 0x07, 0x09, 0x0D, 0x02, 0x03, 0x16, 0x0C, 0x09, 0x07, 0x09]
    assert [type(event) for event in CORPUS_EVENTS].count(BinaryMode) == 2
    assert [type(event) for event in CORPUS_EVENTS].count(TimeSync) == 3
    assert [event.cmd for event in CORPUS_EVENTS if isinstance(event, Setting)] == [
        0x05, 0x0E, 0x04, 0x08, 0x0A,
    ]  # fmt: skip
    assert len(CORPUS_EVENTS) == 2 + 12 + 3 + 5 + 4 + 3


def test_corpus_in_one_byte_chunks() -> None:
    assert parse_chunks([CORPUS[i : i + 1] for i in range(len(CORPUS))]) == CORPUS_EVENTS


def test_corpus_split_at_every_point() -> None:
    for cut in range(len(CORPUS) + 1):
        assert parse_chunks([CORPUS[:cut], CORPUS[cut:]]) == CORPUS_EVENTS, cut


def test_corpus_in_random_chunks() -> None:
    rng = random.Random(1234)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(CORPUS)), rng.randint(1, 40)))
        bounds = [0, *cuts, len(CORPUS)]
        chunks = [CORPUS[a:b] for a, b in zip(bounds, bounds[1:])]
        assert parse_chunks(chunks) == CORPUS_EVENTS


def test_empty_feed() -> None:
    parser = ClientParser()
    assert parser.feed(b"") == []
    assert parser.feed(h("F1")) == []
    assert parser.feed(b"") == []
    assert parser.feed(h("09")) == [Query(0x09)]


# --- frames, server -> client (§3) -----------------------------------------------------------


def frame_at(
    bus: int, can_id: int, data: bytes, ts_us: int, *, extended: bool = False, fd: bool = False
) -> Frame:
    return make_frame(
        bus, can_id, data, extended=extended, fd=fd, brs=fd, ts_ns=START_NS + ts_us * 1000
    )


@pytest.mark.parametrize("dialect", list(Dialect))
def test_section_3_example(dialect: Dialect) -> None:
    frame = frame_at(1, 0x123, h("11 22 33"), 0x12345)
    assert encode_frames([frame], dialect, START_NS) == (
        h("F1 00 45 23 01 00 23 01 00 00 13 11 22 33 00"),
        1,
        0,
    )


@pytest.mark.parametrize("dialect", list(Dialect))
@pytest.mark.parametrize("length", range(9))
def test_classic_frame_every_length_standard(dialect: Dialect, length: int) -> None:
    data = bytes(range(0xF1, 0xF1 + length))
    frame = frame_at(2, 0x7E7, data, 0x01020304)
    expected = h("F1 00 04 03 02 01 E7 07 00 00") + bytes((0x20 | length,)) + data + h("00")
    assert encode_frames([frame], dialect, START_NS) == (expected, 1, 0)


@pytest.mark.parametrize("dialect", list(Dialect))
@pytest.mark.parametrize("length", range(9))
def test_classic_frame_every_length_extended(dialect: Dialect, length: int) -> None:
    data = bytes(range(length))
    frame = frame_at(15, 0x1ABCDEF0, data, 0, extended=True)
    expected = h("F1 00 00 00 00 00 F0 DE BC 9A") + bytes((0xF0 | length,)) + data + h("00")
    assert encode_frames([frame], dialect, START_NS) == (expected, 1, 0)


def test_extended_frame_with_low_id_keeps_bit_31() -> None:
    frame = frame_at(0, 0x5, b"", 0, extended=True)
    assert encode_frames([frame], Dialect.CLASSIC, START_NS)[0] == h(
        "F1 00 00000000 05000080 00 00"
    )


@pytest.mark.parametrize(("dlc", "length"), list(enumerate(FD_LENGTHS)))
def test_fd_frame_wiretap_dialect_low_nibble_is_dlc_code(dlc: int, length: int) -> None:
    data = bytes((0xF1,)) * length
    frame = frame_at(1, 0x123, data, 0x10, fd=True)
    expected = h("F1 00 10 00 00 00 23 01 00 00") + bytes((0x10 | dlc,)) + data + h("00")
    assert encode_frames([frame], Dialect.WIRETAP, START_NS) == (expected, 1, 0)


@pytest.mark.parametrize("length", FD_ONLY_LENGTHS)
def test_fd_frame_esp32ret_dialect_is_cmd_14(length: int) -> None:
    data = bytes(range(length))
    frame = frame_at(3, 0x1ABCDEF0, data, 0xA0B0C0D0, extended=True, fd=True)
    expected = h("F1 14 D0 C0 B0 A0 F0 DE BC 9A") + bytes((length, 3)) + data + h("00")
    assert encode_frames([frame], Dialect.ESP32RET, START_NS) == (expected, 1, 0)


def test_fd_frame_esp32ret_bus_is_a_whole_byte() -> None:
    frame = frame_at(17, 0x123, bytes(12), 0, fd=True)
    expected = h("F1 14 00 00 00 00 23 01 00 00 0C 11") + bytes(12) + h("00")
    assert encode_frames([frame], Dialect.ESP32RET, START_NS) == (expected, 1, 0)


@pytest.mark.parametrize("length", range(9))
def test_short_fd_frame_classic_dialect_goes_as_cmd_00(length: int) -> None:
    data = bytes(range(length))
    frame = frame_at(1, 0x123, data, 0, fd=True)
    expected = h("F1 00 00 00 00 00 23 01 00 00") + bytes((0x10 | length,)) + data + h("00")
    assert encode_frames([frame], Dialect.CLASSIC, START_NS) == (expected, 1, 0)


def test_classic_dialect_leaves_out_long_fd_frames_and_counts_them() -> None:
    batch = [
        frame_at(0, 0x1, bytes(12), 1, fd=True),
        frame_at(0, 0x2, h("AA"), 2),
        frame_at(1, 0x3, bytes(64), 3, fd=True),
        frame_at(1, 0x4, bytes(8), 4, fd=True),
        frame_at(0, 0x5, bytes(48), 5, fd=True),
    ]
    expected = h("F1 00 02 00 00 00 02 00 00 00 01 AA 00") + h(
        "F1 00 04 00 00 00 04 00 00 00 18 00 00 00 00 00 00 00 00 00"
    )
    assert encode_frames(batch, Dialect.CLASSIC, START_NS) == (expected, 2, 3)


def test_classic_dialect_all_left_out() -> None:
    batch = [frame_at(0, 0x1, bytes(12), 1, fd=True)] * 4
    assert encode_frames(batch, Dialect.CLASSIC, START_NS) == (b"", 0, 4)


def test_empty_batch() -> None:
    for dialect in Dialect:
        assert encode_frames([], dialect, START_NS) == (b"", 0, 0)


def test_rtr_frame_from_the_kernel_goes_with_length_0() -> None:
    raw = (0x123 | CAN_RTR_FLAG).to_bytes(4, sys.byteorder) + bytes((4, 0, 0, 0)) + bytes(8)
    frame = decode(raw, 1, START_NS + 0x10 * 1000)
    assert frame.rtr is True
    for dialect in Dialect:
        encoded = encode_frames([frame], dialect, START_NS)
        assert encoded == (h("F1 00 10 00 00 00 23 01 00 00 10 00"), 1, 0)


@pytest.mark.parametrize(
    ("offset_ns", "ts_bytes"),
    [
        (0, "00 00 00 00"),
        (999, "00 00 00 00"),
        (1000, "01 00 00 00"),
        ((2**32 - 1) * 1000, "FF FF FF FF"),
        (2**32 * 1000, "00 00 00 00"),
        ((2**32 + 7) * 1000 + 999, "07 00 00 00"),
        (3 * 2**32 * 1000 + 0x12345 * 1000, "45 23 01 00"),
        (-1000, "FF FF FF FF"),
    ],
)
def test_timestamp_wraps_modulo_2_32(offset_ns: int, ts_bytes: str) -> None:
    frame = make_frame(0, 0x1, b"", ts_ns=START_NS + offset_ns)
    expected = h("F1 00") + h(ts_bytes) + h("01 00 00 00 00 00")
    assert encode_frames([frame], Dialect.WIRETAP, START_NS)[0] == expected
    assert timestamp_us(START_NS + offset_ns, START_NS) == int.from_bytes(h(ts_bytes), "little")


def test_time_sync_and_frames_share_one_clock() -> None:
    ts_ns = START_NS + (2**32 + 0x12345) * 1000
    dev = Device(1, lambda bus: DISABLED_BUS, lambda: timestamp_us(ts_ns, START_NS))
    frame_ts = encode_frames([make_frame(0, 0x1, ts_ns=ts_ns)], Dialect.CLASSIC, START_NS)[0][2:6]
    assert reply_for(TimeSync(), dev) == h("F1 01") + frame_ts == h("F1 01 45 23 01 00")


# --- an independent decoder for the server -> client stream ----------------------------------


class Record(NamedTuple):
    cmd: int
    ts: int
    bus: int
    can_id: int
    extended: bool
    data: bytes


def decode_stream(stream: bytes) -> List[Record]:
    """Split a server -> client stream into cmd 00 and cmd 14 records (§3), checking trailers."""
    records: List[Record] = []
    pos = 0
    while pos < len(stream):
        assert stream[pos] == 0xF1, pos
        cmd = stream[pos + 1]
        ts, raw_id = struct.unpack_from("<II", stream, pos + 2)
        if cmd == 0x00:
            bus, length = stream[pos + 10] >> 4, FD_LENGTHS[stream[pos + 10] & 0x0F]
            body = pos + 11
        else:
            assert cmd == 0x14
            length, bus = stream[pos + 10], stream[pos + 11]
            body = pos + 12
        assert raw_id & 0x60000000 == 0, "bits 30 and 29 are always 0"
        data = stream[body : body + length]
        assert len(data) == length
        assert stream[body + length] == 0x00, "trailer is always 00"
        records.append(Record(cmd, ts, bus, raw_id & 0x1FFFFFFF, bool(raw_id >> 31), data))
        pos = body + length + 1
    return records


@st.composite
def bus_frames(draw: st.DrawFn) -> Frame:
    extended = draw(st.booleans())
    can_id = draw(st.integers(0, 0x1FFFFFFF if extended else 0x7FF))
    fd = draw(st.booleans())
    length = draw(st.sampled_from(FD_LENGTHS if fd else range(9)))
    data = draw(st.binary(min_size=length, max_size=length))
    ts_ns = START_NS + draw(st.integers(-(2**40), 2**50))
    bus = draw(st.integers(0, 15))
    return make_frame(bus, can_id, data, extended=extended, fd=fd, brs=fd, ts_ns=ts_ns)


@PROPERTY_SETTINGS
@given(st.lists(bus_frames(), max_size=12), st.sampled_from(list(Dialect)))
def test_encode_frames_round_trip(batch: List[Frame], dialect: Dialect) -> None:
    stream, encoded, skipped = encode_frames(batch, dialect, START_NS)
    if dialect is Dialect.CLASSIC:
        sent = [frame for frame in batch if len(frame.data) <= 8]
    else:
        sent = batch
    assert (encoded, skipped) == (len(sent), len(batch) - len(sent))
    records = decode_stream(stream)
    assert len(records) == len(sent)
    for frame, record in zip(sent, records):
        expected_cmd = 0x14 if dialect is Dialect.ESP32RET and frame.fd else 0x00
        assert record == Record(
            expected_cmd,
            ((frame.ts_ns - START_NS) // 1000) % 2**32,
            frame.bus,
            frame.can_id,
            frame.extended,
            frame.data,
        )


# --- properties of the client parser ---------------------------------------------------------


@st.composite
def transmit_messages(draw: st.DrawFn) -> bytes:
    """A well-formed ``F1 00`` / ``F1 0B`` request with a valid ID and length."""
    extended = draw(st.booleans())
    can_id = draw(st.integers(0, 0x1FFFFFFF if extended else 0x7FF))
    length = draw(st.sampled_from(FD_LENGTHS))
    return transmit_bytes(
        can_id | (0x80000000 if extended else 0),
        draw(st.integers(0, 255)),
        draw(st.binary(min_size=length, max_size=length)),
        cmd=draw(st.sampled_from([0x00, 0x0B])),
    )


over_long_transmits = st.integers(65, 255).map(
    lambda length: h("F1 00") + struct.pack("<IBB", 0x123, 0, length) + bytes(length + 1)
)
queries = st.sampled_from([1, 2, 3, 6, 7, 9, 0x0C, 0x0D, 0x16]).map(lambda cmd: bytes((0xF1, cmd)))
settings_messages = st.sampled_from([(4, 1), (5, 8), (8, 1), (0x0A, 1), (0x0E, 12)]).flatmap(
    lambda spec: st.binary(min_size=spec[1], max_size=spec[1]).map(
        lambda payload: bytes((0xF1, spec[0])) + payload
    )
)
client_messages = st.one_of(
    queries, settings_messages, transmit_messages(), over_long_transmits, st.binary(max_size=6)
)
"""One client message (good, deliberately bad, or a little garbage)."""


def split(data: bytes, cuts: List[int]) -> List[bytes]:
    bounds = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


FORBIDDEN_REPLY_PREFIXES = (h("F1 03"), h("F1 16"))
ALLOWED_REPLY_COMMANDS = {0x01, 0x02, 0x06, 0x07, 0x09, 0x0C, 0x0D}


def check_events(data: bytes, events: List[Event]) -> None:
    assert len(events) <= len(data)
    for event in events:
        reply = reply_for(event, device())
        if reply is None:
            continue
        assert not reply.startswith(FORBIDDEN_REPLY_PREFIXES)
        assert reply[0] == 0xF1
        assert reply[1] in ALLOWED_REPLY_COMMANDS
        if isinstance(event, Transmit):
            limit = 0x1FFFFFFF if event.extended else 0x7FF
            assert 0 <= event.can_id <= limit
            assert len(event.data) in FD_LENGTHS


@PROPERTY_SETTINGS
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=20))
def test_arbitrary_bytes_never_raise_and_any_chunking_agrees(data: bytes, cuts: List[int]) -> None:
    whole = parse(data)
    assert parse_chunks(split(data, cuts)) == whole
    check_events(data, whole)


@PROPERTY_SETTINGS
@given(
    st.lists(client_messages, max_size=25).map(b"".join),
    st.lists(st.integers(0, 2000), max_size=20),
)
def test_message_streams_any_chunking_agrees(data: bytes, cuts: List[int]) -> None:
    whole = parse(data)
    assert parse_chunks(split(data, cuts)) == whole
    assert parse_chunks([data[i : i + 1] for i in range(len(data))]) == whole
    check_events(data, whole)


@PROPERTY_SETTINGS
@given(st.lists(st.one_of(transmit_messages(), over_long_transmits), min_size=1, max_size=8))
def test_valid_transmits_round_trip_through_the_parser(messages: List[bytes]) -> None:
    events = parse(b"".join(messages))
    assert len(events) == len(messages)
    for message, event in zip(messages, events):
        if message[7] > 64:
            assert isinstance(event, BadTransmit)
            continue
        raw_id, bus, length = struct.unpack_from("<IBB", message, 2)
        echo = message[1] == 0x0B
        assert [event] == [
            Transmit(bus, raw_id & 0x1FFFFFFF, bool(raw_id >> 31), message[8 : 8 + length], echo)
        ]


def test_parser_work_is_bounded_on_a_flood() -> None:
    parser = ClientParser()
    flood = (h("E7 F1 09 F1 01 00") + transmit_bytes(0x1, 0, bytes(64))) * 2000
    events = parser.feed(flood)
    assert len(events) == 2000 * 4
    garbage = bytes(range(256)) * 400
    assert len(ClientParser().feed(garbage)) <= len(garbage)


def test_esp32ret_sends_short_fd_frames_as_cmd_14() -> None:
    frame = Frame(2, 0x123, False, False, True, True, False, h("11 22 33 44"), START_NS, "rx", 0)
    stream, encoded, skipped = encode_frames([frame], Dialect.ESP32RET, START_NS)
    assert stream == h("F1 14 00000000 23010000 04 02 11223344 00")
    assert (encoded, skipped) == (1, 0)
    classic, _, _ = encode_frames([frame], Dialect.CLASSIC, START_NS)
    assert classic == h("F1 00 00000000 23010000 24 11223344 00")
