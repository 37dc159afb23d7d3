"""End to end through the seam: a real server, real TCP clients, frames through socket pairs."""

from __future__ import annotations

import logging
import random
import socket
import struct
import threading
import time

from gvret_client import SAVVYCAN_HELLO, GvretClient
from harness import wait_until

from wiretap.frames import CAN_FRAME, CANFD_FRAME, make_frame
from wiretap.server import QUIET_WRITE_BYTES, Outbox

EXAMPLE_REPLIES = {
    0x0C: bytes.fromhex("02"),
    0x06: bytes.fromhex("0120A10700 0120A10700".replace(" ", "")),
    0x07: bytes.fromhex("6A0220000000"),
    0x09: bytes.fromhex("DEAD"),
    0x0D: bytes(15),
}


def test_savvycan_handshake_gets_byte_exact_replies(harness, bus_factory):
    app = harness.start(
        "--iface", "can0,can1", buses={"can0": bus_factory(), "can1": bus_factory()}
    )
    client = GvretClient(app.port, hello=SAVVYCAN_HELLO)
    client.wait_reply(0x09)
    assert [r.cmd for r in client.replies] == [0x0C, 0x06, 0x07, 0x01, 0x09]
    client.send(b"\xf1\x0d")
    client.wait_reply(0x0D)
    for reply in client.replies:
        if reply.cmd != 0x01:
            assert reply.payload == EXAMPLE_REPLIES[reply.cmd]
    # The 17-byte F1 0D reply and the 12-byte F1 06 reply, whole, on the wire.
    assert bytes.fromhex("F10D") + bytes(15) in bytes(client.raw)
    assert bytes.fromhex("F106 0120A10700 0120A10700".replace(" ", "")) in bytes(client.raw)
    client.close()


def test_time_sync_uses_the_frame_clock(harness, bus_factory):
    app = harness.start("--iface", "can0", buses={"can0": bus_factory()})
    client = GvretClient(app.port, hello=b"")
    before = (time.time_ns() - app.start_ns) // 1000
    client.send(b"\xf1\x01\x00")
    (reply,) = client.wait_reply(0x01)
    after = (time.time_ns() - app.start_ns) // 1000
    assert before <= struct.unpack("<I", reply.payload)[0] <= after
    client.close()


def test_frames_arrive_with_bus_id_data_and_kernel_timestamp(harness, bus_factory):
    can0, can1 = bus_factory(), bus_factory()
    app = harness.start(
        "--iface", "can0,can1", "--bus-offset", "2", buses={"can0": can0, "can1": can1}
    )
    client = GvretClient(app.port)
    wait_until(lambda: any(c.streaming for c in app.hub.clients), what="binary mode")
    sent = []
    bounds = []
    for i in range(8):
        frame = make_frame(0, 0x100 + i, bytes(range(i)))
        t0 = time.time_ns()
        can0.send(frame)
        can1.send(make_frame(0, 0x1ABCDE00 + i, bytes([0xF1, 0xE7] * 4)[:i], extended=True))
        bounds.append((t0, time.time_ns()))
        sent.append(frame)
    frames = client.wait_frames(16)
    assert len(frames) == 16
    on_bus2 = [f for f in frames if f.bus == 2]
    on_bus3 = [f for f in frames if f.bus == 3]
    assert [(f.can_id, f.extended, f.data) for f in on_bus2] == [
        (0x100 + i, False, bytes(range(i))) for i in range(8)
    ]
    assert [(f.can_id, f.extended, f.data) for f in on_bus3] == [
        (0x1ABCDE00 + i, True, bytes([0xF1, 0xE7] * 4)[:i]) for i in range(8)
    ]
    for frame, (t0, t1) in zip(on_bus2, bounds):
        assert (t0 - app.start_ns) // 1000 <= frame.ts_us <= (t1 - app.start_ns) // 1000 + 1
    client.send(b"\xf1\x0c")
    assert client.wait_reply(0x0C)[0].payload == b"\x04"
    client.close()


