"""Hostile and broken peers: what they can make the server log, hold, or keep open."""

from __future__ import annotations

import logging
import re
import socket
import threading

from gvret_client import GvretClient
from harness import wait_until

from wiretap.server import GvretHandler

SUPPRESSED = re.compile(r"\((\d+) more suppressed\)")
HELD_AT_DISCONNECT = re.compile(r"disconnected \(.*, (\d+) log lines suppressed\)")


def _suppressed_in(messages, pattern=SUPPRESSED):
    return sum(int(m.group(1)) for m in map(pattern.search, messages) if m)


def test_a_command_flood_costs_one_line_and_the_count_of_the_rest(
    harness, bus_factory, caplog, monkeypatch
):
    # An interval no test run reaches: exactly one line per kind, the rest counted.
    monkeypatch.setattr("wiretap.server.PEER_LOG_INTERVAL_S", 3600.0)
    app = harness.start("--iface", "can0", buses={"can0": bus_factory()})
    flood = 20_000
    with caplog.at_level(logging.INFO, logger="wiretap.server"):
        client = GvretClient(app.port, hello=b"\xe7\xe7")
        for _ in range(flood // 1000):
            client.send(bytes.fromhex("F10400") * 1000)  # set digital out: ignored, logged
        client.send(bytes.fromhex("F100 23010000 07 01 11 00") * 50)  # no bus 7: refused
        client.send(b"\xf1\x09")
        client.wait_reply(0x09)
        client.close()
        wait_until(lambda: "disconnected" in caplog.text, what="the disconnected line")
    messages = [r.getMessage() for r in caplog.records]
    ignoring = [m for m in messages if "ignoring command 04" in m]
    refused = [m for m in messages if "transmit refused" in m]
    (disconnected,) = [m for m in messages if "disconnected" in m]
    assert len(ignoring) == 1 and len(refused) == 1
    assert _suppressed_in(ignoring) + _suppressed_in(refused) == 0
    # Every line held back is counted when the client leaves: 19,999 + 49.
    assert _suppressed_in([disconnected], HELD_AT_DISCONNECT) == flood - 1 + 49
    assert len(messages) == 5  # connected, binary mode, the two above, disconnected


def test_connecting_in_a_loop_past_max_clients_costs_one_line(harness, bus_factory, caplog):
    app = harness.start("--iface", "can0", "--max-clients", "1", buses={"can0": bus_factory()})
    member = GvretClient(app.port, hello=b"\xf1\x09")
    member.wait_reply(0x09)
    with caplog.at_level(logging.WARNING, logger="wiretap.server"):
        for _ in range(50):
            with socket.create_connection(("127.0.0.1", app.port), timeout=10) as extra:
                assert extra.recv(10) == b""
    refused = [r.getMessage() for r in caplog.records if "max_clients=1" in r.getMessage()]
    assert len(refused) == 1
    assert app.server.peer_log.suppressed_total == 49


def test_a_connection_that_comes_in_during_shutdown_is_closed_too(
    harness, bus_factory, monkeypatch
):
    # Hold a handler between its setup and its registration while the server stops: the window
    # in which a snapshot of the clients misses it.
    past_setup, resume = threading.Event(), threading.Event()
    setup = GvretHandler.setup

    def held_setup(handler):
        setup(handler)
        past_setup.set()
        resume.wait(60)

    monkeypatch.setattr(GvretHandler, "setup", held_setup)
    app = harness.start("--iface", "can0", buses={"can0": bus_factory()})
    late = socket.create_connection(("127.0.0.1", app.port), timeout=10)
    assert past_setup.wait(10)
    app.stop()
    resume.set()
    late.sendall(b"\xe7\xe7\xf1\x09")
    assert late.recv(10) == b""  # closed by the server, unserved
    assert app.hub.clients == ()
    late.close()
