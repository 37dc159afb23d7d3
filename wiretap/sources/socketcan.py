"""SocketCAN reader: one thread per interface, raw ``AF_CAN`` socket, kernel timestamps.

Owns: opening the raw socket and its options, the read loop (one ``recvmmsg`` per batch, with
the ancillary data: ``SO_TIMESTAMP``, ``SO_RXQ_OVFL``), direction from ``msg_flags``, error-frame
accounting, the down / gone / reopen-by-name life of an interface, what is known of the
interface (bit rate, listen-only, controller state: learnt over rtnetlink when it is opened and
whenever the kernel announces a change, in the reader thread, so that :meth:`bus_info` only reads
a snapshot), and ``transmit`` for GVRET clients.

The socket comes through a seam (``open_socket``): tests hand in one end of an ``AF_UNIX``
``SOCK_DGRAM`` pair carrying ``can_frame`` / ``canfd_frame`` bytes, which receives the same
``SO_TIMESTAMP`` ancillary data as a CAN socket.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import subprocess
import threading
import time
from typing import Callable, Deque, List, Optional, Tuple

from ..frames import (
    CAN_ERR_BUSOFF,
    CAN_ERR_CRTL,
    CAN_ERR_CRTL_RX_PASSIVE,
    CAN_ERR_CRTL_TX_PASSIVE,
    CANFD_MTU,
    RX,
    TX,
    ErrorFrame,
    Frame,
    decode_from,
    encode,
)
from ..ratelimit import RateLimitedLog
from . import (
    BUS_OFF,
    CAN_STATES,
    ERROR_ACTIVE,
    ERROR_PASSIVE,
    ERROR_WARNING,
    BusHealth,
    BusInfo,
    Publish,
    Source,
    TransmitResult,
)
from .mmsg import SO_RXQ_OVFL, SO_TIMESTAMP, SO_TIMESTAMP_NEW, MessageBatch
from .netlink import (
    LinkEvent,
    LinkState,
    LinkUpdate,
    LinkWatch,
    RequestFailed,
    open_link_socket,
)

log = logging.getLogger("wiretap.socketcan")

# <asm-generic/socket.h>; the socket module lacks some of these on older Pythons.
SO_RCVBUFFORCE = 33
# <linux/can/raw.h>
SOL_CAN_RAW = 101
CAN_RAW_ERR_FILTER = 2
CAN_RAW_RECV_OWN_MSGS = 4
CAN_RAW_FD_FRAMES = 5
# <linux/can/error.h>
CAN_ERR_RESTARTED = 0x00000100
CAN_ERR_CNT = 0x00000200  # data[6] / data[7] hold the TX / RX error counters
CAN_ERR_CRTL_RX_WARNING = 0x04
CAN_ERR_CRTL_TX_WARNING = 0x08
CAN_ERR_CRTL_ACTIVE = 0x40
BUS_OFF_TX_ERRORS = 256  # the controller goes bus-off when its TX error counter passes 255
STATE_LOG_INTERVAL_S = 10.0  # a bus flapping between states logs each state once per interval
# <linux/socket.h>: how the kernel marks frames this host sent (net/can/raw.c raw_rcv()).
MSG_DONTROUTE = 0x04  # sent by another socket on this host (e.g. cansend)
MSG_CONFIRM = 0x800  # sent by this very socket, echoed back with CAN_RAW_RECV_OWN_MSGS

SO_MEMINFO = 55
SK_MEMINFO = struct.Struct("=9I")
"""``SO_MEMINFO``: ``__u32 meminfo[SK_MEMINFO_VARS]`` (``<linux/sock_diag.h>``); index 8 is
``SK_MEMINFO_DROPS``, the frames dropped on this socket so far."""

CAN_ERR_FILTER = CAN_ERR_CRTL | CAN_ERR_BUSOFF | CAN_ERR_RESTARTED
RECEIVE_BUFFER = 4 * 1024 * 1024
MAX_BATCH = 512
# A busy bus (BUSY_FPS or more) is read once per READ_PAUSE_S: the frames wait in the socket's
# queue, and the reader wakes (and the server fans out) once per ~40 frames at 10,000 frames/s,
# not once per frame or two. Each wake-up costs the same whatever it carries (the sleep, one
# send per client, the database writer's hand-over): 4 ms rather than 2 took a fifth off the CPU
# per frame, for 1-2 ms more latency. The same time the broker would otherwise coalesce for; a
# quiet bus is read at once. Only where the queue holds twice what a pause brings in
# (RATE_WINDOW_S).
READ_PAUSE_S = 0.004
BUSY_FPS = 4000
RATE_WINDOW_S = 0.05
CAN_SKB_BYTES = 1024  # what one CAN frame costs a socket's receive buffer (skb truesize), at most
MAX_DGRAM_QLEN = "/proc/sys/net/unix/max_dgram_qlen"
LINK_QUERY_TIMEOUT_S = 1.0
REOPEN_BACKOFF_MAX_S = 5.0
SEND_RETRY_WINDOW_S = 0.02
PENDING_CONFIRMATIONS = 1024
DEFAULT_BITRATE = 500_000
SEND_ERRORS = {
    errno.ENOBUFS: TransmitResult.BUSY,
    errno.EAGAIN: TransmitResult.BUSY,
    errno.ENETDOWN: TransmitResult.DOWN,
    errno.ENODEV: TransmitResult.DOWN,
}


def direction_of(msg_flags: int) -> str:
    """``tx`` for frames this host sent (another local socket, or this one), else ``rx``."""
    return TX if msg_flags & (MSG_DONTROUTE | MSG_CONFIRM) else RX


def queue_capacity(sock: socket.socket) -> int:
    """Frames ``sock`` can queue unread. A CAN socket's queue is bounded by bytes (its receive
    buffer); an ``AF_UNIX`` datagram socket's (the tests' seam) by a count, the namespace's
    ``net.unix.max_dgram_qlen``, 10 by default: a reader that waited there would stall its
    writer."""
    if sock.family == socket.AF_UNIX:
        try:
            with open(MAX_DGRAM_QLEN) as f:
                return int(f.read()) + 1
        except (OSError, ValueError):
            return 1
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // CAN_SKB_BYTES


def enable_timestamps(sock: socket.socket) -> None:
    """Asks for the kernel's receive time on ``sock``: ``SO_TIMESTAMP_NEW`` where the kernel has
    it, so a 32-bit userland keeps its timestamps past 2038, else ``SO_TIMESTAMP``."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP_NEW, 1)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)


