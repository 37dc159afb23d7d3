"""Upkeep of the partitioned ``can_frame``: partitions ahead of time, retention, the count of
frames that fell outside every partition.

Owns the ``pg-partitions`` thread and its own database connection (so upkeep never waits on a
batch, nor a batch on upkeep). At start it says which layout ``public.can_frame`` has: a plain
table (an existing database) is written as it always was and needs nothing from this thread.
For a partitioned one it calls ``can_frame_create_partitions`` (``init_schema.sql``) at start and
then every hour, ``can_frame_drop_partitions`` when ``retention_days`` is set, and counts this
node's rows in the DEFAULT partition every minute for the stats (``outside=``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Dict, Optional

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from ..ratelimit import RateLimitedLog

log = logging.getLogger("wiretap.pg")

APPLICATION_NAME = "wiretap-server partitions"
UPKEEP_INTERVAL_S = 3600.0
COUNT_INTERVAL_S = 60.0
RETRY_S = 30.0
# Partitions are made this far ahead, so a day without upkeep (a database that refused it, a
# lock it could not get) still never sends a frame to the DEFAULT partition.
AHEAD = "2 days"
STATEMENT_TIMEOUT = "60s"
LAYOUT_SQL = """
select c.relkind,
       exists (select 1 from pg_attribute a
               where a.attrelid = c.oid and a.attname = 'node' and not a.attisdropped)
from pg_class c where c.oid = to_regclass('public.can_frame')
"""


class PartitionKeeper:
    """Keeps a partitioned ``public.can_frame`` ready for the next days' frames."""

    def __init__(
        self,
        dsn: str,
        node: str,
        partition_interval: str = "1 day",
        retention_days: int = 0,
        upkeep_interval: float = UPKEEP_INTERVAL_S,
        count_interval: float = COUNT_INTERVAL_S,
    ) -> None:
        self._dsn = dsn
        self._node = node
        self._interval = partition_interval
        self._retention_days = retention_days
        self._upkeep_interval = upkeep_interval
        self._count_interval = count_interval
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._conn: Optional[psycopg2.extensions.connection] = None
        self._failures = RateLimitedLog(log, 600.0)
        self.layout: Optional[str] = None  # "partitioned" or "plain", once known
        self.outside = 0  # this node's rows in the DEFAULT partition, as last counted
        self.upkeep_runs = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pg-partitions", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 0.5) -> None:
        """Ask the thread to end and wait at most ``timeout``. A statement it is in stays: not
        ``conn.cancel()``, which holds the GIL while it connects to a database that may not
        answer; the thread is a daemon, and its upkeep is safe to cut at any point."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def counters(self) -> Dict[str, int]:
        return {"outside": self.outside}

    # -- thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        next_upkeep = next_count = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    if self._conn is None:
                        self._connect()
                        if self.layout is None:
                            self.layout = self._detect_layout()
                            if self.layout != "partitioned":
                                return
                    if now >= next_upkeep:
                        self.upkeep()
                        next_upkeep = now + self._upkeep_interval
                    if now >= next_count:
                        self._count_outside()
                        next_count = now + self._count_interval
                except psycopg2.Error as error:
                    self._disconnect()
                    if self._stop.is_set():
                        return
                    self._failures.log(
                        "upkeep", logging.WARNING, "partition upkeep failed, retrying in %g s: %s",
                        RETRY_S, _reason(error),
                    )  # fmt: skip
                    self._stop.wait(RETRY_S)
                    continue
                self._stop.wait(max(min(next_upkeep, next_count) - time.monotonic(), 0.01))
        finally:
            self._disconnect()

    def _connect(self) -> None:
        conn = psycopg2.connect(self._dsn, application_name=APPLICATION_NAME, connect_timeout="5")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SET statement_timeout = %s", (STATEMENT_TIMEOUT,))
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
            self._conn = None

    def _detect_layout(self) -> str:
        with self._conn.cursor() as cur:
            cur.execute(LAYOUT_SQL)
            found = cur.fetchone()
        if found is None:
            log.error("public.can_frame does not exist: load init_schema.sql into the database")
            return "missing"
        relkind, has_node = found
        if relkind == "p" and has_node:
            log.info(
                "public.can_frame is partitioned: partitions of %s made %s ahead every hour,"
                " retention %s, this server's rows marked node=%s",
                self._interval,
                AHEAD,
                f"{self._retention_days} days" if self._retention_days else "off",
                self._node,
            )
            return "partitioned"
        log.info(
            "public.can_frame is a plain table (a database made before partitioning): frames"
            " are written to it as before, without node, partitions or retention;"
            " scripts/migrate-partitions.py moves it to the partitioned layout"
        )
        return "plain"

    def upkeep(self) -> None:
        """Make the coming partitions, then apply retention; log what was done."""
        with self._conn.cursor() as cur:
            cur.execute(
                "select partition, rows from public.can_frame_create_partitions(%s::interval,"
                " %s::interval)",
                (self._interval, AHEAD),
            )
            for partition, rows in cur.fetchall():
                if rows:
                    log.info("created partition %s, moved %d rows into it from can_frame_default",
                             partition, rows)  # fmt: skip
                else:
                    log.info("created partition %s", partition)
            if self._retention_days:
                try:
                    cur.execute(
                        "select partition, rows from public.can_frame_drop_partitions("
                        "make_interval(days => %s))",
                        (self._retention_days,),
                    )
                except psycopg2.errors.InsufficientPrivilege as error:
                    self._failures.log(
                        "retention", logging.WARNING,
                        "retention needs the rights of can_frame's owner, which this server's"
                        " database role lacks: %s", _reason(error),
                    )  # fmt: skip
                else:
                    for partition, rows in cur.fetchall():
                        log.info("retention: dropped partition %s (%d rows, older than %d days)",
                                 partition, rows, self._retention_days)  # fmt: skip
        self.upkeep_runs += 1

    def _count_outside(self) -> None:
        with self._conn.cursor() as cur:
            cur.execute("select public.can_frame_outside(%s)", (self._node,))
            self.outside = cur.fetchone()[0]


def _reason(error: BaseException) -> str:
    text = getattr(error, "pgerror", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0]
