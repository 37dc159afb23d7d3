"""The SocketCAN reader through its seam, and the pure pieces the kernel tier cannot show here."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from typing import List

import pytest
from gvret_client import SAVVYCAN_HELLO, GvretClient
from harness import wait_until
from test_netlink import can_link

from wiretap.app import App
from wiretap.config import load_config
from wiretap.frames import CAN_ERR_BUSOFF, CAN_ERR_FLAG, CAN_FRAME, TX, Frame, make_frame
from wiretap.sources import BusInfo, TransmitResult
from wiretap.sources.socketcan import (
    MSG_CONFIRM,
    MSG_DONTROUTE,
    SocketCanSource,
    direction_of,
    set_link_bitrate,
)


class Collector:
    def __init__(self) -> None:
        self.frames: List[Frame] = []
        self.batches = 0

    def __call__(self, frames: List[Frame]) -> None:
        self.frames.extend(frames)
        self.batches += 1


def started(source: SocketCanSource) -> Collector:
    collector = Collector()
    source.start(collector)
    return collector


def test_direction_from_msg_flags():
    assert direction_of(0) == "rx"
    assert direction_of(MSG_DONTROUTE) == TX
    assert direction_of(MSG_CONFIRM) == TX
    assert direction_of(MSG_CONFIRM | MSG_DONTROUTE) == TX


def test_reader_decodes_classic_and_fd_with_the_kernel_timestamp(bus_factory):
    bus = bus_factory()
    source = SocketCanSource("can0", 3, can_fd=True, open_socket=lambda: bus.reader_end)
    collector = started(source)
    try:
        before = time.time_ns()
        bus.send(make_frame(0, 0x123, b"\x11\x22"))
        bus.send(make_frame(0, 0x1FFFFFFF, bytes(range(64)), fd=True, brs=True, esi=True))
        bus.send(make_frame(0, 0x7FF, b"", rtr=True))
        after = time.time_ns()
        wait_until(lambda: len(collector.frames) == 3)
    finally:
        source.stop()
        source.join(5)
    classic, fd, rtr = collector.frames
    assert (classic.bus, classic.can_id, classic.extended, classic.data, classic.fd) == (
        3,
        0x123,
        False,
        b"\x11\x22",
        False,
    )
    assert (fd.can_id, fd.extended, fd.fd, fd.brs, fd.esi, fd.data) == (
        0x1FFFFFFF,
        True,
        True,
        True,
        True,
        bytes(range(64)),
    )
    assert (rtr.rtr, rtr.data) == (True, b"")
    # SO_TIMESTAMP is microsecond resolution: the bounds are rounded to it.
    for frame in collector.frames:
        assert before // 1000 * 1000 <= frame.ts_ns <= after
        assert frame.direction == "rx"
    assert source.frames_read == 3


def test_error_frames_are_counted_not_published_and_bus_off_logged_once(bus_factory, caplog):
    bus = bus_factory()
    source = SocketCanSource("can0", 0, open_socket=lambda: bus.reader_end)
    collector = started(source)
    busoff = CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_BUSOFF, 8, 0, bytes(8))
    try:
        with caplog.at_level(logging.WARNING, logger="wiretap.socketcan"):
            for _ in range(3):
                bus.send_raw(busoff)
            bus.send(make_frame(0, 0x100, b"\x01"))
            wait_until(lambda: len(collector.frames) == 1)
    finally:
        source.stop()
        source.join(5)
    assert source.error_frames == 3
    assert [r.getMessage() for r in caplog.records if "bus-off" in r.getMessage()] == [
        "can0: bus-off (tx errors 256)"
    ]


def test_datagrams_of_other_sizes_are_ignored(bus_factory):
    bus = bus_factory()
    source = SocketCanSource("can0", 0, open_socket=lambda: bus.reader_end)
    collector = started(source)
    try:
        bus.send_raw(b"\x00" * 15)
        bus.send(make_frame(0, 0x100, b"\x01"))
        wait_until(lambda: len(collector.frames) == 1)
    finally:
        source.stop()
        source.join(5)
    assert collector.frames[0].can_id == 0x100


def test_missing_interface_is_waited_for_and_logged_once(bus_factory, caplog):
    bus = bus_factory()
    attempts = []

    def open_socket() -> socket.socket:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise OSError(errno.ENODEV, "No such device")
        return bus.reader_end

    source = SocketCanSource("can9", 0, open_socket=open_socket)
    with caplog.at_level(logging.INFO, logger="wiretap.socketcan"):
        collector = started(source)
        try:
            bus.send(make_frame(0, 0x100, b"\x01"))
            wait_until(lambda: len(collector.frames) == 1)
        finally:
            source.stop()
            source.join(5)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("can9: cannot open (no such interface)" in m for m in messages) == 1
    assert sum("can9: interface is back, reading again" in m for m in messages) == 1
    assert len(attempts) == 3


def test_transmit_writes_can_frame_bytes(bus_factory):
    bus = bus_factory()
    source = SocketCanSource("can0", 0, open_socket=lambda: bus.reader_end)
    started(source)
    try:
        wait_until(lambda: source._sock is not None)
        result = source.transmit(make_frame(0, 0x18DAF110, b"\x02\x01\x0c", extended=True), 7)
        assert result is TransmitResult.SENT
        assert bus.receive() == CAN_FRAME.pack(0x80000000 | 0x18DAF110, 3, 0, b"\x02\x01\x0c")
        refused = source.transmit(make_frame(0, 0x100, bytes(12), fd=True), 7)
        assert refused is TransmitResult.REFUSED
    finally:
        source.stop()
        source.join(5)
    assert (source.tx, source.tx_fail) == (1, 0)


def test_transmit_on_a_full_queue_is_dropped_and_counted(bus_factory):
    bus = bus_factory()
    source = SocketCanSource("can0", 0, open_socket=lambda: bus.reader_end)
    started(source)
    try:
        wait_until(lambda: source._sock is not None)
        frame = make_frame(0, 0x100, b"\x01")
        results = []
        while TransmitResult.BUSY not in results and len(results) < 10_000:
            results.append(source.transmit(frame, 1))  # nobody reads the other end
        results += [source.transmit(frame, 1) for _ in range(2)]
    finally:
        source.stop()
        source.join(5)
    sent = results.count(TransmitResult.SENT)
    assert results[sent:] == [TransmitResult.BUSY] * 3
    assert (source.tx, source.tx_fail) == (sent, 3)


def test_transmit_without_an_interface_reports_down(caplog):
    never = threading.Event()

    def open_socket() -> socket.socket:
        never.wait(0.01)
        raise OSError(errno.ENODEV, "No such device")

    source = SocketCanSource("can7", 0, open_socket=open_socket)
    started(source)
    try:
        with caplog.at_level(logging.WARNING, logger="wiretap.socketcan"):
            results = [source.transmit(make_frame(0, 0x100, b"\x01"), 1) for _ in range(3)]
    finally:
        source.stop()
        source.join(5)
    assert results == [TransmitResult.DOWN] * 3
    assert source.tx_fail == 3
    assert sum("transmit dropped" in r.getMessage() for r in caplog.records) == 1


def test_error_passive_and_recovery_are_logged_once_each(bus_factory, caplog):
    from wiretap.frames import CAN_ERR_CRTL, CAN_ERR_CRTL_RX_PASSIVE
    from wiretap.sources.socketcan import CAN_ERR_RESTARTED

    bus = bus_factory()
    source = SocketCanSource("can0", 0, open_socket=lambda: bus.reader_end)
    collector = started(source)
    passive = CAN_FRAME.pack(
        CAN_ERR_FLAG | CAN_ERR_CRTL, 8, 0, bytes([0, CAN_ERR_CRTL_RX_PASSIVE]) + bytes(6)
    )
    restarted = CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_RESTARTED, 8, 0, bytes(8))
    try:
        with caplog.at_level(logging.INFO, logger="wiretap.socketcan"):
            for raw in (passive, passive, restarted, restarted):
                bus.send_raw(raw)
            bus.send(make_frame(0, 0x100, b"\x01"))
            wait_until(lambda: len(collector.frames) == 1)
    finally:
        source.stop()
        source.join(5)
    assert [r.getMessage() for r in caplog.records if "error-" in r.getMessage()] == [
        "can0: error-passive (tx errors 0, rx errors 0)",
        "can0: error-active again after error-passive (tx errors 0, rx errors 0)",
    ]
    assert source.error_frames == 4


# --- what is known of the interface (rtnetlink through a seam) -----------------------------


def link_seam():
    """``(kernel end, source end)``: the test plays the kernel's side of an rtnetlink socket."""
    kernel_end, source_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    kernel_end.settimeout(10)
    return kernel_end, source_end


