"""init_schema.sql: idempotent, the ingest function, the byte views, grants when the role exists."""

from __future__ import annotations

import pytest
from pg_helpers import fetch
from pgcluster import PgClusterError

pytestmark = pytest.mark.pg


PARTITIONS = "select partition::text from public.can_frame_partitions()"


def test_schema_loads_again_and_again_without_error(pg):
    partitions = fetch(pg.dsn, PARTITIONS)
    pg.load_schema()
    pg.load_schema()
    assert fetch(
        pg.dsn, "select indexname from pg_indexes where tablename = 'can_frame' order by 1"
    ) == [("can_frame_node_bus_ts_idx",), ("can_frame_node_id_ts_idx",), ("can_frame_ts_brin",)]
    assert fetch(pg.dsn, PARTITIONS) == partitions


def test_ingest_function_takes_an_id_or_its_hex_and_defaults_dlc(pg):
    pg.psql(
        "-c", "select public.ingest_can_frame(timestamptz '2024-01-02 03:04:05.678901+00',"
        " true, false, _id_hex => '1abcdef', _data_bytes => '\\x0102')",
        "-c", "select public.ingest_can_frame(now(), false, true, _id => 291, _dlc => 0::smallint,"
        " _bus => 2, _dir => 'tx')",
    )  # fmt: skip
    assert fetch(
        pg.dsn,
        "select id, id_hex, extended, dlc, is_fd, data_hex, bus, dir from public.can_frame"
        " order by row_id",
    ) == [(0x1ABCDEF, "01ABCDEF", True, 2, False, "0102", 0, "rx"),
          (291, "123", False, 0, True, "", 2, "tx")]  # fmt: skip
    assert fetch(
        pg.dsn, "select to_char(ts at time zone 'UTC', 'HH24:MI:SS.US') from public.can_frame"
        " where row_id = 1"
    ) == [("03:04:05.678901",)]  # fmt: skip


def test_ingest_function_wants_exactly_one_of_id_and_hex(pg):
    with pytest.raises(PgClusterError, match="exactly one of _id and _id_hex"):
        pg.psql(
            "-c", "select public.ingest_can_frame(now(), false, false, _id => 1, _id_hex => '1')"
        )


def test_byte_views_give_null_past_the_payload(pg):
    pg.psql(
        "-c", "select public.ingest_can_frame(now(), false, false, _id => 1,"
        " _data_bytes => '\\x0a0b')",
        "-c", "select public.ingest_can_frame(now(), false, true, _id => 2,"
        " _data_bytes => decode(repeat('ff', 64), 'hex'))",
    )  # fmt: skip
    assert fetch(pg.dsn, "select id, b0, b1, b2, b7 from public.can_frame_bytes order by id") == [
        (1, 10, 11, None, None),
        (2, 255, 255, 255, 255),
    ]
    assert fetch(pg.dsn, "select id, b0, b63 from public.can_fd_frame_bytes") == [(2, 255, 255)]


def test_grants_go_to_the_ingest_role_when_it_exists(pg):
    pg.psql("-c", "do $$ begin if not exists (select 1 from pg_roles where rolname = 'candor')"
            " then create role candor login; end if; end $$")  # fmt: skip
    pg.load_schema()
    assert fetch(
        pg.dsn,
        "select has_table_privilege('candor', 'public.can_frame', 'insert'),"
        " has_table_privilege('candor', 'public.can_frame', 'delete'),"
        " has_function_privilege('candor', 'public.ingest_can_frame(timestamptz, boolean,"
        " boolean, integer, text, smallint, bytea, integer, text)', 'execute')",
    ) == [(True, False, True)]
