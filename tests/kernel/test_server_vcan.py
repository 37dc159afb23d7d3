"""The server against real SocketCAN: frames, FD, buses, direction, transmit, interface life.

Every test starts ``wiretap-server.py`` as a process on vcan interfaces, connects GVRET clients
(``gvret_probe``) and drives the bus with can-utils, checking exact counts and bytes; ``candump``
is the independent witness of what was on the bus.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from typing import Callable, List, Optional, Tuple

import pytest
from gvret_probe import FD_LENGTHS, GvretFrame, GvretProbe
from vcan_tools import (
    Candump,
    ServerProcess,
    add_vcan,
    cangen,
    cansend,
    interface_exists,
    ip_link,
    parse_candump_line,
    scaled,
    server_on,
    wait_for_readers,
)

from wiretap.frames import (
    CAN_ERR_BUSOFF,
    CAN_ERR_CRTL,
    CAN_ERR_CRTL_TX_PASSIVE,
    CAN_ERR_FLAG,
    CAN_FRAME,
)
from wiretap.sources.socketcan import CAN_ERR_CNT, CAN_ERR_RESTARTED

pytestmark = pytest.mark.vcan

StartServer = Callable[..., ServerProcess]


def connect(server: ServerProcess, count: int = 1) -> List[GvretProbe]:
    """``count`` clients, returned once the server streams to all of them."""
    clients = [GvretProbe(server.port) for _ in range(count)]
    server.wait_for_log("binary mode", count)
    return clients


def test_cangen_frames_reach_a_client_exactly_with_kernel_timestamps(
    vcan: Callable[..., str], wiretap_server: StartServer, candump: Callable[[str], Candump]
) -> None:
    iface = vcan("vcan0")
    server = server_on(wiretap_server, [iface])
    dump = candump(iface)
    (client,) = connect(server)
    with client:
        cangen(iface, 150, "-g", "1", "-I", "i", "-L", "i", "-D", "i")
        cangen(iface, 50, "-g", "1", "-e", "-L", "8", "-D", "r")
        frames = client.read_frames(200)
        assert client.read_available(quiet=0.5) == []
    dumped = [parse_candump_line(line) for line in dump.stop()]

    assert len(dumped) == 200
    assert [(f.can_id, f.extended, f.bus, f.data) for f in frames] == [
        (can_id, extended, 0, data) for _, _, can_id, extended, _, data in dumped
    ]
    assert sum(f.extended for f in frames) == 50
    # GVRET timestamps are the kernel's receive times (the same ones candump prints), in µs
    # since the server started: every gap between frames matches candump's to the microsecond.
    stamps = [f.ts_us for f in frames]
    assert stamps == sorted(stamps)
    dump_stamps = [entry[0] for entry in dumped]
    for index in range(1, 200):
        gap = stamps[index] - stamps[index - 1]
        assert abs(gap - (dump_stamps[index] - dump_stamps[index - 1])) <= 1
    stats = server.stop()
    assert (stats["rx"], stats["kernel_drops"], stats["client_drops"]) == (200, 0, 0)


def test_fd_frames_of_every_length_reach_a_wiretap_dialect_client(
    vcan: Callable[..., str], wiretap_server: StartServer
) -> None:
    iface = vcan("vcan0", fd=True)
    server = server_on(wiretap_server, [iface], "--can-fd")
    (client,) = connect(server)
    with client:
        for length in FD_LENGTHS:
            cansend(iface, f"{0x100 + length:03X}##1{bytes(range(length)).hex()}")
        frames = client.read_frames(len(FD_LENGTHS))

    assert [(f.can_id, f.data) for f in frames] == [
        (0x100 + length, bytes(range(length))) for length in FD_LENGTHS
    ]
    assert server.stop()["rx"] == len(FD_LENGTHS)


def test_two_interfaces_with_bus_offset_and_frames_from_this_host_tagged_tx(
    vcan: Callable[..., str], wiretap_server: StartServer
) -> None:
    classic, fd = vcan("vcan0"), vcan("vcan1", fd=True)
    server = server_on(wiretap_server, [classic, fd], "--bus-offset", "2", "--can-fd", "--echo")
    (client,) = connect(server)
    with client:
        cansend(classic, "123#11")
        cansend(fd, f"456##1{bytes(range(12)).hex()}")
        cansend(classic, "12345678#2233")
        frames = client.read_frames(3)
    # One reader thread per interface: frames of different buses may arrive in either order.
    assert sorted((f.bus, f.can_id, f.extended, f.data) for f in frames) == [
        (2, 0x123, False, b"\x11"),
        (2, 0x12345678, True, b"\x22\x33"),
        (3, 0x456, False, bytes(range(12))),
    ]

    assert server.stop()["rx"] == 3
    # cansend is another socket on this host: the kernel marks its frames MSG_DONTROUTE -> tx.
    echoed = server.output().splitlines()
    assert sorted(line.split()[0] for line in echoed) == ["B2", "B2", "B3"]
    assert all(" TX " in line for line in echoed), echoed


def test_client_transmit_reaches_the_bus_and_other_clients_but_not_itself(
    vcan: Callable[..., str], wiretap_server: StartServer, candump: Callable[[str], Candump]
) -> None:
    iface = vcan("vcan0", fd=True)
    server = server_on(wiretap_server, [iface], "--can-fd", "--echo")
    dump = candump(iface)
    sender, watcher = connect(server, 2)
    sent = [
        (0x321, False, b"\x01\x02\x03"),
        (0x1ABCDEF0, True, bytes(range(64))),
        (0x7E0, False, bytes(range(100, 112))),
    ]
    with sender, watcher:
        for can_id, extended, data in sent:
            sender.transmit(can_id, data, extended=extended)
        seen = watcher.read_frames(3)
        cansend(iface, "7FF#AA")
        # Frames reach a client in bus order: if the sender got its own frames back, they would
        # arrive before this marker.
        assert [f.can_id for f in sender.read_frames(1)] == [0x7FF]
        assert [f.can_id for f in watcher.read_frames(1)] == [0x7FF]
    assert [(f.can_id, f.extended, f.data) for f in seen] == sent

    on_bus = [parse_candump_line(line) for line in dump.stop()]
    assert [(can_id, ext, fd, data) for _, _, can_id, ext, fd, data in on_bus] == [
        (0x321, False, False, b"\x01\x02\x03"),
        (0x1ABCDEF0, True, True, bytes(range(64))),
        (0x7E0, False, True, bytes(range(100, 112))),
        (0x7FF, False, False, b"\xaa"),
    ]
    stats = server.stop()
    assert (stats["rx"], stats["tx"], stats["tx_fail"]) == (4, 3, 0)
    echoed = server.output().splitlines()
    assert len(echoed) == 4
    assert all(" TX " in line for line in echoed), echoed


def test_interface_down_then_up_is_logged_once_each_and_frames_resume(
    vcan: Callable[..., str], wiretap_server: StartServer
) -> None:
    iface = vcan("vcan0")
    server = server_on(wiretap_server, [iface])
    (client,) = connect(server)
    with client:
        cangen(iface, 20, "-g", "1", "-I", "111", "-L", "2", "-D", "i")
        client.read_frames(20)
        ip_link("set", "down", iface)
        server.wait_for_log("vcan0: interface is down")
        ip_link("set", "up", iface)
        cangen(iface, 20, "-g", "1", "-I", "222", "-L", "2", "-D", "i")
        frames = client.read_frames(20)
        server.wait_for_log("vcan0: reading again")
    assert {f.can_id for f in frames} == {0x222}
    assert len(server.log_lines("vcan0: interface is down")) == 1
    assert len(server.log_lines("vcan0: reading again")) == 1
    assert server.stop()["rx"] == 40


@pytest.mark.parametrize("back_at_once", [False, True], ids=["after-a-failed-open", "at-once"])
def test_deleted_interface_is_reopened_by_name_when_it_comes_back(
    vcan: Callable[..., str], wiretap_server: StartServer, back_at_once: bool
) -> None:
    # "at-once": re-created before the reader's first reopen attempt (a USB adapter re-plugged
    # quickly), so the reopen may succeed straight away; the recovery must still be logged.
    iface = vcan("vcan0")
    server = server_on(wiretap_server, [iface])
    (client,) = connect(server)
    with client:
        cansend(iface, "101#01")
        client.read_frames(1)
        ip_link("del", iface)
        if back_at_once:
            add_vcan(iface)
            server.wait_for_log("vcan0: interface is gone")
        else:
            server.wait_for_log("vcan0: interface is gone")
            server.wait_for_log("vcan0: cannot open")
            add_vcan(iface)
        wait_for_readers(iface, 1)
        cansend(iface, "102#02")
        frames = client.read_frames(1)
        server.wait_for_log("vcan0: interface is back")
    assert [(f.can_id, f.data) for f in frames] == [(0x102, b"\x02")]
    assert len(server.log_lines("vcan0: interface is gone")) == 1
    assert len(server.log_lines("vcan0: interface is back")) == 1
    assert server.stop()["rx"] == 2


def test_interface_missing_at_start_is_picked_up_when_it_appears(
    vcan: Callable[..., str], wiretap_server: StartServer
) -> None:
    assert not interface_exists("vcan7")
    server = wiretap_server("--iface", "vcan7")
    server.wait_for_log("vcan7: cannot open")
    (client,) = connect(server)
    with client:
        vcan("vcan7")
        wait_for_readers("vcan7", 1)
        cansend("vcan7", "7A7#0707")
        frames = client.read_frames(1)
    assert [(f.can_id, f.data) for f in frames] == [(0x7A7, b"\x07\x07")]
    assert len(server.log_lines("vcan7: interface is back")) == 1
    assert server.stop()["rx"] == 1


def read_through_end_marker(
    client: GvretProbe, iface: str, timeout: Optional[float] = None
) -> Tuple[List[GvretFrame], int]:
    """Every frame up to an end marker sent after the flood, and how many markers were sent.

    The marker is one byte long, which no ``-L 8`` flood frame is (``-I i`` sends ID 7FF too).
    Its arrival means everything queued before it on the bus has reached the client or was
    dropped on the way. A marker can itself be dropped if the server's socket is still full,
    so one that has not come within 2 s (scaled) is followed by the next (numbered by its byte);
    reading ends only at the last one sent, since an earlier one may just be late.
    """
    timeout = timeout if timeout is not None else scaled(30.0)
    received: List[GvretFrame] = []
    deadline = time.monotonic() + timeout
    markers = 0
    while time.monotonic() < deadline:
        last_marker = (0x7FF, bytes([markers]))
        cansend(iface, f"7FF#{markers:02X}")
        markers += 1
        resend_at = min(time.monotonic() + scaled(2.0), deadline)
        while time.monotonic() < resend_at:
            received += client.read_available(quiet=0.1)
            if received and (received[-1].can_id, received[-1].data) == last_marker:
                return received, markers
    raise AssertionError(f"no end marker arrived in {timeout:.0f} s; got {len(received)} frames")


def test_flood_counts_of_kernel_server_and_client_agree(
    vcan: Callable[..., str], wiretap_server: StartServer
) -> None:
    sent = 3000
    iface = vcan("vcan0")
    server = server_on(wiretap_server, [iface])
    (client,) = connect(server)
    with client:
        cangen(iface, sent, "-g", "0", "-I", "i", "-L", "8", "-D", "i")
        received, markers = read_through_end_marker(client, iface)
    stats = server.stop()
    # What the kernel handed the server's socket, or dropped there, is everything sent.
    assert stats["rx"] + stats["kernel_drops"] == sent + markers
    assert len(received) + stats["client_drops"] == stats["rx"]


def test_error_frames_on_the_bus_drive_state_log_status_and_stats(
    vcan: Callable[..., str], wiretap_server: StartServer
) -> None:
    """vcan has no controller, but another socket may put error frames on it: the kernel delivers
    them to the reader through its CAN_RAW_ERR_FILTER, as a real controller's would be."""
    iface = vcan("vcan0")
    server = server_on(wiretap_server, [iface], "--status-listen", "127.0.0.1:0")
    server.wait_for_log("status page on")
    status_port = int(re.search(r"status page on http://127\.0\.0\.1:(\d+)/", server.log())[1])
    counters = bytes([0, CAN_ERR_CRTL_TX_PASSIVE, 0, 0, 0, 0, 128, 4])
    with socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW) as injector:
        injector.bind((iface,))
        injector.send(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_CRTL | CAN_ERR_CNT, 8, 0, counters))
        server.wait_for_log("vcan0: error-passive (tx errors 128, rx errors 4)")
        injector.send(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_BUSOFF, 8, 0, bytes(8)))
        server.wait_for_log("vcan0: bus-off (tx errors 256)")
        with urllib.request.urlopen(f"http://127.0.0.1:{status_port}/status", timeout=10) as r:
            (bus,) = json.load(r)["buses"]
        assert (bus["state"], bus["tx_errors"], bus["bus_off_total"]) == ("bus-off", 256, 1)
        assert (bus["error_frames_total"], bus["frames_total"], bus["healthy"]) == (2, 0, False)
        injector.send(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_RESTARTED, 8, 0, bytes(8)))
        server.wait_for_log("vcan0: error-active again after bus-off")
    cansend(iface, "123#01")
    server.wait_for_log(" stats rx=1 ")
    stats = server.stop()
    assert (stats["rx"], stats["error_frames"], stats["bus_off"]) == (1, 3, 1)
