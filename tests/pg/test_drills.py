"""Drills for the database path with a real PostgreSQL and real signals: a frozen database, a
SIGTERM while it is frozen, a spool whose disk fills, an exception inside a write, and
configuration mistakes. Each ends with the accounting identity holding exactly:
offered + carried == committed + spooled + in memory + dropped."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from harness import ServerProcess
from pg_helpers import balanced, fetch, row_count, wait_for
from test_writer import BASE_NS, numbered, spool_rows
from test_writer_faults import stored_exactly_once_in_order

import wiretap.pg.writer as writer_module
from wiretap.frames import Frame

pytestmark = pytest.mark.pg

ROOT = Path(__file__).resolve().parents[2]
DEMO_LOG = ROOT / "examples" / "demo.log"


class Feeder:
    """Delivers numbered frames to a writer at about ``rate`` frames/s from a thread, as the
    broker would; ``sent`` is how many so far. Checks the identity and the queue bound after
    every delivery."""

    def __init__(self, writer, rate: int, chunk: int = 20) -> None:
        self.writer = writer
        self.rate = rate
        self.chunk = chunk
        self.sent = 0
        self.worst_in_memory = 0
        self.unbalanced: List[dict] = []
        self._running = threading.Event()
        self._thread = threading.Thread(target=self._feed, name="test-feeder")

    def start(self) -> Feeder:
        self._running.set()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._running.clear()
        self._thread.join()
        return self.sent

    def _feed(self) -> None:
        started = time.monotonic()
        while self._running.is_set():
            due = started + self.sent / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.writer.deliver(numbered(self.chunk, self.sent))
            self.sent += self.chunk
            snapshot = self.writer.snapshot()
            self.worst_in_memory = max(self.worst_in_memory, snapshot["in_memory"])
            if snapshot["offered"] + snapshot["carried"] != (
                snapshot["committed"] + snapshot["spooled"] + snapshot["in_memory"]
                + snapshot["dropped"]
            ):  # fmt: skip
                self.unbalanced.append(snapshot)


def messages(pg_log: pytest.LogCaptureFixture, text: str) -> List[str]:
    return [r.getMessage() for r in pg_log.records if text in r.getMessage()]


# -- a database that stops answering ----------------------------------------------------------


def test_a_frozen_database_is_abandoned_and_frames_reach_the_spool_meanwhile(
    pg, make_writer, pg_log
):
    # The server's statement timeout is 1 s here (10 s in production): the writer abandons a
    # statement 1.5 s without an answer, whatever the server does.
    writer = make_writer(pg.dsn, batch_size=200, queue_size=3000, statement_timeout_s=1.0)
    feeder = Feeder(writer, rate=2000).start()
    try:
        wait_for(lambda: writer.snapshot()["committed"] >= 1000, "rows before the freeze")
        with pg.frozen():
            before = writer.snapshot()
            wait_for(lambda: messages(pg_log, "abandoning the connection"), "the abandon")
            # More than the whole queue reaches the disk while the database is frozen: the
            # queue alone could not have held it.
            wait_for(
                lambda: writer.snapshot()["spooled"] >= before["spooled"] + 2 * 3000,
                "frames reaching the spool while the database is frozen",
            )
            assert writer.snapshot()["committed"] <= before["committed"] + 200
        wait_for(lambda: writer.snapshot()["spooled"] == 0, "the spool drained after the thaw",
                 timeout=60)  # fmt: skip
    finally:
        sent = feeder.stop()
    wait_for(lambda: writer.snapshot()["committed"] == sent, f"all {sent} rows", timeout=60)
    writer.stop()
    assert stored_exactly_once_in_order(pg.dsn, sent)
    snapshot = balanced(writer)
    assert (snapshot["offered"], snapshot["committed"], snapshot["dropped"]) == (sent, sent, 0)
    assert feeder.unbalanced == []
    assert feeder.worst_in_memory <= 3000


def final_stats(server: ServerProcess) -> Dict[str, int]:
    line = server.final_stats()
    return {key: int(value) for key, value in re.findall(r" (\w+)=(\d+)(?= |$)", line)}


def spool_count(state_dir: Path) -> int:
    return spool_rows(state_dir / "wiretap-spool.db")


def test_sigterm_while_the_database_is_frozen_spools_everything_and_says_so(
    pg, make_writer, tmp_path
):
    server = ServerProcess(
        "--port", "0", "--stats-interval", "0", "--iface", f"replay:{DEMO_LOG}",
        "--replay-speed", "20", "--replay-loop", "--pg-enable", "--pg-dsn", pg.dsn,
        env={"STATE_DIRECTORY": str(tmp_path)},
    )  # fmt: skip
    try:
        wait_for(lambda: row_count(pg.dsn) > 500, "rows before the freeze")
        with pg.frozen():
            wait_for(lambda: spool_count(tmp_path) > 0, "frames spooled while frozen")
            assert server.stop() == 0  # within the harness's 10 s, or it raises
    finally:
        server.kill()
    final = final_stats(server)
    assert final["rx"] + final["carried"] == (
        final["wrote"] + final["spooled"] + final["queued"] + final["dropped"]
    ), final
    assert (final["queued"], final["dropped"], final["carried"]) == (0, 0, 0), final
    assert spool_count(tmp_path) == final["spooled"]
    assert final["spooled"] > 0

    # Thawed: the next writer settles the transaction abandoned in COMMIT, if any, and drains.
    drain = make_writer(pg.dsn, cache_path=str(tmp_path / "wiretap-spool.db"))
    wait_for(lambda: drain.snapshot()["spooled"] == 0, "the spool drained", timeout=60)
    assert fetch(
        pg.dsn,
        "select count(*), count(distinct (ts, bus, id, data_bytes)) from public.can_frame",
    ) == [(final["rx"], final["rx"])]


# -- a spool whose disk fills -----------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Fill what is left of ``disk`` with a file, as another program would."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, bytes(4096))
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)
    return filler


def test_a_full_spool_disk_drops_counted_and_never_stores_a_row_twice(
    pg, make_writer, tmp_path, pg_log
):
    with small_disk(tmp_path / "disk", "2m") as disk:
        path = disk / "spool.db"
        pg.stop()
        writer = make_writer(pg.dsn, cache_path=str(path), queue_size=2000, batch_size=500)
        # Slow enough for the keeper to keep the queue short until the spool is full.
        feeder = Feeder(writer, rate=5_000, chunk=50).start()
        try:
            wait_for(lambda: messages(pg_log, "is full"), "the spool full", timeout=60)
            wait_for(lambda: writer.snapshot()["dropped"] > 0, "the queue overflowing")
        finally:
            sent = feeder.stop()
        assert feeder.unbalanced == []
        assert feeder.worst_in_memory <= 2000
        full = balanced(writer)
        assert full["spooled"] > 0 and full["dropped"] == full["dropped_queue_full"]

        # Another program takes the rest of the disk; then the database comes back. The spool
        # cannot note its progress, so it waits rather than risk writing a batch twice.
        filler = fill(disk)
        pg.start()
        wait_for(
            lambda: (
                messages(pg_log, "cannot record progress")
                or messages(pg_log, "cannot delete stored frames")
                or writer.snapshot()["spooled"] == 0
            ),
            "the drain to wait for the disk (or to finish within the reserve)",
        )
        writer.stop()
        first = balanced(writer)
        assert first["offered"] == sent
        stored_first = row_count(pg.dsn)

        filler.unlink()
        second = make_writer(pg.dsn, cache_path=str(path))
        wait_for(lambda: second.snapshot()["spooled"] == 0, "the spool drained", timeout=60)
        second.stop()
        after = balanced(second)
    stored = sent - first["dropped"]
    assert stored_first <= stored
    assert fetch(pg.dsn, "select count(*), count(distinct ts) from public.can_frame") == [
        (stored, stored)
    ]
    assert after["carried"] + after["offered"] == after["committed"] + after["dropped"]


# -- an unexpected exception inside a write -----------------------------------------------------

BAD_PAYLOAD = b"\xba\xd0"


def test_a_row_the_encoder_chokes_on_is_dropped_counted_and_the_rest_stored(
    pg, make_writer, pg_log, monkeypatch
):
    render_rows = writer_module.render_rows

    def buggy(ts_text, rows, casts):  # a bug in row rendering, hit by one row
        if any(row[5] == BAD_PAYLOAD for row in rows):
            raise ValueError("bug in rendering")
        return render_rows(ts_text, rows, casts)

    monkeypatch.setattr(writer_module, "render_rows", buggy)
    frames = numbered(40)
    frames[17] = frames[17]._replace(data=BAD_PAYLOAD)
    writer = make_writer(pg.dsn, batch_size=40)
    writer.deliver(frames)
    wait_for(lambda: writer.snapshot()["committed"] == 39, "the good rows")
    snapshot = balanced(writer)
    assert (snapshot["dropped"], snapshot["dropped_writer_error"]) == (1, 1)
    assert len(messages(pg_log, "cannot encode frame")) == 1
    assert row_count(pg.dsn) == 39


def failing_in_the_writer(times: int):
    """``frame_rows`` that raises in the pg-writer thread ``times`` times, or (-1) always and
    in every thread (the keeper cannot spool the frames either)."""
    frame_rows = writer_module.frame_rows
    failures = [0]

    def flaky(frames: List[Frame], rx_dir: str):
        if times < 0 or (threading.current_thread().name == "pg-writer" and failures[0] < times):
            failures[0] += 1
            raise RuntimeError("unexpected")
        return frame_rows(frames, rx_dir)

    return flaky


def test_an_unexpected_error_keeps_the_batch_in_hand_and_retries_it(
    pg, make_writer, pg_log, monkeypatch
):
    monkeypatch.setattr(writer_module, "frame_rows", failing_in_the_writer(1))
    writer = make_writer(pg.dsn, batch_size=50)
    writer.deliver(numbered(50))
    wait_for(lambda: writer.snapshot()["committed"] == 50, "the batch stored after the retry")
    assert balanced(writer)["dropped"] == 0
    assert stored_exactly_once_in_order(pg.dsn, 50)
    assert len(messages(pg_log, "pg-writer hit an unexpected error")) == 1


def test_a_batch_that_always_fails_is_dropped_and_counted_not_lost(
    pg, make_writer, pg_log, monkeypatch
):
    monkeypatch.setattr(writer_module, "frame_rows", failing_in_the_writer(-1))
    writer = make_writer(pg.dsn, batch_size=50)
    writer.deliver(numbered(50))
    wait_for(lambda: writer.snapshot()["dropped_writer_error"] == 50, "the batch given up")
    snapshot = balanced(writer)
    assert (snapshot["committed"], snapshot["in_memory"], snapshot["dropped"]) == (0, 0, 50)
    assert messages(pg_log, "dropped 50 frames: writing them failed 3 times")


# -- configuration mistakes --------------------------------------------------------------------


def test_a_missing_function_is_one_clear_error_frames_are_spooled_and_it_recovers(
    pg, make_writer, pg_log
):
    pg.psql("-c", "drop function if exists public.later_ingest")
    writer = make_writer(pg.dsn, mode="function", func="public.later_ingest")
    writer.deliver(numbered(30))
    wait_for(lambda: writer.snapshot()["spooled"] == 30, "frames spooled")
    wait_for(lambda: writer.connects >= 3, "the writer trying again")
    errors = messages(pg_log, "PostgreSQL refuses the server's writes")
    assert len(errors) == 1  # at most once a minute
    assert "later_ingest" in errors[0] and "[postgres] func (--pg-func)" in errors[0]
    assert not messages(pg_log, "database unavailable")

    pg.psql("-c", LATER_FUNC)
    wait_for(lambda: writer.snapshot()["committed"] == 30, "stored once it exists", timeout=30)
    assert stored_exactly_once_in_order(pg.dsn, 30)
    assert balanced(writer)["dropped"] == 0
    assert messages(pg_log, "the database accepts the server's writes now")


LATER_FUNC = """
create function public.later_ingest(
    _ts timestamptz, _extended boolean, _is_fd boolean, _id integer default null,
    _id_hex text default null, _dlc smallint default null, _data_bytes bytea default null,
    _bus integer default 0, _dir text default 'rx')
