"""The benchmark's processes: the server under test, the feeder that plays the bus, the clients.

Owns: what each process does and the small command protocol the orchestrator (bench/run.py)
speaks to it over a ``multiprocessing`` pipe. Every role runs in its own forked process so that
none shares the server's GIL: the feeder writes ``struct can_frame`` datagrams into the seam
socket pair at a paced rate (or as fast as the seam takes them), the server is the real
:class:`wiretap.app.App`, and one client process holds K GVRET connections, does SavvyCAN's
handshake on each and decodes every frame in bulk.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import selectors
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection
from typing import Dict, List, Optional, Sequence

FEED_FRAME = struct.Struct("=IB2xBQ")
"""``struct can_frame`` as the feeder writes it: can_id u32 (with CAN_EFF_FLAG), len u8, pad,
res0, len8_dlc u8, then the 8 data bytes read as one little-endian u64: the frame's sequence
number, so a client can check that it got every frame, in order."""

CAN_EFF_FLAG = 0x80000000
FEED_ID = 0x18FEF100  # a J1939-like 29-bit ID: the benchmark's frames are classic 8-byte frames

GVRET_RECORD = 20
"""A classic 8-byte frame from the server: F1 00, ts u32, id u32, bus<<4|len, data[8], 00."""

RECORD_TS = struct.Struct("<2xI14x")
"""One 20-byte record read for its timestamp only (µs since the server started, mod 2**32)."""

RECORD_SEQ = struct.Struct("<Q")
"""The sequence number in a record's data bytes, at offset 11."""

