"""What the kernel says about a network interface, over rtnetlink: no ``ip`` subprocess.

Owns: the ``RTM_GETLINK`` request for one interface by name, the parsing of the kernel's
``RTM_NEWLINK`` / ``RTM_DELLINK`` / ``NLMSG_ERROR`` messages into :class:`LinkState` and events
(pure: bytes in, events out; it never raises on input), and :class:`LinkWatch`, the socket edge:
an ``AF_NETLINK`` socket that asks about one interface and hears every change of it, since it
joins the ``RTMGRP_LINK`` group (every ``RTM_NEWLINK`` the kernel sends carries the whole link,
bit timing included).

For a CAN interface the kernel nests, under ``IFLA_LINKINFO`` / ``IFLA_INFO_DATA``, the bit
timing, the control mode (listen-only), the controller state and, where the driver can say, its
error counters (``<linux/can/netlink.h>``, filled by ``can_fill_info()`` in
drivers/net/can/dev/netlink.c). A vcan has none of these: only ``IFLA_INFO_KIND`` "vcan".
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import time
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

NLMSGHDR = struct.Struct("=IHHII")
"""``struct nlmsghdr`` (<linux/netlink.h>): __u32 nlmsg_len; __u16 nlmsg_type;
__u16 nlmsg_flags; __u32 nlmsg_seq; __u32 nlmsg_pid. Messages are 4-byte aligned."""

NLMSGERR = struct.Struct("=i")
"""``struct nlmsgerr`` (<linux/netlink.h>), its first member: int error (0 for an ack, else
-errno); the failed request's ``nlmsghdr`` follows."""

IFINFOMSG = struct.Struct("=BxHiII")
"""``struct ifinfomsg`` (<linux/rtnetlink.h>): unsigned char ifi_family; unsigned char pad;
unsigned short ifi_type; int ifi_index; unsigned ifi_flags; unsigned ifi_change."""

RTATTR = struct.Struct("=HH")
"""``struct rtattr`` / ``struct nlattr`` (<linux/rtnetlink.h>, <linux/netlink.h>):
unsigned short rta_len (header included); unsigned short rta_type; the payload follows, padded
to 4 bytes."""

CAN_BITTIMING = struct.Struct("=8I")
"""``struct can_bittiming`` (<linux/can/netlink.h>): __u32 bitrate; sample_point; tq; prop_seg;
phase_seg1; phase_seg2; sjw; brp."""

CAN_CTRLMODE = struct.Struct("=II")
"""``struct can_ctrlmode`` (<linux/can/netlink.h>): __u32 mask; __u32 flags."""

CAN_BERR_COUNTER = struct.Struct("=HH")
"""``struct can_berr_counter`` (<linux/can/netlink.h>): __u16 txerr; __u16 rxerr."""

U32 = struct.Struct("=I")
"""A ``__u32`` attribute (IFLA_MTU, IFLA_EXT_MASK, IFLA_CAN_STATE)."""

# <linux/netlink.h>
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTMGRP_LINK = 0x1
RTEXT_FILTER_SKIP_STATS = 1 << 3  # kernels that do not know it ignore it
# <linux/if_link.h>
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_EXT_MASK = 29
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
# <linux/can/netlink.h>
IFLA_CAN_BITTIMING = 1
IFLA_CAN_STATE = 4
IFLA_CAN_CTRLMODE = 5
IFLA_CAN_RESTART_MS = 6
IFLA_CAN_BERR_COUNTER = 8
IFLA_CAN_DATA_BITTIMING = 9
CAN_CTRLMODE_LISTENONLY = 0x02
CAN_STATES = ("error-active", "error-warning", "error-passive", "bus-off", "stopped", "sleeping")
# <linux/if.h>
IFF_UP = 0x1
OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")

RECEIVE_SIZE = 65536
RECEIVE_BUFFER = 256 * 1024  # a burst of link changes must not overrun it (ENOBUFS: re-ask)


class LinkState(NamedTuple):
    """One interface as the kernel last described it."""

    ifindex: int
    name: str
    up: bool  # IFF_UP: set up by the administrator
    operstate: str  # "up", "down", "unknown" (what vcan reports when up), ...
    mtu: Optional[int]  # 16: classic CAN, 72: CAN FD
    kind: Optional[str]  # "can", "vcan", "vxcan", ...; None for a device with no link kind
    bitrate: Optional[int]  # None when the kernel gives no bit timing (vcan, not configured)
    data_bitrate: Optional[int]  # CAN FD data phase, when configured
    listen_only: bool
    can_state: Optional[str]  # one of CAN_STATES; None when the kernel says none (vcan)
    tx_errors: Optional[int]  # the controller's error counters, where the driver reports them
    rx_errors: Optional[int]
    restart_ms: Optional[int] = None  # after bus-off (0: stays off until restarted by hand)


