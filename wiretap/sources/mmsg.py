"""Many datagrams per system call: ``recvmmsg(2)`` into buffers allocated once.

Owns: the kernel's ``struct iovec`` / ``struct msghdr`` / ``struct mmsghdr`` (laid out by
``ctypes`` for this platform's C ABI, so 32- and 64-bit userlands alike), the buffers a batch of
up to ``capacity`` datagrams and their ancillary data land in, and reading each message's
length, ``msg_flags`` and ``SO_TIMESTAMP`` / ``SO_RXQ_OVFL`` data back out of them.

Python's ``socket`` has no ``recvmmsg``: one ``recvmsg`` per frame builds five objects and makes
one system call, most of the reader's CPU on a busy bus. Here one call fills the buffers with
everything queued, and each message costs two ``struct`` unpacks and one ``bytes`` slice.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from socket import SOL_SOCKET
from typing import Iterator, List, Optional, Tuple

MSG_DONTWAIT = 0x40  # <bits/socket.h>: this call only, whatever the socket's blocking mode
SO_TIMESTAMP = 29  # SO_TIMESTAMP_OLD: a timeval of the userland's time_t (8 bytes on armhf)
SO_TIMESTAMP_NEW = 63  # Linux 5.1+: __kernel_sock_timeval, 64-bit seconds, on every platform
SO_RXQ_OVFL = 40

TIMEVAL_64 = struct.Struct("=qq")
"""``struct timeval`` with 64-bit ``time_t`` (64-bit userlands), and ``struct
__kernel_sock_timeval { __s64 tv_sec; __s64 tv_usec; }`` that ``SO_TIMESTAMP_NEW`` delivers on
every platform."""

TIMEVAL_32 = struct.Struct("=ii")
"""``struct timeval`` with 32-bit ``time_t`` (32-bit Raspberry Pi OS): tv_sec, tv_usec."""

RXQ_OVFL_COUNT = struct.Struct("=I")
"""``SO_RXQ_OVFL`` ancillary data: ``__u32`` frames the kernel dropped on this socket so far."""

ANCILLARY_SPACE = socket.CMSG_SPACE(TIMEVAL_64.size) + socket.CMSG_SPACE(RXQ_OVFL_COUNT.size)
"""Room for a timestamp and a drop count, the most a reader's socket adds to one datagram."""

_SIZE_T = {4: "I", 8: "Q"}[ctypes.sizeof(ctypes.c_size_t)]


