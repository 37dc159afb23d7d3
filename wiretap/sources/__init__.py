"""Frame sources: where frames come from, and where a client's transmit goes back to.

Owns the interface every source offers (:class:`Source`) and what is known of each bus
(:class:`BusInfo`: what GVRET's ``F1 06`` reports, and the controller's health). Sources import
only ``frames``: they hand batches to a ``publish`` callable and never know who consumes them.
"""

from __future__ import annotations

import enum
import threading
from typing import Callable, List, NamedTuple, Optional

from ..frames import Frame

Publish = Callable[[List[Frame]], None]


class BusInfo(NamedTuple):
    """One bus as last known: a snapshot, read without waiting on anything.

    ``enabled``, ``listen_only`` and ``bitrate`` are what ``F1 06`` says (``bitrate`` falls back
    to 500000 where the kernel gives none). ``state`` is the CAN controller's ("error-active",
    "error-warning", "error-passive", "bus-off", "stopped", "sleeping"), ``tx_errors`` /
    ``rx_errors`` its error counters, as of the kernel's last word on the interface; None where
    there is none (vcan, a replay, a driver that does not report them).
    """

    enabled: bool
    listen_only: bool
    bitrate: int
    state: Optional[str] = None
    tx_errors: Optional[int] = None
    rx_errors: Optional[int] = None


ERROR_ACTIVE = "error-active"
ERROR_WARNING = "error-warning"
ERROR_PASSIVE = "error-passive"
BUS_OFF = "bus-off"
CAN_STATES = (ERROR_ACTIVE, ERROR_WARNING, ERROR_PASSIVE, BUS_OFF)  # from healthy to not


class BusHealth(NamedTuple):
    """How one bus is: open or not, its controller's CAN state and error counters (as the last
    CAN error frame said them), and what was lost or went wrong on it so far."""

    up: bool
    state: str  # one of CAN_STATES
    tx_errors: int
    rx_errors: int
    error_frames: int
    bus_off: int  # times the controller went bus-off
    kernel_drops: int


HEALTHY = BusHealth(True, ERROR_ACTIVE, 0, 0, 0, 0, 0)


class TransmitResult(enum.Enum):
    SENT = "sent"
    BUSY = "busy"  # ENOBUFS after the retries: the interface's TX queue stayed full
    DOWN = "down"  # ENETDOWN / ENODEV: no interface to send on
    REFUSED = "refused"  # the frame does not fit this bus (FD frame on a classic bus)
    FAILED = "failed"


class Source:
    """A thread that reads one or more buses (``first_bus`` .. ``first_bus + bus_count - 1``).

    Subclasses call :meth:`_init_thread` and implement ``_run``, which publishes batches through
    ``self._publish`` until ``self._stop`` is set.
    """

    name: str
    first_bus: int
    bus_count: int = 1

    def _init_thread(self, thread_name: str) -> None:
        self._publish: Optional[Publish] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self, publish: Publish) -> None:
        self._publish = publish
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def transmit(self, frame: Frame, origin: int) -> TransmitResult:
        """Send ``frame`` on ``frame.bus``; ``origin`` tags the kernel's confirmation."""
        raise NotImplementedError

    def bus_names(self) -> List[str]:
        """A name for each of this source's buses, in bus order (for the start-up line)."""
        return [self.name]

    def bus_info(self, bus: int) -> BusInfo:
        raise NotImplementedError

    def health(self, bus: int) -> BusHealth:
        """The state of bus ``bus``; a source that cannot tell says healthy."""
        return HEALTHY

    def counters(self) -> dict:
        """Counters for the stats line: ``kernel_drops``, ``tx``, ``tx_fail`` …"""
        return {}
