"""Ingest through the real program: ./wiretap-server.py --pg-enable in a subprocess."""

from __future__ import annotations

import re
import signal
import sqlite3
from pathlib import Path
from typing import List

import pytest
from gvret_client import SAVVYCAN_HELLO, GvretClient
from harness import ServerProcess, wait_until
from pg_helpers import fetch
from pgcluster import free_port

from wiretap.sources.replay import read_log

pytestmark = pytest.mark.pg

ROOT = Path(__file__).resolve().parents[2]
DEMO_LOG = ROOT / "examples" / "demo.log"
DEMO = read_log(str(DEMO_LOG))
IN_ORDER = "select array_agg(ts order by row_id) = array_agg(ts order by ts) from public.can_frame"


def demo_ingest(state_dir: Path, *args: str) -> ServerProcess:
    """wiretap-server.py replaying the demo log into PostgreSQL, its spool in ``state_dir``."""
    return ServerProcess(
        "--port", "0", "--stats-interval", "0", "--iface", f"replay:{DEMO_LOG}", "--can-fd",
        "--pg-enable", *args, env={"STATE_DIRECTORY": str(state_dir)},
    )  # fmt: skip


@pytest.fixture
def servers():
    started: List[ServerProcess] = []

    def start(state_dir: Path, *args: str) -> ServerProcess:
        server = demo_ingest(state_dir, *args)
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
    port = server.wait_listening()
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


def test_sighup_mid_replay_stops_like_sigterm_and_stores_every_frame_read(pg, servers, tmp_path):
    # SIGHUP is what closing the terminal of scripts/run.sh sends: a clean stop, never a loss.
    server = servers(tmp_path, "--pg-dsn", pg.dsn, "--replay-speed", "5", "--replay-loop")
    wait_until(lambda: fetch(pg.dsn, "select count(*) from public.can_frame")[0][0] > 0,
               what="the first rows")  # fmt: skip
    assert server.stop(signal.SIGHUP) == 0
    assert sum("SIGHUP: shutting down" in line for line in server.lines) == 1

    read = int(re.search(r" rx=(\d+)", server.final_stats()).group(1))
    assert f"enq={read} wrote={read} dropped=0 spooled=0" in server.final_stats()
    rows = fetch(pg.dsn, "select id, data_bytes from public.can_frame order by row_id")
    assert rows == [(DEMO[i % len(DEMO)].frame.can_id, DEMO[i % len(DEMO)].frame.data)
                    for i in range(read)]  # fmt: skip
