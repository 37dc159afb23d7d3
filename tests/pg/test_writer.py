"""The PostgreSQL writer against a real throw-away cluster: rows, counts, outages, bad rows."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List

import pytest
from pg_helpers import balanced, fetch, row_count, wait_for

from wiretap.frames import Frame, make_frame

pytestmark = pytest.mark.pg

BASE_NS = 1_700_000_000_123_456_789
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
COLUMNS = "ts, id, id_hex, extended, dlc, is_fd, data_bytes, data_hex, bus, dir"


def as_ts(ts_ns: int) -> datetime:
    return EPOCH + timedelta(microseconds=ts_ns // 1000)


def numbered(count: int, start: int = 0) -> List[Frame]:
    """Frames whose ts (µs apart) and payload both carry their number."""
    return [
        make_frame(0, 0x100 + i % 0x600, (start + i).to_bytes(4, "big"),
                   ts_ns=BASE_NS + (start + i) * 1000)
        for i in range(count)
    ]  # fmt: skip


def spool_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("select count(*) from frames").fetchone()[0]


@pytest.mark.parametrize("mode", ["insert", "function", "copy"])
def test_rows_carry_every_field_in_each_mode(pg, make_writer, mode):
    frames = [
        make_frame(0, 0x123, bytes(range(1, 9)), ts_ns=BASE_NS),
        make_frame(2, 0x1ABCDEF0, b"\xaa\xbb\xcc", ts_ns=BASE_NS + 1_001, direction="tx"),
        make_frame(1, 0x7FF, bytes(range(64)), fd=True, brs=True, ts_ns=BASE_NS + 2_999),
        make_frame(0, 0x5, b"", ts_ns=BASE_NS + 1_000_000_000),
        make_frame(3, 0x42, b"\x00\x01", extended=True, fd=True, ts_ns=BASE_NS + 3_000_000_000),
    ]
    writer = make_writer(pg.dsn, mode=mode)
    writer.deliver(frames)
    wait_for(lambda: writer.counters()["wrote"] == len(frames), "rows written")

    rows = fetch(pg.dsn, f"select {COLUMNS} from public.can_frame order by row_id")
    assert rows == [
        (as_ts(BASE_NS), 0x123, "123", False, 8, False, bytes(range(1, 9)), "0102030405060708",
         0, "rx"),
        (as_ts(BASE_NS + 1_001), 0x1ABCDEF0, "1ABCDEF0", True, 3, False, b"\xaa\xbb\xcc",
         "AABBCC", 2, "tx"),
        (as_ts(BASE_NS + 2_999), 0x7FF, "7FF", False, 64, True, bytes(range(64)),
         bytes(range(64)).hex().upper(), 1, "rx"),
        (as_ts(BASE_NS + 1_000_000_000), 0x5, "005", False, 0, False, b"", "", 0, "rx"),
        (as_ts(BASE_NS + 3_000_000_000), 0x42, "00000042", True, 2, True, b"\x00\x01", "0001",
         3, "rx"),
    ]  # fmt: skip
    # µs precision survives the trip (psycopg2 hands back datetimes with microseconds).
    assert rows[0][0].microsecond == 123_456
    assert rows[1][0].microsecond == 123_457
    assert writer.counters() == {
        "queued": 0, "enq": 5, "wrote": 5, "dropped": 0, "spooled": 0, "conn": 1, "rejected": 0,
        "carried": 0,
    }  # fmt: skip


@pytest.mark.parametrize(("setting", "default_dir"), [(None, "tx"), ("tx", "rx"), ("rx", "tx")])
def test_dir_of_received_frames_comes_from_setting_else_default(
    pg, make_writer, setting, default_dir
):
    writer = make_writer(pg.dsn, default_dir=default_dir, dir=setting)
    writer.deliver([make_frame(0, 1, ts_ns=BASE_NS), make_frame(0, 2, ts_ns=BASE_NS + 1000,
                                                                 direction="tx")])  # fmt: skip
    wait_for(lambda: writer.counters()["wrote"] == 2, "rows written")
    expected = setting or default_dir
    assert fetch(pg.dsn, "select dir from public.can_frame order by id") == [(expected,), ("tx",)]


@pytest.mark.parametrize("mode", ["insert", "copy"])
def test_stop_flushes_every_queued_frame_exactly_once(pg, make_writer, mode):
    writer = make_writer(pg.dsn, mode=mode, batch_size=300, flush_interval=10.0)
    frames = numbered(5000)
    for start in range(0, len(frames), 7):
        writer.deliver(frames[start : start + 7])
    writer.stop()

    assert fetch(pg.dsn, "select count(*), count(distinct ts) from public.can_frame") == [
        (5000, 5000)
    ]
    counters = writer.counters()
    assert (counters["enq"], counters["wrote"], counters["dropped"], counters["spooled"]) == (
        5000, 5000, 0, 0,
    )  # fmt: skip


def test_outage_mid_stream_loses_nothing_and_keeps_order(pg, make_writer, tmp_path, pg_log):
    writer = make_writer(pg.dsn, batch_size=50)
    sent = 0
    feeding = threading.Event()
    feeding.set()

    def feed() -> None:
        nonlocal sent
        while feeding.is_set():
            writer.deliver(numbered(10, sent))
            sent += 10
            time.sleep(0.005)

    feeder = threading.Thread(target=feed, name="test-feeder")
    feeder.start()
    try:
        wait_for(lambda: writer.counters()["wrote"] >= 200, "rows before the outage")
        pg.stop()
        wait_for(lambda: writer.counters()["spooled"] >= 200, "frames spooled in the outage")
        assert writer.counters()["conn"] == 0
        pg.start()
        wait_for(lambda: writer.counters()["conn"] == 1, "reconnect")
        wait_for(lambda: writer.counters()["spooled"] == 0, "spool drained while feeding")
        drained_at = writer.counters()["wrote"]
        wait_for(lambda: writer.counters()["wrote"] >= drained_at + 100, "live rows after it")
    finally:
        feeding.clear()
        feeder.join()

    wait_for(lambda: row_count(pg.dsn) == sent, f"all {sent} rows")
    wait_for(lambda: writer.counters()["spooled"] == 0, "spool drained")
    assert fetch(
        pg.dsn,
        "select count(distinct ts), array_agg(ts order by row_id) = array_agg(ts order by ts)"
        " from public.can_frame",
    ) == [(sent, True)]
    counters = writer.counters()
    assert (counters["enq"], counters["wrote"], counters["dropped"]) == (sent, sent, 0)
    assert spool_rows(tmp_path / "spool.db") == 0
    messages = [record.getMessage() for record in pg_log.records]
    assert sum("database unavailable, caching frames to disk" in m for m in messages) == 1
    assert sum(m.startswith("draining ") and m.endswith(" cached frames to database")
               for m in messages) == 1  # fmt: skip
    assert messages.count("cached frames drained, back to live ingest") == 1


def test_spool_left_by_stopped_writer_is_drained_by_the_next(pg, make_writer, tmp_path, pg_log):
    pg.stop()
    first = make_writer(pg.dsn)
    first.deliver(numbered(120))
    wait_for(lambda: first.counters()["spooled"] == 120, "frames spooled")
    first.deliver(numbered(80, 120))
    first.stop()  # the database is down: the queue goes to the spool
    assert spool_rows(tmp_path / "spool.db") == 200

    pg.start()
    second = make_writer(pg.dsn)
    wait_for(lambda: row_count(pg.dsn) == 200, "spooled rows in the database")
    wait_for(lambda: second.counters()["spooled"] == 0, "spool drained")
    assert fetch(
        pg.dsn, "select array_agg(ts order by row_id) = array_agg(ts order by ts)"
        " from public.can_frame"
    ) == [(True,)]  # fmt: skip
    assert second.counters()["wrote"] == 200
    assert "draining 200 cached frames to database" in pg_log.text


POISON_FUNC = r"""
create or replace function public.poisoned_ingest(
    _ts timestamptz, _extended boolean, _is_fd boolean, _id integer default null,
    _id_hex text default null, _dlc smallint default null, _data_bytes bytea default null,
    _bus integer default 0, _dir text default 'rx')