def test_no_frames_before_binary_mode(harness, bus_factory):
    can0 = bus_factory()
    app = harness.start("--iface", "can0", buses={"can0": can0})
    telnet = GvretClient(app.port, hello=b"hello\r\n")
    binary = GvretClient(app.port)
    wait_until(lambda: sum(c.streaming for c in app.hub.clients) == 1)
    can0.send(make_frame(0, 0x321, b"\x01"))
    binary.wait_frames(1)
    telnet.send(b"\xf1\x09")
    telnet.wait_reply(0x09)
    assert telnet.frames == []
    telnet.close()
    binary.close()


def test_client_transmit_reaches_the_bus_as_can_frame_bytes(harness, bus_factory):
    can0, can1 = bus_factory(), bus_factory()
    app = harness.start("--iface", "can0,can1", "--can-fd", buses={"can0": can0, "can1": can1})
    client = GvretClient(app.port)
    client.send(bytes.fromhex("F100 23010000 00 03 112233 00"))
    raw = can0.receive()
    assert raw == CAN_FRAME.pack(0x123, 3, 0, b"\x11\x22\x33")
    data = bytes(range(64))
    client.send(b"\xf1\x00" + struct.pack("<IBB", 0x80000000 | 0x18DAF110, 1, 64) + data + b"\x00")
    raw = can1.receive()
    assert len(raw) == 72
    assert raw == CANFD_FRAME.pack(0x80000000 | 0x18DAF110, 64, 0x05, data)
    wait_until(lambda: app.counters()["tx"] == 2, what="tx=2")


def test_bad_transmits_are_refused_and_the_connection_lives_on(harness, bus_factory, caplog):
    can0 = bus_factory()
    app = harness.start("--iface", "can0", buses={"can0": can0})
    client = GvretClient(app.port)
    with caplog.at_level(logging.WARNING, logger="wiretap.server"):
        client.send(bytes.fromhex("F100 23010000 05 01 11 00"))  # no bus 5
        client.send(
            b"\xf1\x00" + struct.pack("<IBB", 0x123, 0, 12) + bytes(12) + b"\x00"
        )  # FD on classic
        client.send(bytes.fromhex("F100 00080000 00 01 11 00"))  # 0x800 does not fit 11 bits
        client.send(bytes.fromhex("F109"))
        client.wait_reply(0x09)
    (handler_client,) = app.hub.clients
    assert handler_client.tx_refused == 3
    assert sum("transmit refused" in r.getMessage() for r in caplog.records) == 1  # rate-limited
    client.send(bytes.fromhex("F100 23010000 00 01 42 00"))
    assert can0.receive() == CAN_FRAME.pack(0x123, 1, 0, b"\x42")


def test_read_only_refuses_every_transmit(harness, bus_factory, caplog):
    can0 = bus_factory()
    app = harness.start("--iface", "can0", "--read-only", buses={"can0": can0})
    client = GvretClient(app.port)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            client.send(bytes.fromhex("F100 23010000 00 01 11 00"))
        client.send(b"\xf1\x09")
        client.wait_reply(0x09)
    can0.test_end.setblocking(False)
    try:
        can0.receive()
        raise AssertionError("a read-only server transmitted")
    except BlockingIOError:
        pass
    assert app.hub.clients[0].tx_refused == 3
    assert sum("read-only" in r.getMessage() for r in caplog.records) == 1


def test_allow_list_refuses_strangers(harness, bus_factory, caplog):
    app = harness.start("--iface", "can0", "--allow", "10.0.0.0/8", buses={"can0": bus_factory()})
    with caplog.at_level(logging.WARNING):
        sock = socket.create_connection(("127.0.0.1", app.port), timeout=5)
        assert sock.recv(10) == b""
    assert sum("not in the allow list" in r.getMessage() for r in caplog.records) == 1
    friendly = harness.start(
        "--iface", "can0", "--allow", "127.0.0.0/8,10.0.0.0/8", buses={"can0": bus_factory()}
    )
    client = GvretClient(friendly.port, hello=b"\xf1\x09")
    client.wait_reply(0x09)


