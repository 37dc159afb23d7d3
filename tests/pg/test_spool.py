"""The SQLite spool on its own: order, persistence, the size bound, durable intents."""

from __future__ import annotations

import sqlite3

import pytest

from wiretap.pg.spool import ROW_OVERHEAD_BYTES, Intent, Spool


def rows(count: int, start: int = 0, payload: bytes = b"\x01\x02") -> list:
    return [(1_000 + i, i, False, len(payload), False, payload, 0, "rx")
            for i in range(start, start + count)]  # fmt: skip


def refuse_deletes(path: str) -> None:
    with sqlite3.connect(path) as db:  # SQLite itself refuses, as it does on a full disk
        db.execute(
            "create trigger refuse_delete before delete on frames"
            " begin select raise(abort, 'database or disk is full'); end"
        )


def test_rows_come_back_in_frame_order_and_survive_a_reopen(tmp_path):
    path = str(tmp_path / "spool.db")
    spool = Spool(path, 1 << 20, reserve_bytes=0)
    spool.append(10, rows(3, 3))
    spool.append(13, rows(2, 6, b""))
    spool.append(7, rows(3))  # a batch older than the rows already there: read first
    spool.close()

    spool = Spool(path, 1 << 20, reserve_bytes=0)
    assert (spool.count, spool.last_seq) == (8, 14)
    assert spool.size_bytes == 8 * ROW_OVERHEAD_BYTES + 6 * 2
    seqs, first = spool.oldest(7)
    assert seqs == [7, 8, 9, 10, 11, 12, 13]
    assert first == rows(6) + rows(1, 6, b"")


def test_booleans_and_bytes_come_back_as_written(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"), 1 << 20)
    row = (1_700_000_000_123_456, 0x1ABCDEF0, True, 64, True, bytes(range(64)), 3, "tx")
    spool.append(1, [row])
    assert spool.oldest(1)[1] == [row]
    assert isinstance(spool.oldest(1)[1][0][2], bool)


def test_size_bound_is_reported_as_room(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"), 10 * (ROW_OVERHEAD_BYTES + 2), reserve_bytes=0)
    spool.append(1, rows(7))
    assert spool.room_bytes() == 3 * (ROW_OVERHEAD_BYTES + 2)
    assert spool.fitting(rows(5)) == 3
    spool.append(8, rows(3, 7))
    assert spool.room_bytes() == 0
    seqs, taken = spool.oldest(12)
    assert spool.settle(Intent(1, seqs[0], seqs[-1], 0), committed=True) == 10
    assert (spool.count, spool.size_bytes) == (0, 0)


def test_room_leaves_the_reserve_free_on_the_disk(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"), 1 << 40, reserve_bytes=0)
    free = spool.disk_free_bytes()
    spool.reserve_bytes = free + 1
    assert spool.room_bytes() == 0
    spool.reserve_bytes = 0
    assert 0 < spool.room_bytes() <= free


def test_commits_are_durable_wal_with_full_sync(tmp_path):
    path = str(tmp_path / "spool.db")
    spool = Spool(path, 1 << 20)
    assert spool._db.execute("pragma synchronous").fetchone() == (2,)  # FULL
    spool.close()
    with sqlite3.connect(path) as db:
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)


def test_a_committed_intent_takes_its_rows_out_with_it(tmp_path):
    path = str(tmp_path / "spool.db")
    spool = Spool(path, 1 << 20)
    spool.append(1, rows(5))
    spool.record_intent(Intent(700, 1, 3, 42))
    spool.close()

    spool = Spool(path, 1 << 20)  # the intent survives a restart
    assert spool.intents() == [Intent(700, 1, 3, 42)]
    assert spool.settle(spool.intents()[0], committed=True) == 3
    assert (spool.count, spool.intents()) == (2, [])
    assert spool.oldest(10) == ([4, 5], rows(2, 3))


def test_an_intent_that_did_not_commit_leaves_its_rows(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"), 1 << 20)
    spool.append(1, rows(2), intent=(701, 9))  # a batch whose COMMIT got no answer
    assert spool.intents() == [Intent(701, 1, 2, 9)]
    assert spool.settle(spool.intents()[0], committed=False) == 0
    assert (spool.count, spool.intents(), spool.oldest(5)[1]) == (2, [], rows(2))


def test_a_settle_that_fails_changes_nothing(tmp_path):
    path = str(tmp_path / "spool.db")
    spool = Spool(path, 1 << 20)
    spool.append(1, rows(5))
    spool.record_intent(Intent(702, 1, 3, 0))
    refuse_deletes(path)
    with pytest.raises(sqlite3.Error):
        spool.settle(Intent(702, 1, 3, 0), committed=True)
    assert (spool.count, spool.intents()) == (5, [Intent(702, 1, 3, 0)])
    assert spool.size_bytes == 5 * (ROW_OVERHEAD_BYTES + 2)
    with sqlite3.connect(path) as db:
        db.execute("drop trigger refuse_delete")
    assert spool.settle(Intent(702, 1, 3, 0), committed=True) == 3
    assert (spool.count, spool.intents()) == (2, [])