returns bigint language plpgsql as $$
begin
    if _data_bytes = '\xdead'::bytea then
        raise exception 'poisoned frame %', _id;
    end if;
    if _data_bytes = '\xbeef'::bytea then
        _dir := 'up';  -- violates the table's check
    end if;
    return public.ingest_can_frame(_ts, _extended, _is_fd, _id, _id_hex, _dlc, _data_bytes,
                                   _bus, _dir);
end $$;
"""


def test_poisoned_rows_are_logged_counted_and_skipped(pg, make_writer, pg_log):
    pg.psql("-c", POISON_FUNC)
    frames = numbered(20)
    frames[5] = frames[5]._replace(data=b"\xde\xad")
    frames[13] = frames[13]._replace(data=b"\xbe\xef")
    writer = make_writer(pg.dsn, mode="function", func="public.poisoned_ingest", batch_size=50)
    writer.deliver(frames)
    wait_for(lambda: writer.counters()["wrote"] == 18, "good rows written")

    stored = fetch(pg.dsn, "select data_bytes from public.can_frame order by row_id")
    assert [row[0] for row in stored] == [
        frame.data for i, frame in enumerate(frames) if i not in (5, 13)
    ]
    counters = writer.counters()
    assert (counters["rejected"], counters["dropped"], counters["conn"]) == (2, 2, 1)
    rejections = [r.getMessage() for r in pg_log.records if "database rejected frame" in r.message]
    balanced(writer)
    assert len(rejections) == 2
    assert "DEAD" in rejections[0] and "poisoned frame 261" in rejections[0]
    assert "BEEF" in rejections[1] and "can_frame_dir_check" in rejections[1]


@pytest.mark.parametrize(
    ("dsn", "said"),
    [
        ("host=127.0.0.1 port={port} user=nobody password=hunter2 dbname=x",
         "database unavailable, caching frames to disk"),
        ("postgresql://nobody:hunter2@127.0.0.1:{port}/x",
         "database unavailable, caching frames to disk"),
        ("host=127.0.0.1 port={port} password='hunter2",  # libpq cannot parse it: a mistake
         "Fix: libpq cannot use the connection string: correct the DSN"),
    ],
)  # fmt: skip
def test_unreachable_database_at_start_spools_and_says_so(make_writer, tmp_path, pg_log, dsn, said):
    from pgcluster import free_port

    writer = make_writer(dsn.format(port=free_port()))
    writer.deliver(numbered(10))
    wait_for(lambda: writer.counters()["spooled"] == 10, "frames spooled")
    assert writer.counters()["conn"] == 0
    writer.stop()
    assert spool_rows(tmp_path / "spool.db") == 10
    assert said in pg_log.text
    assert "127.0.0.1" in pg_log.text  # the log says which database
    assert "hunter2" not in pg_log.text


def test_full_queue_and_full_spool_drop_visibly(make_writer, pg_log):
    from pgcluster import free_port

    writer = make_writer(f"host=127.0.0.1 port={free_port()}", queue_size=100, cache_max_mb=0)
    writer.deliver(numbered(80))
    writer.deliver(numbered(15, 80))
    writer.deliver(numbered(55, 95))
    assert writer.counters()["dropped"] == 50
    writer.stop()
    assert writer.counters()["dropped"] == 150
    assert "queue high water mark: 80 % (80 of 100 frames)" in pg_log.text
    assert "queue high water mark: 95 % (95 of 100 frames)" in pg_log.text
    assert "queue FULL" in pg_log.text