def test_max_clients_closes_the_next_connection(harness, bus_factory, caplog):
    app = harness.start("--iface", "can0", "--max-clients", "2", buses={"can0": bus_factory()})
    clients = [GvretClient(app.port, hello=b"\xf1\x09") for _ in range(2)]
    for client in clients:
        client.wait_reply(0x09)
    with caplog.at_level(logging.WARNING):
        extra = socket.create_connection(("127.0.0.1", app.port), timeout=5)
        assert extra.recv(10) == b""
    assert sum("max_clients=2" in r.getMessage() for r in caplog.records) == 1
    clients[0].close()
    wait_until(lambda: len(app.hub.clients) == 1)
    late = GvretClient(app.port, hello=b"\xf1\x09")
    late.wait_reply(0x09)


def test_fd_dialect_per_client(harness, bus_factory):
    can0 = bus_factory()
    app = harness.start("--iface", "can0", "--can-fd", buses={"can0": can0})
    wiretap = GvretClient(app.port)  # never sends 06 or 09: wiretap dialect
    savvy = GvretClient(app.port, hello=SAVVYCAN_HELLO)  # classic
    savvy.wait_reply(0x09)
    wait_until(lambda: sum(c.streaming for c in app.hub.clients) == 2)
    can0.send(make_frame(0, 0x123, bytes(range(64)), fd=True, brs=True))
    can0.send(make_frame(0, 0x124, b"\x01\x02", fd=True))
    can0.send(make_frame(0, 0x125, b"\x03"))
    assert [(f.can_id, len(f.data), f.cmd) for f in wiretap.wait_frames(3)] == [
        (0x123, 64, 0),
        (0x124, 2, 0),
        (0x125, 1, 0),
    ]
    assert [(f.can_id, f.data) for f in savvy.wait_frames(2)] == [
        (0x124, b"\x01\x02"),
        (0x125, b"\x03"),
    ]
    savvy_conn = next(c for c in app.hub.clients if c.dialect.value == "classic")
    assert savvy_conn.fd_skipped == 1


def test_esp32ret_dialect_sends_cmd_14(harness, bus_factory):
    can0 = bus_factory()
    app = harness.start(
        "--iface", "can0", "--can-fd", "--gvret-fd", "esp32ret", buses={"can0": can0}
    )
    client = GvretClient(app.port, hello=SAVVYCAN_HELLO)
    wait_until(lambda: any(c.streaming for c in app.hub.clients))
    can0.send(make_frame(0, 0x7FF, bytes(range(12)), fd=True))
    (frame,) = client.wait_frames(1)
    assert (frame.cmd, frame.can_id, frame.data) == (0x14, 0x7FF, bytes(range(12)))


def test_stalled_client_costs_only_itself(harness, bus_factory):
    can0 = bus_factory()
    app = harness.start("--iface", "can0", buses={"can0": can0})
    stalled = socket.create_connection(("127.0.0.1", app.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"\xe7\xe7")  # binary mode, then never reads
    fast = GvretClient(app.port)
    wait_until(lambda: sum(c.streaming for c in app.hub.clients) == 2)
    total, step, keepalives = 40_000, 500, 0
    for start in range(0, total, step):
        for i in range(start, start + step):
            can0.send(make_frame(0, i & 0x7FF, struct.pack("<Q", i)))
        fast.send(b"\xf1\x09")
        keepalives += 1
        fast.wait_frames(start + step)
    fast.wait_reply(0x09, keepalives)
    assert [struct.unpack("<Q", f.data)[0] for f in fast.frames] == list(range(total))
    stalled_conn = next(c for c in app.hub.clients if c.frames_sent < total)
    # gvret.md 3: at most ~64 KB waits for a client in the kernel (Linux doubles what is asked).
    sock = stalled_conn.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) <= 64 * 1024
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert stalled_conn.outbox.drops.total > 0
    assert stalled_conn.frames_sent + stalled_conn.outbox.drops.total == total
    assert app.hub.client_drops() == stalled_conn.outbox.drops.total
    stalled.close()


