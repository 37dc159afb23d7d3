"""wiretap.gvret.Connection: one client's protocol state, with byte strings and a fake clock.

The dialect a client gets must not depend on how TCP split its handshake; the bus settings a
client makes apply to it alone; and a client that reads like SavvyCAN (tests/savvycan_model.py)
never has more than the window waiting for it, loses nothing at one saturated bus, and at five
times that rate loses only frames the server counted, getting the rest whole and in order.
"""

from __future__ import annotations

import struct
from typing import List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from savvycan_model import DENSE_FPS, READ_LIMIT, SAVVYCAN_HELLO, Figures, simulate

from wiretap.frames import Frame, make_frame
from wiretap.gvret import (
    DISABLED_BUS,
    FLOW_CONTROL_GIVE_UP_S,
    HANDSHAKE_S,
    WINDOW_MAX,
    WINDOW_MIN,
    BitrateRequested,
    BusParams,
    BusSettingsChanged,
    Connection,
    ConnectionEvent,
    Device,
    Dialect,
    DialectChosen,
    FlowControlStarted,
    Reply,
    SettingIgnored,
    StreamingStarted,
    Transmit,
    TransmitRefused,
)

WIRETAP_HELLO = bytes.fromhex("E7E7F107F10C")
BITRATES = [500_000, 250_000, 125_000]


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def device(bus_count: int = 3, listen_only: bool = False) -> Device:
    buses = [BusParams(True, listen_only, rate) for rate in BITRATES[:bus_count]]
    return Device(bus_count, lambda bus: buses[bus] if bus < bus_count else DISABLED_BUS, lambda: 0)


def fd_frame(bus: int = 0, length: int = 64) -> Frame:
    return make_frame(bus, 0x123, bytes(range(length)), fd=True, brs=True)


def classic_frame(bus: int = 0, seq: int = 0) -> Frame:
    return make_frame(bus, 0x100 + bus, struct.pack("<Q", seq))


def replies(events: List[ConnectionEvent]) -> List[bytes]:
    return [event.data for event in events if isinstance(event, Reply)]


def bus_word(enabled: bool, listen_only: bool, bitrate: int) -> int:
    """One bus in SavvyCAN's F1 05 layout (gvretserial.cpp, piSetBusSettings)."""
    return (
        0x80000000 | (0x40000000 if enabled else 0) | (0x20000000 if listen_only else 0) | bitrate
    )


def setup_buses(bus0: int, bus1: int) -> bytes:
    return h("F1 05") + struct.pack("<II", bus0, bus1) + h("00")  # SavvyCAN's trailing 00


# --- the dialect, whatever TCP does ------------------------------------------------------------


def run_handshake(chunks: List[bytes], step_s: float = 0.0) -> tuple:
    """Feed ``chunks`` one per read, ``step_s`` apart, offering a long FD frame and a classic
    frame after every read; returns (dialect, every byte the client was sent)."""
    connection = Connection(device(), dialect=None)
    sent = bytearray()
    now = 0.0
    for chunk in chunks:
        for event in connection.receive_data(chunk, now):
            if isinstance(event, Reply):
                sent += event.data
        sent += connection.send_frames([fd_frame(), classic_frame()], now).data
        now += step_s
    return connection.dialect, bytes(sent)


def long_fd_frames_in(stream: bytes) -> int:
    """FD frames the client got in the WireTAP form (cmd 00 with an FD DLC code above 8)."""
    return stream.count(h("F1 00 00 00 00 00 23 01 00 00 0F"))


def test_savvycan_handshake_split_at_every_position_gets_classic() -> None:
    for cut in range(len(SAVVYCAN_HELLO) + 1):
        dialect, stream = run_handshake([SAVVYCAN_HELLO[:cut], SAVVYCAN_HELLO[cut:]])
        assert dialect is Dialect.CLASSIC, cut
        assert long_fd_frames_in(stream) == 0, cut


def test_savvycan_handshake_one_byte_per_read_with_delays_gets_classic() -> None:
    step = HANDSHAKE_S / (len(SAVVYCAN_HELLO) + 1)
    dialect, stream = run_handshake([bytes([b]) for b in SAVVYCAN_HELLO], step_s=step)
    assert dialect is Dialect.CLASSIC
    assert long_fd_frames_in(stream) == 0
    # Classic frames flowed from the first E7 on, one per read.
    assert stream.count(h("F1 00 00 00 00 00 00 01 00 00 08")) == len(SAVVYCAN_HELLO)


