"""A model of SavvyCAN's GVRET reader, for flow-control tests and the benchmark.

What SavvyCAN does (connections/gvretserial.cpp, and docs/gvret.md §3): one thread reads the
socket and runs a 250 ms timer; each read takes everything queued (``readAll``) and costs about
n² × 1e-9 s for n bytes (it builds a hex debug string byte by byte); the timer sends ``F1 09``
only when that thread is idle, so a late keepalive means the reader is behind.

Two forms of the same model:
- :func:`simulate`: a :class:`wiretap.gvret.Connection` and the model on a fake clock, with a
  fake network (one-way delay, a batch from the dispatcher every 2 ms, a writer that paces as
  the server's does). Deterministic, so a
  minute of a bus at five times its saturated rate runs in seconds and every figure is exact.
- :func:`model_client` / :func:`feeder`: the model as a real TCP client and a seam feeder, each
  in a process of its own (no shared GIL with the server), for the host tier and the bench.
"""

from __future__ import annotations

import collections
import selectors
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Deque, List, Optional, Tuple

from wiretap import gvret
from wiretap.frames import CAN_FRAME, make_frame
from wiretap.gvret import PACE_BYTES, PACE_INTERVAL_S

SAVVYCAN_HELLO = bytes.fromhex("E7E7F10CF106F107F101F109")
KEEPALIVE = b"\xf1\x09"
KEEPALIVE_S = 0.25
READ_COST_S_PER_BYTE2 = 1e-9  # 60 KB read: 3.6 s (measured with SavvyCAN's client: 3.7 s)
DENSE_FPS = 10_000  # one saturated bus, as in the field report: ~10,000 frames/s of 8 bytes
READ_LIMIT = 64_000
SEQ = struct.Struct("<Q")
REPLY_SIZES = {0x01: 4, 0x02: 2, 0x06: 10, 0x07: 6, 0x09: 2, 0x0C: 1, 0x0D: 15}


@dataclass
class Figures:
    """What the model client saw (and, from :func:`simulate`, what the server counted)."""

    fed: int = 0
    received: int = 0
    dropped: int = 0  # the server's count
    order_errors: int = 0
    largest_read: int = 0
    reads: int = 0
    keepalives_sent: int = 0
    keepalive_replies: int = 0
    keepalive_gaps: List[float] = field(default_factory=list)
    last_missing_seq: int = -1  # the last frame the client did not get
    error: str = ""

    @property
    def largest_keepalive_gap(self) -> float:
        return max(self.keepalive_gaps, default=0.0)


class StreamCheck:
    """Decodes the server's stream as the model receives it: frames carry a sequence number in
    their 8 data bytes; each must be whole and later than the one before."""

    def __init__(self, figures: Figures) -> None:
        self.figures = figures
        self.buf = bytearray()
        self.next_seq = 0

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, size = 0, len(buf)
        figures = self.figures
        while size - pos >= 2:
            if buf[pos] != 0xF1:
                raise ValueError(f"stream out of step at byte {buf[pos]:02X}")
            cmd = buf[pos + 1]
            if cmd == 0x00:
                if size - pos < 11:
                    break
                length = buf[pos + 10] & 0x0F
                end = pos + 12 + length
                if end > size:
                    break
                if length != 8 or buf[end - 1] != 0:
                    raise ValueError("a frame that is not the feeder's 8-byte frame")
                (seq,) = SEQ.unpack_from(buf, pos + 11)
                if seq < self.next_seq:
                    figures.order_errors += 1
                elif seq > self.next_seq:
                    figures.last_missing_seq = seq - 1
                self.next_seq = seq + 1
                figures.received += 1
                pos = end
            elif cmd in REPLY_SIZES:
                end = pos + 2 + REPLY_SIZES[cmd]
                if end > size:
                    break
                figures.keepalive_replies += cmd == 0x09
                pos = end
            else:
                raise ValueError(f"unexpected command byte {cmd:02X}")
        del buf[:pos]


# --- on a fake clock ------------------------------------------------------------------------


