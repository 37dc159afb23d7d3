"""Writer parts that need no database: the func guard, timestamp text, row literals."""

from __future__ import annotations

import pytest

from wiretap.pg.names import quote_function_name
from wiretap.pg.rows import TimestampText, render_row


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
