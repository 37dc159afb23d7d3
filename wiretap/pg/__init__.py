"""PostgreSQL ingest: the batch writer (:mod:`.writer`) and its on-disk spool (:mod:`.spool`)."""

from .writer import PgWriter

__all__ = ["PgWriter"]
