"""The SQLite spool on its own: order, persistence across restarts, the size bound."""

from __future__ import annotations

import sqlite3

import pytest

from wiretap.pg.spool import ROW_OVERHEAD_BYTES, Spool


def rows(count: int, start: int = 0, payload: bytes = b"\x01\x02") -> list:
    return [(1_000 + i, i, False, len(payload), False, payload, 0, "rx")
            for i in range(start, start + count)]  # fmt: skip


def test_rows_come_back_oldest_first_and_survive_a_reopen(tmp_path):
    path = str(tmp_path / "spool.db")
    spool = Spool(path, 1 << 20)
    spool.append(rows(3))
    spool.append(rows(2, 3, b""))
    spool.close()

    spool = Spool(path, 1 << 20)
    assert spool.count == 5
    assert spool.size_bytes == 5 * ROW_OVERHEAD_BYTES + 3 * 2
    seqs, first = spool.oldest(4)
    assert first == rows(3) + rows(1, 3, b"")
    spool.delete(seqs[:2], first[:2])
    assert spool.count == 3
    assert spool.oldest(10)[1] == rows(1, 2) + rows(2, 3, b"")


def test_booleans_and_bytes_come_back_as_written(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"), 1 << 20)
    row = (1_700_000_000_123_456, 0x1ABCDEF0, True, 64, True, bytes(range(64)), 3, "tx")
    spool.append([row])
    assert spool.oldest(1)[1] == [row]
    assert isinstance(spool.oldest(1)[1][0][2], bool)


def test_size_bound_is_reported_as_room(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"), 10 * (ROW_OVERHEAD_BYTES + 2))
    spool.append(rows(7))
    assert spool.room_bytes() == 3 * (ROW_OVERHEAD_BYTES + 2)
    spool.append(rows(5, 7))
    assert spool.room_bytes() == 0
    seqs, taken = spool.oldest(12)
    spool.delete(seqs, taken)
    assert (spool.count, spool.size_bytes) == (0, 0)


def test_the_file_is_in_wal_mode(tmp_path):
    path = str(tmp_path / "spool.db")
    Spool(path, 1 << 20).close()
    with sqlite3.connect(path) as db:
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)


def test_rows_marked_stored_are_not_read_again_while_their_delete_fails(tmp_path):
    path = str(tmp_path / "spool.db")
    spool = Spool(path, 1 << 20)
    spool.append(rows(5))
    with sqlite3.connect(path) as db:
        db.execute(
            "create trigger refuse_delete before delete on frames"
            " begin select raise(abort, 'database or disk is full'); end"
        )
    seqs, taken = spool.oldest(3)
    with pytest.raises(sqlite3.Error):
        spool.delete(seqs, taken)
    assert (spool.count, spool.unremoved) == (2, 3)
    assert spool.oldest(10)[1] == rows(2, 3)
    assert spool.size_bytes == 5 * (ROW_OVERHEAD_BYTES + 2)  # the file still holds all five

    with sqlite3.connect(path) as db:
        db.execute("drop trigger refuse_delete")
    spool.delete([], [])
    assert (spool.count, spool.unremoved, spool.size_bytes) == (2, 0, 2 * (ROW_OVERHEAD_BYTES + 2))
    seqs, taken = spool.oldest(10)
    assert taken == rows(2, 3)
    spool.delete(seqs, taken)
    spool.append(rows(1, 7))  # numbered from 1 again in the emptied table: still read
    assert spool.oldest(10)[1] == rows(1, 7)