def assert_getlink_request(data: bytes, ifname: str) -> None:
    length, kind, flags = struct.unpack_from("=IHH", data)
    assert (length, kind, flags) == (len(data), 18, 1)  # RTM_GETLINK, NLM_F_REQUEST
    assert ifname.encode() + b"\0" in data


def test_bus_info_is_what_the_kernel_said_at_start_then_at_each_change(bus_factory):
    bus = bus_factory()
    kernel, source_end = link_seam()
    kernel.send(can_link("can0", bitrate=250_000, listen_only=True))
    source = SocketCanSource(
        "can0", 0, open_socket=lambda: bus.reader_end, open_link=lambda: source_end
    )
    started(source)
    try:
        assert_getlink_request(kernel.recv(256), "can0")
        # Known before start() returned: the first client's F1 06 has it.
        assert source.bus_info(0) == BusInfo(True, True, 250_000, state="error-active")
        kernel.send(can_link("can0", bitrate=125_000, state=2, berr=(128, 3)))
        wait_until(lambda: source.bus_info(0).bitrate == 125_000, what="the change")
        assert source.bus_info(0) == BusInfo(True, False, 125_000, "error-passive", 128, 3)
        kernel.send(can_link("can1", bitrate=1_000_000))  # another interface's change
        kernel.send(can_link("can0", bitrate=500_000))
        wait_until(lambda: source.bus_info(0).bitrate == 500_000, what="the second change")
        assert source.link.name == "can0"
        # A controller state change that the kernel does not announce: the reader asks.
        bus.send_raw(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_BUSOFF, 8, 0, bytes(8)))
        assert_getlink_request(kernel.recv(256), "can0")
    finally:
        source.stop()
        source.join(10)
    assert not source._thread.is_alive()  # woken at once by stop(): it has no poll timeout


