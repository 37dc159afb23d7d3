"""The kernel facts the SocketCAN source relies on, checked on a real raw CAN socket.

Frames sent by ``cansend`` (another local socket) arrive with ``MSG_DONTROUTE``, an
``SO_TIMESTAMP`` of the receive time, and as ``can_frame`` / ``canfd_frame`` bytes that
``wiretap.frames.decode`` reads back to what was sent.
"""

from __future__ import annotations

import select
import socket
import subprocess
import time
from typing import Callable, Tuple

import pytest
from vcan_tools import scaled

from wiretap.frames import CAN_MTU, CANFD_MTU, decode
from wiretap.sources.mmsg import MessageBatch
from wiretap.sources.socketcan import enable_timestamps

pytestmark = pytest.mark.vcan


def open_raw(iface: str, fd: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    enable_timestamps(sock)
    if fd:
        sock.setsockopt(socket.SOL_CAN_RAW, socket.CAN_RAW_FD_FRAMES, 1)
    sock.settimeout(scaled(10))
    sock.bind((iface,))
    return sock


def receive(sock: socket.socket) -> Tuple[bytes, int, int]:
    """One frame: its bytes, ``msg_flags`` and the kernel timestamp in ns.

    Read the way the source reads (``recvmmsg``), with the timestamp asked for the same way
    (``SO_TIMESTAMP_NEW``, 16 bytes on every platform; ``SO_TIMESTAMP`` with the userland's
    ``time_t`` before Linux 5.1).
    """
    ready, _, _ = select.select([sock], [], [], scaled(10))
    assert ready, "no frame"
    batch = MessageBatch(1, CANFD_MTU)
    assert batch.receive(sock.fileno()) == 1
    [(offset, size, flags, ts_ns)] = batch.messages(1)
    data = batch.datagram(offset, size)
    assert ts_ns is not None, "no SO_TIMESTAMP"
    return data, flags, ts_ns


def test_cansend_classic_frame_arrives_with_timestamp_and_dontroute(
    vcan: Callable[..., str],
) -> None:
    iface = vcan("vcan0")
    with open_raw(iface) as sock:
        before_ns = time.time_ns()
        subprocess.run(["cansend", iface, "123#1122334455667788"], check=True)
        data, flags, ts_ns = receive(sock)
        after_ns = time.time_ns()

    assert len(data) == CAN_MTU
    assert flags & socket.MSG_DONTROUTE
    # The kernel stamps the frame on receipt: between our two clock reads (µs resolution).
    assert before_ns - 1000 <= ts_ns <= after_ns
    frame = decode(data, bus=0, ts_ns=ts_ns)
    assert (frame.can_id, frame.extended, frame.fd, frame.data) == (
        0x123,
        False,
        False,
        bytes.fromhex("1122334455667788"),
    )


def test_cansend_extended_and_fd_frames_decode(vcan: Callable[..., str]) -> None:
    iface = vcan("vcan0", fd=True)
    payload = bytes(range(64))
    with open_raw(iface, fd=True) as sock:
        subprocess.run(["cansend", iface, "1ABCDEF0#0102"], check=True)
        subprocess.run(["cansend", iface, f"7FF##1{payload.hex()}"], check=True)
        classic, _, _ = receive(sock)
        fd, _, ts_ns = receive(sock)

    assert len(classic) == CAN_MTU
    frame = decode(classic, bus=0, ts_ns=0)
    assert (frame.can_id, frame.extended, frame.data) == (0x1ABCDEF0, True, b"\x01\x02")
    assert len(fd) == CANFD_MTU
    frame = decode(fd, bus=0, ts_ns=ts_ns)
    assert (frame.can_id, frame.fd, frame.brs, frame.data) == (0x7FF, True, True, payload)