SAVVYCAN_HELLO = bytes.fromhex("E7E7F10CF106F107F101F109")
HELLO_REPLIES = 5  # 0C, 06, 07, 01 and 09 are each answered once
KEEPALIVE = b"\xf1\x09"
REPLY_SIZES = {0x01: 4, 0x02: 2, 0x06: 10, 0x07: 6, 0x09: 2, 0x0C: 1, 0x0D: 15}
FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)
RECV_SIZE = 1 << 18
_F1 = b"\xf1" * (RECV_SIZE // GVRET_RECORD + 1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> Dict[str, float]:
    """``rss`` (now) and ``hwm`` (peak) resident memory of a process, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line[2:5].lower()] = int(line.split()[1]) / 1024
    return values


def percentile(values: Sequence[float], fraction: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def thread_cpu() -> Dict[str, float]:
    """CPU seconds of each live thread of this process, by thread name (the kernel's
    ``/proc/self/task/<tid>/schedstat``, in ns), so a phase can show where the time goes."""
    import threading

    seconds: Dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
                value = int(f.read().split()[0]) / 1e9
        except (OSError, ValueError):
            continue
        seconds[thread.name] = seconds.get(thread.name, 0.0) + value
    return seconds


STAGES = (
    ("reader", "reader-"),  # poll, recvmsg, decode, publish (and on a quiet bus the fan-out)
    ("dispatch+encode", "dispatcher"),  # coalescing, one encode per dialect, queueing for all
    ("send", "writer-"),  # the client writer threads: outbox, send()
    ("handlers", "Thread-"),  # socketserver's per-client threads: recv, keepalive replies
    ("db writer", "pg-writer"),  # rows, COPY bytes, the round trip to PostgreSQL
)
"""The frame path's stages, each the thread (name prefix) that does its work."""


def stage_cpu(by_thread: Dict[str, float]) -> Dict[str, float]:
    """:func:`thread_cpu` summed per stage of :data:`STAGES`; the rest (pg-keeper, stats, the
    accept loop, the bench's own command thread) as ``other``."""
    stages = {name: 0.0 for name, _ in STAGES}
    stages["other"] = 0.0
    for thread, seconds in by_thread.items():
        stage = next((name for name, prefix in STAGES if thread.startswith(prefix)), "other")
        stages[stage] += seconds
    return stages


# --- server -------------------------------------------------------------------------------------


def serve(
    conn: Connection,
    argv: List[str],
    reader_end: socket.socket,
    pg_spool: str,
    server_tree: Optional[str] = None,
) -> None:
    """The server under test: ``App`` on the seam's reader end; answers ``counters``, ``cpu``
    (user + system seconds of the whole process, exact rather than in clock ticks),
    ``thread_cpu`` (:func:`thread_cpu`) and ``stop``. ``server_tree``: import ``wiretap`` from
    that checkout instead (another commit's server, measured by the same bench)."""
    if server_tree:
        for name in [name for name in sys.modules if name.split(".")[0] == "wiretap"]:
            del sys.modules[name]
        sys.path.insert(0, server_tree)
    from wiretap.app import App
    from wiretap.config import load_config
    from wiretap.sources.netlink import open_link_socket
    from wiretap.sources.socketcan import SocketCanSource

    config = load_config(argv, {})
    if config.postgres.enable:
        config = dataclasses.replace(
            config, postgres=dataclasses.replace(config.postgres, cache_path=pg_spool)
        )
    # Frames through the seam, but the interface learnt from the kernel as on a real bus (this
    # host has no can0: the kernel's answer is "no such device", after the same round trip).
    source = SocketCanSource("can0", 0, open_socket=lambda: reader_end, open_link=open_link_socket)
    app = App(config, sources=[source])
    app.start()
    status_port = app.status.port if app.status is not None else None
    conn.send({"port": app.port, "start_ns": app.start_ns, "status_port": status_port})
    while True:
        command = conn.recv()
        if command == "counters":
            counters = app.counters()
            counters["streaming"] = sum(client.streaming for client in app.hub.clients)
            conn.send(counters)
        elif command == "cpu":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(usage.ru_utime + usage.ru_stime)
        elif command == "thread_cpu":
            conn.send(thread_cpu())
        elif command == "stop":
            app.stop()
            conn.send(app.counters())
            return


# --- feeder -------------------------------------------------------------------------------------


def feed(conn: Connection, bus_end: socket.socket) -> None:
    """Plays the bus: ``(count, rate)`` sends ``count`` frames at ``rate`` fps (0: as fast as the
    seam takes them) and answers ``(sent, seconds, cpu_seconds, stalls)``.

    The seam is blocking, like a bus that waits: when the server's reader falls behind, the
    feeder stalls and its achieved rate falls below the asked one; the orchestrator treats that as
    the server not keeping up.
    """
    send = bus_end.send
    pack = FEED_FRAME.pack
    can_id = CAN_EFF_FLAG | FEED_ID
    seq = 0
    while True:
        command = conn.recv()
        if command is None:
            return
        count, rate = command
        cpu0 = time.process_time()
        start = time.perf_counter()
        first, end_seq = seq, seq + count
        behind = 0
        while seq < end_seq:
            if rate:
                target = min(end_seq, first + int((time.perf_counter() - start) * rate) + 1)
                if target <= seq:
                    time.sleep(0.0005)
                    continue
                behind = max(behind, target - seq)
            else:
                target = min(end_seq, seq + 256)
            for number in range(seq, target):
                send(pack(can_id, 8, 0, number))
            seq = target
        elapsed = time.perf_counter() - start
        conn.send((count, elapsed, time.process_time() - cpu0, behind))


# --- clients ------------------------------------------------------------------------------------


class _Client:
    """One GVRET connection's decoding state."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.replies = 0
        self.frames = 0
        self.next_seq = 0
        self.order_errors = 0
        self.latencies_us: List[int] = []
        self.keepalive_sent: List[float] = []
        self.keepalive_rtt_ms: List[float] = []
        self.error = ""
        self.hello_sent = 0.0
        self.hello_ms: Optional[float] = None  # last handshake byte sent -> last reply decoded


class ClientPool:
    """K GVRET clients in one process, each decoded as runs of fixed-size 20-byte records."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.selector = selectors.DefaultSelector()
        self.selector.register(conn.fileno(), selectors.EVENT_READ, None)
        self.clients: List[_Client] = []
        self.start_ns = 0
        self.record_latency = False
        self.keepalive_interval = 0.0
        self.next_keepalive = float("inf")

    def run(self) -> None:
        while True:
            timeout = max(0.0, self.next_keepalive - time.monotonic())
            for key, _ in self.selector.select(min(timeout, 1.0)):
                if key.data is None:
                    if not self._command(self.conn.recv()):
                        return
                else:
                    self._receive(key.data)
            if time.monotonic() >= self.next_keepalive:
                self._send_keepalives()

    def _command(self, command: tuple) -> bool:
        name = command[0]
        if name == "connect":
            _, port, count, start_ns = command
            self.start_ns = start_ns
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.sendall(SAVVYCAN_HELLO)
                sent = time.monotonic()
                sock.setblocking(False)
                client = _Client(sock)
                client.hello_sent = sent
                self.clients.append(client)
                self.selector.register(sock, selectors.EVENT_READ, client)
            self.conn.send(len(self.clients))
        elif name == "phase":
            _, first_seq, self.record_latency, self.keepalive_interval = command
            for client in self.clients:
                client.next_seq = first_seq
                client.frames = 0
                client.order_errors = 0
                client.latencies_us = []
                client.keepalive_sent = []
                client.keepalive_rtt_ms = []
            self.next_keepalive = (
                time.monotonic() + self.keepalive_interval if self.keepalive_interval else 1e18
            )
            self.conn.send(True)
        elif name == "report":
            self.conn.send(
                {
                    "cpu": time.process_time(),
                    "clients": [
                        {
                            "replies": c.replies,
                            "frames": c.frames,
                            "order_errors": c.order_errors,
                            "latencies_us": c.latencies_us if command[1:] == (True,) else [],
                            "keepalive_rtt_ms": c.keepalive_rtt_ms,
                            "hello_ms": c.hello_ms,
                            "error": c.error,
                        }
                        for c in self.clients
                    ],
                }
            )
        elif name == "close":
            for client in self.clients:
                self.selector.unregister(client.sock)
                client.sock.close()
            self.clients = []
            self.conn.send(True)
        else:
            return False
        return True

    def _send_keepalives(self) -> None:
        now = time.monotonic()
        for client in self.clients:
            if not client.error:
                client.keepalive_sent.append(now)
                client.sock.send(KEEPALIVE)
        self.next_keepalive = now + self.keepalive_interval

    def _receive(self, client: _Client) -> None:
        if client.sock.fileno() == -1:
            return  # closed by a "close" command handled earlier in the same select() round
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            data, client.error = b"", str(exc)
        if not data:
            self.selector.unregister(client.sock)
            client.error = client.error or "closed by the server"
            return
        now_ns = time.time_ns()
        buf = client.buf
        buf += data
        try:
            used = self._decode(client, buf, now_ns)
        except ValueError as exc:
            client.error = str(exc)
            self.selector.unregister(client.sock)
            return
        del buf[:used]

    def _decode(self, client: _Client, buf: bytearray, now_ns: int) -> int:
        """Consume whole records and replies from ``buf``; returns how many bytes were used."""
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            whole = (size - pos) // GVRET_RECORD
            if whole and buf[pos] == 0xF1 and buf[pos + 1] == 0x00:
                block = bytes(buf[pos : pos + whole * GVRET_RECORD])
                # The run of frames ends where the first reply (a 2..15-byte message) sits.
                run = min(
                    whole - len(block[0::GVRET_RECORD].lstrip(b"\xf1")),
                    whole - len(block[1::GVRET_RECORD].lstrip(b"\x00")),
                )
                if run:
                    self._frames(client, block, run, now_ns)
                    pos += run * GVRET_RECORD
                    continue
            end = self._message(client, buf, pos, size)
            if end is None:
                break
            pos = end
        return pos

    def _frames(self, client: _Client, block: bytes, run: int, now_ns: int) -> None:
        end = run * GVRET_RECORD
        if block[10:end:GVRET_RECORD].lstrip(b"\x08") or block[19:end:GVRET_RECORD].lstrip(b"\x00"):
            raise ValueError("a frame that is not the feeder's bus-0 8-byte frame")
        (first,) = RECORD_SEQ.unpack_from(block, 11)
        (last,) = RECORD_SEQ.unpack_from(block, end - GVRET_RECORD + 11)
        if first != client.next_seq or last != first + run - 1:
            client.order_errors += 1
        client.next_seq = last + 1
        client.frames += run
        if self.record_latency:
            now_us = ((now_ns - self.start_ns) // 1000) & 0xFFFFFFFF
            client.latencies_us.extend(
                (now_us - ts) & 0xFFFFFFFF for (ts,) in RECORD_TS.iter_unpack(block[:end])
            )

    def _message(self, client: _Client, buf: bytearray, pos: int, size: int) -> Optional[int]:
        """Decode one reply at ``pos``: its end, or None while it is incomplete."""
        if buf[pos] != 0xF1:
            raise ValueError(f"stream out of step at byte {buf[pos]:02X}")
        cmd = buf[pos + 1]
        if cmd == 0x00:
            if size - pos < 11:
                return None
            end = pos + 12 + FD_LENGTHS[buf[pos + 10] & 0x0F]
            if end > size:
                return None
            raise ValueError("a frame that is not the feeder's bus-0 8-byte frame")
        if cmd not in REPLY_SIZES:
            raise ValueError(f"unexpected command byte {cmd:02X}")
        end = pos + 2 + REPLY_SIZES[cmd]
        if end > size:
            return None
        client.replies += 1
        if client.replies == HELLO_REPLIES:
            client.hello_ms = (time.monotonic() - client.hello_sent) * 1000
        if cmd == 0x09 and client.keepalive_sent:
            sent = client.keepalive_sent.pop(0)
            client.keepalive_rtt_ms.append((time.monotonic() - sent) * 1000)
        return end


def clients(conn: Connection) -> None:
    ClientPool(conn).run()


# --- PostgreSQL writer alone --------------------------------------------------------------------


def pg_rows(conn: Connection, dsn: str, mode: str, rows: int, spool: str) -> None:
    """Ingest ``rows`` frames through :class:`PgWriter` alone; answers rows/s."""
    from wiretap.config import PostgresConfig
    from wiretap.frames import make_frame
    from wiretap.pg.writer import PgWriter

    config = dataclasses.replace(
        PostgresConfig(), enable=True, dsn=dsn, mode=mode, cache_path=spool, queue_size=2 * rows
    )
    writer = PgWriter(config, "rx")
    base_ns = time.time_ns()
    frames = [
        make_frame(0, FEED_ID, RECORD_SEQ.pack(n), extended=True, ts_ns=base_ns + n * 1000)
        for n in range(rows)
    ]
    writer.start()
    deadline = time.monotonic() + 30
    while not writer.counters()["conn"] and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.perf_counter()
    for offset in range(0, rows, 500):
        writer.deliver(frames[offset : offset + 500])
    while writer.counters()["wrote"] + writer.counters()["dropped"] < rows:
        if time.monotonic() > deadline + 60:
            break
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    counters = writer.counters()
    writer.stop()
    conn.send({"rows_per_s": counters["wrote"] / elapsed, **counters})
