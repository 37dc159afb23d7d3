"""The real program as a user runs it: ./wiretap-server.py in a subprocess."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from gvret_client import SAVVYCAN_HELLO, GvretClient
from harness import ServerProcess

from wiretap.sources.replay import read_log

ROOT = Path(__file__).resolve().parent.parent
DEMO_LOG = ROOT / "examples" / "demo.log"


@pytest.fixture
def processes():
    started: List[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        process = ServerProcess(*args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def test_demo_replay_reaches_savvycan_with_every_frame_and_its_timing(processes):
    speed = 20
    log = read_log(str(DEMO_LOG))
    server = processes(
        "--iface", f"replay:{DEMO_LOG}", "--can-fd", "--replay-speed", str(speed),
        "--replay-loop", "--port", "0", "--stats-interval", "0",
    )  # fmt: skip
    client = GvretClient(server.wait_listening(), hello=SAVVYCAN_HELLO)
    (listening,) = [line for line in server.lines if "listening on" in line]
    assert listening.endswith(f"buses: replay:{DEMO_LOG}:can0=0, replay:{DEMO_LOG}:can1=1")
    client.send(b"\xf1\x0d")
    client.wait_reply(0x06)
    client.wait_reply(0x0D)
    # SavvyCAN is in the classic dialect: FD frames above 8 bytes are not sent to it.
    expected = [
        (0 if line.iface == "can0" else 1, line.frame.can_id, line.frame.data, line.ts_ns)
        for line in log
        if len(line.frame.data) <= 8
    ]
    keepalives = 0
    deadline = time.monotonic() + 60
    while len(client.frames) < 2 * len(expected) + 50 and time.monotonic() < deadline:
        client.send(b"\xf1\x09")  # SavvyCAN's 250 ms tick, faster
        keepalives += 1
        time.sleep(0.05)
    client.wait_reply(0x09, keepalives)
    received = [(f.bus, f.can_id, f.data) for f in client.frames]
    wanted = [entry[:3] for entry in expected]
    starts = [
        i for i in range(len(received) - len(wanted) + 1) if received[i : i + len(wanted)] == wanted
    ]
    assert starts, "no complete pass of the log arrived in order"
    window = client.frames[starts[0] : starts[0] + len(wanted)]
    first_us, first_log_ns = window[0].ts_us, expected[0][3]
    for got, (_, _, _, log_ns) in zip(window, expected):
        log_delta_us = (log_ns - first_log_ns) / 1000 / speed
        assert abs((got.ts_us - first_us) % 2**32 - log_delta_us) <= 1
    assert server.stop() == 0


def test_sigterm_stops_cleanly_with_exit_0(processes):
    server = processes("--iface", f"replay:{DEMO_LOG}", "--port", "0", "--stats-interval", "0")
    client = GvretClient(server.wait_listening(), hello=SAVVYCAN_HELLO)
    client.wait_reply(0x09)
    assert server.stop(signal.SIGTERM, timeout=10) == 0
    assert client.closed.wait(5)
    assert sum("SIGTERM: shutting down" in line for line in server.lines) == 1
    # The final stats line, followed at most by the client's own "disconnected" line (its handler
    # may finish after the stats were taken; the log writes it rather than lose it).
    last_stats = max(i for i, line in enumerate(server.lines) if " stats rx=" in line)
    after = server.lines[last_stats + 1 :]
    assert all(" disconnected (" in line for line in after), after
    assert sum(" disconnected (" in line for line in server.lines) == 1


def test_sigint_stops_cleanly_too(processes):
    server = processes("--iface", f"replay:{DEMO_LOG}", "--port", "0")
    server.wait_listening()
    assert server.stop(signal.SIGINT) == 0
    assert sum("SIGINT: shutting down" in line for line in server.lines) == 1
    assert server.lines[-1].split(": ", 1)[-1].startswith("stats rx=")


def test_port_taken_is_one_clear_line_and_exit_1(processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = processes("--iface", f"replay:{DEMO_LOG}", "--port", str(port))
        assert server.exit_code() == 1
    errors = [line for line in server.lines if "ERROR" in line]
    assert len(errors) == 1
    assert f"cannot listen on 127.0.0.1:{port}: the port is already in use" in errors[0]


def test_too_many_buses_is_a_configuration_error(processes, tmp_path):
    log = tmp_path / "wide.log"
    log.write_text("".join(f"(1700000000.000000) can{i} 100#01\n" for i in range(4)))
    server = processes("--iface", f"replay:{log}", "--bus-offset", "14", "--port", "0")
    assert server.exit_code() == 2
    assert server.lines == [
        f"config error: server.iface = replay:{log} with bus_offset 14 needs GVRET buses 14..17 "
        "(a replay log brings one per interface in it), but there are only 16 (0..15)"
    ]
    check = subprocess.run(
        [sys.executable, str(ROOT / "wiretap-server.py"), "--check-config",
         "--iface", f"replay:{log}", "--bus-offset", "14"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 2 and "there are only 16 (0..15)" in check.stderr


def test_stats_line_reports_what_was_read(processes, tmp_path):
    log = tmp_path / "three.log"
    log.write_text("".join(f"(1700000000.00000{i}) can0 10{i}#0{i}\n" for i in range(3)))
    server = processes("--iface", f"replay:{log}", "--port", "0", "--stats-interval", "0.2")
    server.wait_listening()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(" rx=3 " in line for line in server.lines):
        time.sleep(0.05)
    line = next((line for line in server.lines if " rx=3 " in line), "\n".join(server.lines))
    assert re.search(
        r"stats rx=3 fps=[\d.]+ clients=0 client_drops=0 kernel_drops=0 tx=0 tx_fail=0 "
        r"queued=0 enq=0 wrote=0 dropped=0 spooled=0 conn=0 carried=0 outside=0 node=[\w.:-]+ "
        r"error_frames=0 bus_off=0$",
        line,
    ), line
    assert server.stop() == 0


def test_an_unusable_spool_path_is_one_clear_line_and_exit_1(processes, tmp_path):
    config = tmp_path / "wiretap-server.toml"
    (tmp_path / "a-file").write_text("")
    config.write_text(
        "[postgres]\nenable = true\n"
        'dsn = "postgresql://nobody@127.0.0.1:1/none"\n'
        f'cache_path = "{tmp_path}/a-file/folder/spool.db"\n'  # a missing folder is created
    )
    server = processes("-C", str(config), "--iface", f"replay:{DEMO_LOG}", "--port", "0")
    assert server.exit_code() == 1
    errors = [line for line in server.lines if "ERROR" in line]
    assert len(errors) == 1 and "cannot start:" in errors[0], server.lines


def test_sigterm_with_stalled_clients_still_exits_within_10_s(processes):
    server = processes(
        "--iface", f"replay:{DEMO_LOG}", "--replay-speed", "50", "--replay-loop",
        "--port", "0", "--stats-interval", "0",
    )  # fmt: skip
    port = server.wait_listening()
    stalled = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"\xe7\xe7")  # binary mode, then never read
        stalled.append(sock)
    deadline = time.monotonic() + 30
    while not any("is not keeping up" in line for line in server.lines):
        assert time.monotonic() < deadline, "no client fell behind"
        time.sleep(0.05)
    assert server.stop(signal.SIGTERM, timeout=10) == 0
    for sock in stalled:
        sock.close()
