"""Fixtures for the PostgreSQL tests: one throw-away cluster per session (tests/pgcluster.py)."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, List

import psycopg2
import pytest
from pgcluster import PgCluster

from wiretap.config import PostgresConfig
from wiretap.pg.writer import PgWriter

WAIT_S = 15.0


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = PgCluster()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg(pg_cluster: PgCluster) -> Iterator[PgCluster]:
    """The cluster, running, with an empty ``can_frame`` (a drill may have left it stopped)."""
    if not (pg_cluster.datadir / "postmaster.pid").exists():
        pg_cluster.start()
    pg_cluster.psql("-c", "truncate public.can_frame restart identity")
    yield pg_cluster


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


@pytest.fixture
def make_writer(tmp_path: Path) -> Iterator[Callable[..., PgWriter]]:
    """``make_writer(dsn, **postgres_settings)``: a started writer, stopped after the test."""
    writers: List[PgWriter] = []

    def make(dsn: str, default_dir: str = "rx", **settings: object) -> PgWriter:
        settings = {"flush_interval": 0.05, "cache_path": str(tmp_path / "spool.db"), **settings}
        cfg = dataclasses.replace(PostgresConfig(), enable=True, dsn=dsn, **settings)
        writer = PgWriter(cfg, default_dir)
        writer.start()
        writers.append(writer)
        return writer

    yield make
    for writer in writers:
        writer.stop()


@pytest.fixture
def pg_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="wiretap.pg")
    return caplog
