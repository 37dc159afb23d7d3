"""Frame sources: where frames come from, and where a client's transmit goes back to.

Owns the interface every source offers (:class:`Source`) and the bus description GVRET's
``F1 06`` reports (:class:`BusInfo`). Sources import only ``frames``: they hand batches to a
``publish`` callable and never know who consumes them.
"""

from __future__ import annotations

import enum
from typing import Callable, List, NamedTuple

from ..frames import Frame

Publish = Callable[[List[Frame]], None]


class BusInfo(NamedTuple):
    """What ``F1 06`` says of one bus."""

    enabled: bool
    listen_only: bool
    bitrate: int
    fd: bool


class TransmitResult(enum.Enum):
    SENT = "sent"
    BUSY = "busy"  # ENOBUFS after the retries: the interface's TX queue stayed full
    DOWN = "down"  # ENETDOWN / ENODEV: no interface to send on
    REFUSED = "refused"  # the frame does not fit this bus (FD frame on a classic bus)
    FAILED = "failed"


class Source:
    """A thread that reads one or more buses (``first_bus`` .. ``first_bus + bus_count - 1``)."""

    name: str
    first_bus: int
    bus_count: int = 1

    def start(self, publish: Publish) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def join(self, timeout: float) -> None:
        raise NotImplementedError

    def transmit(self, frame: Frame, origin: int) -> TransmitResult:
        """Send ``frame`` on ``frame.bus``; ``origin`` tags the kernel's confirmation."""
        raise NotImplementedError

    def bus_info(self, bus: int) -> BusInfo:
        raise NotImplementedError

    def counters(self) -> dict:
        """Counters for the stats line: ``kernel_drops``, ``tx``, ``tx_fail`` …"""
        return {}
