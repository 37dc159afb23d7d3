"""The fleet drill, short: sixteen servers, each its own node and replay log, write into one
database at once, and every frame each of them read is stored exactly once, under its node.
bench/fleet.py runs the full drill (60 s, 60,000 rows/s) and times the queries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pg_helpers import fetch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.fleet import run_drill  # noqa: E402

pytestmark = pytest.mark.pg


@pytest.mark.parametrize("mode", ["copy", "insert"])
def test_sixteen_servers_store_every_frame_they_read_exactly_once(pg, tmp_path, mode):
    drill = run_drill(pg.dsn, tmp_path, nodes=16, seconds=3, rate=400, mode=mode)
    for node in drill.per_node:
        assert (node.node, node.dropped, node.spooled) == (node.node, 0, 0)
        assert node.read > 0
        assert node.stored == node.read == node.wrote, node
    assert drill.exactly_once
    assert fetch(pg.dsn, "select count(distinct node) from public.can_frame") == [(16,)]
    # The inventory counted every row, per node, bus and ID.
    assert fetch(
        pg.dsn,
        "select count(*) from (select node, bus, id, count(*) from public.can_frame"
        " group by 1, 2, 3 except"
        " select node, bus, id, sum(frames) from public.can_inventory group by 1, 2, 3) d",
    ) == [(0,)]
