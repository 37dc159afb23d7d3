"""A process to kill: the database writer fed numbered frames at a steady rate, as the broker
would feed it. Prints ``fed N T`` (frames handed over so far, monotonic seconds) after each
delivery, so whoever kills it knows how many frames it had read and when.

    python crash_driver.py DSN SPOOL_PATH RATE
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

from test_writer import numbered  # noqa: E402

from wiretap.config import PostgresConfig  # noqa: E402
from wiretap.pg.writer import PgWriter  # noqa: E402

CHUNK = 20


def main() -> None:
    dsn, spool, rate = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = dataclasses.replace(PostgresConfig(), enable=True, dsn=dsn, cache_path=spool)
    writer = PgWriter(settings, "rx")
    writer.start()
    sent = 0
    started = time.monotonic()
    while True:
        delay = started + sent / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        writer.deliver(numbered(CHUNK, sent))
        sent += CHUNK
        print(f"fed {sent} {time.monotonic():.3f}", flush=True)


if __name__ == "__main__":
    main()
