"""scripts/migrate-partitions.py: a plain can_frame moved into the partitioned layout, in
batches, resumable, every day's count verified."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg2
import pytest
from pg_helpers import fetch, wait_for

from wiretap.frames import make_frame

pytestmark = pytest.mark.pg

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "migrate-partitions.py"
PLAIN_SCHEMA = Path(__file__).resolve().parent / "plain_schema.sql"
ROWS = 5000
# 5000 rows over the last four days (one a minute, 1440 a day) and one from a logger with no clock.
FILL = f"""
insert into public.can_frame (ts, id, extended, dlc, is_fd, data_bytes, bus, dir)
select date_trunc('day', now()) - interval '3 days' + i * interval '1 minute', i % 70,
       i % 3 = 0, 2, false, int2send(i::smallint), i % 2,
       case when i % 5 = 0 then 'tx' else 'rx' end
from generate_series(1, {ROWS - 1}) i;
insert into public.can_frame (ts, id, extended, dlc, is_fd, data_bytes)
values ('1970-01-01 00:00:09+00', 7, false, 0, false, '');
"""
CONTENT = (
    "select md5(string_agg(concat_ws(',', row_id, ts, ingest_ts, id, id_hex, extended, dlc, is_fd,"
    " data_hex, bus, dir), ';' order by row_id)) from {table}"
)


def migrate(dsn: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dsn", dsn, "--node", "old-pi", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def execute(dsn: str, sql: str) -> None:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql)
    conn.close()


@pytest.fixture
def plain_db(pg):
    dsn = pg.create_database("migrate", PLAIN_SCHEMA)
    execute(dsn, FILL)
    return dsn


def test_migration_moves_every_row_resumes_and_verifies_each_day(plain_db, make_writer):
    before = fetch(plain_db, CONTENT.format(table="public.can_frame"))

    first = migrate(plain_db, "--batch-rows", "700", "--max-batches", "3")
    assert first.returncode == 3, first.stdout + first.stderr
    assert "stopped after 3 batches" in first.stdout
    assert fetch(plain_db, "select count(*) from public.can_frame") == [(2100,)]
    assert fetch(plain_db, "select relkind::text from pg_class where relname = 'can_frame'") == [
        ("p",)
    ]

    # A server writing in between: its rows are its own, after the plain table's row ids.
    writer = make_writer(plain_db, node="new-pi", mode="copy")
    writer.deliver([make_frame(0, 0x10, b"\x01", ts_ns=1_700_000_000_000_000_000)])
    wait_for(lambda: writer.counters()["wrote"] == 1, "the new server's row")

    second = migrate(plain_db, "--batch-rows", "700")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming the copy" in second.stdout
    assert f"verified: {ROWS} rows on 5 days, every day's count matches" in second.stdout
    assert fetch(plain_db, "select to_regclass('public.can_frame_plain')") == [(None,)]

    migrated = f"(select * from public.can_frame where row_id <= {ROWS}) m"
    assert fetch(plain_db, CONTENT.format(table=migrated)) == before
    assert fetch(plain_db, "select node, count(*) from public.can_frame group by 1 order by 1") == [
        ("new-pi", 1),
        ("old-pi", ROWS),
    ]
    assert fetch(plain_db, "select row_id from public.can_frame where node = 'new-pi'") == [
        (ROWS + 1,)
    ]
    assert fetch(plain_db, "select count(*) from public.can_frame_default") == [(2,)]
    assert fetch(
        plain_db, "select sum(frames) from public.can_inventory where node = 'old-pi'"
    ) == [(ROWS,)]
    assert fetch(plain_db, "select count(*) from public.can_frame_bytes") == [(ROWS + 1,)]

    again = migrate(plain_db)
    assert again.returncode == 0 and "already partitioned" in again.stdout


def test_a_day_whose_count_does_not_match_keeps_the_plain_table(plain_db):
    prepared = migrate(plain_db, "--max-batches", "0")
    assert prepared.returncode == 3, prepared.stdout + prepared.stderr
    # A row in the new table that the plain one does not have, on the second day.
    execute(plain_db, "insert into public.can_frame (row_id, ts, id, extended, dlc, is_fd,"
            " data_bytes, node) select 1, ts, id, extended, dlc, is_fd, data_bytes, 'x'"
            " from public.can_frame_plain where row_id = 2000")  # fmt: skip
    utc_day = "(ts at time zone 'UTC')::date"
    ((day, count),) = fetch(
        plain_db,
        f"select {utc_day}, count(*) from public.can_frame_plain where {utc_day} ="
        f" (select {utc_day} from public.can_frame_plain where row_id = 2000) group by 1",
    )
    result = migrate(plain_db)
    assert result.returncode == 1
    assert f"MISMATCH {day}: {count} rows in can_frame_plain, {count + 1} in can_frame" in (
        result.stdout
    )
    assert fetch(plain_db, "select count(*) from public.can_frame_plain") == [(ROWS,)]