@settings(deadline=None, max_examples=200)
@given(st.lists(st.integers(0, len(SAVVYCAN_HELLO)), max_size=12))
def test_savvycan_handshake_any_split_gets_classic(cuts: List[int]) -> None:
    bounds = [0, *sorted(cuts), len(SAVVYCAN_HELLO)]
    chunks = [SAVVYCAN_HELLO[a:b] for a, b in zip(bounds, bounds[1:])]
    dialect, stream = run_handshake(chunks, step_s=0.01)
    assert dialect is Dialect.CLASSIC
    assert long_fd_frames_in(stream) == 0


def test_wiretap_desktop_handshake_any_split_gets_wiretap() -> None:
    for cut in range(len(WIRETAP_HELLO) + 1):
        dialect, stream = run_handshake([WIRETAP_HELLO[:cut], WIRETAP_HELLO[cut:], b""])
        assert dialect is Dialect.WIRETAP, cut
        assert long_fd_frames_in(stream) >= 1, cut


def test_later_keepalive_switches_a_client_still_in_auto() -> None:
    connection = Connection(device())
    assert connection.receive_data(h("E7 E7"), 0.0) == [StreamingStarted(None)]
    out = connection.send_frames([classic_frame()], 0.1)
    assert out.frames == 1 and connection.dialect is None  # classic frames decide nothing
    events = connection.receive_data(h("F1 09"), 5.0)
    assert DialectChosen(Dialect.CLASSIC, "it sent F1 09") in events
    out = connection.send_frames([fd_frame()], 5.1)
    assert (out.data, out.frames, out.dropped, out.fd_skipped) == (b"", 0, 0, 1)


def test_a_silent_client_gets_wiretap_after_its_handshake_and_keeps_it() -> None:
    connection = Connection(device(), flow_control=False)
    connection.receive_data(h("E7"), 0.0)
    assert connection.send_frames([fd_frame()], HANDSHAKE_S / 2).fd_skipped == 1
    out = connection.send_frames([fd_frame()], HANDSHAKE_S)
    assert out.frames == 1
    assert out.notices == (DialectChosen(Dialect.WIRETAP, "it sent no F1 09 or F1 06 within 1 s"),)
    assert connection.dialect is Dialect.WIRETAP
    connection.receive_data(h("F1 06"), HANDSHAKE_S + 1)
    assert connection.dialect is Dialect.WIRETAP  # an FD frame already went out in that form


@pytest.mark.parametrize("dialect", [Dialect.WIRETAP, Dialect.ESP32RET])
def test_a_configured_dialect_is_never_switched(dialect: Dialect) -> None:
    connection = Connection(device(), dialect=dialect)
    events = connection.receive_data(SAVVYCAN_HELLO, 0.0)
    assert not any(isinstance(event, DialectChosen) for event in events)
    assert connection.dialect is dialect


# --- bus settings, for this client only -----------------------------------------------------


def test_bus_switched_off_is_not_streamed_and_refuses_transmits() -> None:
    dev = device()
    savvy, other = Connection(dev), Connection(dev)
    savvy.receive_data(SAVVYCAN_HELLO, 0.0)
    other.receive_data(h("E7"), 0.0)
    events = savvy.receive_data(setup_buses(bus_word(True, False, 500_000), 0x80000000), 1.0)
    assert events == [BusSettingsChanged(1, False, False)]
    frames = [classic_frame(0, 1), classic_frame(1, 2), classic_frame(2, 3)]
    assert savvy.send_frames(frames, 1.1).frames == 2
    assert other.send_frames(frames, 1.1).frames == 3
    transmit = h("F1 00 23 01 00 00 01 01 42 00")
    assert savvy.receive_data(transmit, 1.2) == [
        TransmitRefused(1, "bus 1 is switched off by this client")
    ]
    assert other.receive_data(transmit, 1.2) == [Transmit(1, 0x123, False, b"\x42", False)]
    # Its F1 06 says so, with the bus's bit rate kept; the other client's does not.
    assert replies(savvy.receive_data(h("F1 06"), 1.3)) == [h("F1 06 01 20A10700 00 90D00300")]
    assert replies(other.receive_data(h("F1 06"), 1.3)) == [h("F1 06 01 20A10700 01 90D00300")]


