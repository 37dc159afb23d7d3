"""The GVRET TCP server: one handler per client, frames fanned out once per dialect.

Owns: the ``socketserver.ThreadingTCPServer`` and its admission rules (``allow``,
``max_clients``), the per-connection handler (its parser, its dialect, its writer thread and
bounded outbox), the :class:`ClientHub` that the broker delivers batches to, routing a client's
transmit to its bus (through the ``transmit`` callable the app hands in), and the optional UDP
discovery beacon.

Each client has an outbox: replies to its commands go out ahead of any queued frame data (a
SavvyCAN keepalive must never wait behind frames), frame data is bounded (beyond it the client
loses frames, counted), and the kernel's send buffer is kept small so that a slow reader such as
SavvyCAN never has more than ~64 KB waiting for it (docs/gvret.md §3).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import itertools
import logging
import socket
import socketserver
import threading
import time
from typing import Callable, Deque, Iterable, List, Optional, Sequence, Set, Tuple

from . import gvret
from .broker import DropReporter
from .frames import Frame
from .ratelimit import RateLimitedLog

log = logging.getLogger("wiretap.server")

SEND_BUFFER = 32 * 1024  # the kernel doubles it: ~64 KB in flight at most (gvret.md §3)
OUTBOX_FRAME_BYTES = 256 * 1024
REPLY_BYTES = 64 * 1024  # unread replies: a client that only sends keepalives must not pin memory
WRITE_CHUNK = 16 * 1024
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

Transmit = Callable[[Frame, int], Optional[str]]
"""Sends a frame for client ``origin``; returns None when sent, else why it was not."""


class Outbox:
    """One client's outgoing bytes: replies first, then bounded frame data."""

    def __init__(self, who: str, capacity: int = OUTBOX_FRAME_BYTES) -> None:
        self.capacity = capacity
        self.drops = DropReporter(f"client {who}")
        self._replies: Deque[bytes] = collections.deque()
        self._frames: Deque[bytes] = collections.deque()
        self._frame_bytes = 0
        self._reply_bytes = 0
        self._ready = threading.Condition(threading.Lock())
        self.closed = False

    def put_reply(self, data: bytes) -> bool:
        """Queue a reply; False when the client has left ``REPLY_BYTES`` of replies unread."""
        with self._ready:
            if self._reply_bytes + len(data) > REPLY_BYTES:
                return False
            self._replies.append(data)
            self._reply_bytes += len(data)
            self._ready.notify()
            return True

    def put_frames(self, data: bytes, count: int) -> bool:
        """Queue encoded frames; False (and counted as dropped) when the client is too far
        behind."""
        with self._ready:
            if self._frame_bytes + len(data) > self.capacity:
                accepted = False
            else:
                self._frames.append(data)
                self._frame_bytes += len(data)
                self._ready.notify()
                accepted = True
        if not accepted:
            self.drops.add(count)
        return accepted

    def take(self, timeout: float) -> Optional[bytes]:
        """The next bytes to write: all waiting replies, else up to a chunk of frame data."""
        with self._ready:
            if not (self._replies or self._frames or self.closed):
                self._ready.wait(timeout)
            if self._replies:
                data = b"".join(self._replies)
                self._replies.clear()
                self._reply_bytes = 0
                return data
            if not self._frames:
                return None
            parts: List[bytes] = []
            size = 0
            while self._frames and size < WRITE_CHUNK:
                chunk = self._frames.popleft()
                parts.append(chunk)
                size += len(chunk)
            self._frame_bytes -= size
            return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()


