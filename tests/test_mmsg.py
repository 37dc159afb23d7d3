"""``recvmmsg`` batches (wiretap.sources.mmsg): what a datagram socket queued comes out whole, in
order, with its timestamp; the control-message parser on the layouts a kernel (or qemu) gives."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest

from wiretap.sources.mmsg import (
    CMSGHDR,
    SO_RXQ_OVFL,
    SO_TIMESTAMP,
    SO_TIMESTAMP_NEW,
    TIMEVAL_32,
    TIMEVAL_64,
    MessageBatch,
    control_messages,
    parse_ancillary,
)
from wiretap.sources.socketcan import enable_timestamps


def cmsg(level: int, kind: int, data: bytes) -> bytes:
    """One control message as the kernel writes it: header, data, padding to CMSG_SPACE."""
    message = CMSGHDR.pack(socket.CMSG_LEN(len(data)), level, kind)
    message += bytes(socket.CMSG_LEN(0) - CMSGHDR.size) + data
    return message.ljust(socket.CMSG_SPACE(len(data)), b"\0")


def read(batch: MessageBatch, count: int) -> list:
    """``(datagram, msg_flags, timestamp)`` of each message of the batch."""
    return [
        (batch.datagram(offset, size), flags, ts)
        for offset, size, flags, ts in batch.messages(count)
    ]


def test_ancillary_timestamps_in_both_time_t_layouts():
    ts64 = [(socket.SOL_SOCKET, SO_TIMESTAMP, TIMEVAL_64.pack(1_700_000_000, 123_456))]
    ts32 = [(socket.SOL_SOCKET, SO_TIMESTAMP, TIMEVAL_32.pack(1_700_000_000, 654_321))]
    assert parse_ancillary(ts64) == (1_700_000_000_123_456_000, None)
    assert parse_ancillary(ts32) == (1_700_000_000_654_321_000, None)
    drops = [(socket.SOL_SOCKET, SO_RXQ_OVFL, (42).to_bytes(4, "little"))]
    assert parse_ancillary(ts64 + drops) == (1_700_000_000_123_456_000, 42)
    assert parse_ancillary([]) == (None, None)


def test_control_messages_split_as_recvmsg_lists_them():
    stamp = TIMEVAL_32.pack(1_700_000_000, 5)  # qemu-user's answer on armhf: 8 bytes
    drops = (7).to_bytes(4, "little")
    control = cmsg(socket.SOL_SOCKET, SO_TIMESTAMP_NEW, stamp) + cmsg(
        socket.SOL_SOCKET, SO_RXQ_OVFL, drops
    )
    assert control_messages(control) == [
        (socket.SOL_SOCKET, SO_TIMESTAMP_NEW, stamp),
        (socket.SOL_SOCKET, SO_RXQ_OVFL, drops),
    ]
    assert parse_ancillary(control_messages(control)) == (1_700_000_000_000_005_000, 7)
    # Cut short (MSG_CTRUNC): the whole messages only.
    cut = socket.CMSG_SPACE(len(stamp)) + socket.CMSG_LEN(len(drops)) - 1
    assert control_messages(control[:cut]) == [(socket.SOL_SOCKET, SO_TIMESTAMP_NEW, stamp)]
    assert control_messages(b"") == []


@pytest.fixture
def pair():
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    enable_timestamps(receiver)
    with sender, receiver:
        yield sender, receiver


def test_a_batch_holds_at_most_its_capacity_and_the_rest_waits(pair):
    sender, receiver = pair
    batch = MessageBatch(4, 72)
    sent = [bytes([number]) * (16 if number % 2 else 72) for number in range(7)]
    for datagram in sent:
        sender.send(datagram)

    first = batch.receive(receiver.fileno())
    got = [data for data, _flags, _ts in read(batch, first)]
    second = batch.receive(receiver.fileno())
    got += [data for data, _flags, _ts in read(batch, second)]

    assert (first, second) == (4, 3)
    assert got == sent
    assert batch.receive(receiver.fileno()) == 0  # nothing queued: no wait, no error
    assert batch.drops is None


def test_timestamps_are_the_kernels_and_in_order(pair):
    sender, receiver = pair
    batch = MessageBatch(8, 72)
    before_ns = time.time_ns()
    for number in range(5):
        sender.send(bytes([number]) * 16)
    after_ns = time.time_ns()
    stamps = [ts for _data, _flags, ts in read(batch, batch.receive(receiver.fileno()))]
    assert len(stamps) == 5
    # Microsecond resolution: the lower bound is rounded down to it.
    assert before_ns // 1000 * 1000 <= stamps[0] <= stamps[-1] <= after_ns
    assert stamps == sorted(stamps)


def test_a_socket_without_timestamps_gives_none(pair):
    sender, _ = pair
    plain_sender, plain_receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with plain_sender, plain_receiver:
        plain_sender.send(b"x" * 16)
        batch = MessageBatch(2, 72)
        count = batch.receive(plain_receiver.fileno())
        assert read(batch, count) == [(b"x" * 16, 0, None)]


def test_errors_are_raised_as_oserror():
    read_end, write_end = os.pipe()  # not a socket: ENOTSOCK, whatever else the process has open
    try:
        with pytest.raises(OSError) as failure:
            MessageBatch(2, 72).receive(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert failure.value.errno == errno.ENOTSOCK
