"""The partitioned can_frame: node per row, partitions by day, DEFAULT for frames outside them,
retention, the inventory, and a plain table of an existing database."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import List

import psycopg2
import pytest
from pg_helpers import fetch, wait_for

from wiretap.frames import Frame, make_frame
from wiretap.pg.partitions import PartitionKeeper

pytestmark = pytest.mark.pg

PLAIN_SCHEMA = Path(__file__).resolve().parent / "plain_schema.sql"
INVENTORY = (
    "select node, bus, id, hour, frames, first_ts, last_ts from public.can_inventory order by 1, 2,"
    " 3, 4"
)
INVENTORY_FROM_ROWS = (
    "select node, bus, id, public.can_hour(ts), count(*), min(ts), max(ts) from public.can_frame"
    " group by 1, 2, 3, 4 order by 1, 2, 3, 4"
)


def utc_midnight(days_from_today: int) -> datetime:
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=days_from_today)


def ns(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def frames_at(moments: List[datetime], bus: int = 0, can_id: int = 0x123) -> List[Frame]:
    return [
        make_frame(bus, can_id, i.to_bytes(2, "big"), ts_ns=ns(m)) for i, m in enumerate(moments)
    ]


@pytest.fixture
def keepers():
    started: List[PartitionKeeper] = []

    def start(dsn: str, node: str = "node-a", **settings: object) -> PartitionKeeper:
        keeper = PartitionKeeper(dsn, node, **settings)
        keeper.start()
        started.append(keeper)
        return keeper

    yield start
    for keeper in started:
        keeper.stop()


@pytest.fixture(autouse=True)
def standard_partitions(pg):
    """Each test starts and ends with the partitions init_schema.sql makes, and no others."""

    def reset() -> None:
        for (name,) in fetch(pg.dsn, "select partition::text from public.can_frame_partitions()"
                             " where lo is not null"):  # fmt: skip
            pg.psql("-c", f"drop table public.{name}")
        pg.psql("-c", "select public.can_frame_create_partitions()")

    reset()
    yield
    reset()


def partition_of(dsn: str) -> List[tuple]:
    return fetch(dsn, "select tableoid::regclass::text, count(*) from public.can_frame group by 1"
                 " order by 1")  # fmt: skip


@pytest.mark.parametrize("mode", ["insert", "copy"])
def test_a_write_across_midnight_lands_in_two_day_partitions(pg, make_writer, mode):
    midnight = utc_midnight(1)
    moments = [midnight - timedelta(microseconds=1), midnight, midnight + timedelta(hours=1)]
    writer = make_writer(pg.dsn, node="node-a", mode=mode)
    writer.deliver(frames_at(moments))
    wait_for(lambda: writer.counters()["wrote"] == 3, "rows written")
    today, tomorrow = (f"can_frame_{d:%Y%m%d}" for d in (utc_midnight(0), midnight))
    assert partition_of(pg.dsn) == [(today, 1), (tomorrow, 2)]
    assert fetch(pg.dsn, "select distinct node from public.can_frame") == [("node-a",)]


def test_a_frame_from_1970_is_stored_in_the_default_partition_and_counted(pg, make_writer, keepers):
    writer = make_writer(pg.dsn, node="clockless", mode="copy")
    writer.deliver(frames_at([datetime(1970, 1, 1, 0, 0, 7, tzinfo=timezone.utc)]))
    writer.deliver(frames_at([datetime.now(timezone.utc)]))
    wait_for(lambda: writer.counters()["wrote"] == 2, "rows written")
    assert partition_of(pg.dsn) == [
        (f"can_frame_{utc_midnight(0):%Y%m%d}", 1),
        ("can_frame_default", 1),
    ]
    keeper = keepers(pg.dsn, node="clockless")
    wait_for(lambda: keeper.upkeep_runs == 1 and keeper.counters() == {"outside": 1},
             "the default partition counted")  # fmt: skip
    other = keepers(pg.dsn, node="another")
    wait_for(lambda: other.upkeep_runs == 1, "upkeep")
    assert other.counters() == {"outside": 0}


def test_rows_in_the_default_partition_move_into_the_partition_made_for_them(pg):
    later = utc_midnight(5) + timedelta(hours=3)
    pg.psql("-c", "set wiretap.node = 'n'", "-c",
            f"insert into public.can_frame (ts, id, extended, dlc, is_fd, data_bytes)"
            f" values ('{later.isoformat()}', 1, false, 0, false, ''), "
            f"('{(later + timedelta(days=1)).isoformat()}', 1, false, 0, false, '')")  # fmt: skip
    assert partition_of(pg.dsn) == [("can_frame_default", 2)]
    made = fetch(pg.dsn, "select * from public.can_frame_create_partitions(_ahead => '6 days')")
    names = [f"can_frame_{utc_midnight(day):%Y%m%d}" for day in (3, 4, 5, 6)]
    assert made == [(names[0], 0), (names[1], 0), (names[2], 1), (names[3], 1)]
    assert partition_of(pg.dsn) == [(names[2], 1), (names[3], 1)]
    assert (
        fetch(pg.dsn, "select * from public.can_frame_create_partitions(_ahead => '6 days')") == []
    )


def test_retention_drops_whole_old_partitions_and_logs_their_row_count(
    pg, make_writer, keepers, caplog
):
    caplog.set_level(logging.INFO, logger="wiretap.pg")
    old_day, kept_day = utc_midnight(-10), utc_midnight(-3)
    writer = make_writer(pg.dsn, node="node-a", mode="copy")
    writer.deliver(frames_at([old_day + timedelta(hours=h) for h in (1, 2, 2)]))
    writer.deliver(frames_at([kept_day + timedelta(hours=5)] * 2))
    wait_for(lambda: writer.counters()["wrote"] == 5, "rows written")
    # Older than yesterday: no partition yet, so DEFAULT holds them until upkeep makes theirs.
    assert partition_of(pg.dsn) == [("can_frame_default", 5)]

    keeper = keepers(pg.dsn, retention_days=7)
    wait_for(lambda: keeper.upkeep_runs == 1, "upkeep")
    old, kept = (f"can_frame_{d:%Y%m%d}" for d in (old_day, kept_day))
    messages = [record.getMessage() for record in caplog.records]
    assert f"created partition {old}, moved 3 rows into it from can_frame_default" in messages
    assert f"retention: dropped partition {old} (3 rows, older than 7 days)" in messages
    assert partition_of(pg.dsn) == [(kept, 2)]
    assert fetch(pg.dsn, "select count(*), sum(frames) from public.can_inventory") == [(1, 2)]
    assert fetch(pg.dsn, "select count(*) from public.can_frame_partitions() where lo < %s",
                 (utc_midnight(-1),)) == [(1,)]  # fmt: skip


def test_inventory_has_one_row_per_node_bus_id_and_hour(pg, make_writer, tmp_path):
    hour = utc_midnight(0) + timedelta(hours=1)
    a = make_writer(pg.dsn, node="node-a", mode="copy", cache_path=str(tmp_path / "a.db"))
    b = make_writer(pg.dsn, node="node-b", mode="insert", cache_path=str(tmp_path / "b.db"))
    for writer in (a, b):  # the same bus number and IDs on two servers: they never collide
        writer.deliver(frames_at([hour + timedelta(seconds=s) for s in range(10)], 0, 0x10))
        writer.deliver(frames_at([hour + timedelta(minutes=70)] * 3, 0, 0x10))
        writer.deliver(frames_at([hour] * 4, 1, 0x10))
    wait_for(lambda: a.counters()["wrote"] == b.counters()["wrote"] == 17, "rows written")
    inventory = fetch(pg.dsn, INVENTORY)
    assert inventory == fetch(pg.dsn, INVENTORY_FROM_ROWS)
    assert [row[:5] for row in inventory] == [
        (node, bus, 0x10, at, count)
        for node in ("node-a", "node-b")
        for bus, at, count in ((0, hour, 10), (0, hour + timedelta(hours=1), 3), (1, hour, 4))
    ]


def insert_batch(conn, node: str, ids: range, moment: datetime) -> None:
    with conn.cursor() as cur:
        cur.execute("select set_config('wiretap.node', %s, false)", (node,))
        cur.execute(
            "insert into public.can_frame (ts, id, extended, dlc, is_fd, data_bytes)"
            " select %s, i, false, 0, false, '' from unnest(%s::int[]) i",
            (moment, list(ids)),
        )


def test_two_servers_adding_to_the_same_inventory_row_both_count(pg):
    moment = utc_midnight(0) + timedelta(hours=2, minutes=3)
    first, second = psycopg2.connect(pg.dsn), psycopg2.connect(pg.dsn)
    try:
        insert_batch(first, "same", range(5), moment)  # holds the rows' locks until commit
        done = threading.Event()

        def other() -> None:
            insert_batch(second, "same", range(5), moment + timedelta(minutes=1))
            second.commit()
            done.set()

        thread = threading.Thread(target=other)
        thread.start()
        wait_for(
            lambda: fetch(pg.dsn, "select count(*) from pg_locks where not granted")[0][0] > 0,
            "the second upsert waiting for the first",
        )
        assert not done.is_set()
        first.commit()
        thread.join(30)
        assert done.is_set()
    finally:
        first.close()
        second.close()
    assert fetch(pg.dsn, INVENTORY) == [
        (
            "same",
            0,
            i,
            utc_midnight(0) + timedelta(hours=2),
            2,
            moment,
            moment + timedelta(minutes=1),
        )
        for i in range(5)
    ]


def test_concurrent_batches_over_the_same_rows_in_opposite_orders_neither_deadlock_nor_lose(pg):
    moment = utc_midnight(0) + timedelta(hours=4)
    rounds = 30
    errors: List[BaseException] = []

    def server(ids: range) -> None:
        conn = psycopg2.connect(pg.dsn)
        try:
            for _ in range(rounds):
                insert_batch(conn, "same", ids, moment)
                conn.commit()
        except BaseException as error:  # a deadlock would surface here
            errors.append(error)
        finally:
            conn.close()

    threads = [threading.Thread(target=server, args=(ids,))
               for ids in (range(0, 50), range(49, -1, -1), range(25, 75))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert fetch(pg.dsn, "select sum(frames), count(*) from public.can_inventory") == [
        (rounds * 150, 75)
    ]
    assert fetch(pg.dsn, INVENTORY) == fetch(pg.dsn, INVENTORY_FROM_ROWS)


def test_a_role_that_may_only_insert_writes_and_keeps_partitions_but_cannot_drop_them(
    pg, make_writer, keepers, caplog
):
    caplog.set_level(logging.INFO, logger="wiretap.pg")
    pg.psql("-c", "do $$ begin if not exists (select 1 from pg_roles where rolname = 'candor')"
            " then create role candor login; end if; end $$")  # fmt: skip
    pg.load_schema()
    dsn = pg.dsn_for("wiretap", user="candor")
    later = f"can_frame_{utc_midnight(2):%Y%m%d}"
    pg.psql("-c", f"drop table public.{later}")
    pg.psql("-c", "set wiretap.node = 'n'", "-c",
            "insert into public.can_frame (ts, id, extended, dlc, is_fd, data_bytes)"
            f" values ('{utc_midnight(-40).isoformat()}', 1, false, 0, false, '')",
            "-c", "select public.can_frame_create_partitions(_backfill => '60 days')")  # fmt: skip
    keeper = keepers(dsn, retention_days=30)
    wait_for(lambda: keeper.upkeep_runs == 1, "upkeep")
    assert fetch(pg.dsn, "select count(*) from public.can_frame_partitions() where partition::text"
                 " = %s", (later,)) == [(1,)]  # fmt: skip
    assert partition_of(pg.dsn) == [(f"can_frame_{utc_midnight(-40):%Y%m%d}", 1)]
    pg.psql("-c", "truncate public.can_frame, public.can_inventory")
    assert any("retention needs the rights of can_frame's owner" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    writer = make_writer(dsn, node="restricted", mode="copy")
    writer.deliver(
        frames_at([datetime.now(timezone.utc), datetime(1999, 1, 1, tzinfo=timezone.utc)])
    )
    wait_for(lambda: writer.counters()["wrote"] == 2, "rows written")
    assert fetch(pg.dsn, "select node from public.can_frame") == [("restricted",)] * 2
    assert fetch(pg.dsn, "select node, sum(frames) from public.can_inventory group by 1") == [
        ("restricted", 2)
    ]
    counter = keepers(dsn, node="restricted")
    wait_for(lambda: counter.counters() == {"outside": 1}, "the DEFAULT partition counted")
    assert not [r for r in caplog.records if "partition upkeep failed" in r.getMessage()]


def test_a_plain_table_of_an_existing_database_is_written_as_before(
    pg, make_writer, keepers, caplog, tmp_path
):
    caplog.set_level(logging.INFO, logger="wiretap.pg")
    dsn = pg.create_database("plain", PLAIN_SCHEMA)
    keeper = keepers(dsn)
    wait_for(lambda: keeper.layout == "plain", "the layout detected")
    lines = [r.getMessage() for r in caplog.records if "plain table" in r.getMessage()]
    assert len(lines) == 1 and "scripts/migrate-partitions.py" in lines[0]
    for mode in ("insert", "function", "copy"):
        writer = make_writer(dsn, node="node-a", mode=mode, cache_path=str(tmp_path / mode))
        writer.deliver(frames_at([datetime.now(timezone.utc)] * 3))
        wait_for(lambda w=writer: w.counters()["wrote"] == 3, "rows written")
    assert fetch(dsn, "select count(*) from public.can_frame") == [(9,)]
    assert keeper.counters() == {"outside": 0}