class LinkUpdate(NamedTuple):
    """``RTM_NEWLINK``: the answer to a request (``seq`` as asked), or a change (``seq`` of
    whichever request made it, 0 when the kernel did it by itself)."""

    seq: int
    link: LinkState


class LinkRemoved(NamedTuple):
    """``RTM_DELLINK``: the interface was unregistered (a USB adapter unplugged)."""

    seq: int
    ifindex: int
    name: str


class RequestFailed(NamedTuple):
    """``NLMSG_ERROR`` with an error: request ``seq`` failed with ``errno`` (ENODEV: no such
    interface)."""

    seq: int
    errno: int


LinkEvent = Union[LinkUpdate, LinkRemoved, RequestFailed]


def _align(length: int) -> int:
    return (length + 3) & ~3


def _attribute(kind: int, payload: bytes) -> bytes:
    header = RTATTR.pack(RTATTR.size + len(payload), kind)
    return (header + payload).ljust(_align(RTATTR.size + len(payload)), b"\0")


def getlink_request(ifname: str, seq: int) -> bytes:
    """``RTM_GETLINK`` for the interface named ``ifname``, without statistics."""
    body = (
        IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        + _attribute(IFLA_IFNAME, ifname.encode() + b"\0")
        + _attribute(IFLA_EXT_MASK, U32.pack(RTEXT_FILTER_SKIP_STATS))
    )
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body


def attributes(data: bytes, start: int, end: int) -> Iterator[Tuple[int, bytes]]:
    """``(type, payload)`` of each attribute in ``data[start:end]``; stops at a malformed one."""
    end = min(end, len(data))
    while start + RTATTR.size <= end:
        length, kind = RTATTR.unpack_from(data, start)
        if length < RTATTR.size or start + length > end:
            return
        yield kind & NLA_TYPE_MASK, data[start + RTATTR.size : start + length]
        start += _align(length)


