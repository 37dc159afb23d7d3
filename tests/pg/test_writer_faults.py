"""The PostgreSQL writer under faults: a statement stuck at shutdown, a spool that cannot delete,
a spool that stays full through a long drain."""

from __future__ import annotations

from pathlib import Path

import psycopg2
import pytest
from pg_helpers import fetch, row_count, wait_for
from test_writer import numbered

from wiretap.pg.spool import Spool

pytestmark = pytest.mark.pg


def spooled_frames(path: Path) -> int:
    spool = Spool(str(path), 1 << 30)
    try:
        return spool.count
    finally:
        spool.close()


def writer_waits_for_lock(dsn: str) -> bool:
    return fetch(
        dsn,
        "select count(*) from pg_stat_activity"
        " where application_name = 'wiretap-server' and wait_event_type = 'Lock'",
    ) == [(1,)]


def test_stop_while_a_statement_is_stuck_parks_everything_in_the_spool(
    pg, make_writer, tmp_path, pg_log
):
    locker = psycopg2.connect(pg.dsn)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE public.can_frame IN ACCESS EXCLUSIVE MODE")
        writer = make_writer(pg.dsn, batch_size=100)
        writer.deliver(numbered(250))
        wait_for(lambda: writer_waits_for_lock(pg.dsn), "the writer's insert to wait for the lock")
        writer.stop(timeout=3)
        # stop() has returned: whatever the thread did not park by now is lost at exit.
        assert spooled_frames(tmp_path / "spool.db") == 250
        assert writer.counters()["dropped"] == 0
    finally:
        locker.rollback()
        locker.close()

    second = make_writer(pg.dsn)
    wait_for(lambda: second.counters()["spooled"] == 0 and row_count(pg.dsn) >= 250, "drain")
    assert fetch(
        pg.dsn,
        "select count(*), count(distinct ts),"
        " array_agg(ts order by row_id) = array_agg(ts order by ts) from public.can_frame",
    ) == [(250, 250, True)]
    assert "did not stop" not in pg_log.text
