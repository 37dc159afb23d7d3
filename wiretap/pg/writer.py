"""The PostgreSQL writer: its two threads and their policy.

Owns: ``deliver`` (the broker-facing side, never blocks), the ``pg-writer`` thread that writes one
transaction per batch (modes ``insert``, ``function``, ``copy``), reconnects with exponential
backoff, drains the spool oldest first and bisects batches the database rejects for their
content; and the ``pg-keeper`` thread, which moves frames from memory to the spool whenever the
writer cannot take them (the database is away, or a statement has run for more than a second),
and abandons a connection whose statement gets no answer by its deadline. Neither thread waits for
the other: a database that stops answering holds up the writer only.

Where each frame is, is the :class:`~wiretap.pg.ledger.Ledger`'s business; rows and their SQL or
COPY bytes come from :mod:`.rows`; what an error means, from :mod:`.diagnosis`.

Order is kept by one rule: a frame enters the spool under its number (its place in arrival
order), and while the spool holds anything, it is written first.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from ..frames import Frame
from ..ratelimit import RateLimitedLog
from .diagnosis import CONFIG, CONTENT, OUTAGE, Diagnosis, diagnose, first_line
from .ledger import QUEUE_FULL, REJECTED, SHUTDOWN, WRITER_ERROR, Ledger
from .names import describe_dsn
from .rows import (
    COLUMNS,
    COPY_SQL,
    INSERT_SQL,
    ROW_TEMPLATE,
    Row,
    TimestampText,
    encode_copy,
    frame_rows,
    function_sql,
    render_rows,
)
from .spool import Intent, Spool

log = logging.getLogger("wiretap.pg")

APPLICATION_NAME = "wiretap-server"
STATEMENT_TIMEOUT_S = 10.0
# A statement without any answer this long after the server's own statement_timeout should have
# ended it is abandoned: the server is frozen or the network swallows packets.
ABANDON_FACTOR = 1.5
# Applied unless the DSN says otherwise: a dead host or a silently dropped connection must end
# in an error the writer can act on, not in a thread blocked for minutes.
CONNECTION_DEFAULTS = {
    "connect_timeout": "3",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
}
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
HIGH_WATER_MARKS = (0.80, 0.95)
# Above this fill level the queue's head moves to the spool (until the queue is half full) even
# while the database answers, since it is slower than the bus.
SPILL_FRACTION = HIGH_WATER_MARKS[0]
# A statement running longer than this is "holding the writer up": the keeper moves the queue to
# the spool meanwhile, so frames reach the disk within about a second of a database going away.
SLOW_STATEMENT_S = 1.0
# Frames that have waited this long in a queue that is not shrinking (a writer that falls behind
# the bus) go to the spool, where a crash or a power cut cannot take them. A queue the writer is
# clearing (the tail of a burst) stays: the spool's detour would halve the writer's speed.
MEMORY_WAIT_S = 1.0
KEEPER_TICK_S = 0.2
SPOOL_CHUNK_ROWS = 20_000
IDLE_WAIT_S = 0.5
RETRY_S = 1.0
# The share of the stop budget the writer may spend writing to PostgreSQL; then its statement is
# abandoned and the rest of the budget parks what is left in the spool.
STOP_WRITER_SHARE = 0.6
# An unexpected error with the same batch this many times: the batch is dropped and counted.
WRITER_ERROR_RETRIES = 3
CONFIG_LOG_INTERVAL_S = 60.0
LOG_INTERVAL_S = 10.0
TXID_SQL = "SELECT txid_current()"


class WriterSettings(Protocol):
    """What the writer needs of the ``[postgres]`` configuration (any object with these)."""

    dsn: str
    mode: str
    func: str
    batch_size: int
    flush_interval: float
    queue_size: int
    dir: Optional[str]
    cache_path: str
    cache_max_mb: float


class _Unavailable(Exception):
    """The database failed, not the rows; rows before ``done`` are committed or dropped.
    ``in_doubt``: the rows ``done..end`` were being committed when the connection failed, by
    transaction ``(txid, backend)``, which may or may not have committed."""

    def __init__(
        self, done: int, diagnosis: Diagnosis, in_doubt: Optional[Tuple[int, int, int]] = None
    ) -> None:
        super().__init__(diagnosis.cause)
        self.done = done
        self.diagnosis = diagnosis
        self.in_doubt = in_doubt  # (end, txid, backend)


class _SpoolStuck(Exception):
    """The spool refused to record an intent (a full disk): nothing was committed."""


def connect(
    dsn: str, statement_timeout_s: float = STATEMENT_TIMEOUT_S, node: Optional[str] = None
) -> psycopg2.extensions.connection:
    """A connection with the writer's application name, timeouts and keepalives; ``node`` fills
    the node column of a partitioned can_frame (init_schema.sql), which a plain table lacks: the
    rows the writer sends are the same for both."""
    params = psycopg2.extensions.parse_dsn(dsn) if dsn else {}
    extra = {key: value for key, value in CONNECTION_DEFAULTS.items() if key not in params}
    conn = psycopg2.connect(dsn, application_name=APPLICATION_NAME, **extra)
    with conn.cursor() as cur:
        cur.execute("SET statement_timeout = %s", (f"{int(statement_timeout_s * 1000)}ms",))
        if node:
            cur.execute("SELECT set_config('wiretap.node', %s, false)", (node,))
    conn.commit()
    return conn


def probe_sql(mode: str, func: str) -> str:
    """A statement that writes no row but needs everything a real write needs: the table or
    function, its columns or arguments, and the privilege to use them."""
    if mode == "function":
        return function_sql(func).replace(
            "(VALUES %s)",
            "(SELECT now(), 0, false, 0::smallint, false, ''::bytea, 0, 'rx'::text WHERE false)",
        )
    return (
        f"INSERT INTO public.can_frame ({COLUMNS})"
        " SELECT now(), 0, false, 0, false, ''::bytea, 0, 'rx' WHERE false"
    )


def probe(conn: psycopg2.extensions.connection, mode: str, func: str) -> None:
    """Run :func:`probe_sql` and the transaction-status function the spool relies on; rolls
    back. Raises what the database said."""
    try:
        with conn.cursor() as cur:
            cur.execute(probe_sql(mode, func))
            cur.execute("SELECT txid_status(txid_current())")
    finally:
        conn.rollback()


def check_target(settings: WriterSettings) -> Tuple[str, str]:
    """For ``--check-config``: ``("ok", text)``, ``("mistake", cause — fix)`` or
    ``("unreachable", cause)``."""
    try:
        conn = connect(settings.dsn or "")
    except psycopg2.Error as error:
        found = diagnose(error)
        if found.kind == CONFIG:
            return "mistake", f"{found.cause} — {found.fix}"
        return "unreachable", found.cause
    try:
        probe(conn, settings.mode, settings.func)
    except psycopg2.Error as error:
        found = diagnose(error)
        if found.kind == CONFIG:
            return "mistake", f"{found.cause} — {found.fix}"
        return "unreachable", found.cause
    finally:
        conn.close()
    target = settings.func if settings.mode == "function" else "public.can_frame"
    return "ok", f"{describe_dsn(settings.dsn or '')}: {target} accepts mode {settings.mode}"


class PgWriter:
    """Consumer that stores every frame in PostgreSQL, or in the spool until it can."""

    def __init__(
        self,
        settings: WriterSettings,
        default_dir: str,
        statement_timeout_s: float = STATEMENT_TIMEOUT_S,
        node: Optional[str] = None,
    ) -> None:
        self._dsn = settings.dsn or ""
        self._node = node or socket.gethostname()
        self._mode = settings.mode
        self._func = settings.func
        self._batch_size = settings.batch_size
        self._flush_interval = settings.flush_interval
        self._queue_size = settings.queue_size
        self._rx_dir = settings.dir or default_dir
        self._cache_path = settings.cache_path
        self._cache_max_bytes = int(settings.cache_max_mb * 1024 * 1024)
        self._statement_timeout_s = statement_timeout_s
        self._abandon_after = statement_timeout_s * ABANDON_FACTOR
        self._write_batch: Callable[[Any, List[Row]], None] = {
            "insert": self._insert,
            "function": self._call_function,
            "copy": self._copy,
        }[settings.mode]
        if settings.mode == "function":
            self._function_sql = function_sql(settings.func)
        self._ts_text = TimestampText()

        self.ledger = Ledger(self._queue_size)
        self._spool: Optional[Spool] = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._keeper_final = threading.Event()
        self._writer_deadline = float("inf")
        self._thread: Optional[threading.Thread] = None
        self._keeper: Optional[threading.Thread] = None

        self._conn: Optional[psycopg2.extensions.connection] = None
        self._conn_lock = threading.Lock()  # the keeper never touches a socket being closed
        self._conn_names: Tuple[object, object] = ("", "")
        self._backend = 0
        self._statement_started: Optional[float] = None
        self._held: Tuple[int, List[Frame]] = (0, [])  # the writer's live batch
        self._held_failures = 0
        self._in_doubt: Optional[Tuple[int, int, int, List[Frame], List[Row]]] = None
        self._unsettled: Optional[Tuple[Intent, bool]] = None  # a settle to try again
        self._resolve_needed = True  # after every (re)connect: intents a failure may have left

        self._queued_before = 0  # the queue's length at the keeper's previous look
        self._marks = [int(self._queue_size * fraction) for fraction in HIGH_WATER_MARKS]
        self._next_mark = 0
        self._spill_level = int(self._queue_size * SPILL_FRACTION)
        self._outage = False  # the database failed and has not taken a batch since
        self._outage_logged = False
        self._draining = False
        self._backoff = BACKOFF_START_S
        self._next_attempt = 0.0
        self._last_take = 0.0
        self._logs = RateLimitedLog(log, LOG_INTERVAL_S)
        self._config_log = RateLimitedLog(log, CONFIG_LOG_INTERVAL_S)
        self.config_problem = ""  # the current configuration mistake, for status pages
        self.connects = 0  # connection attempts

    # -- broker side (one delivering thread at a time) ------------------------------------------

    def deliver(self, frames: Sequence[Frame]) -> None:
        """Queue frames for the writer thread; drops and counts what does not fit. Never blocks."""
        count = len(frames)
        accepted, length = self.ledger.offer(frames)
        if accepted < count:
            self._logs.log(
                "queue-full", logging.WARNING,
                "queue FULL (%d frames): dropped %d new frames (dropped=%d so far)",
                self._queue_size, count - accepted, self.ledger.dropped[QUEUE_FULL],
            )  # fmt: skip
        if self._next_mark < len(self._marks) and length >= self._marks[self._next_mark]:
            while self._next_mark < len(self._marks) and length >= self._marks[self._next_mark]:
                log.warning(
                    "queue high water mark: %d %% (%d of %d frames)",
                    round(100 * HIGH_WATER_MARKS[self._next_mark]), length, self._queue_size,
                )  # fmt: skip
                self._next_mark += 1
        # Wake the writer when a batch is complete or when it may be idle (the queue held only
        # these frames); anything in between it collects at its flush deadline.
        if length <= accepted or length >= self._batch_size:
            self._wake.set()

    # -- control --------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the spool (a previous run's leftovers are drained first) and start the threads.
        ``OSError`` / ``sqlite3.Error`` when the spool cannot be opened."""
        folder = os.path.dirname(os.path.abspath(self._cache_path))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self._spool = Spool(self._cache_path, self._cache_max_bytes)
        self.ledger = Ledger(self._queue_size, self._spool.count, self._spool.last_seq + 1)
        if self._spool.count:
            log.info("spool %s holds %d frames from a previous run", self._cache_path,
                     self._spool.count)  # fmt: skip
        log.info(
            "PostgreSQL writer: %s, mode=%s, batch_size=%d, flush_interval=%gs, spool=%s",
            describe_dsn(self._dsn), self._mode, self._batch_size, self._flush_interval,
            self._cache_path,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="pg-writer", daemon=True)
        self._keeper = threading.Thread(target=self._keep, name="pg-keeper", daemon=True)
        self._thread.start()
        self._keeper.start()

    def stop(self, timeout: float = 8.0) -> None:
        """Write what is in memory to PostgreSQL, or to the spool when it cannot; then stop.

        The writer has ``STOP_WRITER_SHARE`` of ``timeout``; a statement still running then is
        abandoned, and the rest of the time parks the queue and the writer's batch in the spool.
        What still does not fit is dropped and counted; the last line tells where every frame is.
        """
        if self._thread is None or self._stopping.is_set():
            return
        started = time.monotonic()
        self._writer_deadline = started + timeout * STOP_WRITER_SHARE
        self._stopping.set()
        self._wake.set()
        self._thread.join(max(started + timeout * 0.75 - time.monotonic(), 0.0))
        self._keeper_final.set()
        self._keeper.join(max(started + timeout * 0.95 - time.monotonic(), 0.0))
        if self._thread.is_alive():
            held = self.ledger.in_flight
            log.error("pg-writer did not stop within %.1f s: %d frames it held are lost",
                      timeout, held)  # fmt: skip
            self.ledger.dropped_from_memory(held, SHUTDOWN, by_writer=True)
        if not self._keeper.is_alive():
            left = self.ledger.drop_queue(SHUTDOWN)
            if left:
                log.error("dropped %d frames at shutdown: the spool %s has no room for them",
                          left, self._cache_path)  # fmt: skip
            if not self._thread.is_alive():
                self._spool.close()
        snapshot = self.ledger.snapshot()
        log.info(
            "pg-writer stopped: offered=%d carried=%d committed=%d spooled=%d in_memory=%d"
            " dropped=%d (%s)%s",
            snapshot["offered"], snapshot["carried"], snapshot["committed"], snapshot["spooled"],
            snapshot["in_memory"], snapshot["dropped"],
            " ".join(f"{reason}={count}" for reason, count in self.ledger.dropped.items()),
            "" if Ledger.balances(snapshot) else " -- THE ACCOUNTS DO NOT BALANCE",
        )  # fmt: skip

    def counters(self) -> Dict[str, int]:
        """The stats line's database fields: ``queued`` is every frame in memory, ``spooled``
        every row in the spool not yet stored, ``dropped`` every lost frame (all reasons),
        ``carried`` the rows a previous run left in the spool."""
        snapshot = self.ledger.snapshot()
        return {
            "queued": snapshot["in_memory"],
            "enq": snapshot["offered"],
            "wrote": snapshot["committed"],
            "dropped": snapshot["dropped"],
            "spooled": snapshot["spooled"],
            "conn": 1 if self._conn is not None else 0,
            "rejected": snapshot[f"dropped_{REJECTED}"],
            "carried": snapshot["carried"],
        }

    def snapshot(self) -> Dict[str, int]:
        """Every term of the accounting identity, drops by reason (see :class:`Ledger`)."""
        return self.ledger.snapshot()

    # -- pg-keeper thread -----------------------------------------------------------------------

    def _keep(self) -> None:
        while True:
            final = self._keeper_final.wait(KEEPER_TICK_S)
            try:
                self._watch_statement()
                self._spool_waiting(final)
            except Exception:
                self._logs.log("keeper-error", logging.ERROR, "pg-keeper: unexpected error",
                               exc_info=True)  # fmt: skip
            if final:
                return

    def _watch_statement(self) -> None:
        started = self._statement_started
        if started is None:
            return
        deadline = started + self._abandon_after
        if self._stopping.is_set():
            deadline = min(deadline, self._writer_deadline)
        if time.monotonic() >= deadline:
            self._abandon(time.monotonic() - started)

    def _abandon(self, waited: float) -> None:
        """Shut the connection's socket down under the writer: its statement fails at once,
        whatever the server does (a frozen server cannot take a cancel request either)."""
        with self._conn_lock:
            conn = self._conn
            if conn is None or conn.closed:
                return
            try:
                sock = socket.socket(fileno=os.dup(conn.fileno()))
            except (OSError, psycopg2.Error):
                return
            with sock:
                if self._socket_names(sock) != self._conn_names:
                    return  # libpq closed it and the number now belongs to another socket
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._logs.log(
            "abandon", logging.WARNING,
            "PostgreSQL did not answer for %.1f s: abandoning the connection", waited,
        )  # fmt: skip

    @staticmethod
    def _socket_names(sock: socket.socket) -> Tuple[object, object]:
        try:
            return sock.getsockname(), sock.getpeername()
        except OSError:
            return None, None

    def _spool_waiting(self, final: bool) -> None:
        """Move frames the writer cannot take to the spool: all of them when the database is
        away, a statement holds the writer up, the spool has a backlog to drain first, frames
        have waited more than ``MEMORY_WAIT_S`` in a queue that is not shrinking, or the writer
        is done; down to half the queue when it is above the spill level. So frames wait in
        memory about a second at most, unless the spool is full or the writer is clearing a
        burst."""
        ledger = self.ledger
        shrinking = ledger.queued < self._queued_before
        self._queued_before = ledger.queued
        if not ledger.queued:
            if self._next_mark:
                self._next_mark = 0
            return
        started = self._statement_started
        if (
            final
            or self._outage
            or ledger.spooled  # a backlog drains first: new frames wait on disk behind it
            or (ledger.oldest_wait() > MEMORY_WAIT_S and not shrinking)
            or (started is not None and time.monotonic() - started > SLOW_STATEMENT_S)
            or (self._stopping.is_set() and self._conn is None)
            or (self._stopping.is_set() and time.monotonic() >= self._writer_deadline)
        ):
            left = ledger.queued
        elif ledger.queued > self._spill_level:
            left = ledger.queued - self._queue_size // 2
        else:
            if ledger.queued < self._queue_size // 2:
                self._next_mark = 0
            return
        while left > 0:
            first, frames = ledger.take_for_spool(min(SPOOL_CHUNK_ROWS, left))
            if not frames:
                break
            try:
                stored = self._spool_frames(first, frames, by_writer=False)
            except BaseException:
                ledger.give_back(first, frames, by_writer=False)  # still queued, not lost
                raise
            left -= len(frames)
            if stored < len(frames):
                break
        self._wake.set()

    def _spool_frames(
        self,
        first: int,
        frames: List[Frame],
        by_writer: bool,
        rows: Optional[List[Row]] = None,
    ) -> int:
        """Spool as many of ``frames`` (taken from the ledger) as fit; the rest go back to the
        queue's head. Returns how many were spooled."""
        if rows is None:
            rows = frame_rows(frames, self._rx_dir)
        fit = self._spool.fitting(rows)
        if fit:
            try:
                self._spool.append(first, rows[:fit])
            except sqlite3.Error as error:
                self._logs.log("spool-write", logging.ERROR, "cannot write spool %s: %s",
                               self._cache_path, error)  # fmt: skip
                fit = 0
            else:
                self.ledger.spooled_from_memory(fit, by_writer)
        if fit < len(frames):
            self._logs.log(
                "spool-full", logging.ERROR,
                "spool %s is full (%d frames, %d of %d MB, or its disk): frames wait in the"
                " queue, and are dropped and counted when it overflows",
                self._cache_path, self._spool.count, self._spool.size_bytes >> 20,
                self._cache_max_bytes >> 20,
            )  # fmt: skip
            self.ledger.give_back(first + fit, frames[fit:], by_writer)
        return fit

    # -- pg-writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._finished():
                try:
                    self._step()
                except Exception:
                    self._writer_error()
        finally:
            self._shutdown()

    def _finished(self) -> bool:
        if not self._stopping.is_set():
            return False
        if time.monotonic() >= self._writer_deadline:
            return True
        if self._unsettled is not None or self._in_doubt is not None:
            return self._conn is None
        return not self.ledger.in_memory and (not self.ledger.spooled or self._conn is None)

    def _writer_error(self) -> None:
        """A bug or a broken spool must not end ingest for good, nor lose the batch in hand:
        it goes back to the queue's head (and is dropped, counted, if it keeps failing)."""
        self._logs.log("writer-error", logging.ERROR,
                       "pg-writer hit an unexpected error; retrying in %g s", RETRY_S,
                       exc_info=True)  # fmt: skip
        self._statement_started = None
        self._disconnect()
        first, frames = self._held
        held = self.ledger.in_flight - (len(self._in_doubt[3]) if self._in_doubt else 0)
        if frames and held > 0:
            rest = frames[len(frames) - held :]
            self._held_failures += 1
            if self._held_failures >= WRITER_ERROR_RETRIES:
                log.error("dropped %d frames: writing them failed %d times", held,
                          self._held_failures)  # fmt: skip
                self.ledger.dropped_from_memory(held, WRITER_ERROR, by_writer=True)
                self._held_failures = 0
            else:
                self.ledger.give_back(first + len(frames) - held, rest, by_writer=True)
        self._held = (0, [])
        self._stopping.wait(RETRY_S)

    def _step(self) -> None:
        """One round of the writer's work."""
        if self._unsettled is not None:
            self._settle_again()
            return
        if self._conn is None:
            if self._stopping.is_set():
                self._stopping.wait(0.05)  # the keeper parks the queue
                return
            wait = self._next_attempt - time.monotonic()
            if wait > 0:
                self._stopping.wait(min(wait, IDLE_WAIT_S))
                return
            self._connect()
            return
        if self._resolve_needed:
            self._resolve_in_doubt()
            return
        if self.ledger.spooled or self.ledger.moving:
            self._drain_batch()
            return
        first, frames = self._next_batch()
        if frames:
            self._store(first, frames)

    def _next_batch(self) -> Tuple[int, List[Frame]]:
        """Up to ``batch_size`` frames once it is full or ``flush_interval`` after its first."""
        ledger = self.ledger
        if not ledger.queued:
            self._wake.clear()
            if not ledger.queued and not self._stopping.is_set():
                self._wake.wait(IDLE_WAIT_S)
            if not ledger.queued:
                return 0, []
            first_seen = time.monotonic()
        else:
            first_seen = self._last_take  # these arrived after the previous batch was taken
        deadline = first_seen + self._flush_interval
        while ledger.queued < self._batch_size and not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            if ledger.queued < self._batch_size:
                self._wake.wait(remaining)
        self._last_take = time.monotonic()
        return ledger.take_batch(self._batch_size)

    def _store(self, first: int, frames: List[Frame]) -> None:
        self._held = (first, frames)
        rows = frame_rows(frames, self._rx_dir)
        try:
            self._write(rows, None)
        except _Unavailable as failure:
            self._park_failed(first, frames, rows, failure)
            self._lose_connection(failure.diagnosis)
        self._held = (0, [])
        self._held_failures = 0

    def _park_failed(
        self, first: int, frames: List[Frame], rows: List[Row], failure: _Unavailable
    ) -> None:
        """The rows after ``failure.done`` are still the writer's. Those whose commit is in doubt
        go to the spool with their transaction, all or none (else they stay here until the
        database says how it ended); the others go to the spool, or back to the queue's head."""
        done = failure.done
        if failure.in_doubt is not None:
            end, txid, backend = failure.in_doubt
            if not self._spool_whole(first + done, rows[done:end], (txid, backend)):
                self._in_doubt = (txid, backend, first + done, frames[done:end], rows[done:end])
            done = end
        self._spool_frames(first + done, frames[done:], True, rows[done:])

    def _spool_whole(self, first: int, rows: List[Row], intent: Tuple[int, int]) -> bool:
        """Spool rows in doubt with their transaction: all of them, or none."""
        if self._spool.fitting(rows) < len(rows):
            return False
        try:
            self._spool.append(first, rows, intent)
        except sqlite3.Error:
            return False
        self.ledger.spooled_from_memory(len(rows), by_writer=True)
        return True

    def _drain_batch(self) -> None:
        seqs, rows = self._spool.oldest(self._batch_size)
        if not rows:
            self._stopping.wait(KEEPER_TICK_S / 4)  # the keeper is still writing its chunk
            return
        if not self._draining:
            self._draining = True
            log.info("draining %d cached frames to database", self.ledger.spooled)
        try:
            self._write(rows, seqs)
        except _Unavailable as failure:
            self._lose_connection(failure.diagnosis)
            return
        except _SpoolStuck:
            self._stopping.wait(RETRY_S)
            return
        if not self.ledger.spooled:
            self._draining = False
            log.info("cached frames drained, back to live ingest")

    # -- exactly once ---------------------------------------------------------------------------

    def _settle(self, intent: Intent, committed: bool) -> int:
        try:
            removed = self._spool.settle(intent, committed)
        except sqlite3.Error as error:
            self._unsettled = (intent, committed)
            self._logs.log(
                "spool-delete", logging.ERROR,
                "cannot delete stored frames from spool %s: %s; retrying every %g s (the spool"
                " remembers they are stored)", self._cache_path, error, RETRY_S,
            )  # fmt: skip
            return 0
        if self._unsettled is not None:
            self._unsettled = None
            log.info("deleted the stored frames from spool %s", self._cache_path)
        return removed

    def _settle_again(self) -> None:
        intent, committed = self._unsettled
        self._unsettled = None
        self._settle(intent, committed)
        if self._unsettled is not None:
            self._stopping.wait(RETRY_S)

    def _txid_status(self, txid: int) -> Optional[str]:
        with self._conn.cursor() as cur:
            cur.execute("SELECT txid_status(%s)", (txid,))
            status = cur.fetchone()[0]
        self._conn.commit()
        return status

    def _resolve_in_doubt(self) -> None:
        """Ask PostgreSQL how each transaction left in doubt ended, and settle it: committed
        rows are done, the others are written again. One still running (a connection
        abandoned while its server was frozen) is ended first."""
        try:
            if self._in_doubt is not None:
                txid, backend, first, frames, _rows = self._in_doubt
                status = self._status_or_end(txid, backend)
                if status is None:
                    return
                self._in_doubt = None
                if status == "committed":
                    self.ledger.committed_from_memory(len(frames))
                else:
                    self.ledger.give_back(first, frames, by_writer=True)
            for intent in self._spool.intents():
                status = self._status_or_end(intent.txid, intent.backend)
                if status is None:
                    return
                if status == "committed":
                    self.ledger.committed_from_spool(self._spool.rows_between(intent))
                    self._settle(intent, True)
                else:
                    self._settle(intent, False)
                if self._unsettled is not None:
                    return
            self._resolve_needed = False
        except psycopg2.Error as error:
            self._lose_connection(diagnose(error))

    def _status_or_end(self, txid: int, backend: int) -> Optional[str]:
        status = self._txid_status(txid)
        if status != "in progress":
            # NULL: too old to know (the spool waited for billions of transactions). Written
            # again: a duplicate is better than a loss.
            return status or "aborted"
        if backend and backend != self._backend:
            with self._conn.cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
            self._conn.commit()
        self._stopping.wait(RETRY_S / 4)
        return None

    # -- database -------------------------------------------------------------------------------

    def _connect(self) -> None:
        self.connects += 1
        try:
            conn = connect(self._dsn, self._statement_timeout_s, self._node)
        except psycopg2.Error as error:
            self._lose_connection(diagnose(error))
            return
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            self._conn_names = self._socket_names(sock)
        self._backend = conn.get_backend_pid()
        with self._conn_lock:
            self._conn = conn
        self._statement_started = time.monotonic()  # the probe may wait too (a table lock)
        try:
            probe(conn, self._mode, self._func)
        except psycopg2.Error as error:
            self._lose_connection(diagnose(error))
            return
        finally:
            self._statement_started = None
        if self.config_problem:
            self.config_problem = ""
            log.info("the database accepts the server's writes now")
        log.info("connected to PostgreSQL: %s", describe_dsn(self._dsn))

    def _disconnect(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(psycopg2.Error):
                    conn.close()

    def _lose_connection(self, found: Diagnosis) -> None:
        self._disconnect()
        self._resolve_needed = True
        self._draining = False
        self._outage = True
        if found.kind == CONFIG:
            self.config_problem = f"{found.cause} — {found.fix}"
            self._config_log.log(
                "config", logging.ERROR,
                "PostgreSQL refuses the server's writes: %s. Fix: %s. Frames go to the spool"
                " meanwhile", found.cause, found.fix,
            )  # fmt: skip
        elif not self._outage_logged:
            self._outage_logged = True
            log.warning("database unavailable, caching frames to disk: %s", found.cause)
        else:
            log.debug("database still unavailable: %s", found.cause)
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _write(self, rows: List[Row], seqs: Optional[List[int]]) -> None:
        """Commit ``rows`` (bisecting around rows the database rejects), spooled rows ``seqs``
        (each transaction's intent recorded first) or live ones (``None``). ``_Unavailable``
        when the database fails."""
        self._write_range(rows, seqs, 0, len(rows))
        if self._outage:
            self._outage = False
            if self._outage_logged:
                self._outage_logged = False
                log.info("database available again")
        self._backoff = BACKOFF_START_S

    def _write_range(self, rows: List[Row], seqs: Optional[List[int]], lo: int, hi: int) -> None:
        conn = self._conn
        batch = rows[lo:hi]
        intent: Optional[Intent] = None
        txid = None
        self._statement_started = time.monotonic()
        try:
            with conn.cursor() as cur:
                self._write_batch(cur, batch)
                cur.execute(TXID_SQL)
                txid = cur.fetchone()[0]
            if seqs is not None:
                intent = Intent(txid, seqs[lo], seqs[hi - 1], self._backend)
                try:
                    self._spool.record_intent(intent)
                except sqlite3.Error as error:
                    self._rollback()
                    self._logs.log("spool-intent", logging.ERROR,
                                   "cannot record progress in spool %s (%s): draining it waits",
                                   self._cache_path, error)  # fmt: skip
                    raise _SpoolStuck(str(error)) from error
            try:
                conn.commit()
            except psycopg2.Error as error:
                # COMMIT was sent: whether it took effect, only the server knows.
                raise _Unavailable(lo, diagnose(error), (hi, txid, self._backend)) from error
        except (_Unavailable, _SpoolStuck):
            raise
        except Exception as error:
            found = diagnose(error) if isinstance(error, psycopg2.Error) else None
            if not self._rollback() or (found is not None and found.kind != CONTENT):
                raise _Unavailable(lo, found or Diagnosis(OUTAGE, first_line(error), "")) from error
            if hi - lo == 1:
                self._reject(rows, seqs, lo, error, REJECTED if found else WRITER_ERROR)
            else:
                middle = (lo + hi) // 2
                self._write_range(rows, seqs, lo, middle)
                self._write_range(rows, seqs, middle, hi)
            return
        finally:
            self._statement_started = None
        if intent is None:
            self.ledger.committed_from_memory(hi - lo)
        else:
            self.ledger.committed_from_spool(hi - lo)
            self._settle(intent, True)
            if self._unsettled is not None:
                raise _SpoolStuck("cannot delete stored rows")

    def _rollback(self) -> bool:
        """Roll back after a failed batch; ``False`` when the connection is gone."""
        try:
            self._conn.rollback()
        except psycopg2.Error:
            return False
        return not self._conn.closed

    def _reject(
        self,
        rows: List[Row],
        seqs: Optional[List[int]],
        index: int,
        error: BaseException,
        reason: str,
    ) -> None:
        """One row the database (or the encoder) will not take: dropped, counted, logged."""
        row = rows[index]
        if seqs is None:
            self.ledger.dropped_from_memory(1, reason, by_writer=True)
        else:
            self._settle(Intent(0, seqs[index], seqs[index], 0), True)
            self.ledger.dropped_from_spool(1, reason)
        ts_us, can_id, extended, _dlc, is_fd, data, bus, direction = row
        self._logs.log(
            ("reject", reason, getattr(error, "pgcode", None) or type(error).__name__),
            logging.ERROR,
            "%s frame bus=%d id=%0*X%s [%d] %s ts_us=%d dir=%s, dropped: %s",
            "database rejected" if reason == REJECTED else "cannot encode",
            bus, 8 if extended else 3, can_id, " FD" if is_fd else "", len(data),
            data.hex().upper(), ts_us, direction, first_line(error),
        )  # fmt: skip

    def _shutdown(self) -> None:
        """The writer's last act: a batch whose commit is in doubt goes to the spool with its
        transaction, or is counted as dropped (it may be stored)."""
        if self._in_doubt is not None:
            txid, backend, first, frames, rows = self._in_doubt
            self._in_doubt = None
            if not self._spool_whole(first, rows, (txid, backend)):
                log.error("dropped %d frames at shutdown whose commit is in doubt: the spool"
                          " has no room for them (they may be stored)", len(frames))  # fmt: skip
                self.ledger.dropped_from_memory(len(frames), SHUTDOWN, by_writer=True)
        self._disconnect()

    def _insert(self, cur: Any, rows: List[Row]) -> None:
        psycopg2.extras.execute_values(
            cur,
            INSERT_SQL,
            [(psycopg2.extensions.AsIs(text),) for text in render_rows(self._ts_text, rows, False)],
            template=ROW_TEMPLATE,
            page_size=len(rows),
        )

    def _call_function(self, cur: Any, rows: List[Row]) -> None:
        psycopg2.extras.execute_values(
            cur,
            self._function_sql,
            [(psycopg2.extensions.AsIs(text),) for text in render_rows(self._ts_text, rows, True)],
            template=ROW_TEMPLATE,
            page_size=len(rows),
        )

    def _copy(self, cur: Any, rows: List[Row]) -> None:
        cur.copy_expert(COPY_SQL, io.BytesIO(encode_copy(rows)), size=1 << 20)
