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

log = logging.getLogger("wiretap.server")

SEND_BUFFER = 32 * 1024  # the kernel doubles it: ~64 KB in flight at most (gvret.md §3)
OUTBOX_FRAME_BYTES = 256 * 1024
REPLY_BYTES = 64 * 1024  # unread replies: a client that only sends keepalives must not pin memory
WRITE_CHUNK = 16 * 1024
# Frame data up to this size is written by whoever queues it into an idle outbox (a quiet bus);
# more (a busy bus) goes to the client's writer thread, whose send overlaps the dispatcher's work.
SEND_NOW_BYTES = 4 * 1024
STALL_TIMEOUT_S = 30.0
SOCKET_POLL_S = 0.5
BEACON_PORT = 17222
BEACON_PAYLOAD = b"\x1c\xef\xac\xed"
REFUSAL_LOG_INTERVAL_S = 10.0

Transmit = Callable[[Frame, int], Optional[str]]
"""Sends a frame for client ``origin``; returns None when sent, else why it was not."""


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
        self._writing = False
        self._writing_now = False  # a send_now write is in progress
        self._ready = threading.Condition(threading.Lock())
        self.closed = False

    def _idle(self) -> bool:
        return not (self._writing or self._head or self._replies or self._frames or self.closed)

    def put_reply(self, data: bytes) -> bool:
        """Queue a reply; False when the client has left ``REPLY_BYTES`` of replies unread."""
        with self._ready:
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

    def put_frames(self, data: bytes, count: int) -> bool:
        """Queue encoded frames; False (and counted as dropped) when the client is too far
        behind."""
        direct = False
        with self._ready:
            if self._frame_bytes + len(data) > self.capacity:
                accepted = False
            else:
                accepted = True
                if len(data) <= SEND_NOW_BYTES and self._send_now is not None and self._idle():
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
        with self._ready:
            self._writing = self._writing_now = False
            if sent < len(data):
                self._head = data[sent:]
            if not self._idle():
                self._ready.notify_all()

    def take(self, timeout: Optional[float] = None) -> Optional[bytes]:
        """The next bytes to write: an unfinished write, else all waiting replies, else up to a
        chunk of frame data. None once closed, or after ``timeout`` s with nothing to write.
        The caller owns the socket until it calls :meth:`written`."""
        with self._ready:
            while self._writing or not (self._head or self._replies or self._frames):
                if self.closed or not self._ready.wait(timeout):
                    return None
            self._writing = True
            if self._head:
                data, self._head = self._head, b""
                return data
            if self._replies:
                data = b"".join(self._replies)
                self._replies.clear()
                self._reply_bytes = 0
                return data
            parts: List[bytes] = []
            size = 0
            while self._frames and size < WRITE_CHUNK:
                chunk = self._frames.popleft()
                parts.append(chunk)
                size += len(chunk)
            self._frame_bytes -= size
            return parts[0] if len(parts) == 1 else b"".join(parts)

    def written(self) -> None:
        """The bytes :meth:`take` returned are written."""
        with self._ready:
            self._writing = False

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()

    def close_then(self, release: Callable[[], None]) -> None:
        """Close, wait for a ``send_now`` write in progress (it never blocks), then call
        ``release`` (which closes what ``send_now`` writes to) while no new one can start."""
        with self._ready:
            self.closed = True
            self._ready.notify_all()
            while self._writing_now:
                self._ready.wait()
            release()


class ClientConnection:
    """The state of one GVRET client, shared by its handler thread and its writer thread."""

    _tokens = itertools.count(1)

    def __init__(self, sock: socket.socket, who: str, dialect: Optional[gvret.Dialect]) -> None:
        self.sock = sock
        self.who = who
        self.token = next(self._tokens)
        self.fixed_dialect = dialect
        self.dialect = dialect or gvret.Dialect.WIRETAP
        self.streaming = False
        # A non-blocking twin of the socket: whoever fills an idle outbox writes through it at
        # once (the socket itself has a timeout, so its send would poll first and could wait).
        self._direct = sock.dup()
        self._direct.setblocking(False)
        self.outbox = Outbox(who, send_now=self._direct.send)
        self.fd_skipped = 0
        self.frames_sent = 0
        self.tx_refused = 0
        self._fd_skip_logged = False
        self._read_only_logged = False
        self._last_refusal_log = float("-inf")
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
        self.outbox.close_then(self._direct.close)

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

    def log_refusal(self, reason: str) -> None:
        """A refused transmit: counted always, logged at most once per 10 s."""
        self.tx_refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL_S:
            self._last_refusal_log = now
            log.warning(
                "client %s: transmit refused: %s (%d refused so far)",
                self.who,
                reason,
                self.tx_refused,
            )

    def refuse_read_only(self) -> None:
        self.tx_refused += 1
        if not self._read_only_logged:
            self._read_only_logged = True
            log.warning("client %s: transmit refused: the server is read-only", self.who)

    def _write_loop(self) -> None:
        sock = self.sock
        outbox = self.outbox
        try:
            while True:
                data = outbox.take()
                if data is None:
                    return
                if not self._send_all(data):
                    return
                outbox.written()
        except OSError as exc:
            log.debug("client %s: write failed: %s", self.who, exc)
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
            except socket.timeout:
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
        self.dropped_by_gone_clients = 0
        self.refused_by_gone_clients = 0

    @property
    def clients(self) -> Tuple[ClientConnection, ...]:
        return self._clients

    def add(self, client: ClientConnection) -> None:
        with self._lock:
            self._clients = self._clients + (client,)

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
        dialect: str = "auto",
    ) -> None:
        self.hub = hub
        self.device = gvret.Device(bus_count, bus_params, self.now_us)
        self.transmit = transmit
        self.read_only = read_only
        self.allow = _parse_networks(allow)
        self.max_clients = max_clients
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
        if self.allow:
            peer = ipaddress.ip_address(client_address[0])
            if peer.version == 6 and peer.ipv4_mapped:
                peer = peer.ipv4_mapped
            if not any(peer in network for network in self.allow):
                log.warning("client %s: refused, not in the allow list", who)
                return False
        with self._active_lock:
            if self._active >= self.max_clients:
                log.warning(
                    "client %s: refused, already serving max_clients=%d", who, self.max_clients
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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.settimeout(SOCKET_POLL_S)
        self.who = _address(self.client_address)
        threading.current_thread().name = f"client-{self.who}"
        self.client = ClientConnection(sock, self.who, self.server.fixed_dialect)

    def handle(self) -> None:
        client = self.client
        log.info("client %s: connected", self.who)
        parser = gvret.ClientParser()
        client.start_writer()
        self.server.hub.add(client)
        sock = self.request
        while not client.outbox.closed:
            try:
                data = sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
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
        self.server.hub.remove(client)
        client.stop_writer()
        log.info(
            "client %s: disconnected (%d frames sent, %d dropped)",
            self.who,
            client.frames_sent,
            client.outbox.drops.total,
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
                log.info(
                    "client %s: ignoring command %02X %s (the server does not reconfigure "
                    "interfaces for network clients)",
                    self.who,
                    event.cmd,
                    event.payload.hex(" "),
                )
            elif isinstance(event, gvret.BadTransmit):
                client.log_refusal(event.reason)
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
            client.refuse_read_only()
            return
        if event.bus >= server.device.bus_count or not server.device.bus_params(event.bus).enabled:
            client.log_refusal(f"no bus {event.bus} on this server")
            return
        reason = server.transmit(gvret.transmit_frame(event), client.token)
        if reason is not None:
            client.log_refusal(f"bus {event.bus}: {reason}")


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
