"""What this platform's kernel (or emulator) hands the reader as ``SO_TIMESTAMP`` ancillary data.

Run natively and in the ARM tier (Debian armhf with 32- and 64-bit ``time_t``, and arm64, under
qemu-user): the seam is asked for timestamps exactly as the reader asks a CAN socket, and the
bytes that arrive must decode, with the reader's own parser, to the moment the datagram was sent.
A wrong field width or byte order would put it decades away.
"""

from __future__ import annotations

import socket
import time

from wiretap.sources.mmsg import (
    ANCILLARY_SPACE,
    SO_TIMESTAMP,
    SO_TIMESTAMP_NEW,
    TIMEVAL_64,
    MessageBatch,
    parse_ancillary,
)
from wiretap.sources.socketcan import enable_timestamps

# (cmsg type, payload size) a kernel can give: SO_TIMESTAMP_NEW's __kernel_sock_timeval, or a
# timeval of the userland's time_t (16 bytes on 64-bit; 8 on 32-bit) before Linux 5.1 or under
# qemu-user, which answers SO_TIMESTAMP_NEW with the old message on armhf.
KNOWN_LAYOUTS = {(SO_TIMESTAMP_NEW, 16), (SO_TIMESTAMP, 16), (SO_TIMESTAMP, 8)}


def test_the_seam_timestamp_decodes_to_the_moment_of_sending():
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sender, receiver:
        enable_timestamps(receiver)
        before_ns = time.time_ns()
        sender.send(b"\x00" * 16)
        after_ns = time.time_ns()
        _data, ancdata, _flags, _addr = receiver.recvmsg(64, ANCILLARY_SPACE)

    stamps = [(kind, len(data)) for level, kind, data in ancdata if level == socket.SOL_SOCKET]
    assert len(stamps) == 1 and stamps[0] in KNOWN_LAYOUTS, ancdata
    ts_ns, drops = parse_ancillary(ancdata)
    assert drops is None
    # Microsecond resolution: the bounds are rounded down to it.
    assert before_ns // 1000 * 1000 <= ts_ns <= after_ns


def test_a_timestamp_after_2038_survives_on_every_platform():
    after_2038 = 2_240_000_000  # 2040-12-25: beyond a 32-bit time_t
    ancdata = [(socket.SOL_SOCKET, SO_TIMESTAMP_NEW, TIMEVAL_64.pack(after_2038, 7))]
    assert parse_ancillary(ancdata) == (after_2038 * 1_000_000_000 + 7_000, None)


def test_recvmmsg_reads_what_recvmsg_reads_on_this_platform():
    # The reader's batches come through ctypes structures laid out for this platform's C ABI
    # (msghdr is 28 bytes on armhf, 56 on 64-bit): both ways of reading must agree exactly.
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    batch = MessageBatch(4, 72)
    with sender, receiver:
        enable_timestamps(receiver)
        before_ns = time.time_ns()
        for size in (16, 72, 16):
            sender.send(bytes([size]) * size)
        first, ancdata, flags, _addr = receiver.recvmsg(72, ANCILLARY_SPACE)
        after_ns = time.time_ns()
        count = batch.receive(receiver.fileno())
        rest = [
            (batch.datagram(offset, size), flags, ts)
            for offset, size, flags, ts in batch.messages(count)
        ]

    # qemu-user 7.2 on trixie armhf (64-bit time_t) answers with two timestamps, an 8-byte
    # SO_TIMESTAMP and the 16-byte SO_TIMESTAMP_NEW; with room for one, recvmsg flags the cut
    # second one (MSG_CTRUNC). The first is the timestamp either way.
    assert (first, flags & ~socket.MSG_CTRUNC) == (b"\x10" * 16, 0)
    assert [(data, flags & ~socket.MSG_CTRUNC) for data, flags, _ts in rest] == [
        (b"H" * 72, 0),
        (b"\x10" * 16, 0),
    ]
    for _data, _flags, ts_ns in rest:
        assert ts_ns is not None and before_ns // 1000 * 1000 <= ts_ns <= after_ns
    assert rest[0][2] >= parse_ancillary(ancdata)[0]