class ClientConnection:
    """The state of one GVRET client, shared by its handler thread and its writer thread."""

    _tokens = itertools.count(1)

    def __init__(
        self,
        sock: socket.socket,
        who: str,
        dialect: Optional[gvret.Dialect],
        *,
        logs: RateLimitedLog,
    ) -> None:
        self.sock = sock
        self.who = who
        self.logs = logs
        self.token = next(self._tokens)
        self.fixed_dialect = dialect
        self.dialect = dialect or gvret.Dialect.WIRETAP
        self.streaming = False
        self.outbox = Outbox(who)
        self.fd_skipped = 0
        self.frames_sent = 0
        self.tx_refused = 0
        self.lost: Optional[str] = None  # why the connection broke, when it did
        self._fd_skip_logged = False
        self._writer = threading.Thread(target=self._write_loop, name=f"writer-{who}", daemon=True)

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

    def add_frames(self, data: bytes, count: int, fd_skipped: int) -> None:
        if fd_skipped:
            self.fd_skipped += fd_skipped
            if not self._fd_skip_logged:
                self._fd_skip_logged = True
                log.info(
                    "client %s: CAN FD frames with more than 8 bytes are not sent to this client "
                    "(classic GVRET cannot carry them)",
                    self.who,
                )
        if data and self.outbox.put_frames(data, count):
            self.frames_sent += count

    def refuse(self, key: str, message: str, *args: object) -> None:
        """A refused transmit: counted always, logged at most once per 10 s per kind (the count
        of those held back on the next line, or on the ``disconnected`` line)."""
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
        try:
            while True:
                data = outbox.take(SOCKET_POLL_S)
                if data is None:
                    if outbox.closed:
                        return
                    continue
                if not self._send_all(data):
                    return
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
    """The broker's consumer for every GVRET client: encodes each batch once per dialect."""

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
            self.dropped_by_gone_clients += client.outbox.drops.total
            self.refused_by_gone_clients += client.tx_refused

    def client_drops(self) -> int:
        return self.dropped_by_gone_clients + sum(c.outbox.drops.total for c in self._clients)

    def transmits_refused(self) -> int:
        return self.refused_by_gone_clients + sum(c.tx_refused for c in self._clients)

    def deliver(self, frames: Sequence[Frame]) -> None:
        clients = self._clients
        if not clients:
            return
        origins = {frame.origin for frame in frames if frame.origin}
        encoded = {}
        for client in clients:
            if not client.streaming:
                continue
            if client.token in origins:
                # The transmitting client is not sent its own frame back (server.md §2).
                own = [frame for frame in frames if frame.origin != client.token]
                client.add_frames(*gvret.encode_frames(own, client.dialect, self.start_ns))
                continue
            dialect = client.dialect
            batch = encoded.get(dialect)
            if batch is None:
                batch = encoded[dialect] = gvret.encode_frames(frames, dialect, self.start_ns)
            client.add_frames(*batch)


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
    ) -> None:
        self.hub = hub
        self.device = gvret.Device(bus_count, bus_params, self.now_us)
        self.transmit = transmit
        self.read_only = read_only
        self.allow = _parse_networks(allow)
        self.max_clients = max_clients
        self.handshake_timeout = handshake_timeout
        self.fixed_dialect = None if dialect == "auto" else gvret.Dialect(dialect)
        self.logs = RateLimitedLog(log, REFUSAL_LOG_INTERVAL_S)
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
    """Owns one client connection for its lifetime: reads, parses, answers, transmits."""

    server: GvretServer
    request: socket.socket

    def setup(self) -> None:
        sock = self.request
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
            sock, self.who, self.server.fixed_dialect, logs=self.server.logs
        )
        self.served = False

    def handle(self) -> None:
        client = self.client
        self.served = self.server.hub.add(client)
        if not self.served:
            return  # the server is shutting down: this connection is closed unserved
        log.info("client %s: connected", self.who)
        parser = gvret.ClientParser()
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
            if not self._handle_events(parser.feed(data)):
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
            client.outbox.drops.total,
            f", {suppressed} log lines suppressed" if suppressed else "",
            f", connection lost: {client.lost}" if client.lost else "",
        )

    def _handle_events(self, events: List[gvret.Event]) -> bool:
        """Act on a read's events; False when the client must be disconnected."""
        client = self.client
        device = self.server.device
        go_binary = False
        for event in events:
            if isinstance(event, gvret.BinaryMode):
                go_binary = True
            elif isinstance(event, (gvret.Query, gvret.TimeSync)):
                if (
                    client.fixed_dialect is None
                    and isinstance(event, gvret.Query)
                    and event.cmd in (gvret.CMD_KEEPALIVE, gvret.CMD_GET_BUS_PARAMS)
                ):
                    # Only SavvyCAN sends these, and it cannot show FD frames (gvret.md §3).
                    client.dialect = gvret.Dialect.CLASSIC
                reply = gvret.reply_for(event, device)
                if reply is not None and not client.outbox.put_reply(reply):
                    return False
            elif isinstance(event, gvret.Setting):
                self.server.logs.log(
                    (self.who, f"setting-{event.cmd:02X}"),
                    logging.INFO,
                    "client %s: ignoring command %02X %s (the server does not reconfigure "
                    "interfaces for network clients)",
                    self.who,
                    event.cmd,
                    event.payload.hex(" "),
                )
            elif isinstance(event, gvret.BadTransmit):
                client.refuse("bad-transmit", "%s", event.reason)
            elif isinstance(event, gvret.Transmit):
                self._transmit(event)
        # Streaming starts after the whole read is handled, so a client's first burst (SavvyCAN
        # sends E7 and F1 06 together) has chosen its dialect before any frame goes out.
        if go_binary and not client.streaming:
            client.streaming = True
            log.info("client %s: binary mode, dialect %s", self.who, client.dialect.value)
        return True

    def _transmit(self, event: gvret.Transmit) -> None:
        client = self.client
        server = self.server
        if event.echo:
            frame = gvret.transmit_frame(event._replace(bus=0), time.time_ns())
            client.add_frames(*gvret.encode_frames([frame], client.dialect, server.hub.start_ns))
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
