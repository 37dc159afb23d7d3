#!/usr/bin/env python3
"""Move an existing plain public.can_frame into the partitioned layout of init_schema.sql.

    PG_DSN='host=db dbname=candor user=owner' scripts/migrate-partitions.py --node old-pi

Run it as the owner of can_frame. What it does, each step safe to interrupt and run again:

1. In one short transaction: renames the plain table to ``can_frame_plain`` (its sequence
   too), loads init_schema.sql, which makes the partitioned ``can_frame`` (servers writing
   at that moment simply continue into it), and makes a partition for every day since the
   oldest frame (at most 400 days back; older frames go to the DEFAULT partition). Row ids
   continue after the plain table's.
2. Copies the rows over in batches of ``--batch-rows`` in row_id order, one transaction per
   batch that also records how far it got (table ``can_frame_migration``), so an interrupted
   run resumes where it stopped and no row is copied twice. Each row gets node ``--node``
   (the server that wrote them); the inventory is filled on the way.
3. Verifies the row count of every day, old table against new; only when every day matches is
   the plain table dropped (``--keep-plain`` keeps it). A mismatch lists the days and exits 1.

Restart the servers afterwards: a server that started on the plain table does not keep
partitions ahead (the partitions made here cover the next two days).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psycopg2
import psycopg2.extensions

# Partitions are made for the days since the oldest frame, but not before this many days ago:
# older frames (a logger whose clock said 1970) go to the DEFAULT partition.
MAX_AGE_DAYS = 400
SCHEMA = Path(__file__).resolve().parent.parent / "init_schema.sql"
COPY_COLUMNS = "row_id, ts, ingest_ts, id, extended, dlc, is_fd, data_bytes, bus, dir"
DAYS = (
    "select date_bin('1 day', ts, timestamptz '2000-01-01 00:00:00+00')::date, count(*)"
    " from {table} where row_id <= %s group by 1 order by 1"
)


def relkind(cur: psycopg2.extensions.cursor, name: str) -> Optional[str]:
    cur.execute("select relkind from pg_class where oid = to_regclass(%s)", (name,))
    found = cur.fetchone()
    return found[0] if found else None


def say(message: str) -> None:
    print(message, flush=True)


def prepare(conn: psycopg2.extensions.connection, node: str, interval: str, schema: Path) -> None:
    """Step 1: the plain table aside, the partitioned one in its place, partitions for its days."""
    with conn.cursor() as cur:
        cur.execute("set local lock_timeout = '10s'")
        cur.execute("lock table public.can_frame in access exclusive mode")
        cur.execute("select pg_get_serial_sequence('public.can_frame', 'row_id')")
        (sequence,) = cur.fetchone()
        cur.execute(
            "select coalesce(max(row_id), 0), greatest(min(ts), now() - %s::interval)"
            " from public.can_frame",
            (f"{MAX_AGE_DAYS} days",),
        )
        last_row_id, oldest = cur.fetchone()
        cur.execute("alter table public.can_frame rename to can_frame_plain")
        if sequence:
            cur.execute(f"alter sequence {sequence} rename to can_frame_plain_row_id_seq")
        cur.execute(schema.read_text())
        if last_row_id:
            cur.execute("select setval('public.can_frame_row_id_seq', %s)", (last_row_id,))
        cur.execute(
            "create table public.can_frame_migration (node text not null, last_row_id bigint not"
            " null, done_through bigint not null)"
        )
        cur.execute(
            "insert into public.can_frame_migration values (%s, %s, 0)", (node, last_row_id)
        )
        if oldest is not None:
            cur.execute(
                "select count(*) from public.can_frame_create_partitions(%s::interval,"
                " _from => %s)",
                (interval, oldest),
            )
            (made,) = cur.fetchone()
            say(f"made {made} partitions, from {oldest:%Y-%m-%d} on")
    conn.commit()
    say(f"renamed the plain table to can_frame_plain ({last_row_id} is its last row_id)")


def copy_rows(
    conn: psycopg2.extensions.connection, batch_rows: int, max_batches: Optional[int]
) -> bool:
    """Step 2; ``False`` when it stopped after ``max_batches`` with rows still to copy."""
    with conn.cursor() as cur:
        cur.execute("select node, last_row_id, done_through from public.can_frame_migration")
        node, last_row_id, done = cur.fetchone()
    conn.commit()
    batches = 0
    started, copied = time.monotonic(), 0
    while done < last_row_id:
        if max_batches is not None and batches >= max_batches:
            say(f"stopped after {batches} batches at row_id {done}; run again to go on")
            return False
        with conn.cursor() as cur:
            cur.execute(
                "select max(row_id) from (select row_id from public.can_frame_plain"
                " where row_id > %s and row_id <= %s order by row_id limit %s) b",
                (done, last_row_id, batch_rows),
            )
            (upto,) = cur.fetchone()
            upto = upto or last_row_id
            cur.execute(
                f"insert into public.can_frame ({COPY_COLUMNS}, node)"
                f" select {COPY_COLUMNS}, %s from public.can_frame_plain"
                " where row_id > %s and row_id <= %s",
                (node, done, upto),
            )
            copied += cur.rowcount
            cur.execute("update public.can_frame_migration set done_through = %s", (upto,))
        conn.commit()
        done = upto
        batches += 1
        if batches % 20 == 0:
            rate = copied / max(time.monotonic() - started, 1e-9)
            say(f"copied through row_id {done} of {last_row_id} ({rate:,.0f} rows/s)")
    return True


def verify(conn: psycopg2.extensions.connection, keep_plain: bool) -> bool:
    """Step 3: rows per day, plain against partitioned; drop the plain table when they match."""
    with conn.cursor() as cur:
        cur.execute("select last_row_id from public.can_frame_migration")
        (last_row_id,) = cur.fetchone()
        counts: List[Dict[object, int]] = []
        for table in ("public.can_frame_plain", "public.can_frame"):
            cur.execute(DAYS.format(table=table), (last_row_id,))
            counts.append(dict(cur.fetchall()))
    conn.commit()
    plain, moved = counts
    wrong = sorted(day for day in set(plain) | set(moved) if plain.get(day) != moved.get(day))
    for day in wrong:
        say(f"MISMATCH {day}: {plain.get(day, 0)} rows in can_frame_plain,"
            f" {moved.get(day, 0)} in can_frame")  # fmt: skip
    if wrong:
        return False
    say(f"verified: {sum(plain.values())} rows on {len(plain)} days, every day's count matches")
    with conn.cursor() as cur:
        if not keep_plain:
            cur.execute("drop table public.can_frame_plain")
            say("dropped can_frame_plain")
        cur.execute("drop table public.can_frame_migration")
    conn.commit()
    return True


def migrate(
    dsn: str,
    node: str,
    batch_rows: int = 50_000,
    interval: str = "1 day",
    max_batches: Optional[int] = None,
    keep_plain: bool = False,
    schema: Path = SCHEMA,
) -> int:
    conn = psycopg2.connect(dsn, application_name="wiretap migrate-partitions")
    try:
        with conn.cursor() as cur:
            table, progress = (
                relkind(cur, "public.can_frame"),
                relkind(cur, "public.can_frame_migration"),
            )
        conn.commit()
        if table is None:
            say("public.can_frame does not exist: nothing to migrate (load init_schema.sql)")
            return 1
        if table == "r":
            prepare(conn, node, interval, schema)
        elif progress is None:
            say("public.can_frame is already partitioned: nothing to migrate")
            return 0
        else:
            say("resuming the copy from can_frame_plain")
        if not copy_rows(conn, batch_rows, max_batches):
            return 3
        return 0 if verify(conn, keep_plain) else 1
    finally:
        conn.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("PG_DSN", ""),
                        help="connection string (default: $PG_DSN)")  # fmt: skip
    parser.add_argument("--node", required=True, help="node name for the existing rows")
    parser.add_argument("--batch-rows", type=int, default=50_000, help="rows per transaction")
    parser.add_argument("--partition-interval", default="1 day", help='e.g. "1 day"')
    parser.add_argument("--max-batches", type=int, help="stop after this many batches")
    parser.add_argument("--keep-plain", action="store_true", help="keep can_frame_plain")
    args = parser.parse_args(argv)
    if args.batch_rows < 1:
        parser.error("--batch-rows must be 1 or more")
    try:
        return migrate(args.dsn, args.node, args.batch_rows, args.partition_interval,
                       args.max_batches, args.keep_plain)  # fmt: skip
    except psycopg2.Error as error:
        print(f"migrate-partitions: {error}".strip(), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