@pytest.mark.parametrize(
    "restart_ms, then",
    [
        (100, ", restarting in 100 ms"),
        (0, ", stays off until 'ip link set can0 type can restart'"),
    ],
)
def test_the_bus_off_line_says_what_the_kernel_does_next(bus_factory, caplog, restart_ms, then):
    bus = bus_factory()
    kernel, source_end = link_seam()
    kernel.send(can_link("can0", restart_ms=restart_ms))  # `ip link set can0 type can restart-ms`
    source = SocketCanSource(
        "can0", 0, open_socket=lambda: bus.reader_end, open_link=lambda: source_end
    )
    collector = started(source)
    try:
        with caplog.at_level(logging.WARNING, logger="wiretap.socketcan"):
            bus.send_raw(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_BUSOFF, 8, 0, bytes(8)))
            bus.send(make_frame(0, 0x100, b""))
            wait_until(lambda: len(collector.frames) == 1)
    finally:
        source.stop()
        source.join(10)
    assert [r.getMessage() for r in caplog.records if "bus-off" in r.getMessage()] == [
        "can0: bus-off (tx errors 256)" + then
    ]


def test_a_kernel_that_gives_no_bitrate_is_reported_as_500000_and_logged_once(bus_factory, caplog):
    bus = bus_factory()
    kernel, source_end = link_seam()
    kernel.send(can_link("can0", bitrate=0))
    source = SocketCanSource(
        "can0", 0, open_socket=lambda: bus.reader_end, open_link=lambda: source_end
    )
    with caplog.at_level(logging.INFO, logger="wiretap.socketcan"):
        started(source)
        try:
            kernel.send(can_link("can0", bitrate=0, state=1))
            wait_until(lambda: source.bus_info(0).state == "error-warning")
        finally:
            source.stop()
            source.join(10)
    assert source.bus_info(0).bitrate == 500_000
    messages = [r.getMessage() for r in caplog.records]
    assert sum("reports no bit rate, reporting 500000" in m for m in messages) == 1