def test_listen_only_refuses_this_clients_transmits_on_that_bus() -> None:
    connection = Connection(device())
    connection.receive_data(h("E7"), 0.0)
    events = connection.receive_data(
        setup_buses(bus_word(True, True, 500_000), bus_word(True, False, 250_000)), 0.1
    )
    assert events == [BusSettingsChanged(0, True, True)]
    assert connection.receive_data(h("F1 00 23 01 00 00 00 01 42 00"), 0.2) == [
        TransmitRefused(0, "bus 0 is listen-only for this client")
    ]
    assert connection.receive_data(h("F1 00 23 01 00 00 01 01 42 00"), 0.2) == [
        Transmit(1, 0x123, False, b"\x42", False)
    ]
    assert connection.send_frames([classic_frame(0)], 0.3).frames == 1  # still streamed
    assert replies(connection.receive_data(h("F1 06"), 0.4)) == [h("F1 06 11 20A10700 01 90D00300")]
    # Back to normal: transmits flow again.
    connection.receive_data(setup_buses(bus_word(True, False, 500_000), 0), 0.5)
    assert connection.receive_data(h("F1 0B 23 01 00 00 00 01 42 00"), 0.6) == [
        Transmit(0, 0x123, False, b"\x42", True)
    ]


def test_a_speed_change_is_a_request_not_a_view() -> None:
    connection = Connection(device())
    events = connection.receive_data(
        setup_buses(bus_word(True, False, 250_000), bus_word(True, False, 250_000)), 0.0
    )
    assert events == [BitrateRequested(0, 250_000, 500_000)]  # bus 1 already runs at 250k
    assert replies(connection.receive_data(h("F1 06"), 0.1)) == [h("F1 06 01 20A10700 01 90D00300")]


def test_bus_2_lives_in_the_extended_buses_reply_and_command() -> None:
    connection = Connection(device())
    assert replies(connection.receive_data(h("F1 0D"), 0.0)) == [h("F1 0D 01 48E80100") + bytes(10)]
    payload = struct.pack("<III", bus_word(False, False, 125_000), 0, 0)
    assert connection.receive_data(h("F1 0E") + payload + h("00"), 0.1) == [
        BusSettingsChanged(2, False, False)
    ]
    assert replies(connection.receive_data(h("F1 0D"), 0.2)) == [h("F1 0D 00 48E80100") + bytes(10)]


def test_old_style_words_and_zero() -> None:
    connection = Connection(device())
    assert connection.receive_data(h("F1 05") + struct.pack("<II", 0, 250_000), 0.0) == [
        BusSettingsChanged(0, False, False)
    ]
    # Without bit 31 a word just switches the bus on (GVRET firmware's old behaviour).
    assert connection.receive_data(h("F1 05") + struct.pack("<II", 500_000, 250_000), 0.1) == [
        BusSettingsChanged(0, True, False)
    ]


def test_settings_for_buses_the_server_lacks_change_nothing() -> None:
    connection = Connection(device(bus_count=1))
    events = connection.receive_data(setup_buses(bus_word(True, False, 500_000), 0x80000000), 0.0)
    assert events == []
    assert replies(connection.receive_data(h("F1 06"), 0.1)) == [h("F1 06 01 20A10700 00 00000000")]


def test_an_interface_in_listen_only_stays_listen_only() -> None:
    connection = Connection(device(bus_count=1, listen_only=True))
    connection.receive_data(setup_buses(bus_word(True, False, 500_000), 0), 0.0)
    assert replies(connection.receive_data(h("F1 06"), 0.1)) == [h("F1 06 11 20A10700 00 00000000")]


@pytest.mark.parametrize("message", ["F1 04 01", "F1 08 10", "F1 0A 02"])
def test_other_settings_are_ignored(message: str) -> None:
    data = h(message)
    assert Connection(device()).receive_data(data, 0.0) == [SettingIgnored(data[1], data[2:])]


# --- flow control ---------------------------------------------------------------------------


def test_flow_control_starts_with_savvycans_commands_only() -> None:
    wiretap = Connection(device())
    wiretap.receive_data(WIRETAP_HELLO, 0.0)
    assert not wiretap.flow_controlled
    savvy = Connection(device())
    assert FlowControlStarted() in savvy.receive_data(SAVVYCAN_HELLO, 0.0)
    assert (
        Connection(device(), flow_control=False)
        .receive_data(SAVVYCAN_HELLO, 0.0)
        .count(FlowControlStarted())
        == 0
    )


