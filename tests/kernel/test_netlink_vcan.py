"""What rtnetlink says of a real vcan, and that each change reaches a LinkWatch unasked.

A vcan has no bit timing, listen-only mode or controller state (the host tier checks those on
hand-packed ``can_fill_info()`` bytes), so this checks everything else the parser reads from the
real kernel's messages, against iproute2's own reading at each step: the link kind, the MTU
(16, then 72 for CAN FD), up/down and the operational state, and the interface's removal.
"""

from __future__ import annotations

import json
import select
import subprocess
from typing import Callable

import pytest
from vcan_tools import TIMEOUT, ip_link

from wiretap.sources.netlink import (
    LinkRemoved,
    LinkState,
    LinkUpdate,
    LinkWatch,
    open_link_socket,
)

pytestmark = pytest.mark.vcan


def shown_by_ip(iface: str) -> dict:
    out = subprocess.run(
        ["ip", "-details", "-json", "link", "show", "dev", iface], capture_output=True, check=True
    ).stdout
    return json.loads(out)[0]


def assert_agrees_with_ip(link: LinkState, iface: str) -> None:
    shown = shown_by_ip(iface)
    assert link.name == shown["ifname"] == iface
    assert link.ifindex == shown["ifindex"]
    assert link.mtu == shown["mtu"]
    assert link.up == ("UP" in shown["flags"])
    assert link.operstate == shown["operstate"].lower()
    assert link.kind == shown["linkinfo"]["info_kind"] == "vcan"
    assert "bittiming" not in shown["linkinfo"].get("info_data", {})
    assert (link.bitrate, link.listen_only, link.can_state) == (None, False, None)


def next_announced(watch: LinkWatch, wanted: Callable[[object], bool]) -> object:
    """The first event ``wanted`` accepts, read as the kernel announces them (never asked)."""
    poller = select.poll()
    poller.register(watch, select.POLLIN)
    while True:
        assert poller.poll(TIMEOUT * 1000), "the kernel announced nothing"
        for event in watch.read():
            if wanted(event):
                return event


def test_a_vcan_as_iproute2_sees_it_and_every_change_announced(vcan: Callable[..., str]) -> None:
    iface = vcan("vcan0")
    watch = LinkWatch(iface, open_link_socket())
    try:
        update = next(e for e in watch.query(TIMEOUT) if isinstance(e, LinkUpdate))
        assert update.link.up and update.link.mtu == 16
        assert_agrees_with_ip(update.link, iface)

        ip_link("set", iface, "down")
        down = next_announced(watch, lambda e: isinstance(e, LinkUpdate) and not e.link.up)
        assert_agrees_with_ip(down.link, iface)

        ip_link("set", iface, "mtu", "72")
        fd = next_announced(watch, lambda e: isinstance(e, LinkUpdate) and e.link.mtu == 72)
        assert_agrees_with_ip(fd.link, iface)

        ip_link("set", iface, "up")
        up = next_announced(watch, lambda e: isinstance(e, LinkUpdate) and e.link.up)
        assert_agrees_with_ip(up.link, iface)

        ifindex = up.link.ifindex
        ip_link("del", iface)
        removed = next_announced(watch, lambda e: isinstance(e, LinkRemoved))
        # (A notification carries the seq of the request that caused it: `ip link del`'s.)
        assert (removed.ifindex, removed.name) == (ifindex, iface)
    finally:
        watch.close()
