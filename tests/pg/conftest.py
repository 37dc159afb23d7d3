"""Fixtures for the PostgreSQL tests: one throw-away cluster per session (tests/pgcluster.py)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
from pgcluster import PgCluster

from wiretap.config import PostgresConfig
from wiretap.pg.writer import PgWriter


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
    pg_cluster.psql("-c", "truncate public.can_frame, public.can_inventory restart identity")
    yield pg_cluster


@pytest.fixture
def make_writer(tmp_path: Path) -> Iterator[Callable[..., PgWriter]]:
    """``make_writer(dsn, **postgres_settings)``: a started writer, stopped after the test
    (``statement_timeout_s`` goes to the writer itself)."""
    writers: List[PgWriter] = []

    def make(dsn: str, default_dir: str = "rx", node: str = "", **settings: object) -> PgWriter:
        settings = {"flush_interval": 0.05, "cache_path": str(tmp_path / "spool.db"), **settings}
        timeouts = {}
        if "statement_timeout_s" in settings:
            timeouts["statement_timeout_s"] = settings.pop("statement_timeout_s")
        cfg = dataclasses.replace(PostgresConfig(), enable=True, dsn=dsn, **settings)
        writer = PgWriter(cfg, default_dir, node=node, **timeouts)
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
