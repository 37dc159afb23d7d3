"""Database-path parts that need no database: names, rows and their SQL or COPY encoding, error
diagnosis, the ledger."""

from __future__ import annotations

import pytest

from wiretap.frames import make_frame
from wiretap.pg.diagnosis import CONFIG, CONTENT, OUTAGE, diagnose
from wiretap.pg.ledger import SHUTDOWN, Ledger
from wiretap.pg.names import LIBPQ_DEFAULTS, describe_dsn, quote_function_name
from wiretap.pg.rows import (
    COPY_HEADER,
    COPY_TRAILER,
    PG_EPOCH_US,
    TimestampText,
    encode_copy,
    frame_rows,
    render_row,
)


@pytest.mark.parametrize(
    ("name", "quoted"),
    [("public.ingest_can_frame", '"public"."ingest_can_frame"'), ("my_func2", '"my_func2"')],
)
def test_function_names_are_quoted(name, quoted):
    assert quote_function_name(name) == quoted


@pytest.mark.parametrize(
    "name", ["f(); drop table can_frame", "a.b.c", "1func", 'x"y', "public.", ""]
)
def test_anything_but_an_identifier_is_refused(name):
    with pytest.raises(ValueError):
        quote_function_name(name)


def test_timestamp_text_is_utc_with_microseconds():
    text = TimestampText()
    assert text(1_700_000_000_000_001) == "2023-11-14 22:13:20.000001+00"
    assert text(1_700_000_000_999_999) == "2023-11-14 22:13:20.999999+00"
    assert text(1_700_000_001_000_000) == "2023-11-14 22:13:21.000000+00"
    assert text(0) == "1970-01-01 00:00:00.000000+00"


def test_rows_render_as_typed_sql_literals():
    row = (0, 0x1ABCDEF0, True, 2, False, b"\x01\xab", 3, "tx")
    assert render_row("2023-11-14 22:13:20.000001+00", row, casts=False) == (
        "('2023-11-14 22:13:20.000001+00',448585456,true,2,false,E'\\\\x01ab'::bytea,3,'tx')"
    )
    assert render_row("T", row, casts=True) == (
        "('T'::timestamptz,448585456,true,2::smallint,false,E'\\\\x01ab'::bytea,3,'tx'::text)"
    )


@pytest.mark.parametrize(
    "row",
    [
        (0, "1); drop table x; --", False, 0, False, b"", 0, "rx"),
        (0, 1, False, 0, False, b"", 0, "rx'); drop table x; --"),
        (0, 1, False, 0.5, False, b"", 0, "rx"),
    ],
)
def test_anything_but_typed_values_refuses_to_render(row):
    with pytest.raises(ValueError):
        render_row("T", row, casts=False)


def test_an_empty_dsn_is_described_as_libpq_defaults():
    assert describe_dsn("") == describe_dsn("  ") == LIBPQ_DEFAULTS
    assert describe_dsn("host=db password=hunter2") == "host=db password=***"


def test_copy_encoding_is_header_rows_trailer():
    row = (PG_EPOCH_US + 1, 0x123, False, 2, True, b"\xab\xcd", 5, "tx")
    assert encode_copy([row]) == (
        b"PGCOPY\n\xff\r\n\x00" + bytes(8)
        + b"\x00\x08"  # 8 fields
        + b"\x00\x00\x00\x08" + (1).to_bytes(8, "big")  # ts: 1 µs after 2000-01-01
        + b"\x00\x00\x00\x04" + (0x123).to_bytes(4, "big")
        + b"\x00\x00\x00\x01\x00"  # extended
        + b"\x00\x00\x00\x02\x00\x02"  # dlc
        + b"\x00\x00\x00\x01\x01"  # is_fd
        + b"\x00\x00\x00\x02\xab\xcd"
        + b"\x00\x00\x00\x04\x00\x00\x00\x05"  # bus
        + b"\x00\x00\x00\x02tx"
        + b"\xff\xff"
    )  # fmt: skip
    assert encode_copy([]) == COPY_HEADER + COPY_TRAILER


