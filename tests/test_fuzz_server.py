"""The whole server fuzzed: several clients send arbitrary byte streams while a well-behaved client
is served. The server stays up, the good client gets every frame and every keepalive reply, and
the log grows with the number of connections, never with the bytes they send."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading

from gvret_client import SAVVYCAN_HELLO, GvretClient
from harness import wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wiretap.frames import make_frame

# Written from docs/gvret.md: the fixed-size argument of each command that has one.
SETTING_LENGTHS = {0x04: 1, 0x05: 8, 0x08: 1, 0x0A: 1, 0x0E: 12}
EXAMPLE_COMMANDS = [
    bytes.fromhex(text.replace(" ", ""))
    for text in (
        "E7 E7",
        "F1 00 23010000 00 03 112233 00",  # a transmit on bus 0
        "F1 00 FFFFFFFF 00 40" + "AA" * 64 + "00",  # an ID that fits nowhere, 64 bytes
        "F1 00 55050000 07 02 BEEF 00",  # no bus 7
        "F1 00 23010000 00 FF" + "F1" * 255 + "00",  # a length no frame has
        "F1 0B 34020000 00 02 AA55 00",  # echo
        "F1 01 00",
        "F1 04 00",
        "F1 05 0000000000000000 00",
        "F1 0E" + "00" * 12,
        "F1 06",
        "F1 09",
    )
]
# What one connection can make the server log, at most, however many bytes it sends (each kind
# once, the interval being longer than the run): connected, binary mode, dialect chosen, flow
# control on, flow control off, frames dropped by flow control, disconnected; ignored commands 04,
# 08, 0A; transmit refused as bad, as read-only, and for each of 3 buses switched off or
# listen-only; each of 3 buses switched, its bit rate asked for; not in binary mode in time, does
# not read its replies, FD frames not sent, not keeping up.
LINES_PER_CONNECTION = 25

piece = st.one_of(
    st.binary(max_size=48),
    st.integers(0, 255).map(lambda cmd: bytes((0xF1, cmd))),
    st.sampled_from(EXAMPLE_COMMANDS).flatmap(
        lambda whole: st.integers(0, len(whole)).map(lambda cut: whole[:cut])  # truncated
    ),
    st.builds(
        lambda can_id, bus, length, data: (
            b"\xf1\x00" + struct.pack("<IBB", can_id, bus, length) + data + b"\x00"
        ),
        st.integers(0, 0xFFFFFFFF),
        st.integers(0, 255),
        st.integers(0, 80),
        st.binary(max_size=80),
    ),
)
repeated = st.tuples(piece, st.integers(2, 300)).map(lambda pair: pair[0] * pair[1])  # a flood
stream = st.lists(st.one_of(piece, repeated), max_size=16).map(b"".join)
hostile_clients = st.lists(st.lists(stream, min_size=1, max_size=4), min_size=1, max_size=4)

EVERY_COMMAND = b"".join(bytes((0xF1, cmd)) for cmd in range(256))
EVERY_COMMAND_FROM_IDLE = b"".join(
    bytes((0xF1, cmd))
    + (struct.pack("<IBB", 0x100, 0, 0) + b"\x00" if cmd in (0x00, 0x0B) else b"")
    + bytes(SETTING_LENGTHS.get(cmd, 0))
    + (b"\x00" if cmd == 0x01 else b"")
    for cmd in range(256)
    if cmd != 0xF1
)


def test_fuzzing_the_whole_server(harness, bus_factory, caplog, monkeypatch):
    # One line per kind for the whole run, so that the bound below does not depend on speed.
    monkeypatch.setattr("wiretap.server.REFUSAL_LOG_INTERVAL_S", 3600.0)
    can0 = bus_factory()
    caplog.set_level(logging.INFO, logger="wiretap")
    app = harness.start("--iface", "can0", "--can-fd", buses={"can0": can0})
    transmitted = []
    threading.Thread(target=_drain, args=(can0.test_end, transmitted), daemon=True).start()
    good = GvretClient(app.port, hello=SAVVYCAN_HELLO)
    good.wait_reply(0x09)
    sent = {"frames": 0, "keepalives": 1, "connections": 1, "bytes": 0}

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(hostile_clients)
    @example([[EVERY_COMMAND]])
    @example([[bytes.fromhex("F10400") * 5000] * 4] * 4)
    @example([[EVERY_COMMAND_FROM_IDLE[:n]] for n in (7, 100, 1000, len(EVERY_COMMAND_FROM_IDLE))])
    @example([[b"\xe7" + EVERY_COMMAND_FROM_IDLE[i : i + 3] for i in range(0, 60, 3)]])
    def fuzz(clients):
        socks = [socket.create_connection(("127.0.0.1", app.port), timeout=10) for _ in clients]
        sent["connections"] += len(socks)
        for round_ in range(max(map(len, clients))):
            for sock, chunks in zip(socks, clients):
                if round_ < len(chunks):
                    with contextlib.suppress(OSError):  # the server may have hung up on it
                        sock.sendall(chunks[round_])
                    sent["bytes"] += len(chunks[round_])
            first = sent["frames"]
            for seq in range(first, first + 5):
                can0.send(make_frame(0, 0x7E0, struct.pack("<Q", seq)))
            sent["frames"] += 5
            good.send(b"\xf1\x09")
            sent["keepalives"] += 1
            good.wait_reply(0x09, sent["keepalives"])
            good.wait_frames(sent["frames"])
        for sock in socks:
            sock.close()
        wait_until(lambda: len(app.hub.clients) == 1, what="the fuzzing clients to be gone")

    fuzz()
    assert [struct.unpack("<Q", f.data)[0] for f in good.frames] == list(range(sent["frames"]))
    assert [(f.bus, f.can_id) for f in good.frames] == [(0, 0x7E0)] * sent["frames"]
    good.close()
    wait_until(lambda: not app.hub.clients, what="the good client to be gone")
    again = GvretClient(app.port, hello=b"\xf1\x09")
    again.wait_reply(0x09)
    # What reached the bus are whole can_frame / canfd_frame structures, nothing else.
    wait_until(lambda: transmitted, what="a fuzzed transmit on can0")
    assert {len(raw) for raw in transmitted} <= {16, 72}
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("wiretap")]
    bound = LINES_PER_CONNECTION * (sent["connections"] + 1) + 5
    assert len(lines) <= bound, "\n".join(lines[-50:])
    assert sent["bytes"] > 100 * len(lines)


def _drain(sock: socket.socket, into: list) -> None:
    """What the server transmits on can0 is read, so the seam never fills up."""
    sock.settimeout(None)
    with contextlib.suppress(OSError):
        while True:
            into.append(sock.recv(128))
