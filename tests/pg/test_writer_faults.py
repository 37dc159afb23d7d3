"""The PostgreSQL writer under faults: a statement stuck at shutdown, a spool that cannot delete,
a spool that stays full through a long drain, a statement that holds the writer up."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import List

import psycopg2
import pytest
from pg_helpers import balanced, fetch, row_count, wait_for
from test_writer import BASE_NS, numbered, spool_rows

from wiretap.pg.spool import Row, Spool

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
    spool.append(1, numbered_rows(count))
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
        assert balanced(writer)["spooled"] == 250
    finally:
        locker.rollback()
        locker.close()

    second = make_writer(pg.dsn)
    wait_for(lambda: second.counters()["spooled"] == 0 and row_count(pg.dsn) >= 250, "drain")
    assert stored_exactly_once_in_order(pg.dsn, 250)
    assert "did not stop" not in pg_log.text


def refuse_deletes(path: Path) -> None:
    with sqlite3.connect(path) as db:  # SQLite itself refuses, as it does on a full disk
        db.execute(
            "create trigger refuse_delete before delete on frames"
            " begin select raise(abort, 'database or disk is full'); end"
        )


def test_a_spool_that_cannot_delete_stored_rows_never_writes_them_twice(
    pg, make_writer, tmp_path, pg_log
):
    path = tmp_path / "spool.db"
    prefilled_spool(path, 500)
    refuse_deletes(path)
    writer = make_writer(pg.dsn, batch_size=100)
    # The first batch is committed, its delete fails: draining waits for the delete.
    wait_for(lambda: writer.counters()["wrote"] == 100, "the first batch stored")
    wait_for(lambda: "cannot delete stored frames" in pg_log.text, "the failed delete logged")
    assert row_count(pg.dsn) == 100
    assert balanced(writer)["spooled"] == 400
    writer.stop()  # the stored batch is still in the file, with its transaction id
    assert spool_rows(path) == 500

    second = make_writer(pg.dsn, batch_size=100)  # asks PostgreSQL, finds it committed
    wait_for(lambda: second.counters()["wrote"] == 100, "the stored batch recognised")
    assert row_count(pg.dsn) == 100
    with sqlite3.connect(path) as db:
        db.execute("drop trigger refuse_delete")
    wait_for(lambda: second.counters()["spooled"] == 0, "every spooled row stored")
    second.stop()
    assert stored_exactly_once_in_order(pg.dsn, 500)
    assert spool_rows(path) == 0
    assert balanced(second)["committed"] == 500  # the carried 500, none twice


def test_a_statement_that_holds_the_writer_up_moves_the_queue_to_the_spool(
    pg, make_writer, tmp_path, pg_log
):
    locker = psycopg2.connect(pg.dsn)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE public.can_frame IN ACCESS EXCLUSIVE MODE")
        writer = make_writer(pg.dsn, batch_size=100, queue_size=1000)
        frames = numbered(1000)
        writer.deliver(frames[:100])
        wait_for(lambda: writer_waits_for_lock(pg.dsn), "the writer's probe to wait for the lock")
        writer.deliver(frames[100:])  # 95 % of the queue while the writer waits
        # Not dependent on the writer: the keeper moves the queue to the spool meanwhile.
        wait_for(lambda: writer.counters()["spooled"] == 1000, "the queue to move to the spool")
        assert balanced(writer)["dropped"] == 0
    finally:
        locker.rollback()
        locker.close()
    wait_for(lambda: row_count(pg.dsn) >= 1000, "every frame stored", timeout=60)
    writer.stop()
    assert stored_exactly_once_in_order(pg.dsn, 1000)
    assert balanced(writer)["committed"] == 1000
    # A statement that only waits is not abandoned: the database answers in the end.
    assert "abandoning" not in pg_log.text
