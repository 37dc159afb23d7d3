"""The PostgreSQL writer: a bounded queue from the broker, batches, and no silent loss.

Owns: the writer's queue (``deliver`` is the broker-facing side and never blocks), the
``pg-writer`` thread that turns frames into rows and writes them in one transaction per batch
(modes ``insert``, ``function``, ``copy``), reconnecting with exponential backoff, parking rows in
the :class:`~wiretap.pg.spool.Spool` while the database is away and draining it oldest first,
bisecting batches the database rejects for their content, and the writer's counters.

Order is kept by one rule: the spool only ever holds frames older than everything in the queue
(it is filled from the queue's head), and while it holds anything it is written first.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import sqlite3
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Sequence

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from ..broker import DropReporter
from ..config import SQL_FUNCTION_NAME, mask_dsn
from ..frames import TX, Frame
from .spool import ROW_OVERHEAD_BYTES, Row, Spool, row_cost

if TYPE_CHECKING:
    from ..config import PostgresConfig

log = logging.getLogger("wiretap.pg")

APPLICATION_NAME = "wiretap-server"
STATEMENT_TIMEOUT = "10s"
# Applied unless the DSN says otherwise: a dead host or a silently dropped connection must end
# in an error the writer can act on, not in a thread blocked for minutes.
CONNECTION_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
}
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
HIGH_WATER_MARKS = (0.80, 0.95)
# Above this fill level the queue's head moves to the spool (until the queue is half full) even
# while the database is up, since it is slower than the bus: the queue must keep room for bursts,
# and the spool is far bigger.
SPILL_FRACTION = HIGH_WATER_MARKS[0]
SPOOL_CHUNK_ROWS = 20_000
IDLE_WAIT_S = 0.5
SPOOL_DELETE_RETRY_S = 1.0
# "Spool is full" is said again only once this share of it is free: during a long drain each
# batch frees a little room that the queue fills at once, and that is one condition, not many.
SPOOL_FULL_CLEAR_FRACTION = 0.10
SPOOL_ERROR_LOG_INTERVAL_S = 10.0
# A func that rejects everything must not flood the journal: rejected frames are logged one by one
# up to this many per interval (all of them are counted).
REJECT_LOG_BURST = 20
REJECT_LOG_INTERVAL_S = 10.0
# SQLSTATE classes that blame the rows, not the connection: data exception, integrity
# constraint, SQL routine / external routine / trigger exceptions, PL/pgSQL raise, check option.
CONTENT_ERROR_CLASSES = frozenset({"22", "23", "2F", "38", "39", "P0", "44"})

COLUMNS = "ts, id, extended, dlc, is_fd, data_bytes, bus, dir"
INSERT_SQL = f"INSERT INTO public.can_frame ({COLUMNS}) VALUES %s"
# Each row reaches execute_values as one ready SQL literal (see render_row): letting psycopg2
# adapt eight parameters per row costs 2.5x the client CPU. The ts goes as a text literal, which
# PostgreSQL parses once; an expression per row (epoch + n * interval) cost it twice the time of
# the rest of the row.
ROW_TEMPLATE = "%s"
SQL_BOOL = ("false", "true")
COPY_SQL = f"COPY public.can_frame ({COLUMNS}) FROM STDIN WITH (FORMAT binary)"

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = struct.pack("!h", -1)
PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01T00:00:00Z, where binary timestamptz counts from
COPY_ROW_HEAD = struct.Struct("!hiqiiiBihiBi")
"""One binary COPY row up to the payload: field count (8), then ``int32 length`` + value for
``ts`` (int8 µs since 2000-01-01), ``id`` (int4), ``extended`` (bool), ``dlc`` (int2), ``is_fd``
(bool), and the length of ``data_bytes`` (whose bytes follow)."""
COPY_ROW_BUS = struct.Struct("!ii")
"""``bus``: length 4, int4 value. ``dir`` follows as a ready-made length + text field."""
COPY_DIR_FIELD = {"rx": struct.pack("!i", 2) + b"rx", "tx": struct.pack("!i", 2) + b"tx"}


class TimestampText:
    """µs since the epoch -> PostgreSQL timestamptz text in UTC, the date and time of the
    current second cached (frames arrive in time order)."""

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._prefix = ""

    def __call__(self, ts_us: int) -> str:
        second, micros = divmod(ts_us, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S.", time.gmtime(second))
        return f"{self._prefix}{micros:06d}+00"


def render_row(ts_text: str, row: Row, casts: bool) -> psycopg2.extensions.AsIs:
    """One row as a SQL ``(…)`` literal. Safe to paste: ``ts_text`` comes from
    :class:`TimestampText`, numbers are formatted as integers (anything else raises), the payload
    as hex, and ``dir`` is one of the validated ``rx``/``tx``. ``casts`` types the columns of a
    bare ``VALUES`` list (function mode), where nothing else would; ``dlc`` must be smallint.
    """
    _ts_us, can_id, extended, dlc, is_fd, data, bus, direction = row
    if direction not in ("rx", "tx"):
        raise ValueError(f"direction {direction!r}")
    if casts:
        text = (
            f"('{ts_text}'::timestamptz,{can_id:d},{SQL_BOOL[extended]},{dlc:d}::smallint,"
            f"{SQL_BOOL[is_fd]},E'\\\\x{data.hex()}'::bytea,{bus:d},'{direction}'::text)"
        )
    else:
        text = (
            f"('{ts_text}',{can_id:d},{SQL_BOOL[extended]},{dlc:d},{SQL_BOOL[is_fd]},"
            f"E'\\\\x{data.hex()}'::bytea,{bus:d},'{direction}')"
        )
    return psycopg2.extensions.AsIs(text)


class _Unavailable(Exception):
    """The database failed (not the rows); the first ``done`` rows are committed or rejected."""

    def __init__(self, done: int, reason: str) -> None:
        super().__init__(reason)
        self.done = done
        self.reason = reason


def quote_function_name(name: str) -> str:
    """``schema.func`` as a quoted SQL identifier; ``ValueError`` unless it is a plain one.
    Checked here as well as in the configuration, since this is where it is pasted into SQL."""
    if not SQL_FUNCTION_NAME.fullmatch(name):
        raise ValueError(f"not a plain or schema-qualified SQL identifier: {name!r}")
    return ".".join(f'"{part}"' for part in name.split("."))


def _reason(error: BaseException) -> str:
    text = getattr(error, "pgerror", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0]


def _is_content_error(error: BaseException) -> bool:
    """Whether a failed batch is the rows' fault (bisect it) rather than the database's."""
    if not isinstance(error, psycopg2.Error):
        return True  # a row that cannot even be encoded
    code = error.pgcode
    return bool(code) and code[:2] in CONTENT_ERROR_CLASSES


class PgWriter:
    """Consumer that stores every frame in PostgreSQL, or in the spool until it can."""

    def __init__(self, cfg: PostgresConfig, default_dir: str) -> None:
        self._dsn = cfg.dsn or ""
        self._mode = cfg.mode
        self._batch_size = cfg.batch_size
        self._flush_interval = cfg.flush_interval
        self._queue_size = cfg.queue_size
        self._rx_dir = cfg.dir or default_dir
        self._cache_path = cfg.cache_path
        self._cache_max_bytes = int(cfg.cache_max_mb * 1024 * 1024)
        self._write_batch: Callable[[Any, List[Row]], None] = {
            "insert": self._insert,
            "function": self._call_function,
            "copy": self._copy,
        }[cfg.mode]
        if cfg.mode == "function":
            self._function_sql = (
                f"SELECT {quote_function_name(cfg.func)}"
                "(v.ts, v.extended, v.is_fd, v.id, NULL::text, v.dlc, v.data_bytes, v.bus, v.dir)"
                f" FROM (VALUES %s) AS v ({COLUMNS})"
            )

        self._ts_text = TimestampText()

        self._queue: Deque[Frame] = collections.deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_deadline = float("inf")
        self._thread: Optional[threading.Thread] = None
        self._in_flight = 0  # frames taken from the queue and not yet stored or spooled
        self._spool: Optional[Spool] = None
        self._conn: Optional[psycopg2.extensions.connection] = None
        self._backend_pid: Optional[int] = None

        self._marks = [int(self._queue_size * fraction) for fraction in HIGH_WATER_MARKS]
        self._next_mark = 0  # index into _marks of the next level to warn about
        self._full_logged = False
        self._queue_drops = DropReporter("PostgreSQL writer")
        self._spill_level = int(self._queue_size * SPILL_FRACTION)

        self._outage = False  # "database unavailable" already said for the current outage
        self._draining = False
        self._spool_full_logged = False
        self._spool_error_logged_at = float("-inf")
        self._delete_failing = False
        self._next_delete = 0.0
        self._backoff = BACKOFF_START_S
        self._next_attempt = 0.0
        self._last_take = 0.0
        self._reject_window_start = float("-inf")
        self._reject_logged = 0
        self._reject_unlogged = 0

        self.enq = 0
        self.wrote = 0
        self.rejected = 0

    # -- broker side (dispatcher thread) --------------------------------------------------------

    def deliver(self, frames: Sequence[Frame]) -> None:
        """Queue frames for the writer thread; drops and counts what does not fit. Never blocks."""
        queue = self._queue
        count = len(frames)
        room = self._queue_size - len(queue)
        if count > room:
            room = max(room, 0)
            self._queue_full(count - room)
            frames = frames[:room]
            count = room
            if not count:
                return
        queue.extend(frames)
        self.enq += count
        length = len(queue)
        if self._next_mark < len(self._marks) and length >= self._marks[self._next_mark]:
            self._high_water(length)
        # Wake the writer when a batch is complete or when it may be idle (the queue held only
        # these frames); anything in between it collects at its flush deadline.
        if length <= count or length >= self._batch_size:
            self._wake.set()

    def _high_water(self, length: int) -> None:
        while self._next_mark < len(self._marks) and length >= self._marks[self._next_mark]:
            log.warning(
                "queue high water mark: %d %% (%d of %d frames)",
                round(100 * HIGH_WATER_MARKS[self._next_mark]),
                length,
                self._queue_size,
            )
            self._next_mark += 1
            if self._next_mark == len(self._marks) and self._in_flight:
                # The writer keeps the queue under 80 % by spilling to the spool, so reaching
                # the last mark means it is held inside one statement (a lock, a database that
                # stopped answering). Cancel it: the writer then parks the queue in the spool,
                # and frames are not dropped while the spool has room (postgres.md 4).
                log.warning("the database holds the writer up, moving the queue to the spool")
                self._cancel_statement()

    def _queue_full(self, dropped: int) -> None:
        if not self._full_logged:
            self._full_logged = True
            log.warning("queue FULL (%d frames), dropping new frames", self._queue_size)
        self._queue_drops.add(dropped)

    # -- control --------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the spool (a previous run's leftovers are drained first) and start the thread."""
        self._spool = Spool(self._cache_path, self._cache_max_bytes)
        if self._spool.count:
            log.info("spool %s holds %d frames from a previous run", self._cache_path,
                     self._spool.count)  # fmt: skip
        log.info(
            "PostgreSQL writer: %s, mode=%s, batch_size=%d, flush_interval=%gs, spool=%s",
            mask_dsn(self._dsn),
            self._mode,
            self._batch_size,
            self._flush_interval,
            self._cache_path,
        )
        self._thread = threading.Thread(target=self._run, name="pg-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 8.0) -> None:
        """Write the queue to PostgreSQL, or to the spool if it is down; then stop the thread.

        A statement still running at three quarters of ``timeout`` (a table lock, a database
        that stopped answering) is cancelled, so the thread parks its batch and the queue in the
        spool in the time left instead of being cut off at exit with them.
        """
        if self._thread is None or not self._thread.is_alive():
            return
        started = time.monotonic()
        self._stop_deadline = started + timeout * 0.75
        self._stopping.set()
        self._wake.set()
        self._thread.join(self._stop_deadline - started)
        if self._thread.is_alive():
            self._cancel_statement()
            self._thread.join(max(started + timeout - time.monotonic(), 0.0))
        if self._thread.is_alive():
            log.error("pg-writer did not stop within %.1f s: %d frames lost (queued or in flight)",
                      timeout, len(self._queue) + self._in_flight)  # fmt: skip

    def _cancel_statement(self) -> None:
        """Ask the server to cancel the writer's running statement, over a connection of its own
        in a thread of its own. Not ``conn.cancel()``: psycopg2 holds the GIL through libpq's
        cancel request, whose connect has no timeout, so an unreachable host would freeze the
        whole process instead of this one thread."""
        pid = self._backend_pid
        if self._conn is None or pid is None:
            return

        def cancel() -> None:
            try:
                with contextlib.closing(psycopg2.connect(
                    self._dsn, application_name=APPLICATION_NAME, connect_timeout="2"
                )) as conn:  # fmt: skip
                    conn.autocommit = True
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_cancel_backend(%s)", (pid,))
            except psycopg2.Error as error:
                log.warning("cannot cancel the writer's statement: %s", _reason(error))

        threading.Thread(target=cancel, name="pg-cancel", daemon=True).start()

    def counters(self) -> Dict[str, int]:
        """``spooled`` is the number of frames in the spool now; ``dropped`` includes rows the
        database rejected (also in ``rejected``)."""
        return {
            "queued": len(self._queue),
            "enq": self.enq,
            "wrote": self.wrote,
            "dropped": self._queue_drops.total + self.rejected,
            "spooled": self._spool.count if self._spool else 0,
            "conn": 1 if self._conn is not None else 0,
            "rejected": self.rejected,
        }

    def oldest_queued_ns(self) -> Optional[int]:
        """Receive time of the oldest frame waiting in memory, None when the queue is empty."""
        try:
            return self._queue[0].ts_ns
        except IndexError:
            return None

    # -- writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._finished():
                try:
                    if self._step():
                        break
                except Exception:
                    # A bug or a broken spool must not end ingest for good: log it, start over
                    # with a fresh connection, and keep the frames where they are.
                    log.exception("pg-writer hit an unexpected error; retrying in 1 s")
                    self._disconnect()
                    self._stopping.wait(1.0)
        finally:
            self._shutdown()

    def _step(self) -> bool:
        """One round of the writer's work; ``True`` when it is time to stop."""
        if self._next_mark and len(self._queue) < self._queue_size // 2:
            self._next_mark = 0
            self._full_logged = False
        if self._spool.unremoved and time.monotonic() >= self._next_delete:
            self._delete_stored((), ())
        if (
            self._conn is None
            and not self._stopping.is_set()
            and time.monotonic() >= self._next_attempt
        ):
            self._connect()
        if self._conn is None:
            self._park_queue()
            if self._stopping.is_set():
                return True
            wait = min(self._next_attempt - time.monotonic(), self._flush_interval)
            self._stopping.wait(max(wait, 0.01))
            return False
        if len(self._queue) > self._spill_level:
            # Down to half: the rest goes straight to the database after the spooled part.
            self._park_queue(len(self._queue) - self._queue_size // 2)
        if self._spool.count:
            self._drain_batch()
            return False
        batch = self._next_batch()
        if batch:
            self._store(batch)
        return False

    def _finished(self) -> bool:
        if not self._stopping.is_set():
            return False
        if time.monotonic() >= self._stop_deadline:
            return True
        return not self._queue and (not self._spool.count or self._conn is None)

    def _shutdown(self) -> None:
        self._park_queue()
        if self._spool.unremoved:
            self._delete_stored((), ())
        if self._spool.unremoved:
            log.error(
                "spool %s still holds %d frames already stored in PostgreSQL;"
                " the next start writes them again",
                self._cache_path,
                self._spool.unremoved,
            )
        left = len(self._queue)
        if left:
            self._queue.clear()
            self._queue_drops.total += left
            log.error("dropped %d frames at shutdown: the spool is full", left)
        self._disconnect()
        self._spool.close()
        log.info(
            "pg-writer stopped: enq=%d wrote=%d spooled=%d dropped=%d",
            self.enq,
            self.wrote,
            self._spool.count,
            self._queue_drops.total + self.rejected,
        )

    def _next_batch(self) -> List[Frame]:
        """Up to ``batch_size`` frames once it is full or ``flush_interval`` after its first."""
        queue = self._queue
        if not queue:
            self._wake.clear()
            if not queue and not self._stopping.is_set():
                self._wake.wait(IDLE_WAIT_S)
            if not queue:
                return []
            first_seen = time.monotonic()
        else:
            first_seen = self._last_take  # these arrived after the previous batch was taken
        deadline = first_seen + self._flush_interval
        while len(queue) < self._batch_size and not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wake.clear()
            if len(queue) < self._batch_size:
                self._wake.wait(remaining)
        self._last_take = time.monotonic()
        popleft = queue.popleft
        return [popleft() for _ in range(min(self._batch_size, len(queue)))]

    def _to_rows(self, frames: Sequence[Frame]) -> List[Row]:
        rx_dir = self._rx_dir
        return [
            (ts_ns // 1000, can_id, extended, len(data), fd, data, bus,
             TX if direction == TX else rx_dir)
            for bus, can_id, extended, _rtr, fd, _brs, _esi, data, ts_ns, direction, _origin
            in frames
        ]  # fmt: skip

    def _store(self, frames: List[Frame]) -> None:
        self._in_flight = len(frames)
        try:
            rows = self._to_rows(frames)
            try:
                self._write(rows)
            except _Unavailable as failure:
                self._lose_connection(failure.reason)
                # The spool is empty here, so the failed rows become its oldest; what does not
                # fit goes back to the front of the queue.
                kept = self._spool_rows(rows[failure.done :])
                self._queue.extendleft(reversed(frames[failure.done + kept :]))
        finally:
            self._in_flight = 0

    def _drain_batch(self) -> None:
        if not self._draining:
            self._draining = True
            log.info("draining %d cached frames to database", self._spool.count)
        seqs, rows = self._spool.oldest(self._batch_size)
        try:
            self._write(rows)
        except _Unavailable as failure:
            self._delete_stored(seqs[: failure.done], rows[: failure.done])
            self._lose_connection(failure.reason)
            return
        self._delete_stored(seqs, rows)
        if not self._spool.count:
            self._draining = False
            log.info("cached frames drained, back to live ingest")

    def _delete_stored(self, seqs: Sequence[int], rows: Sequence[Row]) -> None:
        """Take committed rows out of the spool. A failed delete (a full disk) is retried every
        ``SPOOL_DELETE_RETRY_S``; the spool's mark keeps the rows from being written again."""
        try:
            self._spool.delete(seqs, rows)
        except sqlite3.Error as error:
            self._next_delete = time.monotonic() + SPOOL_DELETE_RETRY_S
            if not self._delete_failing:
                self._delete_failing = True
                log.error("cannot delete stored frames from spool %s: %s; retrying every %g s",
                          self._cache_path, error, SPOOL_DELETE_RETRY_S)  # fmt: skip
            return
        if self._delete_failing:
            self._delete_failing = False
            log.info("deleted the stored frames from spool %s", self._cache_path)
        if self._spool.room_bytes() > self._cache_max_bytes * SPOOL_FULL_CLEAR_FRACTION:
            self._spool_full_logged = False

    def _park_queue(self, limit: Optional[int] = None) -> None:
        """Move frames (up to ``limit``) from the queue's head to the spool, as many as fit."""
        queue = self._queue
        left = len(queue) if limit is None else limit
        full = False
        while queue and left > 0 and not full:
            room = self._spool.room_bytes()
            frames = []
            while queue and len(frames) < min(SPOOL_CHUNK_ROWS, left):
                cost = ROW_OVERHEAD_BYTES + len(queue[0].data)
                if cost > room:
                    full = True
                    break
                room -= cost
                frames.append(queue.popleft())
            if frames and not self._spool_append(self._to_rows(frames)):
                queue.extendleft(reversed(frames))
                return
            left -= len(frames)
        if full:
            self._spool_full()

    def _spool_rows(self, rows: List[Row]) -> int:
        """Append as many of ``rows`` as fit; returns how many."""
        room = self._spool.room_bytes()
        count = 0
        for row in rows:
            room -= row_cost(row)
            if room < 0:
                break
            count += 1
        if not self._spool_append(rows[:count]):
            return 0
        if count < len(rows):
            self._spool_full()
        return count

    def _spool_append(self, rows: List[Row]) -> bool:
        try:
            self._spool.append(rows)
        except sqlite3.Error as error:
            # e.g. the disk is full: the frames stay in the queue, which is bounded and counted.
            now = time.monotonic()
            if now - self._spool_error_logged_at >= SPOOL_ERROR_LOG_INTERVAL_S:
                self._spool_error_logged_at = now
                log.error("cannot write spool %s: %s", self._cache_path, error)
            return False
        return True

    def _spool_full(self) -> None:
        if not self._spool_full_logged:
            self._spool_full_logged = True
            log.error(
                "spool %s is full (%d frames, %d MB); frames wait in the queue",
                self._cache_path,
                self._spool.count,
                self._cache_max_bytes // (1024 * 1024),
            )

    # -- database -------------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            params = psycopg2.extensions.parse_dsn(self._dsn) if self._dsn else {}
            extra = {key: value for key, value in CONNECTION_DEFAULTS.items() if key not in params}
            conn = psycopg2.connect(self._dsn, application_name=APPLICATION_NAME, **extra)
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (STATEMENT_TIMEOUT,))
            conn.commit()
        except psycopg2.Error as error:
            self._lose_connection(_reason(error))
            return
        self._backend_pid = conn.get_backend_pid()
        self._conn = conn
        log.info("connected to PostgreSQL: %s", mask_dsn(self._dsn))

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg2.Error):
                self._conn.close()
            self._conn = None

    def _lose_connection(self, reason: str) -> None:
        self._disconnect()
        self._draining = False
        if not self._outage:
            self._outage = True
            log.warning("database unavailable, caching frames to disk: %s", reason)
        else:
            log.debug("database still unavailable: %s", reason)
        self._next_attempt = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _write(self, rows: List[Row]) -> None:
        """Commit ``rows`` (bisecting around rows the database rejects); ``_Unavailable`` when
        the database fails, telling how many leading rows are already done."""
        self._write_range(rows, 0, len(rows))
        if self._outage:
            self._outage = False
            log.info("database available again")
        self._backoff = BACKOFF_START_S

    def _write_range(self, rows: List[Row], lo: int, hi: int) -> None:
        conn = self._conn
        batch = rows[lo:hi]
        try:
            with conn.cursor() as cur:
                self._write_batch(cur, batch)
            conn.commit()
        except Exception as error:
            if not self._rollback() or not _is_content_error(error):
                raise _Unavailable(lo, _reason(error)) from error
            if hi - lo == 1:
                self._reject(batch[0], error)
            else:
                middle = (lo + hi) // 2
                self._write_range(rows, lo, middle)
                self._write_range(rows, middle, hi)
            return
        self.wrote += len(batch)

    def _rollback(self) -> bool:
        """Roll back after a failed batch; ``False`` when the connection is gone."""
        try:
            self._conn.rollback()
        except psycopg2.Error:
            return False
        return not self._conn.closed

    def _reject(self, row: Row, error: BaseException) -> None:
        self.rejected += 1
        now = time.monotonic()
        if now - self._reject_window_start >= REJECT_LOG_INTERVAL_S:
            if self._reject_unlogged:
                log.error("%d more rejected frames were not logged one by one",
                          self._reject_unlogged)  # fmt: skip
            self._reject_window_start = now
            self._reject_logged = self._reject_unlogged = 0
        if self._reject_logged >= REJECT_LOG_BURST:
            self._reject_unlogged += 1
            return
        self._reject_logged += 1
        ts_us, can_id, extended, _dlc, is_fd, data, bus, direction = row
        log.error(
            "database rejected frame bus=%d id=%0*X%s [%d] %s ts_us=%d dir=%s: %s",
            bus,
            8 if extended else 3,
            can_id,
            " FD" if is_fd else "",
            len(data),
            data.hex().upper(),
            ts_us,
            direction,
            _reason(error),
        )

    def _rendered(self, rows: List[Row], casts: bool) -> List[tuple]:
        ts_text = self._ts_text
        return [(render_row(ts_text(row[0]), row, casts),) for row in rows]

    def _insert(self, cur: Any, rows: List[Row]) -> None:
        psycopg2.extras.execute_values(
            cur, INSERT_SQL, self._rendered(rows, False), template=ROW_TEMPLATE, page_size=len(rows)
        )

    def _call_function(self, cur: Any, rows: List[Row]) -> None:
        psycopg2.extras.execute_values(
            cur,
            self._function_sql,
            self._rendered(rows, True),
            template=ROW_TEMPLATE,
            page_size=len(rows),
        )

    def _copy(self, cur: Any, rows: List[Row]) -> None:
        pack_head = COPY_ROW_HEAD.pack
        pack_bus = COPY_ROW_BUS.pack
        dir_field = COPY_DIR_FIELD
        parts = [COPY_HEADER]
        append = parts.append
        for ts_us, can_id, extended, dlc, is_fd, data, bus, direction in rows:
            append(pack_head(8, 8, ts_us - PG_EPOCH_US, 4, can_id, 1, extended, 2, dlc, 1, is_fd,
                             dlc))  # fmt: skip
            append(data)
            append(pack_bus(4, bus))
            append(dir_field[direction])
        append(COPY_TRAILER)
        cur.copy_expert(COPY_SQL, io.BytesIO(b"".join(parts)), size=1 << 20)