def test_no_client_reply_waits_on_a_subprocess(bus_factory, monkeypatch):
    spawned = []

    def no_subprocess(*args, **kwargs):
        spawned.append(args)
        raise AssertionError("a subprocess on the way to a reply")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    monkeypatch.setattr(os, "posix_spawn", no_subprocess)
    monkeypatch.setattr(os, "fork", no_subprocess)
    monkeypatch.setenv("PATH", "/nonexistent")  # and no `ip` to be found either
    bus = bus_factory()
    kernel, source_end = link_seam()
    kernel.send(can_link("can0", bitrate=250_000, listen_only=True))
    source = SocketCanSource(
        "can0", 0, open_socket=lambda: bus.reader_end, open_link=lambda: source_end
    )
    config = load_config(["--host", "127.0.0.1", "--port", "0", "--stats-interval", "0"], {})
    app = App(config, sources=[source])
    app.start()
    client = GvretClient(app.port, SAVVYCAN_HELLO)
    try:
        client.wait_reply(0x09)
        # Bus 0: enabled + listen-only, 250,000 bit/s; bus 1: not there.
        assert client.wait_reply(0x06)[0].payload == bytes.fromhex("11 90D00300 00 00000000")
        kernel.send(can_link("can0", bitrate=500_000))
        wait_until(lambda: source.bus_info(0).bitrate == 500_000, what="the change")
        client.send(b"\xf1\x06")
        assert client.wait_reply(0x06, 2)[1].payload == bytes.fromhex("01 20A10700 00 00000000")
    finally:
        client.close()
        app.stop()
    assert spawned == []


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_setting_a_bitrate_says_what_ip_link_refused() -> None:
    with pytest.raises(RuntimeError, match=r"ip link set dev nosuchcan9 down: .+"):
        set_link_bitrate("nosuchcan9", 250_000)


def test_a_seam_source_is_not_reconfigured() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    source = SocketCanSource("can0", 0, open_socket=lambda: a)
    with pytest.raises(RuntimeError, match="can0 is not a kernel CAN interface"):
        source.set_bitrate(250_000)
    a.close()
    b.close()


