"""Ingest through the real program: ./wiretap-server.py --pg-enable in a subprocess."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

import pytest
from gvret_client import SAVVYCAN_HELLO, GvretClient
from pg_helpers import fetch
from pgcluster import free_port

from wiretap.sources.replay import read_log

pytestmark = pytest.mark.pg

ROOT = Path(__file__).resolve().parents[2]
DEMO_LOG = ROOT / "examples" / "demo.log"
DEMO = read_log(str(DEMO_LOG))
IN_ORDER = "select array_agg(ts order by row_id) = array_agg(ts order by ts) from public.can_frame"


class Server:
    """wiretap-server.py replaying the demo log into PostgreSQL; stderr collected line by line."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        command = [
            sys.executable, str(ROOT / "wiretap-server.py"), "--host", "127.0.0.1", "--port", "0",
            "--stats-interval", "0", "--iface", f"replay:{DEMO_LOG}", "--can-fd", "--pg-enable",
            *args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "STATE_DIRECTORY": str(state_dir)}
        env.pop("PG_DSN", None)
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float = 20.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        self._reader.join(5)
        return code

    def final_stats(self) -> str:
        return [line for line in self.lines if " stats rx=" in line][-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def servers():
    started: List[Server] = []

    def start(state_dir: Path, *args: str) -> Server:
        server = Server(state_dir, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


def spool_count(state_dir: Path) -> int:
    with sqlite3.connect(state_dir / "wiretap-spool.db") as db:
        return db.execute("select count(*) from frames").fetchone()[0]


@pytest.mark.parametrize("mode", ["insert", "function", "copy"])
def test_every_demo_frame_becomes_one_row_after_sigterm(pg, servers, tmp_path, mode):
    server = servers(tmp_path, "--pg-dsn", pg.dsn, "--pg-mode", mode, "--replay-speed", "100")
    server.wait_line(r"end of log, \d+ frames")
    assert server.stop() == 0  # frames still queued at this point are flushed on the way out

    rows = fetch(pg.dsn, "select bus, id, extended, is_fd, data_bytes, dir from public.can_frame"
                 " order by row_id")  # fmt: skip
    assert rows == [
        (0 if line.iface == "can0" else 1, line.frame.can_id, line.frame.extended, line.frame.fd,
         line.frame.data, "rx")
        for line in DEMO
    ]  # fmt: skip
    assert f"enq={len(DEMO)} wrote={len(DEMO)} dropped=0 spooled=0" in server.final_stats()


def test_server_restarted_while_database_down_drains_its_spool(pg, servers, tmp_path):
    pg.stop()
    first = servers(tmp_path, "--pg-dsn", pg.dsn, "--replay-speed", "100")
    first.wait_line("database unavailable, caching frames to disk")
    first.wait_line(r"end of log, \d+ frames")
    assert first.stop() == 0  # the database is still down: the queue goes to the spool
    assert spool_count(tmp_path) == len(DEMO)

    pg.start()
    second = servers(tmp_path, "--pg-dsn", pg.dsn, "--replay-speed", "100")
    second.wait_line(f"draining {len(DEMO)} cached frames to database")
    second.wait_line("cached frames drained")
    second.wait_line(r"end of log, \d+ frames")
    assert second.stop() == 0

    assert fetch(pg.dsn, "select count(*) from public.can_frame") == [(2 * len(DEMO),)]
    assert fetch(pg.dsn, IN_ORDER) == [(True,)]
    assert spool_count(tmp_path) == 0


def test_live_stream_and_keepalives_go_on_while_database_is_unreachable(servers, tmp_path):
    dsn = f"host=127.0.0.1 port={free_port()} user=wiretap password=hunter2 dbname=wiretap"
    server = servers(tmp_path, "--pg-dsn", dsn, "--replay-speed", "20", "--replay-loop")
    port = int(server.wait_line(r"listening on [^ ]+:(\d+) ").group(1))
    server.wait_line("database unavailable, caching frames to disk")

    client = GvretClient(port, hello=SAVVYCAN_HELLO)
    try:
        for keepalives in range(1, 11):
            client.send(b"\xf1\x09")
            client.wait_reply(0x09, keepalives)
        client.wait_frames(500)
    finally:
        client.close()
    assert server.stop() == 0
    final = server.final_stats()
    enq = int(re.search(r" enq=(\d+)", final).group(1))
    assert enq >= 500
    assert f"wrote=0 dropped=0 spooled={enq} conn=0" in final
    assert spool_count(tmp_path) == enq
    assert not any("hunter2" in line for line in server.lines)
