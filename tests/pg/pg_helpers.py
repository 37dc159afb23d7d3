"""Helpers for the PostgreSQL tests (a module of its own: every conftest is named 'conftest')."""

from __future__ import annotations

import time
from typing import Callable, List

import psycopg2

WAIT_S = 15.0


def fetch(dsn: str, query: str, params: tuple = ()) -> List[tuple]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        rows = [
            tuple(bytes(value) if isinstance(value, memoryview) else value for value in row)
            for row in cur.fetchall()
        ]
    conn.close()
    return rows


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def row_count(dsn: str) -> int:
    return fetch(dsn, "select count(*) from public.can_frame")[0][0]


def balanced(writer) -> dict:
    """The writer's accounting snapshot, asserting the identity
    offered + carried == committed + spooled + in memory + dropped."""
    snapshot = writer.snapshot()
    assert snapshot["offered"] + snapshot["carried"] == (
        snapshot["committed"] + snapshot["spooled"] + snapshot["in_memory"] + snapshot["dropped"]
    ), snapshot
    return snapshot
