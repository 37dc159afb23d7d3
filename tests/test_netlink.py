"""rtnetlink: the parser on crafted kernel messages, and the real host kernel answering.

The crafted messages are packed here by hand from the C layouts in <linux/netlink.h>,
<linux/rtnetlink.h>, <linux/if_link.h> and <linux/can/netlink.h>, not with the module's own
structs, so that a wrong layout in the module cannot agree with itself.
"""

from __future__ import annotations

import errno
import json
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiretap.sources.netlink import (
    LinkRemoved,
    LinkState,
    LinkUpdate,
    LinkWatch,
    RequestFailed,
    getlink_request,
    open_link_socket,
    parse_messages,
)

NLA_F_NESTED = 0x8000


def attr(kind: int, payload: bytes) -> bytes:
    """``struct rtattr`` + payload, padded to 4 bytes."""
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def message(kind: int, seq: int, body: bytes, flags: int = 0) -> bytes:
    """``struct nlmsghdr`` (len u32, type u16, flags u16, seq u32, pid u32) + body."""
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def ifinfomsg(index: int, flags: int) -> bytes:
    """``struct ifinfomsg``: family u8, pad u8, type u16, index i32, flags u32, change u32."""
    return struct.pack("=BBHiII", 0, 0, 280, index, flags, 0xFFFFFFFF)


def can_link(
    name: str = "can0",
    *,
    index: int = 7,
    up: bool = True,
    bitrate: int = 250_000,
    data_bitrate: int = 0,
    listen_only: bool = False,
    state: int = 0,
    berr: tuple = None,
    restart_ms: int = 0,
    mtu: int = 16,
    kind: int = 16,  # RTM_NEWLINK
    seq: int = 0,
) -> bytes:
    """An RTM_NEWLINK as can_fill_info() builds it (nested attributes flagged NLA_F_NESTED)."""
    bittiming = struct.pack("=8I", bitrate, 875, 125, 6, 7, 2, 1, 2)
    data = attr(5, struct.pack("=II", 0xFFFF, 0x02 if listen_only else 0))  # IFLA_CAN_CTRLMODE
    data += attr(4, struct.pack("=I", state))  # IFLA_CAN_STATE
    data += attr(6, struct.pack("=I", restart_ms))  # IFLA_CAN_RESTART_MS, always there
    if bitrate:
        data = attr(1, bittiming) + data  # IFLA_CAN_BITTIMING, only when configured
    if data_bitrate:
        data += attr(9, struct.pack("=8I", data_bitrate, 750, 25, 0, 0, 0, 0, 0))
    if berr is not None:
        data += attr(8, struct.pack("=HH", *berr))  # IFLA_CAN_BERR_COUNTER
    linkinfo = attr(1, b"can\0") + attr(2 | NLA_F_NESTED, data)
    body = (
        ifinfomsg(index, 0x1 | 0x40 if up else 0)
        + attr(3, name.encode() + b"\0")  # IFLA_IFNAME
        + attr(4, struct.pack("=I", mtu))  # IFLA_MTU
        + attr(16, bytes([6 if up else 2]))  # IFLA_OPERSTATE: IF_OPER_UP / IF_OPER_DOWN
        + attr(18 | NLA_F_NESTED, linkinfo)  # IFLA_LINKINFO
    )
    return message(kind, seq, body)


def nlmsgerr(seq: int, error: int) -> bytes:
    """NLMSG_ERROR: ``struct nlmsgerr`` (int error, then the request's nlmsghdr)."""
    return message(2, seq, struct.pack("=i", error) + struct.pack("=IHHII", 40, 18, 1, seq, 0))


def test_a_can_interface_with_every_attribute():
    data = can_link(
        bitrate=500_000,
        data_bitrate=2_000_000,
        listen_only=True,
        state=2,
        berr=(130, 5),
        restart_ms=100,
        mtu=72,
        seq=9,
    )
    assert parse_messages(data) == [
        LinkUpdate(
            9,
            LinkState(
                ifindex=7,
                name="can0",
                up=True,
                operstate="up",
                mtu=72,
                kind="can",
                bitrate=500_000,
                data_bitrate=2_000_000,
                listen_only=True,
                can_state="error-passive",
                tx_errors=130,
                rx_errors=5,
                restart_ms=100,
            ),
        )
    ]


def test_an_unconfigured_can_interface_has_no_bitrate():
    (update,) = parse_messages(can_link(bitrate=0, up=False, state=4))
    assert update.link.bitrate is None
    assert update.link.can_state == "stopped"
    assert (update.link.up, update.link.operstate) == (False, "down")
    assert update.link.tx_errors is None