def test_every_can_state_change_is_one_line_with_the_counters(bus_factory, caplog):
    from wiretap.frames import CAN_ERR_CRTL
    from wiretap.sources.socketcan import (
        CAN_ERR_CNT,
        CAN_ERR_CRTL_ACTIVE,
        CAN_ERR_CRTL_TX_PASSIVE,
        CAN_ERR_CRTL_TX_WARNING,
        CAN_ERR_RESTARTED,
    )

    def controller(status: int, tec: int, rec: int) -> bytes:
        data = bytes([0, status, 0, 0, 0, 0, tec, rec])
        return CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_CRTL | CAN_ERR_CNT, 8, 0, data)

    bus = bus_factory()
    source = SocketCanSource("can0", 0, open_socket=lambda: bus.reader_end)
    source._state_log.interval = 0  # every change, however quick (the flapping test limits)
    collector = started(source)
    sequence = [
        controller(CAN_ERR_CRTL_TX_WARNING, 96, 3),
        controller(CAN_ERR_CRTL_TX_WARNING, 97, 3),  # same state: counters only
        controller(CAN_ERR_CRTL_TX_PASSIVE, 128, 4),
        CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_BUSOFF, 8, 0, bytes(8)),
        CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_RESTARTED, 8, 0, bytes(8)),
        controller(CAN_ERR_CRTL_TX_WARNING, 100, 0),
        controller(CAN_ERR_CRTL_ACTIVE, 20, 1),
    ]
    seen = []
    try:
        with caplog.at_level(logging.INFO, logger="wiretap.socketcan"):
            for number, raw in enumerate(sequence):
                bus.send_raw(raw)
                bus.send(make_frame(0, 0x100 + number, b""))
                wait_until(lambda n=number: len(collector.frames) == n + 1)
                seen.append(source.health(0)[1:6])
    finally:
        source.stop()
        source.join(5)
    assert [
        (r.levelname, r.getMessage()) for r in caplog.records if "errors" in r.getMessage()
    ] == [
        ("WARNING", "can0: error-warning (tx errors 96, rx errors 3)"),
        ("WARNING", "can0: error-passive (tx errors 128, rx errors 4)"),
        ("WARNING", "can0: bus-off (tx errors 256)"),  # restart-ms unknown: no link seam here
        ("INFO", "can0: error-active again after bus-off (tx errors 0, rx errors 0)"),
        ("WARNING", "can0: error-warning (tx errors 100, rx errors 0)"),
        ("INFO", "can0: error-active again after error-warning (tx errors 20, rx errors 1)"),
    ]
    # (state, tx errors, rx errors, error frames, bus-off count) after each error frame
    assert seen == [
        ("error-warning", 96, 3, 1, 0),
        ("error-warning", 97, 3, 2, 0),
        ("error-passive", 128, 4, 3, 0),
        ("bus-off", 256, 4, 4, 1),
        ("error-active", 0, 0, 5, 1),
        ("error-warning", 100, 0, 6, 1),
        ("error-active", 20, 1, 7, 1),
    ]
    assert source.counters()["bus_off"] == 1


def test_a_flapping_bus_logs_each_state_once_per_interval(bus_factory, caplog):
    from wiretap.frames import CAN_ERR_CRTL
    from wiretap.sources.socketcan import CAN_ERR_CRTL_ACTIVE, CAN_ERR_CRTL_RX_WARNING

    bus = bus_factory()
    source = SocketCanSource("can0", 0, open_socket=lambda: bus.reader_end)
    collector = started(source)
    try:
        with caplog.at_level(logging.INFO, logger="wiretap.socketcan"):
            for status in [CAN_ERR_CRTL_RX_WARNING, CAN_ERR_CRTL_ACTIVE] * 50:
                data = bytes([0, status]) + bytes(6)
                bus.send_raw(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_CRTL, 8, 0, data))
            bus.send(make_frame(0, 0x100, b""))
            wait_until(lambda: len(collector.frames) == 1)
    finally:
        source.stop()
        source.join(5)
    assert [r.getMessage() for r in caplog.records if "errors" in r.getMessage()] == [
        "can0: error-warning (tx errors 0, rx errors 0)",
        "can0: error-active again after error-warning (tx errors 0, rx errors 0)",
    ]
    assert source.error_frames == 100
    assert source._state_log.suppressed_total == 98


@pytest.mark.parametrize("broken", ["while reading", "before the first read"])
def test_losing_the_kernels_news_keeps_the_last_values_and_the_frames(bus_factory, caplog, broken):
    bus = bus_factory()
    kernel, source_end = link_seam()
    kernel.send(can_link("can0", bitrate=250_000))

    def open_socket() -> socket.socket:
        if broken == "before the first read":
            wait_until(lambda: source.bus_info(0).bitrate == 250_000, what="the link learnt")
            source_end.close()
        return bus.reader_end

    source = SocketCanSource("can0", 0, open_socket=open_socket, open_link=lambda: source_end)
    with caplog.at_level(logging.WARNING, logger="wiretap.socketcan"):
        collector = started(source)
        try:
            if broken == "while reading":
                source_end.close()  # the rtnetlink socket breaks (EBADF at the next read)
            for i in range(3):
                bus.send(make_frame(0, 0x100, bytes([i])))
            wait_until(lambda: len(collector.frames) == 3, what="frames after the break")
        finally:
            source.stop()
            source.join(10)
    assert source.bus_info(0).bitrate == 250_000
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no more news of the interface from the kernel" in m for m in messages) == 1
    assert not any("reader failed" in m for m in messages)