def simulate(
    fps: int,
    seconds: float,
    *,
    one_way_s: float = 0.0003,
    batch_s: float = 0.002,
    step_s: float = 0.0005,
    hiccup: Optional[Tuple[float, float]] = None,
    keepalive_before_read: bool = True,
    flow_control: bool = True,
) -> Figures:
    """Feed ``fps`` 8-byte frames for ``seconds`` through a :class:`gvret.Connection` to the
    model; returns what it got. ``hiccup`` = (at, for): the client is also busy then (a pause
    of its process). ``keepalive_before_read``: when a busy spell ends with a keepalive due and
    data queued, the keepalive goes first (either order is possible in Qt's event loop)."""
    device = gvret.Device(
        1, lambda bus: gvret.BusParams(True, False, 500_000) if bus == 0 else gvret.DISABLED_BUS,
        lambda: 0,
    )  # fmt: skip
    connection = gvret.Connection(device, flow_control=flow_control)
    figures = Figures()
    check = StreamCheck(figures)
    to_client: Deque[Tuple[float, bytes]] = collections.deque()
    outbox: Deque[bytes] = collections.deque()  # frame pieces the writer has yet to send
    next_write = 0.0
    to_server: Deque[Tuple[float, bytes]] = collections.deque()
    queued = bytearray()
    busy_until = 0.0
    next_keepalive = KEEPALIVE_S
    last_keepalive = 0.0
    next_batch = one_way_s + 0.01  # once the handshake is in: frames before it are not for it
    owed = 0.0
    seq = 0
    steps = int((seconds + 30.0) / step_s)  # time enough to read what is left after feeding

    def client_sends(now: float, data: bytes) -> None:
        nonlocal last_keepalive, next_keepalive
        to_server.append((now + one_way_s, data))
        if data == KEEPALIVE:
            figures.keepalives_sent += 1
            figures.keepalive_gaps.append(now - last_keepalive)
            last_keepalive, next_keepalive = now, now + KEEPALIVE_S

    client_sends(0.0, SAVVYCAN_HELLO)
    for step in range(steps):
        now = step * step_s
        while to_server and to_server[0][0] <= now:
            undelivered = sum(len(data) for _, data in to_client) + sum(map(len, outbox))
            for event in connection.receive_data(to_server.popleft()[1], now, undelivered):
                if isinstance(event, gvret.Reply):
                    to_client.append((now + one_way_s, event.data))
        if now < seconds and now >= next_batch:
            owed += fps * batch_s
            count = int(owed)
            owed -= count
            frames = [make_frame(0, 0x100, SEQ.pack(seq + i)) for i in range(count)]
            seq += count
            figures.fed += count
            out = connection.send_frames(frames, now)
            figures.dropped += out.dropped
            outbox.extend(out.pieces() if out.cuts else [out.data] if out.data else [])
            next_batch += batch_s
        if outbox and now >= next_write:  # the writer thread, paced as the server paces it
            piece = outbox.popleft()
            while connection.paced and outbox and len(piece) + len(outbox[0]) <= PACE_BYTES:
                piece += outbox.popleft()
            to_client.append((now + one_way_s, piece))
            next_write = now + (PACE_INTERVAL_S if connection.paced else 0.0)
        while to_client and to_client[0][0] <= now:
            queued += to_client.popleft()[1]
        if now > seconds and now >= busy_until and not (to_client or to_server or queued or outbox):
            break
        if hiccup and hiccup[0] <= now < hiccup[0] + step_s:
            busy_until = max(busy_until, now + hiccup[1])
        if now < busy_until:
            continue
        if now >= next_keepalive and (keepalive_before_read or not queued):
            client_sends(now, KEEPALIVE)
        if queued:
            size = len(queued)
            figures.reads += 1
            figures.largest_read = max(figures.largest_read, size)
            check.feed(bytes(queued))
            queued.clear()
            busy_until = now + size * size * READ_COST_S_PER_BYTE2
    return figures


# --- over real sockets (each in a process of its own) --------------------------------------


def model_client(pipe: Pipe, port: int) -> None:
    """The model as a TCP client: connects, sends SavvyCAN's handshake, reads as SavvyCAN does
    until told to stop, then sends its :class:`Figures` back (``"report"`` asks for them at any
    time)."""
    figures = Figures()
    check = StreamCheck(figures)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(SAVVYCAN_HELLO)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "socket")
    selector.register(pipe.fileno(), selectors.EVENT_READ, "pipe")
    last_keepalive = time.monotonic()
    pipe.send("connected")
    try:
        while True:
            now = time.monotonic()
            due = last_keepalive + KEEPALIVE_S
            if now >= due:
                sock.sendall(KEEPALIVE)
                figures.keepalives_sent += 1
                figures.keepalive_gaps.append(now - last_keepalive)
                last_keepalive = now
                continue
            ready = selector.select(due - now)
            if any(key.data == "pipe" for key, _ in ready):
                command = pipe.recv()
                if command == "stop":
                    break
                if command == "reset":  # a new phase: its own largest read and gaps
                    figures.largest_read = 0
                    figures.keepalive_gaps = []
                pipe.send(figures)
            if not any(key.data == "socket" for key, _ in ready):
                continue
            data = _read_all(sock)
            if not data:
                figures.error = figures.error or "closed by the server"
                selector.unregister(sock)
                continue
            figures.reads += 1
            figures.largest_read = max(figures.largest_read, len(data))
            check.feed(data)
            # Busy, as SavvyCAN is, without reading or sending: quadratic in the read's size.
            time.sleep(len(data) ** 2 * READ_COST_S_PER_BYTE2)
    except (OSError, ValueError) as exc:
        figures.error = str(exc)
    finally:
        sock.close()
    pipe.send(figures)


def _read_all(sock: socket.socket) -> bytes:
    """Everything queued, as Qt's ``readAll`` returns it."""
    parts = []
    while True:
        try:
            data = sock.recv(1 << 22)
        except (BlockingIOError, InterruptedError):
            break
        if not data:
            break
        parts.append(data)
    return b"".join(parts)


def feeder(pipe: Pipe, bus_end: socket.socket) -> None:
    """Plays the bus into the seam: ``(count, fps)`` sends ``count`` 8-byte frames numbered on
    from the last, at ``fps`` in 10 ms steps; a step that comes late is not made up by a burst
    (a bus never carries more than its rate). Answers the number sent."""
    seq = 0
    while True:
        command = pipe.recv()
        if command is None:
            return
        count, fps = command
        per_step = max(1, fps // 100)
        end = seq + count
        next_step = time.monotonic()
        while seq < end:
            for number in range(seq, min(end, seq + per_step)):
                bus_end.send(CAN_FRAME.pack(0x100, 8, 0, SEQ.pack(number)))
            seq = min(end, seq + per_step)
            next_step = max(next_step + 0.01, time.monotonic() - 0.01)
            time.sleep(max(0.0, next_step - time.monotonic()))
        pipe.send(count)