class IoVec(ctypes.Structure):
    """``struct iovec { void *iov_base; size_t iov_len; }`` (``<bits/types/struct_iovec.h>``)."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    """``struct msghdr`` (``<bits/socket.h>``)::

    struct msghdr {
        void *msg_name; socklen_t msg_namelen;
        struct iovec *msg_iov; size_t msg_iovlen;
        void *msg_control; size_t msg_controllen;
        int msg_flags;
    };
    """

    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(IoVec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    """``struct mmsghdr { struct msghdr msg_hdr; unsigned int msg_len; }``: one message of
    ``recvmmsg``, ``msg_len`` the bytes received into it."""

    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


_IOVEC_POINTER = ctypes.POINTER(IoVec)
_MMSGHDR_SIZE = ctypes.sizeof(MMsgHdr)


def _result_struct() -> struct.Struct:
    """What the kernel writes back into each ``mmsghdr``: ``msg_controllen``, ``msg_flags`` and
    ``msg_len``, with the rest of the record skipped as padding (offsets from ``ctypes``)."""
    control_len = MsgHdr.msg_controllen.offset
    flags = MsgHdr.msg_flags.offset
    length = MMsgHdr.msg_len.offset
    size_t = ctypes.sizeof(ctypes.c_size_t)
    return struct.Struct(
        f"={control_len}x{_SIZE_T}{flags - control_len - size_t}xi"
        f"{length - flags - 4}xI{ctypes.sizeof(MMsgHdr) - length - 4}x"
    )


MMSGHDR_RESULT = _result_struct()
"""The fields of one ``struct mmsghdr`` that ``recvmmsg`` fills in: ``msg_hdr.msg_controllen``,
``msg_hdr.msg_flags``, ``msg_len`` (the rest skipped)."""

CMSGHDR = struct.Struct(f"={_SIZE_T}ii")
"""``struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; }`` (``<bits/socket.h>``),
its data at ``CMSG_LEN(0)``."""

CMSG_TIMESTAMP_64 = struct.Struct(f"={_SIZE_T}ii{socket.CMSG_LEN(0) - CMSGHDR.size}xqq")
"""A ``cmsghdr`` and the 16-byte timeval after it: the one control message of nearly every
datagram (``SO_TIMESTAMP_NEW``, or ``SO_TIMESTAMP`` on a 64-bit userland)."""

_TIMESTAMPS = frozenset((SO_TIMESTAMP, SO_TIMESTAMP_NEW))
_TIMESTAMP_64_SPACE = socket.CMSG_SPACE(TIMEVAL_64.size)
_TIMESTAMP_64_LEN = socket.CMSG_LEN(TIMEVAL_64.size)


def _load_recvmmsg() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    function = ctypes.CDLL(None, use_errno=True).recvmmsg
    # int recvmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags,
    #              struct timespec *timeout): no timeout is passed, so no time_t is involved.
    function.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(MMsgHdr),
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    function.restype = ctypes.c_int
    return function


_recvmmsg = _load_recvmmsg()


def control_messages(control: bytes) -> List[Tuple[int, int, bytes]]:
    """The ``(level, type, data)`` of each control message in ``control`` (what the kernel wrote
    to ``msg_control``, ``msg_controllen`` bytes), as ``socket.recvmsg`` would list them; a
    message cut short ends the list."""
    messages = []
    offset = 0
    header_len = socket.CMSG_LEN(0)
    while offset + CMSGHDR.size <= len(control):
        cmsg_len, level, kind = CMSGHDR.unpack_from(control, offset)
        if cmsg_len < header_len or offset + cmsg_len > len(control):
            break
        messages.append((level, kind, control[offset + header_len : offset + cmsg_len]))
        offset += socket.CMSG_SPACE(cmsg_len - header_len)
    return messages


def parse_ancillary(ancdata: List[Tuple[int, int, bytes]]) -> Tuple[Optional[int], Optional[int]]:
    """``(timestamp ns, kernel drop count)`` from ``recvmsg`` ancillary data; None if absent."""
    ts_ns = drops = None
    for level, kind, data in ancdata:
        if level != SOL_SOCKET:
            continue
        if kind in (SO_TIMESTAMP, SO_TIMESTAMP_NEW):
            # Chosen by size, not by kind: qemu-user (7.2) answers SO_TIMESTAMP_NEW on armhf with
            # an 8-byte SO_TIMESTAMP_OLD message, which a real kernel never does.
            layout = TIMEVAL_64 if len(data) >= TIMEVAL_64.size else TIMEVAL_32
            seconds, micros = layout.unpack_from(data)
            ts_ns = seconds * 1_000_000_000 + micros * 1000
        elif kind == SO_RXQ_OVFL:
            (drops,) = RXQ_OVFL_COUNT.unpack_from(data)
    return ts_ns, drops


class MessageBatch:
    """Buffers for up to ``capacity`` datagrams of up to ``slot`` bytes each, filled by one
    ``recvmmsg`` call (:meth:`receive`) and read back with :meth:`messages`."""

    def __init__(self, capacity: int, slot: int) -> None:
        self.capacity = capacity
        self.slot = slot
        self.drops: Optional[int] = None
        """The kernel's drop count as the last message that carried one said (``SO_RXQ_OVFL``
        comes only once the socket has dropped something)."""
        self._data = ctypes.create_string_buffer(capacity * slot)
        self.data = memoryview(self._data).cast("B")
        """The datagrams of the last batch, each at the start of its ``slot`` bytes."""
        self._control = ctypes.create_string_buffer(capacity * ANCILLARY_SPACE)
        self._iovecs = (IoVec * capacity)()
        self._headers = (MMsgHdr * capacity)()
        data_at = ctypes.addressof(self._data)
        control_at = ctypes.addressof(self._control)
        iovec_at = ctypes.addressof(self._iovecs)
        for index in range(capacity):
            self._iovecs[index].iov_base = data_at + index * slot
            self._iovecs[index].iov_len = slot
            header = self._headers[index].msg_hdr
            header.msg_iov = ctypes.cast(iovec_at + index * ctypes.sizeof(IoVec), _IOVEC_POINTER)
            header.msg_iovlen = 1
            header.msg_control = control_at + index * ANCILLARY_SPACE
            header.msg_controllen = ANCILLARY_SPACE
        # The kernel overwrites msg_controllen and msg_flags of the messages it fills: before the
        # next call, those are put back from this copy.
        self._pristine = memoryview(bytes(self._headers))
        self._header_bytes = memoryview(self._headers).cast("B")
        self._filled = 0

    def receive(self, fd: int) -> int:
        """Fill the buffers with what ``fd`` has queued, without waiting: how many datagrams (0
        when there are none). ``OSError`` as ``recvmsg`` would raise it."""
        used = self._filled * _MMSGHDR_SIZE
        self._header_bytes[:used] = self._pristine[:used]
        while True:
            count = _recvmmsg(fd, self._headers, self.capacity, MSG_DONTWAIT, None)
            if count >= 0:
                self._filled = count
                return count
            error = ctypes.get_errno()
            if error in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            if error != errno.EINTR:  # a signal handled in this thread: ask again (PEP 475)
                raise OSError(error, os.strerror(error))

    def messages(self, count: int) -> Iterator[Tuple[int, int, int, Optional[int]]]:
        """``(offset in data, size, msg_flags, timestamp ns or None)`` of each of the first
        ``count`` datagrams that :meth:`receive` put in :attr:`data`, in order."""
        control = self._control
        timestamp = CMSG_TIMESTAMP_64.unpack_from
        start = -self.slot
        at = -ANCILLARY_SPACE
        results = MMSGHDR_RESULT.iter_unpack(self._header_bytes[: count * MMSGHDR_RESULT.size])
        for control_len, msg_flags, size in results:
            start += self.slot
            at += ANCILLARY_SPACE
            if control_len == _TIMESTAMP_64_SPACE:
                cmsg_len, level, kind, seconds, micros = timestamp(control, at)
                if cmsg_len == _TIMESTAMP_64_LEN and level == SOL_SOCKET and kind in _TIMESTAMPS:
                    yield start, size, msg_flags, seconds * 10**9 + micros * 1000
                    continue
            used = control[at : at + min(control_len, ANCILLARY_SPACE)]
            ts_ns, drops = parse_ancillary(control_messages(used))
            if drops is not None:
                self.drops = drops
            yield start, size, msg_flags, ts_ns

    def datagram(self, offset: int, size: int) -> bytes:
        """A copy of one datagram of the last batch."""
        return bytes(self.data[offset : offset + size])