def open_can_socket(ifname: str, can_fd: bool) -> socket.socket:
    """A raw CAN socket bound to ``ifname`` with the options the reader relies on."""
    sock = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    try:
        sock.setsockopt(SOL_CAN_RAW, CAN_RAW_RECV_OWN_MSGS, 1)
        sock.setsockopt(SOL_CAN_RAW, CAN_RAW_ERR_FILTER, CAN_ERR_FILTER)
        if can_fd:
            sock.setsockopt(SOL_CAN_RAW, CAN_RAW_FD_FRAMES, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except PermissionError:
            # Without CAP_NET_ADMIN (the systemd unit grants only CAP_NET_BIND_SERVICE) the
            # kernel caps the buffer at net.core.rmem_max.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            if granted < RECEIVE_BUFFER:
                log.info(
                    "%s: receive buffer is %d bytes; for bursts, raise it with "
                    "'sysctl -w net.core.rmem_max=%d'",
                    ifname,
                    granted,
                    RECEIVE_BUFFER,
                )
        sock.bind((ifname,))
    except BaseException:
        sock.close()
        raise
    return sock


def set_link_bitrate(ifname: str, bitrate: int) -> None:
    """Set a CAN interface's bit rate with ``ip link`` (down, set, up: the kernel refuses to
    change the bit timing of a running interface); raises RuntimeError saying what failed."""
    for args in (
        ["set", "dev", ifname, "down"],
        ["set", "dev", ifname, "type", "can", "bitrate", str(bitrate)],
        ["set", "dev", ifname, "up"],
    ):
        try:
            subprocess.run(
                ["ip", "link", *args], capture_output=True, text=True, timeout=5, check=True
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"ip link {' '.join(args)}: {exc.stderr.strip()}") from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"ip link {' '.join(args)}: {exc}") from exc


def _operstate(ifname: str) -> Optional[str]:
    try:
        with open(f"/sys/class/net/{ifname}/operstate") as f:
            return f.read().strip()
    except OSError:
        return None