def test_garbage_client_is_survived(harness, bus_factory):
    can0 = bus_factory()
    app = harness.start("--iface", "can0", buses={"can0": can0})
    good = GvretClient(app.port)
    wait_until(lambda: sum(c.streaming for c in app.hub.clients) == 1)
    garbage = socket.create_connection(("127.0.0.1", app.port))
    rng = random.Random(1234)
    garbage.sendall(bytes(rng.getrandbits(8) for _ in range(200_000)))
    for i in range(100):
        can0.send(make_frame(0, 0x200, bytes([i])))
    good.send(b"\xf1\x09")
    good.wait_reply(0x09)
    assert [f.data for f in good.wait_frames(100)] == [bytes([i]) for i in range(100)]
    garbage.close()
    wait_until(lambda: len(app.hub.clients) == 1)
    again = GvretClient(app.port, hello=b"\xf1\x09")
    again.wait_reply(0x09)


def test_transmitting_client_is_not_sent_its_own_frame(harness, bus_factory, tmp_path):
    # The replay bus confirms a transmit at once, as the kernel would; a marker frame read from
    # a seam bus afterwards is then the sender's first frame if its own was held back (the
    # broker keeps order).
    log = tmp_path / "empty.log"
    log.write_text("")
    can0 = bus_factory()
    app = harness.start("--iface", f"can0,replay:{log}", buses={"can0": can0})
    sender = GvretClient(app.port)
    watcher = GvretClient(app.port)
    wait_until(lambda: sum(c.streaming for c in app.hub.clients) == 2)
    sender.send(bytes.fromhex("F100 55050000 01 02 BEEF 00"))  # bus 1: the replay bus
    wait_until(lambda: app.counters()["tx"] == 1, what="tx=1")
    can0.send(make_frame(0, 0x7AA, b"\x01"))
    assert [(f.bus, f.can_id, f.data) for f in watcher.wait_frames(2)] == [
        (1, 0x555, b"\xbe\xef"),
        (0, 0x7AA, b"\x01"),
    ]
    assert [(f.bus, f.can_id) for f in sender.wait_frames(1)] == [(0, 0x7AA)]


def test_echo_command_returns_the_frame_on_bus_0(harness, bus_factory):
    app = harness.start("--iface", "can0", buses={"can0": bus_factory()})
    client = GvretClient(app.port)
    wait_until(lambda: any(c.streaming for c in app.hub.clients))
    client.send(bytes.fromhex("F10B 34020000 00 02 AA55 00"))
    (frame,) = client.wait_frames(1)
    assert (frame.bus, frame.can_id, frame.extended, frame.data) == (0, 0x234, False, b"\xaa\x55")


