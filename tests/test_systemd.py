"""systemd's notify protocol, with a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import uuid
from pathlib import Path
from typing import Iterator, List, Sequence

import pytest
from harness import ServerProcess, wait_until

from wiretap import buildinfo, systemd
from wiretap.app import App
from wiretap.config import load_config
from wiretap.frames import Frame

ROOT = Path(__file__).resolve().parent.parent
DEMO_LOG = ROOT / "examples" / "demo.log"
START_TIMEOUT_S = 120  # a loaded box, or an emulated ARM userland, starts Python slowly


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: one message per datagram, as ``KEY=value``
    dicts."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.settimeout(START_TIMEOUT_S)
        self.env = address

    def receive(self) -> dict:
        text = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in text.split("\n"))

    def receive_until(self, key: str) -> List[dict]:
        """Messages up to and including the first one that has ``key``."""
        messages = []
        while True:
            messages.append(self.receive())
            if key in messages[-1]:
                return messages


@pytest.fixture(params=["path", "abstract"])
def fake_systemd(request, tmp_path: Path) -> Iterator[FakeSystemd]:
    if request.param == "path":
        address = str(tmp_path / "notify")
    else:
        address = f"@wiretap-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(address)
    yield fake
    fake.sock.close()


def test_notify_address_takes_paths_and_abstract_names() -> None:
    assert systemd.notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == (
        "/run/systemd/notify"
    )
    assert systemd.notify_address({"NOTIFY_SOCKET": "@/org/systemd/x"}) == "\0/org/systemd/x"
    assert systemd.notify_address({}) is None
    assert systemd.notify_address({"NOTIFY_SOCKET": ""}) is None
    assert systemd.notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_watchdog_interval_is_ours_only_for_our_pid() -> None:
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 30.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "42"}, 42) == 2.5
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "2500000", "WATCHDOG_PID": "7"}, 42) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert systemd.watchdog_interval({}, 42) is None


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = systemd.Notifier({"WATCHDOG_USEC": "1000000"}, lambda: 0.0, lambda: "x")
    assert not notifier.enabled
    assert notifier.watchdog_s is None
    assert notifier.send("READY=1") is False
    notifier.start()
    notifier.stop()


def test_real_server_is_ready_once_listening_then_feeds_the_watchdog_and_says_stopping(
    fake_systemd: FakeSystemd,
) -> None:
    server = ServerProcess(
        "--iface", f"replay:{DEMO_LOG}", "--replay-loop", "--port", "0",
        "--stats-interval", "0",
        env={"NOTIFY_SOCKET": fake_systemd.env, "WATCHDOG_USEC": "2000000"},
    )  # fmt: skip
    try:
        first = fake_systemd.receive()
        assert first["READY"] == "1"
        port = int(re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)", first["STATUS"]).group(1))
        # READY=1 means it: the GVRET port accepts a client at this moment.
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
        assert int(server.wait_line(r"listening on [^ ]+:(\d+) ", START_TIMEOUT_S)[1]) == port
        fed = [m for m in fake_systemd.receive_until("WATCHDOG") if "WATCHDOG" in m]
        fed += [m for m in fake_systemd.receive_until("WATCHDOG") if "WATCHDOG" in m]
        assert [m["WATCHDOG"] for m in fed] == ["1", "1"]
        # STATUS= carries the stats line, frames counted as they are replayed.
        wait_until(
            lambda: int(re.match(r"rx=(\d+) fps=", fake_systemd.receive()["STATUS"]).group(1)) > 0,
            timeout=30,
            what="a STATUS= line with rx > 0",
        )
        assert server.stop() == 0
        last = fake_systemd.receive_until("STOPPING")[-1]
        assert last == {"STOPPING": "1", "STATUS": "shutting down"}
    finally:
        server.kill()


def test_first_log_line_names_version_and_commit() -> None:
    server = ServerProcess("--iface", f"replay:{DEMO_LOG}", "--port", "0")
    try:
        server.wait_line(r"listening on ", timeout=START_TIMEOUT_S)
        assert server.lines[0].endswith(f" INFO wiretap: {buildinfo.describe()} starting")
    finally:
        server.kill()


class Wedge:
    """A consumer that blocks the dispatcher while ``held`` (a bug breaking the never-block
    rule)."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()

    def deliver(self, frames: Sequence[Frame]) -> None:
        if any(frame.can_id == 0x666 for frame in frames):
            self.holding.set()
            self.release.wait(600)  # until the test lets go (it always does, in a finally)


def test_a_wedged_dispatcher_stops_feeding_the_watchdog_and_resumes_after(
    fake_systemd: FakeSystemd, bus_factory, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(systemd, "STALL_MIN_S", 1.0)
    caplog.set_level(logging.WARNING, logger="wiretap.systemd")
    bus = bus_factory()
    config = load_config(
        ["--host", "127.0.0.1", "--port", "0", "--stats-interval", "0", "--iface", "can0"], {}
    )
    env = {"NOTIFY_SOCKET": fake_systemd.env, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": ""}
    app = App(config, {"can0": lambda: bus.reader_end}, environ=env)
    wedge = Wedge()
    app.broker.register(wedge)
    app.start()
    try:
        assert fake_systemd.receive()["READY"] == "1"
        fake_systemd.receive_until("WATCHDOG")
        bus.send(Frame(0, 0x666, False, False, False, False, False, b"\x01", 0, "rx", 0))
        assert wedge.holding.wait(30)
        wait_until(
            lambda: "no longer feeding the systemd watchdog" in caplog.text,
            timeout=30,
            what="the stall to be noticed",
        )
        # Skip what was sent before the stall was noticed; from the first message without
        # WATCHDOG=1 on, until the dispatcher moves again, only STATUS= is sent.
        for _ in range(1000):
            if "WATCHDOG" not in fake_systemd.receive():
                break
        else:
            raise AssertionError("WATCHDOG=1 went on while the dispatcher was wedged")
        later = [fake_systemd.receive() for _ in range(3)]
        assert all("WATCHDOG" not in message and "STATUS" in message for message in later)
        wedge.release.set()
        fake_systemd.receive_until("WATCHDOG")
        assert "dispatcher is running again" in caplog.text
    finally:
        wedge.release.set()
        app.stop()
    assert fake_systemd.receive_until("STOPPING")[-1]["STOPPING"] == "1"
    assert os.environ.get("NOTIFY_SOCKET") != fake_systemd.env


def test_shipped_unit_waits_for_ready_feeds_a_watchdog_and_checks_the_config_first() -> None:
    lines = (ROOT / "wiretap-server.service").read_text().splitlines()
    settings = {}
    for line in lines:
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, value)
    assert settings["Type"] == "notify"
    assert float(settings["WatchdogSec"]) >= 2 * systemd.STALL_MIN_S
    assert settings["ExecStartPre"] == settings["ExecStart"] + " --check-config"
    assert settings["Restart"] == "on-failure"  # a watchdog timeout counts as a failure
