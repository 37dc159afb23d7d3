"""The PostgreSQL writer under faults: a statement stuck at shutdown, a spool that cannot delete,
a spool that stays full through a long drain."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import List

import psycopg2
import pytest
from pg_helpers import fetch, row_count, wait_for
from test_writer import BASE_NS, numbered, spool_rows

from wiretap.pg.spool import Row, Spool, row_cost

pytestmark = pytest.mark.pg


def spooled_frames(path: Path) -> int:
    spool = Spool(str(path), 1 << 30)
    try:
        return spool.count
    finally:
        spool.close()


def numbered_rows(count: int) -> List[Row]:
    """Spool rows of ``numbered(count)``, as a previous run would have left them."""
    return [
        ((BASE_NS + i * 1000) // 1000, 0x100 + i % 0x600, False, 4, False, i.to_bytes(4, "big"), 0,
         "rx")
        for i in range(count)
    ]  # fmt: skip


def prefilled_spool(path: Path, count: int) -> None:
    spool = Spool(str(path), 1 << 30)
    spool.append(numbered_rows(count))
    spool.close()


def stored_exactly_once_in_order(dsn: str, count: int) -> bool:
    return fetch(
        dsn,
        "select count(*), count(distinct ts),"
        " array_agg(ts order by row_id) = array_agg(ts order by ts) from public.can_frame",
    ) == [(count, count, True)]


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
        # The default timeout: the lock is never released, so stop() still has to cancel the
        # statement, and the time left to park 250 rows is not a hidden speed requirement.
        writer.stop()
        assert not writer._thread.is_alive(), "the writer thread outlived stop()"
        assert spooled_frames(tmp_path / "spool.db") == 250
        assert writer.counters()["dropped"] == 0
    finally:
        locker.rollback()
        locker.close()

    second = make_writer(pg.dsn)
    wait_for(lambda: second.counters()["spooled"] == 0 and row_count(pg.dsn) >= 250, "drain")
    assert stored_exactly_once_in_order(pg.dsn, 250)
    assert "did not stop" not in pg_log.text


def test_a_spool_that_cannot_delete_stored_rows_does_not_write_them_again(
    pg, make_writer, tmp_path, pg_log
):
    path = tmp_path / "spool.db"
    prefilled_spool(path, 500)
    with sqlite3.connect(path) as db:  # SQLite itself refuses, as it does on a full disk
        db.execute(
            "create trigger refuse_delete before delete on frames"
            " begin select raise(abort, 'database or disk is full'); end"
        )
    writer = make_writer(pg.dsn, batch_size=100)
    wait_for(lambda: writer.counters()["spooled"] == 0, "every spooled row stored")
    assert stored_exactly_once_in_order(pg.dsn, 500)
    assert spool_rows(path) == 500  # none deleted: the writer went on by its in-memory mark

    with sqlite3.connect(path) as db:
        db.execute("drop trigger refuse_delete")
    wait_for(lambda: spool_rows(path) == 0, "the delete retried")
    assert stored_exactly_once_in_order(pg.dsn, 500)
    failures = [r for r in pg_log.records if "cannot delete stored frames" in r.getMessage()]
    assert len(failures) == 1


def test_a_spool_full_through_a_long_drain_is_logged_once(pg, make_writer, tmp_path, pg_log):
    prefilled_spool(tmp_path / "spool.db", 200)
    spool_max_mb = 200 * row_cost(numbered_rows(1)[0]) / (1024 * 1024)  # full already
    writer = make_writer(pg.dsn, queue_size=1000, batch_size=20, cache_max_mb=spool_max_mb)
    # Above the spill level for 10 drained batches: each one frees room that the queue refills.
    writer.deliver(numbered(1000, 200))
    wait_for(lambda: writer.counters()["spooled"] == 0 and row_count(pg.dsn) >= 1200, "drain")
    assert stored_exactly_once_in_order(pg.dsn, 1200)
    assert writer.counters()["dropped"] == 0
    assert sum(" is full " in r.getMessage() for r in pg_log.records) == 1


def test_a_statement_that_holds_the_writer_up_is_cancelled_before_the_queue_overflows(
    pg, make_writer, tmp_path, pg_log
):
    locker = psycopg2.connect(pg.dsn)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE public.can_frame IN ACCESS EXCLUSIVE MODE")
        writer = make_writer(pg.dsn, batch_size=100, queue_size=1000)
        frames = numbered(1050)
        writer.deliver(frames[:100])
        wait_for(lambda: writer_waits_for_lock(pg.dsn), "the writer's insert to wait for the lock")
        writer.deliver(frames[100:])  # 95 % of the queue while the insert waits
        wait_for(lambda: writer.counters()["queued"] == 0, "the queue to move to the spool")
        assert spooled_frames(tmp_path / "spool.db") == 1050
        assert writer.counters()["dropped"] == 0
    finally:
        locker.rollback()
        locker.close()
    wait_for(lambda: row_count(pg.dsn) >= 1050, "every frame stored", timeout=60)
    writer.stop()
    assert stored_exactly_once_in_order(pg.dsn, 1050)
    assert writer.counters()["dropped"] == 0
    messages = [r.getMessage() for r in pg_log.records]
    assert messages.count("the database holds the writer up, moving the queue to the spool") == 1