def test_a_client_that_accepts_nothing_is_disconnected(harness, bus_factory, monkeypatch, caplog):
    monkeypatch.setattr("wiretap.server.STALL_TIMEOUT_S", 1.0)
    can0 = bus_factory()
    app = harness.start("--iface", "can0", buses={"can0": can0})
    stalled = socket.create_connection(("127.0.0.1", app.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"\xe7")
    wait_until(lambda: any(c.streaming for c in app.hub.clients))
    with caplog.at_level(logging.WARNING, logger="wiretap.server"):
        sent = 0
        while app.hub.clients and sent < 200_000:
            for _ in range(1000):
                can0.send(make_frame(0, 0x100, bytes(8)))
            sent += 1000
            time.sleep(0.01)
        wait_until(lambda: not app.hub.clients, what="the stalled client to be dropped")
    assert (
        sum("accepted nothing for 1 s, disconnecting" in r.getMessage() for r in caplog.records)
        == 1
    )
    stalled.close()


def test_ipv6_listener(harness, bus_factory):
    app = harness.start("--iface", "can0", "--host", "::1", buses={"can0": bus_factory()})
    client = GvretClient(app.port, hello=b"\xf1\x09", host="::1")
    client.wait_reply(0x09)


def test_beacon_announces_the_server():
    from wiretap.server import Beacon

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        beacon = Beacon("127.0.0.1", port=listener.getsockname()[1], interval=0.01)
        beacon.start()
        try:
            received = [listener.recv(16) for _ in range(3)]
        finally:
            beacon.stop()
    assert received == [bytes.fromhex("1CEFACED")] * 3


def test_a_client_that_never_reads_its_replies_is_disconnected(harness, bus_factory, caplog):
    app = harness.start("--iface", "can0", buses={"can0": bus_factory()})
    other = GvretClient(app.port, hello=b"\xf1\x09")
    flooder = socket.create_connection(("127.0.0.1", app.port))
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with caplog.at_level(logging.WARNING, logger="wiretap.server"):
        try:
            for _ in range(100):
                flooder.sendall(b"\xf1\x09" * 5000)
        except OSError:
            pass  # the server hung up on it: that is the point
        wait_until(
            lambda: "does not read the replies, disconnecting" in caplog.text,
            what="the flooder to be dropped",
        )
    wait_until(lambda: len(app.hub.clients) == 1)
    other.send(b"\xf1\x09")
    other.wait_reply(0x09, 2)
    flooder.close()


def test_refused_transmits_count_in_tx_fail(harness, bus_factory):
    app = harness.start("--iface", "can0", "--read-only", buses={"can0": bus_factory()})
    client = GvretClient(app.port)
    client.send(bytes.fromhex("F100 23010000 00 01 11 00") * 4 + b"\xf1\x09")
    client.wait_reply(0x09)
    assert app.counters()["tx_fail"] == 4
    client.close()
    wait_until(lambda: not app.hub.clients)
    assert app.counters()["tx_fail"] == 4


def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server_side, _ = listener.accept()
    return server_side, client


def test_an_idle_outbox_is_written_at_once_and_a_cut_write_is_finished_first():
    server_side, client = tcp_pair()
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server_side.setblocking(False)
    outbox = Outbox("test", send_now=server_side.send)
    keepalive_reply = b"\xf1\x09\xde\xad"
    record = bytes(range(20))
    # Idle: written by the caller at once, nothing left for a writer thread.
    outbox.put_reply(keepalive_reply)
    outbox.put_frames(record, 1)
    received = b""
    while len(received) < 24:
        received += client.recv(100)
    assert received == keepalive_reply + record
    assert outbox.take(timeout=0) == (None, False)
    # The client stops reading: at last a write does not go through whole (or at all).
    chunks = []
    while True:
        chunks.append(bytes([len(chunks) % 251]) * QUIET_WRITE_BYTES)
        outbox.put_frames(chunks[-1], 1)
        rest, _ = outbox.take(timeout=0)
        if rest is not None:
            break
    assert chunks[-1].endswith(rest)
    outbox.put_reply(keepalive_reply)  # queued: the cut write owns the socket
    collected = []
    reader = threading.Thread(target=lambda: collected.append(read_to_end(client)))
    reader.start()
    writer = server_side.dup()
    writer.settimeout(10)
    writer.sendall(rest)
    outbox.written()
    assert outbox.take(timeout=0) == (keepalive_reply, False)
    writer.sendall(keepalive_reply)
    outbox.written()
    writer.close()
    server_side.close()
    reader.join(10)
    # The rest of the cut frame data went before the reply: the stream never breaks a message.
    assert collected == [b"".join(chunks) + keepalive_reply]
    client.close()


def read_to_end(sock: socket.socket) -> bytes:
    parts = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(parts)
        parts.append(data)


def test_dialect_does_not_depend_on_how_tcp_splits_the_handshake(harness, bus_factory, caplog):
    can0 = bus_factory()
    app = harness.start("--iface", "can0", "--can-fd", buses={"can0": can0})
    splits = [[SAVVYCAN_HELLO[:cut], SAVVYCAN_HELLO[cut:]] for cut in range(1, 12)]
    splits.append([bytes([b]) for b in SAVVYCAN_HELLO])
    with caplog.at_level(logging.INFO, logger="wiretap.server"):
        for chunks in splits:
            client = GvretClient(app.port, hello=b"")
            client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for chunk in chunks:
                client.send(chunk)
                # A long FD frame and a marker between the parts: sent while the client's
                # handshake is half in.
                can0.send(make_frame(0, 0x123, bytes(range(64)), fd=True, brs=True))
                can0.send(make_frame(0, 0x7EE, b"\x01"))
                time.sleep(0.005)  # a pause between reads; all 12 well inside 1 s
            client.wait_reply(0x09)
            can0.send(make_frame(0, 0x7EF, b"\x02"))
            client.wait_for(lambda c: any(f.can_id == 0x7EF for f in c.frames))
            assert all(len(f.data) <= 8 for f in client.frames), chunks
            (connection,) = app.hub.clients
            assert connection.dialect.value == "classic"
            client.close()
            wait_until(lambda: not app.hub.clients)
    chosen = [r.getMessage() for r in caplog.records if "dialect" in r.getMessage()]
    assert not any("wiretap" in line for line in chosen)


def test_bus_settings_apply_to_the_client_that_made_them(harness, bus_factory, caplog):
    can0, can1 = bus_factory(), bus_factory()
    app = harness.start("--iface", "can0,can1", buses={"can0": can0, "can1": can1})
    savvy = GvretClient(app.port, hello=SAVVYCAN_HELLO)
    other = GvretClient(app.port, hello=SAVVYCAN_HELLO)
    savvy.wait_reply(0x09)
    other.wait_reply(0x09)
    # SavvyCAN's Connections window: bus 0 listen-only at 250 kbit/s, bus 1 off.
    words = struct.pack("<II", 0xE0000000 | 250_000, 0x80000000 | 500_000)
    with caplog.at_level(logging.INFO, logger="wiretap.server"):
        savvy.send(b"\xf1\x05" + words + b"\x00\xf1\x06")
        (_, reply) = savvy.wait_reply(0x06, 2)
        assert reply.payload == bytes.fromhex("1120A10700 0020A10700".replace(" ", ""))
        for _ in range(3):
            savvy.send(bytes.fromhex("F100 23010000 00 01 11 00"))  # bus 0: listen-only
        savvy.send(bytes.fromhex("F100 23010000 01 01 11 00"))  # bus 1: off
        savvy.send(b"\xf1\x09")
        savvy.wait_reply(0x09, 2)
    can0.send(make_frame(0, 0x100, b"\x00"))
    can1.send(make_frame(0, 0x101, b"\x01"))
    can0.send(make_frame(0, 0x102, b"\x02"))
    # (Two buses are two readers: their frames keep their order per bus only.)
    assert sorted((f.bus, f.can_id) for f in other.wait_frames(3)) == [
        (0, 0x100),
        (0, 0x102),
        (1, 0x101),
    ]
    assert [(f.bus, f.can_id) for f in savvy.wait_frames(2)] == [(0, 0x100), (0, 0x102)]
    savvy_conn = next(c for c in app.hub.clients if c.tx_refused)
    assert savvy_conn.tx_refused == 4
    messages = [r.getMessage() for r in caplog.records]
    assert sum("refused: bus 0 is listen-only for this client" in m for m in messages) == 1
    assert sum("refused: bus 1 is switched off by this client" in m for m in messages) == 1
    assert sum("bus 0 is now on, listen-only for this client" in m for m in messages) == 1
    assert sum("bus 1 is now off for this client" in m for m in messages) == 1
    assert sum("at 250000 bit/s (it runs at 500000): not applied" in m for m in messages) == 1
    # The other client's view and transmits are untouched.
    other.send(b"\xf1\x06" + bytes.fromhex("F100 23010000 00 01 11 00"))
    (_, reply) = other.wait_reply(0x06, 2)
    assert reply.payload == bytes.fromhex("0120A10700 0120A10700".replace(" ", ""))
    assert can0.receive() == CAN_FRAME.pack(0x123, 1, 0, b"\x11")


def test_a_speed_change_needs_the_operators_permission(harness, bus_factory, caplog):
    app = harness.start(
        "--iface", "can0", "--reconfigure-interfaces", buses={"can0": bus_factory()}
    )
    client = GvretClient(app.port, hello=SAVVYCAN_HELLO)
    client.wait_reply(0x09)
    with caplog.at_level(logging.INFO, logger="wiretap.server"):
        client.send(b"\xf1\x05" + struct.pack("<II", 0xC0000000 | 125_000, 0) + b"\x00\xf1\x09")
        client.wait_reply(0x09, 2)
    (line,) = [r.getMessage() for r in caplog.records if "125000" in r.getMessage()]
    assert "not applied: can0 is not a kernel CAN interface" in line


def test_extended_buses_reply_describes_the_third_bus(harness, bus_factory):
    buses = {name: bus_factory() for name in ("can0", "can1", "can2")}
    app = harness.start("--iface", "can0,can1,can2", buses=buses)
    client = GvretClient(app.port, hello=SAVVYCAN_HELLO)
    client.send(b"\xf1\x0d")
    (reply,) = client.wait_reply(0x0D)
    assert reply.payload == bytes.fromhex("0120A10700") + bytes(10)
    client.send(b"\xf1\x0e" + struct.pack("<III", 0x80000000 | 500_000, 0, 0) + b"\x00\xf1\x0d")
    (_, reply) = client.wait_reply(0x0D, 2)
    assert reply.payload == bytes.fromhex("0020A10700") + bytes(10)
    buses["can2"].send(make_frame(0, 0x222, b"\x02"))
    buses["can0"].send(make_frame(0, 0x200, b"\x00"))
    assert [(f.bus, f.can_id) for f in client.wait_frames(1)] == [(0, 0x200)]
    assert app.hub.clients[0].fd_skipped == 0


def test_a_paced_client_gets_a_quiet_bus_at_once_and_only_bigger_writes_wait():
    server_side, client = tcp_pair()
    server_side.setblocking(False)
    outbox = Outbox("test", send_now=server_side.send)
    record = bytes(range(20))
    interval = 3600.0  # a pacing interval no test outlives: whatever waits for it, waits
    for _ in range(3):
        outbox.put_frames(record, 1)
    assert outbox.take(timeout=0, paced=True) == (None, False)  # all three went out at once
    bigger = bytes([7]) * (QUIET_WRITE_BYTES + 20)
    outbox.put_frames(bigger, 1)  # for the writer thread, not at once
    data, frames = outbox.take(timeout=0, paced=True)
    assert (data, frames) == (bigger, True)  # no interval yet: it goes
    server_side.sendall(data)
    outbox.written(time.monotonic() + interval)
    outbox.put_frames(record, 1)  # quiet: at once, though the interval has not passed
    assert outbox.take(timeout=0, paced=True) == (None, False)
    outbox.put_frames(bigger, 1)
    assert outbox.take(timeout=0, paced=True) == (None, False)  # this one waits for it
    expected = record * 3 + bigger + record
    received = b""
    while len(received) < len(expected):
        received += client.recv(4096)
    assert received == expected
    client.close()
    server_side.close()