def test_window_drops_newest_frames_whole_and_counts_them() -> None:
    connection = Connection(device())
    connection.receive_data(SAVVYCAN_HELLO, 0.0)
    frames = [classic_frame(0, seq) for seq in range(WINDOW_MAX // 20 + 100)]
    out = connection.send_frames(frames, 0.1)
    assert out.frames == WINDOW_MAX // 20
    assert out.dropped == 100
    assert len(out.data) == 20 * out.frames
    assert connection.unacknowledged == len(out.data)
    # A keepalive acknowledges what reached the client (the kernel still holds 400 bytes).
    connection.receive_data(h("F1 09"), 0.2, undelivered=400)
    assert connection.unacknowledged == 400
    assert connection.send_frames(frames[:100], 0.3).frames == 100


def test_a_client_that_sends_no_keepalives_is_let_go() -> None:
    connection = Connection(device())
    connection.receive_data(SAVVYCAN_HELLO, 0.0)
    frames = [classic_frame(0, seq) for seq in range(WINDOW_MAX // 20)]
    assert connection.send_frames(frames, 1.0).dropped == 0
    assert connection.send_frames(frames, FLOW_CONTROL_GIVE_UP_S - 1).dropped == len(frames)
    out = connection.send_frames(frames, FLOW_CONTROL_GIVE_UP_S + 1)
    assert (out.frames, out.dropped, len(out.notices)) == (len(frames), 0, 1)
    assert not connection.flow_controlled


def check_model_figures(figures: Figures, *, lossless: bool) -> None:
    assert figures.error == ""
    assert figures.order_errors == 0
    assert figures.received + figures.dropped == figures.fed  # every loss counted, exactly
    assert figures.largest_read <= READ_LIMIT
    assert figures.keepalive_replies == figures.keepalives_sent + 1  # + the handshake's
    if lossless:
        assert figures.dropped == 0


def test_model_savvycan_at_one_saturated_bus_gets_every_frame() -> None:
    figures = simulate(DENSE_FPS, 20.0)
    check_model_figures(figures, lossless=True)
    assert figures.largest_keepalive_gap <= 0.26


@pytest.mark.parametrize(
    ("seconds", "one_way_s", "keepalive_before_read"),
    [(60.0, 0.0003, True), (20.0, 0.0003, False), (20.0, 0.02, True), (20.0, 0.02, False)],
)
def test_model_savvycan_at_five_times_the_rate(
    seconds: float, one_way_s: float, keepalive_before_read: bool
) -> None:
    figures = simulate(
        5 * DENSE_FPS, seconds, one_way_s=one_way_s, keepalive_before_read=keepalive_before_read
    )
    check_model_figures(figures, lossless=False)
    assert figures.dropped > 0
    assert figures.received > 0
    # Never more than one window in a read: it takes the model about 4 s.
    assert figures.largest_keepalive_gap < 4.5


def test_model_savvycan_recovers_from_a_pause_by_itself() -> None:
    figures = simulate(DENSE_FPS, 20.0, hiccup=(3.0, 0.2))
    check_model_figures(figures, lossless=False)
    # It lost frames after the pause, but none in the last 10 s.
    assert 3.0 * DENSE_FPS < figures.last_missing_seq < 10.0 * DENSE_FPS


def test_without_flow_control_the_model_spirals() -> None:
    figures = simulate(5 * DENSE_FPS, 10.0, flow_control=False)
    assert figures.dropped == 0
    assert figures.largest_read > 3 * READ_LIMIT  # and growing: what the flow control is for


@settings(deadline=None, max_examples=100)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 1.0),
            st.sampled_from(["frames", "keepalive", "bus-off", "bus-on", "read"]),
            st.integers(0, 3000),
        ),
        max_size=60,
    )
)
def test_window_invariants_under_any_schedule(actions: List[tuple]) -> None:
    connection = Connection(device())
    connection.receive_data(SAVVYCAN_HELLO, 0.0)
    now, seq, unread, offered, got = 0.0, 0, 0, 0, 0
    in_order: Optional[int] = -1
    for delay, action, size in actions:
        now += delay
        if action == "frames":
            frames = [classic_frame(seq % 2, seq + i) for i in range(size)]
            seq += size
            out = connection.send_frames(frames, now)
            offered += len(frames)
            got += out.frames
            assert out.frames + out.dropped + out.fd_skipped <= len(frames)
            assert len(out.data) == 20 * out.frames
            unread += len(out.data)
            numbers = [
                struct.unpack_from("<Q", out.data, 20 * i + 11)[0] for i in range(out.frames)
            ]
            assert numbers == sorted(numbers) and (not numbers or numbers[0] > in_order)
            in_order = numbers[-1] if numbers else in_order
        elif action == "keepalive":
            connection.receive_data(h("F1 09"), now, undelivered=min(size, unread))
        elif action == "read":
            unread = 0
        else:
            on = action == "bus-on"
            words = setup_buses(bus_word(True, False, 500_000), bus_word(on, False, 250_000))
            connection.receive_data(words, now)
        assert 0 <= connection.unacknowledged <= WINDOW_MAX
        assert WINDOW_MIN <= connection.window <= WINDOW_MAX
    assert connection.frames_sent == got
