"""The on-disk spool that holds rows while PostgreSQL is away.

Owns: one SQLite file (standard library, WAL mode) with the rows the writer could not store yet,
in arrival order; its size bound; reading the oldest rows and deleting them once PostgreSQL has
committed them. Rows are the writer's tuples ``(ts_us, can_id, extended, dlc, is_fd, data, bus,
dir)``; the spool does not interpret them. Used by the writer thread only.
"""

from __future__ import annotations

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
        self.count: int = count
        self.size_bytes: int = payload + count * ROW_OVERHEAD_BYTES

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
        """Up to ``limit`` of the oldest rows, and their sequence numbers."""
        seqs: List[int] = []
        rows: List[Row] = []
        for seq, ts_us, can_id, extended, dlc, is_fd, data, bus, direction in self._db.execute(
            "select * from frames order by seq limit ?", (limit,)
        ):
            seqs.append(seq)
            rows.append((ts_us, can_id, bool(extended), dlc, bool(is_fd), data, bus, direction))
        return seqs, rows

    def delete(self, seqs: Sequence[int], rows: Iterable[Row]) -> None:
        """Forget the oldest rows up to ``seqs[-1]`` (``rows`` are them, for the size bound)."""
        if not seqs:
            return
        with self._db:  # one transaction: commit, or rollback on error
            self._db.execute("delete from frames where seq <= ?", (seqs[-1],))
        self.count -= len(seqs)
        self.size_bytes -= sum(map(row_cost, rows))
        if self.count == 0:
            self.size_bytes = 0

    def close(self) -> None:
        if self.count == 0:
            # Reclaim the pages an outage left behind; an empty spool should be a small file.
            self._db.execute("vacuum")
        self._db.close()