def test_a_vcan_has_a_kind_and_nothing_else():
    body = (
        ifinfomsg(3, 0x1 | 0x40)
        + attr(3, b"vcan0\0")
        + attr(16, bytes([0]))  # IF_OPER_UNKNOWN: what vcan says when up
        + attr(18, attr(1, b"vcan\0"))
    )
    (update,) = parse_messages(message(16, 0, body))
    assert update.link == LinkState(3, "vcan0", True, "unknown", None, "vcan", None, None, False,
                                    None, None, None)  # fmt: skip


def test_errors_removals_and_several_messages_in_one_datagram():
    data = (
        nlmsgerr(5, -errno.ENODEV)
        + nlmsgerr(6, 0)  # an acknowledgement: nothing to report
        + can_link("can1", kind=17, index=4)  # RTM_DELLINK
        + message(3, 7, struct.pack("=i", 0))  # NLMSG_DONE
        + can_link("can2", bitrate=125_000)
    )
    events = parse_messages(data)
    assert events[:2] == [RequestFailed(5, errno.ENODEV), LinkRemoved(0, 4, "can1")]
    assert events[2].link.bitrate == 125_000
    assert len(events) == 3


def test_a_truncated_datagram_yields_the_whole_messages_before_the_cut():
    whole = can_link("can0")
    cut = can_link("can1")
    events = parse_messages(whole + cut[:-9])
    assert [event.link.name for event in events] == ["can0"]
    # Attributes that claim more than their message holds are dropped, not read past.
    broken = bytearray(can_link("can3"))
    struct.pack_into("=H", broken, 32, 0xFFF0)  # the IFLA_IFNAME length
    assert parse_messages(bytes(broken)) == []


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_the_parser_never_raises(data: bytes):
    parse_messages(data)
    parse_messages(can_link()[:16] + data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.binary(min_size=1, max_size=8))
def test_the_parser_never_raises_on_corrupted_kernel_messages(position: int, junk: bytes):
    data = bytearray(can_link(data_bitrate=1_000_000, berr=(1, 2)))
    position %= len(data)
    data[position : position + len(junk)] = junk
    parse_messages(bytes(data))


def test_the_request_asks_for_one_interface_by_name():
    request = getlink_request("can0", 42)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, seq, pid) == (len(request), 18, 1, 42, 0)  # RTM_GETLINK
    assert struct.unpack_from("=BBHiII", request, 16) == (0, 0, 0, 0, 0, 0)
    assert request[32:44] == attr(3, b"can0\0")  # IFLA_IFNAME
    assert request[44:] == attr(29, struct.pack("=I", 1 << 3))  # RTEXT_FILTER_SKIP_STATS


# --- the real kernel of this host ---------------------------------------------------------


def test_the_kernel_answers_for_loopback():
    watch = LinkWatch("lo", open_link_socket())
    try:
        events = watch.query(10.0)
    finally:
        watch.close()
    updates = [event for event in events if isinstance(event, LinkUpdate)]
    assert updates, events
    link = updates[0].link
    assert link.name == "lo"
    assert link.ifindex == socket.if_nametoindex("lo")
    assert link.mtu == int(Path("/sys/class/net/lo/mtu").read_text())
    assert link.up is True
    assert (link.bitrate, link.listen_only, link.can_state) == (None, False, None)


def test_the_kernel_says_when_there_is_no_such_interface():
    watch = LinkWatch("wiretapnone0", open_link_socket())
    try:
        events = watch.query(10.0)
    finally:
        watch.close()
    assert [(type(e), e.errno) for e in events] == [(RequestFailed, errno.ENODEV)]


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")
def test_every_host_interface_agrees_with_iproute2():
    shown = json.loads(
        subprocess.run(
            ["ip", "-details", "-json", "link", "show"], capture_output=True, check=True
        ).stdout
    )
    for entry in shown:
        watch = LinkWatch(entry["ifname"], open_link_socket())
        try:
            link = next(e.link for e in watch.query(10.0) if isinstance(e, LinkUpdate))
        finally:
            watch.close()
        assert link.ifindex == entry["ifindex"]
        assert link.mtu == entry["mtu"]
        assert link.operstate == entry["operstate"].lower()
        assert link.up == ("UP" in entry["flags"])
        assert link.kind == entry.get("linkinfo", {}).get("info_kind")