def _string(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode("utf-8", "replace")


def _u32(payload: bytes) -> Optional[int]:
    return U32.unpack_from(payload)[0] if len(payload) >= U32.size else None


def _bitrate(payload: bytes) -> Optional[int]:
    if len(payload) < CAN_BITTIMING.size:
        return None
    return CAN_BITTIMING.unpack_from(payload)[0] or None


class CanData(NamedTuple):
    """``IFLA_INFO_DATA`` of a CAN interface."""

    bitrate: Optional[int] = None
    data_bitrate: Optional[int] = None
    listen_only: bool = False
    state: Optional[str] = None
    tx_errors: Optional[int] = None
    rx_errors: Optional[int] = None
    restart_ms: Optional[int] = None


def parse_can_data(data: bytes) -> CanData:
    """The CAN attributes nested in ``IFLA_INFO_DATA`` (``can_fill_info()``)."""
    found = CanData()
    for attr, value in attributes(data, 0, len(data)):
        if attr == IFLA_CAN_BITTIMING:
            found = found._replace(bitrate=_bitrate(value))
        elif attr == IFLA_CAN_DATA_BITTIMING:
            found = found._replace(data_bitrate=_bitrate(value))
        elif attr == IFLA_CAN_CTRLMODE and len(value) >= CAN_CTRLMODE.size:
            _mask, mode = CAN_CTRLMODE.unpack_from(value)
            found = found._replace(listen_only=bool(mode & CAN_CTRLMODE_LISTENONLY))
        elif attr == IFLA_CAN_STATE and len(value) >= U32.size:
            (state,) = U32.unpack_from(value)
            found = found._replace(
                state=CAN_STATES[state] if state < len(CAN_STATES) else str(state)
            )
        elif attr == IFLA_CAN_BERR_COUNTER and len(value) >= CAN_BERR_COUNTER.size:
            tx_errors, rx_errors = CAN_BERR_COUNTER.unpack_from(value)
            found = found._replace(tx_errors=tx_errors, rx_errors=rx_errors)
        elif attr == IFLA_CAN_RESTART_MS and len(value) >= U32.size:
            found = found._replace(restart_ms=U32.unpack_from(value)[0])
    return found


def parse_link(payload: bytes) -> Optional[LinkState]:
    """The ``ifinfomsg`` and attributes of an ``RTM_NEWLINK`` (after its ``nlmsghdr``)."""
    if len(payload) < IFINFOMSG.size:
        return None
    _family, _type, ifindex, flags, _change = IFINFOMSG.unpack_from(payload)
    name = kind = mtu = None
    operstate = "unknown"
    can = CanData()
    for attr, value in attributes(payload, IFINFOMSG.size, len(payload)):
        if attr == IFLA_IFNAME:
            name = _string(value)
        elif attr == IFLA_MTU:
            mtu = _u32(value)
        elif attr == IFLA_OPERSTATE and value:
            operstate = OPERSTATES[value[0]] if value[0] < len(OPERSTATES) else str(value[0])
        elif attr == IFLA_LINKINFO:
            for info, info_value in attributes(value, 0, len(value)):
                if info == IFLA_INFO_KIND:
                    kind = _string(info_value)
                elif info == IFLA_INFO_DATA:
                    can = parse_can_data(info_value)
    if name is None:
        return None
    return LinkState(
        ifindex=ifindex,
        name=name,
        up=bool(flags & IFF_UP),
        operstate=operstate,
        mtu=mtu,
        kind=kind,
        bitrate=can.bitrate,
        data_bitrate=can.data_bitrate,
        listen_only=can.listen_only,
        can_state=can.state,
        tx_errors=can.tx_errors,
        rx_errors=can.rx_errors,
        restart_ms=can.restart_ms,
    )


def parse_messages(data: bytes) -> List[LinkEvent]:
    """The events in one datagram from an rtnetlink socket; whatever is malformed or of no
    interest is skipped."""
    events: List[LinkEvent] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            break
        payload = data[offset + NLMSGHDR.size : offset + length]
        if kind == RTM_NEWLINK:
            link = parse_link(payload)
            if link is not None:
                events.append(LinkUpdate(seq, link))
        elif kind == RTM_DELLINK:
            link = parse_link(payload)
            if link is not None:
                events.append(LinkRemoved(seq, link.ifindex, link.name))
        elif kind == NLMSG_ERROR and len(payload) >= NLMSGERR.size:
            (error,) = NLMSGERR.unpack_from(payload)
            if error:
                events.append(RequestFailed(seq, -error))
        offset += _align(length)
    return events


def open_link_socket() -> socket.socket:
    """A non-blocking rtnetlink socket in the ``RTMGRP_LINK`` group."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((0, RTMGRP_LINK))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LinkWatch:
    """Asks the kernel about one interface and hears every change of it, through ``sock`` (an
    rtnetlink socket from :func:`open_link_socket`; tests hand in a datagram socket pair)."""

    def __init__(self, ifname: str, sock: socket.socket) -> None:
        self.ifname = ifname
        self._sock = sock
        sock.setblocking(False)
        self._seq = int(time.monotonic() * 1000) & 0x7FFFFFFF  # tells our answers from others'
        self._asked: List[int] = []

    def fileno(self) -> int:
        return self._sock.fileno()

    def request(self) -> None:
        """Ask for the interface's state; the answer comes to :meth:`read`. Never blocks: an
        answer already on its way will do if the socket cannot take the request."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        self._asked = (self._asked + [self._seq])[-4:]
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self._sock.send(getlink_request(self.ifname, self._seq))

    def read(self) -> List[LinkEvent]:
        """What has arrived about this interface (answers and changes), oldest first."""
        events: List[LinkEvent] = []
        while True:
            try:
                data = self._sock.recv(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                return events
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # Changes were lost while the socket was full: ask again for the whole state.
                self.request()
                continue
            if not data:
                return events
            for event in parse_messages(data):
                if isinstance(event, RequestFailed):
                    mine = event.seq in self._asked
                elif isinstance(event, LinkRemoved):
                    mine = event.name == self.ifname
                else:
                    mine = event.link.name == self.ifname
                if mine:
                    events.append(event)

    def query(self, timeout: float) -> List[LinkEvent]:
        """Ask and wait (at most ``timeout`` s) for the answer: for start-up, before any client
        can ask. The kernel answers within the request's own system call."""
        self.request()
        asked = self._seq
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        events: List[LinkEvent] = []
        while True:
            events += self.read()
            if any(
                isinstance(e, LinkUpdate) or (isinstance(e, RequestFailed) and e.seq == asked)
                for e in events
            ):
                return events
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return events

    def close(self) -> None:
        self._sock.close()