returns bigint language sql as $$
    select public.ingest_can_frame(_ts, _extended, _is_fd, _id, _id_hex, _dlc, _data_bytes,
                                   _bus, _dir)
$$;
"""


def test_a_role_without_rights_is_told_what_to_grant(pg, make_writer, pg_log):
    pg.psql("-c", "drop role if exists reader", "-c", "create role reader login")
    dsn = pg.dsn.replace("user=wiretap", "user=reader")
    writer = make_writer(dsn)
    writer.deliver(numbered(10))
    wait_for(lambda: writer.snapshot()["spooled"] == 10, "frames spooled")
    wait_for(lambda: messages(pg_log, "PostgreSQL refuses"), "the error")
    assert "GRANT INSERT ON public.can_frame" in messages(pg_log, "PostgreSQL refuses")[0]
    assert balanced(writer)["dropped"] == 0


def run_check_config(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "wiretap-server.py"), "--check-config", "--pg-enable",
         *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_check_config_probes_the_database_target(pg):
    pg.psql("-c", "drop function if exists public.later_ingest")
    missing = run_check_config("--pg-dsn", pg.dsn, "--pg-func", "public.later_ingest")
    assert missing.returncode == 2, missing.stderr
    assert "config error: database:" in missing.stderr
    assert "later_ingest" in missing.stderr and "--pg-func" in missing.stderr

    good = run_check_config("--pg-dsn", pg.dsn, "--pg-mode", "copy")
    assert good.returncode == 0, good.stderr
    assert "public.can_frame accepts mode copy" in good.stdout


# -- a crash ------------------------------------------------------------------------------------

CRASH_RATE = 10_000


class Driver:
    """tests/pg/crash_driver.py in a subprocess: the writer at ``CRASH_RATE`` frames/s."""

    def __init__(self, dsn: str, spool: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("crash_driver.py")), dsn, str(spool),
             str(CRASH_RATE)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.fed: List[tuple] = []  # (frames fed, monotonic time)

    def read_until(self, count: int) -> None:
        for line in self.proc.stdout:
            _, sent, when = line.split()
            self.fed.append((int(sent), float(when)))
            if int(sent) >= count:
                return
        raise AssertionError("the driver ended")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for line in self.proc.stdout:  # what it printed before it died
            _, sent, when = line.split()
            self.fed.append((int(sent), float(when)))


def stored_numbers(dsn: str) -> List[int]:
    """The frame numbers in the table (numbered() puts n µs after BASE_NS in each ts)."""
    return [
        number
        for (number,) in fetch(
            dsn,
            "select ((extract(epoch from ts) * 1000000)::bigint - %s)::bigint"
            " from public.can_frame",
            (BASE_NS // 1000,),
        )
    ]


@pytest.mark.parametrize("database", ["up", "down", "down-then-up"])
def test_kill_9_mid_stream_loses_only_the_last_moments_and_stores_nothing_twice(
    pg, make_writer, tmp_path, database
):
    spool = tmp_path / "spool.db"
    if database != "up":
        pg.stop()
    driver = Driver(pg.dsn, spool)
    try:
        driver.read_until(2 * CRASH_RATE)
        if database == "down-then-up":
            pg.start()
            driver.read_until(driver.fed[-1][0] + 2 * CRASH_RATE)
    finally:
        driver.kill()
    if database == "down":
        pg.start()
    read, killed_at = driver.fed[-1]
    # Every frame fed up to 1.5 s before the kill must be stored: frames wait in memory up to a
    # second when the writer is behind (a machine this loaded), then one keeper round and one
    # spool commit.
    settled = max((n for n, when in driver.fed if when <= killed_at - 1.5), default=0)

    after = make_writer(pg.dsn, cache_path=str(spool))
    wait_for(lambda: after.snapshot()["spooled"] == 0, "the spool drained", timeout=60)
    numbers = stored_numbers(pg.dsn)
    assert len(numbers) == len(set(numbers)), "a frame stored twice"
    assert max(numbers) < read + 20  # + one delivery printed after the last line we read
    missing = set(range(settled)) - set(numbers)
    assert not missing, f"{len(missing)} frames lost older than 1.5 s, first {min(missing)}"
    balanced(after)
    print(f"kill -9, database {database}: read {read}, stored {len(numbers)},"
          f" lost {read - len(numbers)} (1.5 s is {read - settled})")  # fmt: skip
