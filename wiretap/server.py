"""The GVRET TCP server: sockets and threads, one handler per client.

Owns: the ``socketserver.ThreadingTCPServer`` and its admission rules (``allow``,
``max_clients``), the per-connection handler and writer threads, each client's bounded outbox,
the :class:`ClientHub` that the broker delivers batches to, routing a client's transmit to its
bus (through the ``transmit`` callable the app hands in), and the optional UDP discovery beacon.
The protocol rules of a connection (binary mode, dialect, the client's view of the buses, flow
control) are :class:`gvret.Connection`'s; this module feeds it bytes and acts on its events.

Each client has an outbox: replies to its commands go out ahead of any queued frame data (a
SavvyCAN keepalive must never wait behind frames), and frame data is bounded (256 KB; beyond it
the client loses frames, counted). The kernel's send buffer is kept small (~64 KB). Neither bounds
what waits in the *client's* receive queue, which its kernel grows to megabytes: for clients
that send keepalives like SavvyCAN, the connection's flow-control window does, and their writer
paces frame data (``gvret.PACE_BYTES`` per ``gvret.PACE_INTERVAL_S``; docs/gvret.md §3).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import ipaddress
import itertools
import logging
import socket
import socketserver
import struct
import termios
import threading
import time
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from . import gvret
from .broker import DropReporter
from .frames import Frame
from .ratelimit import RateLimitedLog

log = logging.getLogger("wiretap.server")

SEND_BUFFER = 32 * 1024  # the kernel doubles it: ~64 KB in this side's send queue at most
OUTBOX_FRAME_BYTES = 256 * 1024
REPLY_BYTES = 64 * 1024  # unread replies: a client that only sends keepalives must not pin memory
WRITE_CHUNK = 16 * 1024
# A quiet bus's write: up to ~12 classic frames. Written at once by whoever queues it into an
# idle outbox, and a paced client gets it without waiting for its interval: a bus that brings
# under 256 B per 4 ms coalescing window brings less than 64 KB/s, far below the pace. More, from
# a busy bus, goes to a paced client's writer thread; an unpaced client's is written at once too,
# up to WRITE_CHUNK (non-blocking: what the socket does not take, its writer thread finishes).
QUIET_WRITE_BYTES = 256
STALL_TIMEOUT_S = 30.0
SOCKET_POLL_S = 0.5
BEACON_PORT = 17222
BEACON_PAYLOAD = b"\x1c\xef\xac\xed"
# A peer that vanished (Wi-Fi out of range, power cut) sends no FIN: keepalive probes from 10 s of
# silence, then every 5 s, and TCP_USER_TIMEOUT ending the connection once 30 s pass with nothing
# acknowledged (it also bounds probes, and data left unacknowledged while frames are sent).
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 4
USER_TIMEOUT_MS = 30_000
LISTEN_BACKLOG = 1024  # socketserver's 5 made every sixth quick connect wait a SYN retransmit
REFUSAL_LOG_INTERVAL_S = 10.0  # each kind of line a client can trigger: at most one per 10 s
SIOCOUTQ = termios.TIOCOUTQ  # <linux/sockios.h>: SIOCOUTQ is TIOCOUTQ
SIOCOUTQ_VALUE = struct.Struct("i")
"""The ``int`` that ``ioctl(SIOCOUTQ)`` fills in: bytes in the send queue not yet acknowledged."""

Transmit = Callable[[Frame, int], Optional[str]]
"""Sends a frame for client ``origin``; returns None when sent, else why it was not."""

SetBitrate = Callable[[int, int], str]
"""Reconfigures bus ``bus`` to ``bitrate`` bit/s; returns what was done, or raises
``RuntimeError`` saying why it could not be."""


class Outbox:
    """One client's outgoing bytes: replies first, then bounded frame data.

    One party writes to the socket at a time: the writer thread, or (``send_now``) the thread
    that puts a reply or a little frame data into an outbox that is empty and idle, which writes
    it at once without waking the writer. A write that does not go through whole leaves the rest
    at the head, sent before anything else (it may end halfway through a message).
    """

    def __init__(
        self,
        who: str,
        capacity: int = OUTBOX_FRAME_BYTES,
        send_now: Optional[Callable[[bytes], int]] = None,
    ) -> None:
        self.capacity = capacity
        self.drops = DropReporter(f"client {who}")
        self._send_now = send_now
        self._head = b""
        self._replies: Deque[bytes] = collections.deque()
        self._frames: Deque[bytes] = collections.deque()
        self._frame_bytes = 0
        self._reply_bytes = 0
        self._writing = False  # the writer thread or a send_now write owns the socket
        self._writing_now = False  # a send_now write is in progress
        # Held with ``with self._lock`` (a Condition's own __enter__ and __exit__ are Python
        # calls, two per put on the per-frame path of a quiet bus); waited on through _ready.
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.closed = False
        self.frames_from = 0.0
        """Monotonic time before which no frame data may be written (a paced client)."""

    def _idle(self) -> bool:
        return not (self._writing or self._head or self._replies or self._frames or self.closed)

    def put_reply(self, data: bytes) -> bool:
        """Queue a reply; False when the client has left ``REPLY_BYTES`` of replies unread."""
        with self._lock:
            if self._send_now is not None and self._idle():
                self._writing = self._writing_now = True
            elif self._reply_bytes + len(data) > REPLY_BYTES:
                return False
            else:
                self._replies.append(data)
                self._reply_bytes += len(data)
                self._ready.notify()
                return True
        self._write_now(data)
        return True

    def put_frames(self, data: bytes, count: int, at_once: int = QUIET_WRITE_BYTES) -> bool:
        """Queue encoded frames; False (and counted as dropped) when the client is too far
        behind. Up to ``at_once`` bytes into an idle outbox are written by the caller at once."""
        direct = False
        with self._lock:
            if self._frame_bytes + len(data) > self.capacity:
                accepted = False
            else:
                accepted = True
                if len(data) <= at_once and self._send_now is not None and self._idle():
                    self._writing = self._writing_now = direct = True
                else:
                    self._frames.append(data)
                    self._frame_bytes += len(data)
                    self._ready.notify()
        if direct:
            self._write_now(data)
        elif not accepted:
            self.drops.add(count)
        return accepted

    def _write_now(self, data: bytes) -> None:
        assert self._send_now is not None
        try:
            sent = self._send_now(data)
        except OSError:
            sent = 0  # a full socket, or a broken one: the writer thread sees which
        with self._lock:
            self._writing = self._writing_now = False
            if sent < len(data):
                self._head = data[sent:]
            if not self._idle():
                self._ready.notify_all()

    @property
    def frame_bytes(self) -> int:
        """Frame bytes queued here, not yet written to the socket."""
        return self._frame_bytes

    def put_frame_pieces(self, pieces: Sequence[bytes], count: int) -> bool:
        """Queue the pieces of one batch (``count`` frames), all or none, each to be written
        on its own (a paced client)."""
        size = sum(len(piece) for piece in pieces)
        with self._lock:
            accepted = self._frame_bytes + size <= self.capacity
            if accepted:
                self._frames.extend(pieces)
                self._frame_bytes += size
                self._ready.notify()
        if not accepted:
            self.drops.add(count)
        return accepted

    def take(
        self, timeout: Optional[float] = None, limit: int = WRITE_CHUNK, paced: bool = False
    ) -> Tuple[Optional[bytes], bool]:
        """The next bytes to write and whether they are frame data: the rest of a cut write
        first, then all waiting replies; else frame data up to about ``limit`` bytes, for a
        ``paced`` client not before :attr:`frames_from` unless at most ``QUIET_WRITE_BYTES``
        are queued (replies never wait for it). None once
        closed, or after ``timeout`` s (None: no limit) with nothing to write. The caller owns
        the socket until it calls :meth:`written`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while True:
                if not self._writing:
                    if self._head:
                        data, self._head = self._head, b""
                        self._writing = True
                        return data, False
                    if self._replies:
                        data = b"".join(self._replies)
                        self._replies.clear()
                        self._reply_bytes = 0
                        self._writing = True
                        return data, False
                now = time.monotonic()
                small = self._frame_bytes <= QUIET_WRITE_BYTES
                frames_from = self.frames_from if paced and not small else 0.0
                if self._frames and now >= frames_from and not self._writing:
                    break
                if self.closed or (deadline is not None and now >= deadline):
                    return None, False
                wake = deadline
                if self._frames and not self._writing and frames_from > now:
                    wake = frames_from if wake is None else min(wake, frames_from)
                self._ready.wait(None if wake is None else wake - now)
            self._writing = True
            parts: List[bytes] = []
            size = 0
            while self._frames and (not parts or size + len(self._frames[0]) <= limit):
                chunk = self._frames.popleft()
                parts.append(chunk)
                size += len(chunk)
            self._frame_bytes -= size
            return (parts[0] if len(parts) == 1 else b"".join(parts)), True

    def written(self, frames_from: Optional[float] = None) -> None:
        """The bytes :meth:`take` returned are written; a paced client's next frame data is due
        at ``frames_from``."""
        with self._lock:
            self._writing = False
            if frames_from is not None:
                self.frames_from = frames_from

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._ready.notify_all()

    def close_then(self, release: Callable[[], None]) -> None:
        """Close, wait for a ``send_now`` write in progress (it never blocks), then call
        ``release`` (which closes what ``send_now`` writes to) while no new one can start."""
        with self._lock:
            self.closed = True
            self._ready.notify_all()
            while self._writing_now:
                self._ready.wait()
            release()