class SocketCanSource(Source):
    """Reads one interface as GVRET bus ``bus``; reopens it by name when it comes back."""

    def __init__(
        self,
        ifname: str,
        bus: int,
        *,
        can_fd: bool = False,
        open_socket: Optional[Callable[[], socket.socket]] = None,
        open_link: Optional[Callable[[], socket.socket]] = None,
    ) -> None:
        """``open_socket`` and ``open_link`` are seams: a socket to read frames from instead of
        a CAN socket, and one to learn the interface from instead of rtnetlink (with
        ``open_socket`` given and no ``open_link``, nothing is learnt: defaults are reported)."""
        self.name = ifname
        self.first_bus = bus
        self.can_fd = can_fd
        self._open_socket = open_socket or (lambda: open_can_socket(ifname, can_fd))
        self._is_can_socket = open_socket is None
        if open_link is None and open_socket is None:
            open_link = open_link_socket
        self._open_link = open_link
        self._link_watch: Optional[LinkWatch] = None
        self._sock: Optional[socket.socket] = None
        self._init_thread(f"reader-{ifname}")
        # Wakes the reader's poll when stopping: no timeout to wake up for when all is quiet.
        self._wake_reader, self._wake_sender = socket.socketpair()
        self._pending: Deque[Tuple[bytes, int]] = collections.deque(maxlen=PENDING_CONFIRMATIONS)
        self._pending_lock = threading.Lock()
        self.link: Optional[LinkState] = None
        """The interface as the kernel last described it; None until it has."""
        self._bus_info = BusInfo(True, False, DEFAULT_BITRATE)
        self._bitrate_fallback_logged = False
        self._down = False
        self._gone = False
        self._bus_state = ERROR_ACTIVE
        self._tx_errors = 0
        self._rx_errors = 0
        self.bus_off = 0
        self._restart_ms: Optional[int] = None  # the kernel's restart-ms, when known
        self._state_log = RateLimitedLog(log, STATE_LOG_INTERVAL_S)
        self._drops_base = 0
        self._drops_socket = 0
        self.frames_read = 0
        self.error_frames = 0
        self.tx = 0
        self.tx_fail = 0
        self._reported_send_down = False

    # --- life ----------------------------------------------------------------------------

    def counters(self) -> dict:
        self._read_socket_drops()
        return {
            "kernel_drops": self._drops_base + self._drops_socket,
            "tx": self.tx,
            "tx_fail": self.tx_fail,
            "error_frames": self.error_frames,
            "bus_off": self.bus_off,
        }

    def health(self, bus: int) -> BusHealth:
        """The controller's state and counters as the kernel last reported them over rtnetlink
        where the driver does, else as the last CAN error frames said them."""
        self._read_socket_drops()
        link = self.link
        state = link.can_state if link is not None and link.can_state in CAN_STATES else None
        tx_errors = link.tx_errors if link is not None else None
        rx_errors = link.rx_errors if link is not None else None
        return BusHealth(
            up=self._sock is not None and not self._down,
            state=state or self._bus_state,
            tx_errors=self._tx_errors if tx_errors is None else tx_errors,
            rx_errors=self._rx_errors if rx_errors is None else rx_errors,
            error_frames=self.error_frames,
            bus_off=self.bus_off,
            kernel_drops=self._drops_base + self._drops_socket,
        )

    def _read_socket_drops(self) -> None:
        # SO_RXQ_OVFL reports the count only with the next frame queued, so drops at the end of
        # a burst would stay unseen until traffic resumes; SO_MEMINFO has the count now.
        sock = self._sock
        if sock is None:
            return
        try:
            meminfo = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, SK_MEMINFO.size)
        except OSError:
            return
        if len(meminfo) >= SK_MEMINFO.size and sock is self._sock:
            self._drops_socket = max(self._drops_socket, SK_MEMINFO.unpack(meminfo)[8])

    def bus_info(self, bus: int) -> BusInfo:
        """What is known now; never waits (a client's reply is built from it)."""
        return self._bus_info

    def start(self, publish: Publish) -> None:
        # Learn the interface before any client can ask (the kernel answers at once).
        if self._open_link is not None:
            try:
                self._link_watch = LinkWatch(self.name, self._open_link())
                self._on_link_events(self._link_watch.query(LINK_QUERY_TIMEOUT_S))
            except OSError as exc:
                log.warning(
                    "%s: cannot ask the kernel about the interface (%s), reporting %d bit/s",
                    self.name,
                    exc.strerror or exc,
                    DEFAULT_BITRATE,
                )
                self._close_link_watch()
        super().start(publish)

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(OSError):
            self._wake_sender.send(b"\0")

    def refresh_link(self) -> None:
        """Ask the kernel for the interface's state now (error counters change without
        notice); the answer updates :attr:`link` and :meth:`bus_info` from the reader thread."""
        watch = self._link_watch
        if watch is not None:
            with contextlib.suppress(OSError):
                watch.request()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                sock = self._open_with_backoff()
                if sock is None:
                    return
                try:
                    self._read(sock)
                except Exception:
                    # Not an interface problem but a bug: say so loudly, then read on from a
                    # fresh socket rather than leave the bus silent while the server seems fine.
                    log.exception("%s: reader failed, reopening the interface", self.name)
                    self._gone = True
                    self._stop.wait(1.0)
                finally:
                    self._sock = None
                    sock.close()
                    self._drops_base += self._drops_socket
                    self._drops_socket = 0
        finally:
            self._close_link_watch()
            self._wake_reader.close()
            self._wake_sender.close()

    def _close_link_watch(self) -> None:
        watch, self._link_watch = self._link_watch, None
        if watch is not None:
            watch.close()

    def _on_link_events(self, events: List[LinkEvent]) -> None:
        for event in events:
            if isinstance(event, LinkUpdate):
                self._apply_link(event.link)
            elif isinstance(event, RequestFailed) and event.errno != errno.ENODEV:
                log.warning(
                    "%s: the kernel did not say what the interface is: %s",
                    self.name,
                    errno.errorcode.get(event.errno, event.errno),
                )
            # LinkRemoved, ENODEV: the reader finds out too and reopens by name; until the
            # interface is back, clients are told what was last known of it.

    def _apply_link(self, link: LinkState) -> None:
        if link.bitrate is None and not self._bitrate_fallback_logged:
            self._bitrate_fallback_logged = True
            log.info(
                "%s: the kernel reports no bit rate, reporting %d to clients",
                self.name,
                DEFAULT_BITRATE,
            )
        previous = self.link
        self.link = link
        self._restart_ms = link.restart_ms
        self._bus_info = BusInfo(
            True,
            link.listen_only,
            link.bitrate or DEFAULT_BITRATE,
            state=link.can_state,
            tx_errors=link.tx_errors,
            rx_errors=link.rx_errors,
        )
        if previous is not None and (previous.bitrate, previous.listen_only) != (
            link.bitrate,
            link.listen_only,
        ):
            log.info(
                "%s: now %s bit/s%s",
                self.name,
                link.bitrate or "unknown",
                ", listen-only" if link.listen_only else "",
            )

    def _open_with_backoff(self) -> Optional[socket.socket]:
        delay = 0.5
        reported: Optional[str] = None
        while not self._stop.is_set():
            sock: Optional[socket.socket] = None
            try:
                sock = self._open_socket()
                enable_timestamps(sock)
                sock.setblocking(False)
            except OSError as exc:
                if sock is not None:
                    sock.close()
                reason = exc.strerror or str(exc)
                if exc.errno == errno.ENODEV:
                    reason = "no such interface"
                if reported != reason:
                    log.warning(
                        "%s: cannot open (%s), retrying every %.0f s at most",
                        self.name,
                        reason,
                        REOPEN_BACKOFF_MAX_S,
                    )
                    reported = reason
                self._stop.wait(delay)
                delay = min(delay * 2, REOPEN_BACKOFF_MAX_S)
                continue
            self._sock = sock
            if self._is_can_socket:
                self._check_down_at_open()
            if reported is not None or self._gone:
                self._gone = False
                log.info("%s: interface is back, reading again", self.name)
                # Perhaps a new interface (replugged) with other settings: ask what it is now.
                self.refresh_link()
            return sock
        return None

    def set_bitrate(self, bitrate: int) -> str:
        """Reconfigure the interface to ``bitrate`` bit/s; says what was done."""
        if not self._is_can_socket:
            raise RuntimeError(f"{self.name} is not a kernel CAN interface")
        set_link_bitrate(self.name, bitrate)
        self.refresh_link()  # the kernel announces it too, when the interface comes back up
        return f"{self.name} set to {bitrate} bit/s with ip link"

    def _lose_link_watch(self, reason: str) -> None:
        log.warning(
            "%s: no more news of the interface from the kernel (%s); clients are told what was "
            "last known",
            self.name,
            reason,
        )
        self._close_link_watch()

    def _check_down_at_open(self) -> None:
        if _operstate(self.name) == "down" and not self._down:
            self._down = True
            log.warning("%s: interface is down", self.name)

    # --- reading -------------------------------------------------------------------------

    def _read(self, sock: socket.socket) -> None:
        """Read until stopped or the interface vanishes (then return to reopen it)."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self._wake_reader, select.POLLIN)
        watch = self._link_watch
        link_fd = -1 if watch is None else watch.fileno()
        if link_fd < 0 and watch is not None:
            self._lose_link_watch(os.strerror(errno.EBADF))  # closed before this read began
            watch = None
        elif watch is not None:
            poller.register(link_fd, select.POLLIN)
        can_fd = sock.fileno()
        received = MessageBatch(MAX_BATCH, CANFD_MTU)
        receive, messages, data = received.receive, received.messages, received.data
        publish = self._publish
        assert publish is not None
        bus = self.first_bus
        # Pause only at rates whose pause the socket's queue holds twice over.
        pause_below_fps = queue_capacity(sock) / (2 * READ_PAUSE_S)
        window_start, window_frames, pause = time.monotonic(), 0, False
        while not self._stop.is_set():
            if pause:
                time.sleep(READ_PAUSE_S)
            can_ready = False
            for fd, _ in poller.poll():
                if fd == can_fd:
                    can_ready = True
                elif fd == link_fd and watch is not None:
                    try:
                        self._on_link_events(watch.read())
                    except OSError as exc:
                        poller.unregister(link_fd)
                        self._lose_link_watch(exc.strerror or str(exc))
                        watch = None
            if not can_ready:
                continue
            try:
                count = receive(can_fd)
            except OSError as exc:
                if not self._on_read_error(exc):
                    return
                continue
            batch: List[Frame] = []
            for offset, size, msg_flags, ts_ns in messages(count):
                if ts_ns is None:
                    ts_ns = time.time_ns()
                origin = 0
                if msg_flags & MSG_CONFIRM:
                    origin = self._confirmed_origin(received.datagram(offset, size))
                frame = decode_from(data, offset, size, bus, ts_ns, direction_of(msg_flags), origin)
                if frame is None:
                    continue
                if type(frame) is ErrorFrame:
                    self._on_error_frame(frame)
                    continue
                batch.append(frame)
            if received.drops is not None:
                self._drops_socket = received.drops
            if batch:
                self._deliver(batch, publish)
            window_frames += len(batch)
            now = time.monotonic()
            if now - window_start >= RATE_WINDOW_S:
                rate = window_frames / (now - window_start)
                pause = BUSY_FPS <= rate < pause_below_fps
                window_start, window_frames = now, 0
            pause = pause and count < MAX_BATCH

    def _deliver(self, batch: List[Frame], publish: Publish) -> None:
        if self._down:
            self._down = False
            log.info("%s: reading again", self.name)
        self.frames_read += len(batch)
        publish(batch)

    def _on_read_error(self, exc: OSError) -> bool:
        """Log the loss; True to keep reading the same socket, False to reopen it."""
        if exc.errno == errno.ENETDOWN:
            if not self._down:
                self._down = True
                log.warning("%s: interface is down", self.name)
            return True
        # ENODEV: the interface was unregistered (USB adapter unplugged). The kernel unbinds the
        # socket, which would then read *every* interface: close it and reopen by name.
        log.warning("%s: interface is gone (%s), reopening by name", self.name, exc.strerror or exc)
        self._down = False
        self._gone = True
        return False

    def _on_error_frame(self, frame: ErrorFrame) -> None:
        """Follow the controller's state (<linux/can/error.h>; the kernel's can_change_state()
        sends CAN_ERR_CRTL with the new level, can_bus_off() CAN_ERR_BUSOFF, a restart
        CAN_ERR_RESTARTED) and its error counters; one log line per change."""
        self.error_frames += 1
        err_class, data = frame.err_class, frame.data
        if err_class & CAN_ERR_CNT and len(data) >= 8:
            self._tx_errors, self._rx_errors = data[6], data[7]
        controller = data[1] if err_class & CAN_ERR_CRTL and len(data) > 1 else 0
        if err_class & CAN_ERR_BUSOFF:
            state = BUS_OFF
            self._tx_errors = BUS_OFF_TX_ERRORS
        elif controller & (CAN_ERR_CRTL_RX_PASSIVE | CAN_ERR_CRTL_TX_PASSIVE):
            state = ERROR_PASSIVE
        elif controller & (CAN_ERR_CRTL_RX_WARNING | CAN_ERR_CRTL_TX_WARNING):
            state = ERROR_WARNING
        elif err_class & CAN_ERR_RESTARTED:
            state = ERROR_ACTIVE
            self._tx_errors = self._rx_errors = 0  # a restart resets the controller
        elif controller & CAN_ERR_CRTL_ACTIVE:
            state = ERROR_ACTIVE
        else:
            return
        previous, self._bus_state = self._bus_state, state
        if state == previous:
            return
        # The kernel announces bus-off and restarts, not error-passive: ask it for its view.
        self.refresh_link()
        if state == BUS_OFF:
            self.bus_off += 1
            restart = self._restart_ms
            if restart is None:
                then = ""
            elif restart > 0:
                then = f", restarting in {restart} ms"
            else:
                then = f", stays off until 'ip link set {self.name} type can restart'"
            self._state_log.log(
                (self.name, state), logging.WARNING, "%s: bus-off (tx errors %d)%s",
                self.name, self._tx_errors, then,
            )  # fmt: skip
            return
        worse = CAN_STATES.index(state) > CAN_STATES.index(previous)
        self._state_log.log(
            (self.name, state),
            logging.WARNING if worse else logging.INFO,
            "%s: %s%s (tx errors %d, rx errors %d)",
            self.name,
            state,
            "" if worse else f" again after {previous}",
            self._tx_errors,
            self._rx_errors,
        )

    # --- transmit ------------------------------------------------------------------------

    @staticmethod
    def _confirmation_key(raw: bytes) -> bytes:
        # can_id and len sit at the same offsets in can_frame and canfd_frame, data at 8.
        return raw[:5] + raw[8 : 8 + raw[4]]

    def _confirmed_origin(self, data: bytes) -> int:
        """The client that transmitted the frame the kernel now confirms (FIFO per socket)."""
        key = self._confirmation_key(data)
        with self._pending_lock:
            for index, (pending_key, origin) in enumerate(self._pending):
                if pending_key == key:
                    del self._pending[index]
                    return origin
        return 0

    def transmit(self, frame: Frame, origin: int) -> TransmitResult:
        if (frame.fd or len(frame.data) > 8) and not self.can_fd:
            return TransmitResult.REFUSED
        sock = self._sock
        if sock is None:
            return self._send_failed(TransmitResult.DOWN, "interface is not open")
        raw = encode(frame)
        entry = (self._confirmation_key(raw), origin)
        with self._pending_lock:
            self._pending.append(entry)
        deadline = time.monotonic() + SEND_RETRY_WINDOW_S
        while True:
            try:
                sock.send(raw)
                break
            except OSError as exc:
                # ENOBUFS: the interface's TX queue is full; EAGAIN: our socket's send buffer is.
                if exc.errno in (errno.ENOBUFS, errno.EAGAIN) and time.monotonic() < deadline:
                    time.sleep(0.001)
                    continue
                with self._pending_lock:
                    if entry in self._pending:
                        self._pending.remove(entry)
                result = SEND_ERRORS.get(exc.errno, TransmitResult.FAILED)
                return self._send_failed(result, exc.strerror or str(exc))
        self.tx += 1
        self._reported_send_down = False
        return TransmitResult.SENT

    def _send_failed(self, result: TransmitResult, reason: str) -> TransmitResult:
        self.tx_fail += 1
        if result is TransmitResult.DOWN:
            if not self._reported_send_down:
                self._reported_send_down = True
                log.warning("%s: transmit dropped: %s", self.name, reason)
        else:
            log.debug("%s: transmit dropped: %s", self.name, reason)
        return result
