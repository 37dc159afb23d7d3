"""systemd's notify protocol: readiness, a status line, and the watchdog.

Owns: sending ``sd_notify`` messages (one datagram of ``KEY=value`` lines to the ``AF_UNIX``
socket named by ``$NOTIFY_SOCKET``, a path or an abstract ``@`` address; see sd_notify(3)), the
watchdog interval from ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``, and the ``systemd-notify``
thread that sends ``STATUS=`` with the stats line and ``WATCHDOG=1`` only while the dispatcher's
heartbeat is fresh: a wedged dispatcher stops feeding the watchdog and systemd restarts the
server. Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.

Standard library only; it knows no other module: ``app`` hands in the heartbeat and the line.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Mapping, Optional

log = logging.getLogger("wiretap.systemd")

STATUS_INTERVAL_S = 5.0
SEND_TIMEOUT_S = 0.5  # STATUS= refresh when there is no watchdog to feed more often
# A dispatcher heartbeat older than this (or half the watchdog interval, if longer) is a wedge:
# the dispatcher goes round its loop at least every broker.HEARTBEAT_S.
STALL_MIN_S = 2.0


def notify_address(environ: Mapping[str, str]) -> Optional[str]:
    """The socket address from ``$NOTIFY_SOCKET`` as ``socket.connect`` takes it: a filesystem
    path, or an abstract name with the leading ``@`` turned into the NUL byte; None if unset."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return None  # unset, or a vsock address (a VM's systemd): not ours to speak
    return "\0" + address[1:] if address[0] == "@" else address


def watchdog_interval(environ: Mapping[str, str], pid: int) -> Optional[float]:
    """Seconds systemd waits for ``WATCHDOG=1`` before restarting us, or None when there is no
    watchdog for this process (unset, zero, or meant for another PID)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or (owner and owner != str(pid)):
        return None
    return usec / 1_000_000


class Notifier:
    """Talks to systemd for one process. ``ready()`` once serving, ``stopping()`` on the way
    out; ``start()`` runs the thread that refreshes STATUS= and feeds the watchdog."""

    def __init__(
        self,
        environ: Mapping[str, str],
        heartbeat: Callable[[], float],
        status_line: Callable[[], str],
    ) -> None:
        self.address = notify_address(environ)
        self.watchdog_s = watchdog_interval(environ, os.getpid()) if self.address else None
        self.heartbeat = heartbeat
        self.status_line = status_line
        self.watchdog_fed = 0
        self._sock: Optional[socket.socket] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stalled = False
        self._send_failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """One notification of ``KEY=value`` lines; False if it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A receiver that does not read (its queue full) must not hold up a stop.
                self._sock.settimeout(SEND_TIMEOUT_S)
            self._sock.sendto("\n".join(assignments).encode(), self.address)
        except OSError as exc:
            if not self._send_failed:
                self._send_failed = True
                log.warning("cannot notify systemd at %s: %s", self.address, exc.strerror or exc)
            return False
        self._send_failed = False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=shutting down")

    def start(self) -> None:
        if self.address is None:
            return
        self._thread = threading.Thread(target=self._run, name="systemd-notify", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def tick(self) -> None:
        """One round: STATUS= with the current line, WATCHDOG=1 if the dispatcher is alive."""
        assignments = []
        if self.watchdog_s is not None and self._dispatcher_alive():
            assignments.append("WATCHDOG=1")
        try:
            assignments.append(f"STATUS={self.status_line()}")
        except Exception:
            log.exception("systemd: could not build the status line")
        if assignments and self.send(*assignments) and assignments[0] == "WATCHDOG=1":
            self.watchdog_fed += 1

    def _dispatcher_alive(self) -> bool:
        assert self.watchdog_s is not None
        age = time.monotonic() - self.heartbeat()
        if age <= max(STALL_MIN_S, self.watchdog_s / 2):
            if self._stalled:
                self._stalled = False
                log.warning("dispatcher is running again, feeding the systemd watchdog")
            return True
        if not self._stalled:
            self._stalled = True
            log.error(
                "dispatcher has not run for %.1f s: no longer feeding the systemd watchdog "
                "(it restarts the server after %.1f s)",
                age,
                self.watchdog_s,
            )
        return False

    def _run(self) -> None:
        period = STATUS_INTERVAL_S if self.watchdog_s is None else self.watchdog_s / 2
        period = min(period, STATUS_INTERVAL_S)
        while True:
            self.tick()
            if self._stop.wait(period):
                return