def unsent_in_kernel(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that the peer has not acknowledged yet (``SIOCOUTQ``)."""
    try:
        return SIOCOUTQ_VALUE.unpack(fcntl.ioctl(sock.fileno(), SIOCOUTQ, bytes(4)))[0]
    except OSError:
        return 0


class ClientConnection:
    """One GVRET client: its protocol state (:class:`gvret.Connection`, shared by its handler
    thread and the dispatcher under ``lock``), its outbox and the writer thread that empties it."""

    _tokens = itertools.count(1)

    def __init__(
        self,
        sock: socket.socket,
        who: str,
        device: gvret.Device,
        *,
        start_ns: int,
        dialect: Optional[gvret.Dialect],
        flow_control: bool,
        logs: RateLimitedLog,
    ) -> None:
        self.sock = sock
        self.who = who
        self.token = next(self._tokens)
        self.lock = threading.Lock()
        self.protocol = gvret.Connection(
            device,
            start_ns=start_ns,
            dialect=dialect,
            flow_control=flow_control,
            origin=self.token,
            now=time.monotonic(),
        )
        # A non-blocking twin of the socket: whoever fills an idle outbox writes through it at
        # once (the socket itself has a timeout, so its send would poll first and could wait).
        self._direct = sock.dup()
        self._direct.setblocking(False)
        self.outbox = Outbox(who, send_now=self._direct.send)
        self.logs = logs
        self.frames_sent = 0
        self.tx_refused = 0
        self.lost: Optional[str] = None  # why the connection broke, when it did
        self._fd_skip_logged = False
        self._writer = threading.Thread(target=self._write_loop, name=f"writer-{who}", daemon=True)

    @property
    def streaming(self) -> bool:
        return self.protocol.streaming

    @property
    def dialect(self) -> Optional[gvret.Dialect]:
        return self.protocol.dialect

    @property
    def fd_skipped(self) -> int:
        return self.protocol.fd_skipped

    @property
    def dropped(self) -> int:
        """Frames this client lost: left out by its flow-control window or its full outbox."""
        return self.protocol.frames_dropped + self.outbox.drops.total

    def start_writer(self) -> None:
        self._writer.start()

    def close(self) -> None:
        """End the connection: the writer stops, and a send or recv blocked on it returns."""
        self.outbox.close()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def stop_writer(self, timeout: float = 2.0) -> None:
        self.outbox.close()
        if self._writer.is_alive() and threading.current_thread() is not self._writer:
            self._writer.join(timeout)
        self.outbox.close_then(self._direct.close)

    def receive(self, data: bytes) -> List[gvret.ConnectionEvent]:
        """The protocol's events for bytes the client sent."""
        with self.lock:
            protocol = self.protocol
            undelivered = 0
            if protocol.flow_controlled:
                undelivered = self.outbox.frame_bytes + unsent_in_kernel(self.sock)
            return protocol.receive_data(data, time.monotonic(), undelivered)

    def deliver(self, frames: Sequence[Frame], shared: Dict[object, object]) -> None:
        """Queue this client's share of a batch (called by the dispatcher; never blocks)."""
        with self.lock:
            out = self.protocol.send_frames(frames, time.monotonic(), shared)
        for notice in out.notices:
            if isinstance(notice, gvret.DialectChosen):
                log.info(
                    "client %s: dialect %s (%s)", self.who, notice.dialect.value, notice.reason
                )
                continue
            log.warning(
                "client %s: sent nothing for %.0f s, so it does not send keepalives: flow "
                "control stopped for it (its reads are no longer bounded)",
                self.who,
                notice.silent_s,
            )
        if out.fd_skipped and not self._fd_skip_logged and self.dialect is gvret.Dialect.CLASSIC:
            self._fd_skip_logged = True
            log.info(
                "client %s: CAN FD frames with more than 8 bytes are not sent to this client "
                "(classic GVRET cannot carry them)",
                self.who,
            )
        if out.dropped:
            self.logs.log(
                (self.who, "flow-control"),
                logging.WARNING,
                "client %s: reads slower than the buses (its keepalives come late): %d frames "
                "dropped for it so far, to keep what waits for it under %d KB",
                self.who,
                self.dropped,
                gvret.WINDOW_MAX // 1024,
            )
        if not out.data:
            return
        if out.cuts:
            accepted = self.outbox.put_frame_pieces(out.pieces(), out.frames)
        else:
            # An unpaced client's batch (up to WRITE_CHUNK) is written by the delivering thread
            # when its outbox is idle: a busy bus's delivery then costs no writer wake-up.
            at_once = QUIET_WRITE_BYTES if self.protocol.paced else WRITE_CHUNK
            accepted = self.outbox.put_frames(out.data, out.frames, at_once)
        if accepted:
            self.frames_sent += out.frames

    def refuse(self, key: str, message: str, *args: object) -> None:
        """A refused transmit: counted always, logged at most once per 10 s per kind."""
        self.tx_refused += 1
        self.logs.log(
            (self.who, key),
            logging.WARNING,
            "client %s: transmit refused: " + message + " (%d refused so far)",
            self.who,
            *args,
            self.tx_refused,
        )

    def _write_loop(self) -> None:
        sock = self.sock
        outbox = self.outbox
        protocol = self.protocol
        try:
            while True:
                paced = protocol.paced
                if paced:
                    data, frames = outbox.take(SOCKET_POLL_S, gvret.PACE_BYTES, paced=True)
                else:
                    data, frames = outbox.take()
                if data is None:
                    if outbox.closed:
                        return
                    continue
                if not self._send_all(data):
                    return
                if frames and paced and len(data) > QUIET_WRITE_BYTES:
                    # On a schedule, not an interval after each write: a writer woken late
                    # may send the next piece at once (at most one), so that the pace holds
                    # on a busy machine; it never makes up for more than one interval.
                    now = time.monotonic()
                    outbox.written(
                        max(outbox.frames_from, now - gvret.PACE_INTERVAL_S)
                        + gvret.PACE_INTERVAL_S * len(data) / gvret.PACE_BYTES
                    )
                else:
                    outbox.written()
        except OSError as exc:
            if not outbox.closed:  # not the server's own shutdown of the socket
                self.lost = exc.strerror or str(exc)
        finally:
            # Wake the handler thread (blocked in recv) so the connection ends as one.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _send_all(self, data: bytes) -> bool:
        """Write all of ``data``; False if the client is gone or stalled for 30 s."""
        view = memoryview(data)
        last_progress = time.monotonic()
        while view:
            try:
                sent = self.sock.send(view)
            except socket.timeout as exc:
                if not _poll_timeout(exc):
                    raise
                if self.outbox.closed:
                    return False
                if time.monotonic() - last_progress > STALL_TIMEOUT_S:
                    log.warning(
                        "client %s: accepted nothing for %.0f s, disconnecting",
                        self.who,
                        STALL_TIMEOUT_S,
                    )
                    return False
                continue
            view = view[sent:]
            last_progress = time.monotonic()
        return True


class ClientHub:
    """The broker's consumer for every GVRET client: hands each batch to every client, with one
    encoding per dialect shared among them."""

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self._clients: Tuple[ClientConnection, ...] = ()
        self._lock = threading.Lock()
        self.closed = False
        self.dropped_by_gone_clients = 0
        self.refused_by_gone_clients = 0

    @property
    def clients(self) -> Tuple[ClientConnection, ...]:
        return self._clients

    def add(self, client: ClientConnection) -> bool:
        """Registers ``client``; False once :meth:`close` was called (the caller then ends the
        connection itself)."""
        with self._lock:
            if self.closed:
                return False
            self._clients = self._clients + (client,)
            return True

    def close(self) -> Tuple[ClientConnection, ...]:
        """Closes the door: no client is added from now on. Returns every client added before,
        so that the caller can end them all; a handler that comes later ends its own."""
        with self._lock:
            self.closed = True
            return self._clients

    def remove(self, client: ClientConnection) -> None:
        with self._lock:
            self._clients = tuple(c for c in self._clients if c is not client)
            self.dropped_by_gone_clients += client.dropped
            self.refused_by_gone_clients += client.tx_refused

    def client_drops(self) -> int:
        return self.dropped_by_gone_clients + sum(c.dropped for c in self._clients)

    def transmits_refused(self) -> int:
        return self.refused_by_gone_clients + sum(c.tx_refused for c in self._clients)

    def deliver(self, frames: Sequence[Frame]) -> None:
        shared: Dict[object, object] = {}
        for client in self._clients:
            client.deliver(frames, shared)


def _parse_networks(allow: Iterable[str]) -> List[ipaddress._BaseNetwork]:
    return [ipaddress.ip_network(entry, strict=False) for entry in allow]


class GvretServer(socketserver.ThreadingTCPServer):
    """Accepts GVRET clients and serves each from its own :class:`GvretHandler` thread."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: Tuple[str, int],
        hub: ClientHub,
        *,
        bus_count: int,
        bus_params: Callable[[int], gvret.BusParams],
        transmit: Transmit,
        read_only: bool = False,
        allow: Iterable[str] = (),
        max_clients: int = 16,
        handshake_timeout: float = 5.0,
        dialect: str = "auto",
        flow_control: str = "auto",
        set_bitrate: Optional[SetBitrate] = None,
    ) -> None:
        self.hub = hub
        self.device = gvret.Device(bus_count, bus_params, self.now_us)
        self.transmit = transmit
        self.set_bitrate = set_bitrate
        self.flow_control = flow_control == "auto"
        self.logs = RateLimitedLog(log, REFUSAL_LOG_INTERVAL_S)
        self.read_only = read_only
        self.allow = _parse_networks(allow)
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.fixed_dialect = None if dialect == "auto" else gvret.Dialect(dialect)
        self._active = 0
        self._active_lock = threading.Lock()
        self._admitted: Set[socket.socket] = set()
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, GvretHandler)

    def now_us(self) -> int:
        return gvret.timestamp_us(time.time_ns(), self.hub.start_ns)

    def verify_request(self, request, client_address) -> bool:  # noqa: ANN001 (socketserver API)
        who = _address(client_address)
        host = client_address[0]
        # Keyed by the peer's host, not its port: each new connection has a new port, and a
        # peer that connects in a loop must not get a line per connection.
        if self.allow:
            peer = ipaddress.ip_address(host)
            if peer.version == 6 and peer.ipv4_mapped:
                peer = peer.ipv4_mapped
            if not any(peer in network for network in self.allow):
                self.logs.log(
                    (host, "not allowed"),
                    logging.WARNING,
                    "client %s: refused, not in the allow list",
                    who,
                )
                return False
        with self._active_lock:
            if self._active >= self.max_clients:
                self.logs.log(
                    (host, "max_clients"),
                    logging.WARNING,
                    "client %s: refused, already serving max_clients=%d",
                    who,
                    self.max_clients,
                )
                return False
            self._active += 1
            self._admitted.add(request)
        return True

    def release(self, request: socket.socket) -> None:
        """Give back the max_clients slot of ``request``; safe to call more than once."""
        with self._active_lock:
            if request in self._admitted:
                self._admitted.discard(request)
                self._active -= 1

    def handle_error(self, request: socket.socket, client_address: Tuple) -> None:
        # socketserver prints the traceback to stderr by itself; say it through logging, with
        # the client's address. The connection is closed; every other client goes on.
        log.exception("client %s: connection failed", _address(client_address))

    def shutdown_request(self, request: socket.socket) -> None:
        # Called for every request, admitted or refused, whatever became of its handler: the
        # slot is given back here even if the handler's setup failed.
        self.release(request)
        super().shutdown_request(request)


def _poll_timeout(exc: OSError) -> bool:
    """True for the socket's own timeout (nothing to read or write yet), False for a connection
    the kernel timed out (ETIMEDOUT: keepalive or TCP_USER_TIMEOUT). Python 3.10 made both the
    same class, ``TimeoutError``; only the errno tells them apart."""
    return isinstance(exc, socket.timeout) and exc.errno is None


def _address(client_address: Tuple) -> str:
    host, port = client_address[0], client_address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GvretHandler(socketserver.BaseRequestHandler):
    """Owns one client connection for its lifetime: reads, hands the bytes to the client's
    protocol state, and acts on its events (replies, transmits, logs)."""

    server: GvretServer
    request: socket.socket

    def setup(self) -> None:
        sock = self.request
        server = self.server
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.settimeout(SOCKET_POLL_S)
        self.who = _address(self.client_address)
        threading.current_thread().name = f"client-{self.who}"
        self.client = ClientConnection(
            sock,
            self.who,
            server.device,
            start_ns=server.hub.start_ns,
            dialect=server.fixed_dialect,
            flow_control=server.flow_control,
            logs=server.logs,
        )
        self.served = False

    def handle(self) -> None:
        client = self.client
        self.served = self.server.hub.add(client)
        if not self.served:
            return  # the server is shutting down: this connection is closed unserved
        log.info("client %s: connected", self.who)
        client.start_writer()
        sock = self.request
        timeout = self.server.handshake_timeout
        handshake_deadline = time.monotonic() + timeout if timeout else None
        while not client.outbox.closed:
            if (
                handshake_deadline is not None
                and not client.streaming
                and time.monotonic() >= handshake_deadline
            ):
                # Keyed by host: a scanner or a crowd of silent sockets costs one line per 10 s.
                self.server.logs.log(
                    (self.client_address[0], "no binary mode"),
                    logging.WARNING,
                    "client %s: closed, not in binary mode %g s after connecting "
                    "(handshake_timeout)",
                    self.who,
                    timeout,
                )
                break
            try:
                data = sock.recv(4096)
            except OSError as exc:
                if _poll_timeout(exc):
                    continue
                client.lost = exc.strerror or str(exc)
                break
            if not data:
                break
            if not self._handle_events(client.receive(data)):
                log.warning(
                    "client %s: sends commands but does not read the replies, disconnecting",
                    self.who,
                )
                break

    def finish(self) -> None:
        client = self.client
        self.server.release(self.request)
        if not self.served:
            return
        self.server.hub.remove(client)
        client.stop_writer()
        suppressed = self.server.logs.forget(self.who)
        log.info(
            "client %s: disconnected (%d frames sent, %d dropped%s%s)",
            self.who,
            client.frames_sent,
            client.dropped,
            f", {suppressed} log lines suppressed" if suppressed else "",
            f", connection lost: {client.lost}" if client.lost else "",
        )

    def _handle_events(self, events: List[gvret.ConnectionEvent]) -> bool:
        """Act on a read's events; False when the client must be disconnected."""
        client = self.client
        logs = self.server.logs
        who = self.who
        for event in events:
            if isinstance(event, gvret.Reply):
                if not client.outbox.put_reply(event.data):
                    return False
            elif isinstance(event, gvret.Transmit):
                self._transmit(event)
            elif isinstance(event, gvret.BadTransmit):
                client.refuse("bad-transmit", "%s", event.reason)
            elif isinstance(event, gvret.TransmitRefused):
                client.refuse(f"view-{event.bus}", "%s", event.reason)
            elif isinstance(event, gvret.StreamingStarted):
                dialect = event.dialect.value if event.dialect else "auto (not chosen yet)"
                log.info("client %s: binary mode, dialect %s", who, dialect)
            elif isinstance(event, gvret.DialectChosen):
                log.info("client %s: dialect %s (%s)", who, event.dialect.value, event.reason)
            elif isinstance(event, gvret.FlowControlStarted):
                log.info(
                    "client %s: sends keepalives like SavvyCAN: at most %d KB will wait for it",
                    who,
                    gvret.WINDOW_MAX // 1024,
                )
            elif isinstance(event, gvret.BusSettingsChanged):
                state = "on" if event.enabled else "off"
                if event.enabled and event.listen_only:
                    state = "on, listen-only"
                logs.log(
                    (who, f"bus-{event.bus}"),
                    logging.INFO,
                    "client %s: bus %d is now %s for this client (other clients unaffected)",
                    who,
                    event.bus,
                    state,
                )
            elif isinstance(event, gvret.BitrateRequested):
                self._bitrate(event)
            elif isinstance(event, gvret.SettingIgnored):
                logs.log(
                    (who, f"setting-{event.cmd:02X}"),
                    logging.INFO,
                    "client %s: ignoring command %02X %s (nothing on this server to apply it to)",
                    who,
                    event.cmd,
                    event.payload.hex(" "),
                )
        return True

    def _bitrate(self, event: gvret.BitrateRequested) -> None:
        who = self.who
        set_bitrate = self.server.set_bitrate
        key = (who, f"bitrate-{event.bus}")
        if set_bitrate is None:
            self.server.logs.log(
                key,
                logging.INFO,
                "client %s: asks for bus %d at %d bit/s (it runs at %d): not applied, the "
                "server does not reconfigure interfaces (reconfigure_interfaces = false)",
                who,
                event.bus,
                event.bitrate,
                event.current,
            )
            return
        try:
            done = set_bitrate(event.bus, event.bitrate)
        except RuntimeError as exc:
            self.server.logs.log(
                key,
                logging.WARNING,
                "client %s: asks for bus %d at %d bit/s: not applied: %s",
                who,
                event.bus,
                event.bitrate,
                exc,
            )
            return
        # A client that alternates two speeds in a loop must not get a line per change.
        self.server.logs.log(
            (who, f"bitrate-set-{event.bus}"),
            logging.WARNING,
            "client %s: asked for bus %d at %d bit/s: %s",
            who,
            event.bus,
            event.bitrate,
            done,
        )

    def _transmit(self, event: gvret.Transmit) -> None:
        client = self.client
        server = self.server
        if event.echo:
            frame = gvret.transmit_frame(dataclasses.replace(event, bus=0), time.time_ns())
            data, count, _ = gvret.encode_frames(
                [frame], client.dialect or gvret.Dialect.CLASSIC, server.hub.start_ns
            )
            client.outbox.put_frames(data, count)
            return
        if server.read_only:
            client.refuse("read-only", "the server is read-only")
            return
        if event.bus >= server.device.bus_count or not server.device.bus_params(event.bus).enabled:
            client.refuse("bad-transmit", "no bus %d on this server", event.bus)
            return
        reason = server.transmit(gvret.transmit_frame(event), client.token)
        if reason is not None:
            client.refuse("bad-transmit", "bus %d: %s", event.bus, reason)


class Beacon:
    """ESP32RET's discovery beacon: ``1C EF AC ED`` to UDP port 17222 once a second."""

    def __init__(self, address: str, port: int = BEACON_PORT, interval: float = 1.0) -> None:
        self.destination = (address, port)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="beacon", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            failed = False
            while True:
                try:
                    sock.sendto(BEACON_PAYLOAD, self.destination)
                    failed = False
                except OSError as exc:
                    if not failed:
                        log.warning("beacon to %s:%d failed: %s", *self.destination, exc)
                    failed = True
                if self._stop.wait(self.interval):
                    return
