"""Every SQL statement in docs/database.md's query cookbook runs against the shipped schema and
finds the frames it is about."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

import pytest
from pg_helpers import fetch

pytestmark = pytest.mark.pg

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "database.md"


def cookbook_statements() -> List[str]:
    blocks = re.findall(r"```sql\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    statements = []
    for block in blocks:
        for statement in block.split(";\n"):
            lines = [line for line in statement.splitlines() if not line.startswith("--")]
            if "".join(lines).strip():
                statements.append("\n".join(lines).strip().rstrip(";"))
    return statements


SEED = """
set wiretap.node = 'pi-7';
select public.ingest_can_frame(now() - interval '3 s', false, false, _id => 201,
                               _data_bytes => '\\x00000fa000000000');
select public.ingest_can_frame(now() - interval '2 s', false, false, _id => 201,
                               _data_bytes => '\\x00000fa000000000');
select public.ingest_can_frame(now() - interval '1 s', false, false, _id => 201,
                               _data_bytes => '\\x0000100000000000');
select public.ingest_can_frame(now(), false, true, _id => 1110, _bus => 1,
                               _data_bytes => decode(repeat('ab', 64), 'hex'));
select public.ingest_can_frame(now(), false, false, _id => 291, _dir => 'tx',
                               _data_bytes => '\\x1122');
select public.ingest_can_frame(now() - interval '40 days', false, false, _id => 1,
                               _data_bytes => '\\x01');
"""


def test_the_cookbook_has_its_queries() -> None:
    statements = cookbook_statements()
    assert len(statements) >= 10
    assert sum(statement.upper().startswith("DELETE") for statement in statements) == 1


@pytest.mark.parametrize("statement", cookbook_statements(), ids=lambda s: s.split("\n")[0][:50])
def test_cookbook_statement_runs_and_finds_the_seeded_frames(pg, statement: str) -> None:
    pg.psql("-c", SEED)
    if statement.upper().startswith("DELETE"):
        pg.psql("-c", statement)
        assert fetch(pg.dsn, "select count(*), min(id) from can_frame") == [(5, 201)]
        return
    rows = fetch(pg.dsn, statement)
    assert rows, statement
    if "lag(data_hex)" in statement:  # the payload changed once after the first frame
        assert [data for _, data in rows] == ["00000FA000000000", "0000100000000000"]