def test_frames_become_rows_with_the_receive_direction_for_bus_frames():
    rx = make_frame(2, 0x1ABCDEF0, b"\x01", extended=True, ts_ns=1_700_000_000_123_456_789)
    tx = make_frame(0, 0x5, b"", ts_ns=1_000, direction="tx")
    assert frame_rows([rx, tx], "tx") == [
        (1_700_000_000_123_456, 0x1ABCDEF0, True, 1, False, b"\x01", 2, "tx"),
        (1, 0x5, False, 0, False, b"", 0, "tx"),
    ]
    assert frame_rows([rx], "rx")[0][7] == "rx"


@pytest.mark.parametrize(
    ("sqlstate", "message", "kind", "fix"),
    [
        ("42883", "function public.x(...) does not exist", CONFIG, "--pg-func"),
        ("42P01", 'relation "public.can_frame" does not exist', CONFIG, "init_schema.sql"),
        ("42501", "permission denied for table can_frame", CONFIG, "GRANT INSERT"),
        ("3F000", 'schema "nope" does not exist', CONFIG, "schema"),
        ("28P01", "password authentication failed", CONFIG, "password"),
        ("57P01", "terminating connection due to administrator command", OUTAGE, ""),
        ("40001", "could not serialize access", OUTAGE, ""),
        ("57014", "canceling statement due to statement timeout", OUTAGE, ""),
        ("23514", "violates check constraint", CONTENT, ""),
        ("P0001", "poisoned", CONTENT, ""),
        ("", 'connection to server failed: FATAL:  password authentication failed for user "x"',
         CONFIG, "pg_hba.conf"),
        ("", 'connection to server failed: FATAL:  database "nope" does not exist', CONFIG,
         "create it"),
        ("", "invalid dsn: missing \"=\" after \"x\" in connection info string", CONFIG,
         "connection string"),
        ("", "connection to server at \"127.0.0.1\", port 1 failed: Connection refused", OUTAGE,
         ""),
    ],
)  # fmt: skip
def test_errors_are_told_apart_outage_mistake_bad_rows(sqlstate, message, kind, fix):
    found = diagnose(Exception(message + "\nDETAIL: more"), sqlstate)
    assert (found.kind, found.cause) == (kind, message)
    assert fix in found.fix


def test_the_ledger_numbers_frames_and_balances_through_every_move():
    ledger = Ledger(queue_limit=10, carried=3, first_number=4)
    frames = [make_frame(0, i) for i in range(12)]
    assert ledger.offer(frames[:6]) == (6, 6)
    assert ledger.take_batch(4) == (0, [])  # the spool holds older rows: they go first
    ledger.committed_from_spool(3)
    first, batch = ledger.take_batch(4)
    assert (first, batch) == (4, frames[:4])
    assert ledger.offer(frames[6:12]) == (4, 6)  # 4 held + 6 queued = the limit
    moving_first, moving = ledger.take_for_spool(3)
    assert (moving_first, moving) == (8, frames[4:7])
    ledger.spooled_from_memory(3, by_writer=False)
    ledger.give_back(first + 2, batch[2:], by_writer=True)  # the writer keeps 2
    ledger.committed_from_memory(2)
    snapshot = ledger.snapshot()
    assert Ledger.balances(snapshot)
    assert snapshot == {
        "offered": 12, "carried": 3, "committed": 5, "spooled": 3, "queued": 5, "in_flight": 0,
        "in_memory": 5, "dropped": 2, "dropped_queue_full": 2, "dropped_rejected": 0,
        "dropped_shutdown": 0, "dropped_writer_error": 0,
    }  # fmt: skip
    assert ledger.drop_queue(SHUTDOWN) == 5
    assert Ledger.balances(ledger.snapshot())
