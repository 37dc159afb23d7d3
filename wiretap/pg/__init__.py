"""PostgreSQL ingest: pure row encoding (:mod:`.rows`, :mod:`.names`), the accounting
(:mod:`.ledger`), the on-disk spool (:mod:`.spool`), error diagnosis (:mod:`.diagnosis`) and the
writer's threads and policy (:mod:`.writer`). Importing this package imports none of them."""
