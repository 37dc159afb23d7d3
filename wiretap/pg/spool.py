"""The on-disk spool that holds rows while PostgreSQL is away.

Owns: one SQLite file (standard library, WAL mode) with the rows the writer could not store yet,
in arrival order; its size bound; reading the oldest rows and deleting them once PostgreSQL has
committed them (an in-memory mark keeps committed rows from being read again while their delete
fails, e.g. on a full disk). Rows are the writer's tuples ``(ts_us, can_id, extended, dlc, is_fd,
data, bus, dir)``; the spool does not interpret them. Used by the writer thread only.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Iterable, List, Sequence, Tuple

Row = Tuple[int, int, bool, int, bool, bytes, int, str]

# What one row costs on disk besides its payload (record header, key, integers, page slack):
# an estimate, so the size bound needs no file-size polling.
ROW_OVERHEAD_BYTES = 48

_SCHEMA = """
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
"""


def row_cost(row: Row) -> int:
    """Estimated bytes a row takes in the spool."""
    return ROW_OVERHEAD_BYTES + len(row[5])


class Spool:
    """An ordered, size-bounded FIFO of rows in a SQLite file that survives restarts."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("pragma journal_mode=wal")
        # WAL + NORMAL survives a crash of this process; only a power cut may lose the tail.
        self._db.execute("pragma synchronous=normal")
        self._db.execute(_SCHEMA)
        count, payload = self._db.execute(
            "select count(*), coalesce(sum(length(data)), 0) from frames"
        ).fetchone()
        self.count: int = count  # rows not yet stored in PostgreSQL
        self.size_bytes: int = payload + count * ROW_OVERHEAD_BYTES
        # Rows up to _stored_seq are in PostgreSQL but still in the file: their delete failed.
        self._stored_seq = 0
        self.unremoved = 0
        self._unremoved_bytes = 0

    def room_bytes(self) -> int:
        return max(self.max_bytes - self.size_bytes, 0)

    def append(self, rows: Sequence[Row]) -> None:
        """Add rows after the newest ones, in one transaction (the caller checks the room)."""
        if not rows:
            return
        with self._db:  # one transaction: commit, or rollback on error
            self._db.executemany(
                "insert into frames (ts_us, can_id, extended, dlc, is_fd, data, bus, dir) "
                "values (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        self.count += len(rows)
        self.size_bytes += sum(map(row_cost, rows))

    def oldest(self, limit: int) -> Tuple[List[int], List[Row]]:
        """Up to ``limit`` of the oldest rows not yet stored, and their sequence numbers."""
        seqs: List[int] = []
        rows: List[Row] = []
        for seq, ts_us, can_id, extended, dlc, is_fd, data, bus, direction in self._db.execute(
            "select * from frames where seq > ? order by seq limit ?", (self._stored_seq, limit)
        ):
            seqs.append(seq)
            rows.append((ts_us, can_id, bool(extended), dlc, bool(is_fd), data, bus, direction))
        return seqs, rows

    def delete(self, seqs: Sequence[int], rows: Iterable[Row]) -> None:
        """Mark the oldest rows up to ``seqs[-1]`` as stored (``rows`` are them, for the size
        bound): :meth:`oldest` and ``count`` leave them out from now on. Then delete every stored
        row from the file; ``sqlite3.Error`` when that fails, and the next call (``seqs`` may be
        empty) tries again."""
        if seqs:
            self._stored_seq = seqs[-1]
            self.count -= len(seqs)
            self.unremoved += len(seqs)
            self._unremoved_bytes += sum(map(row_cost, rows))
        if not self.unremoved:
            return
        with self._db:  # one transaction: commit, or rollback on error
            self._db.execute("delete from frames where seq <= ?", (self._stored_seq,))
        self.size_bytes -= self._unremoved_bytes
        # An emptied table numbers new rows from 1 again, so the mark must not outlive its rows.
        self._stored_seq = self.unremoved = self._unremoved_bytes = 0
        if self.count == 0:
            self.size_bytes = 0

    def close(self) -> None:
        if self.count == 0 and not self.unremoved:
            # Reclaim the pages an outage left behind; an empty spool should be a small file.
            # Only a nicety: on a full disk it fails, and the file stays as it is.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("vacuum")
        self._db.close()
