"""The on-disk spool that holds rows while PostgreSQL is away.

Owns: one SQLite file (standard library, WAL mode, ``synchronous=full``: a commit is on the disk
when it returns, so a power cut loses nothing the spool took) with the rows the writer could not
store yet, ordered by their frame number; its size bound, which also leaves the file system some
room; and the *intents*, which make "stored exactly once" survive any failure.

An intent names a PostgreSQL transaction (its ``txid``) that writes a range of spooled rows. It is
committed here before that transaction commits there; afterwards the rows and the intent go in one
SQLite transaction. Whoever finds an intent left over (a crash, a lost connection during
``COMMIT``, a delete that failed on a full disk) asks PostgreSQL with ``txid_status`` whether the
transaction committed, and deletes the rows or writes them again accordingly. Rows are the
writer's tuples (:data:`~wiretap.pg.rows.Row`); the spool does not interpret them.
Thread-safe: the writer and its keeper both use it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from typing import Iterator, List, NamedTuple, Sequence, Tuple

from .rows import Row

# What one row costs on disk besides its payload (record header, key, integers, page slack):
# an estimate, so the size bound needs no file-size polling.
ROW_OVERHEAD_BYTES = 48
# Free space the spool leaves on its file system (at most a quarter of it): enough for the WAL
# pages of deleting one drained batch and recording an intent, so that a spool that filled the
# disk can still empty itself.
RESERVE_BYTES = 512 * 1024
# Checkpoint the WAL into the database every this many pages (SQLite's default is 1000, 4 MB),
# and cut the WAL file back to this size after: a spool on a small disk must not keep megabytes
# of WAL it no longer needs.
WAL_AUTOCHECKPOINT_PAGES = 256
JOURNAL_SIZE_LIMIT_BYTES = 1 << 20

_SCHEMA = (
    """
    create table if not exists frames (
        seq      integer primary key,
        ts_us    integer not null,
        can_id   integer not null,
        extended integer not null,
        dlc      integer not null,
        is_fd    integer not null,
        data     blob not null,
        bus      integer not null,
        dir      text not null
    )
    """,
    """
    create table if not exists intents (
        txid       integer primary key,
        first_seq  integer not null,
        last_seq   integer not null,
        backend    integer not null
    )
    """,
)
_INSERT = (
    "insert into frames (seq, ts_us, can_id, extended, dlc, is_fd, data, bus, dir) "
    "values (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class Intent(NamedTuple):
    """PostgreSQL transaction ``txid`` (in backend ``backend``) writes rows ``first..last``."""

    txid: int
    first_seq: int
    last_seq: int
    backend: int


def row_cost(row: Row) -> int:
    """Estimated bytes a row takes in the spool."""
    return ROW_OVERHEAD_BYTES + len(row[5])


class Spool:
    """An ordered, size-bounded store of rows in a SQLite file that survives restarts."""

    def __init__(self, path: str, max_bytes: int, reserve_bytes: int = RESERVE_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.reserve_bytes = reserve_bytes
        with contextlib.suppress(OSError):  # a small file system keeps a quarter of itself free
            stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
            self.reserve_bytes = min(reserve_bytes, stat.f_blocks * stat.f_frsize // 4)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=full")
        self._db.execute(f"pragma wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        self._db.execute(f"pragma journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
        for statement in _SCHEMA:
            self._db.execute(statement)
        count, payload, last = self._db.execute(
            "select count(*), coalesce(sum(length(data)), 0), coalesce(max(seq), 0) from frames"
        ).fetchone()
        self.count: int = count  # rows in the file
        self.size_bytes: int = payload + count * ROW_OVERHEAD_BYTES
        self.last_seq: int = last

    # -- room -----------------------------------------------------------------------------------

    def disk_free_bytes(self) -> int:
        stat = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        return stat.f_bavail * stat.f_frsize

    def room_bytes(self) -> int:
        """What may still be added: under ``max_bytes``, and leaving ``reserve_bytes`` free."""
        try:
            disk = self.disk_free_bytes() - self.reserve_bytes
        except OSError:
            disk = 0
        return max(min(self.max_bytes - self.size_bytes, disk), 0)

    def fitting(self, rows: Sequence[Row]) -> int:
        """How many of the leading ``rows`` fit in :meth:`room_bytes`."""
        room = self.room_bytes()
        count = 0
        for row in rows:
            room -= row_cost(row)
            if room < 0:
                break
            count += 1
        return count

    # -- writing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One SQLite transaction, committed or rolled back. ``durable=False`` skips its fsync
        (WAL with ``synchronous=normal``: the next durable commit syncs it as well; a power cut
        may undo it)."""
        with self._lock:
            if not durable:
                self._db.execute("pragma synchronous=normal")
            try:
                self._db.execute("begin immediate")
                try:
                    yield self._db
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("rollback")
                    raise
                self._db.execute("commit")
            finally:
                if not durable:
                    self._db.execute("pragma synchronous=full")

    def append(self, first_seq: int, rows: Sequence[Row], intent: Tuple[int, int] = ()) -> None:
        """Store ``rows`` numbered from ``first_seq``, in one durable transaction; with
        ``intent=(txid, backend)`` they are recorded as written by that transaction, whose
        outcome is not known (a connection lost during ``COMMIT``). ``sqlite3.Error`` on failure
        (a full disk), and nothing is stored."""
        if not rows:
            return
        last_seq = first_seq + len(rows) - 1
        with self._transaction() as db:
            db.executemany(
                _INSERT, [(seq, *row) for seq, row in zip(range(first_seq, last_seq + 1), rows)]
            )
            if intent:
                db.execute(
                    "insert into intents values (?, ?, ?, ?)",
                    (intent[0], first_seq, last_seq, intent[1]),
                )
        self.count += len(rows)
        self.size_bytes += sum(map(row_cost, rows))
        self.last_seq = max(self.last_seq, last_seq)

    def oldest(self, limit: int) -> Tuple[List[int], List[Row]]:
        """Up to ``limit`` of the oldest rows, and their sequence numbers."""
        seqs: List[int] = []
        rows: List[Row] = []
        with self._lock:
            cursor = self._db.execute("select * from frames order by seq limit ?", (limit,))
            for seq, ts_us, can_id, extended, dlc, is_fd, data, bus, direction in cursor:
                seqs.append(seq)
                rows.append((ts_us, can_id, bool(extended), dlc, bool(is_fd), data, bus, direction))
        return seqs, rows

    def record_intent(self, intent: Intent) -> None:
        """Durably note that ``intent.txid`` writes rows ``first..last`` (before it commits)."""
        with self._transaction() as db:
            db.execute("insert into intents values (?, ?, ?, ?)", intent)

    def intents(self) -> List[Intent]:
        with self._lock:
            return [Intent(*values) for values in self._db.execute(
                "select txid, first_seq, last_seq, backend from intents order by first_seq"
            )]  # fmt: skip

    def rows_between(self, intent: Intent) -> int:
        """How many rows ``intent`` covers (its range may have gaps: frames that never needed
        the spool)."""
        with self._lock:
            return self._db.execute(
                "select count(*) from frames where seq between ? and ?",
                (intent.first_seq, intent.last_seq),
            ).fetchone()[0]

    def settle(self, intent: Intent, committed: bool) -> int:
        """The outcome of ``intent`` is known: if it committed, its rows leave the spool with it
        (one transaction); if not, only the intent goes and the rows are written again. Returns
        how many rows left. ``sqlite3.Error`` on failure: then nothing changed. Not synced to
        the disk: a power cut may bring the rows and the intent back, and the intent is
        settled again (PostgreSQL still knows how its transaction ended)."""
        with self._transaction(durable=False) as db:
            removed, payload = 0, 0
            if committed:
                removed, payload = db.execute(
                    "select count(*), coalesce(sum(length(data)), 0) from frames"
                    " where seq between ? and ?",
                    (intent.first_seq, intent.last_seq),
                ).fetchone()
                db.execute(
                    "delete from frames where seq between ? and ?",
                    (intent.first_seq, intent.last_seq),
                )
            db.execute("delete from intents where txid = ?", (intent.txid,))
        self.count -= removed
        self.size_bytes -= payload + removed * ROW_OVERHEAD_BYTES
        if self.count == 0:
            self.size_bytes = 0
        return removed

    def close(self) -> None:
        with self._lock:
            if self.count == 0:
                # Reclaim the pages an outage left behind; an empty spool should be a small file.
                # Only a nicety: on a full disk it fails, and the file stays as it is.
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("vacuum")
            self._db.close()
