"""The bounded log queue between every thread that logs and the one that writes stderr.

Owns: :class:`LogQueue`. A thread that logs (the dispatcher counting a drop, a client's handler)
only puts the record on a queue of at most ``capacity`` records and never waits: a stalled stderr
(a pipe nobody reads, a journald that pushes back) costs records, counted, never a stalled server
or unbounded memory. One writer thread empties the queue into the real handler and says how many
records were dropped once it catches up (``log: N lines dropped …``). ``stop()`` writes what is
queued and gives up on a stderr that makes no progress, so logging never holds up shutdown.
Imports the standard library only.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import threading
import time
from typing import Optional

CAPACITY = 10_000
"""Records queued at most: a few MB, minutes of normal logging, seconds of a flood."""

DROP_REPORT_S = 10.0
"""While records keep being dropped, the count is reported at least this often."""

STALL_S = 1.0
"""At stop, stderr that has not taken a single line for this long is given up on."""

FLUSH_MAX_S = 3.0
"""At stop, the longest the queue is given to drain into a slow but working stderr."""

_POLL_S = 0.25

log = logging.getLogger("wiretap.log")


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A ``QueueHandler`` that counts a record it cannot queue instead of waiting."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0
        self.direct: Optional[logging.Handler] = None  # set once the queue's writer has stopped
        self._count_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if self.direct is not None:
            self.direct.handle(record)
        else:
            super().emit(record)

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._count_lock:
                self.dropped += 1


class LogQueue:
    """Routes ``logger``'s records through a queue of ``capacity`` to ``target``.

    ``start()`` attaches it; ``stop()`` drains it and from then on passes records straight to
    ``target`` (it returns False when ``target`` stalled with records left; records are then still
    queued or dropped, never written by the thread that logs them).
    ``dropped`` counts records that did not fit.
    """

    def __init__(
        self,
        target: logging.Handler,
        logger: Optional[logging.Logger] = None,
        capacity: int = CAPACITY,
    ) -> None:
        self.target = target
        self.logger = logger if logger is not None else logging.getLogger()
        self.capacity = capacity
        self.records: queue.Queue[logging.LogRecord] = queue.Queue(capacity)
        self.handler = _DroppingQueueHandler(self.records)
        self.written = 0
        self._reported = 0
        self._last_report = time.monotonic()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    @property
    def dropped(self) -> int:
        return self.handler.dropped

    def start(self) -> None:
        self._thread.start()
        self.logger.addHandler(self.handler)

    def stop(self) -> bool:
        """Write what is queued, then log straight to ``target``; False if it stalled.

        Waits while the writer makes progress (at most :data:`FLUSH_MAX_S`), and gives up after
        :data:`STALL_S` without a line written. After a stall the writer thread is still blocked
        in ``target``: the caller should end the process without waiting for it.
        """
        self._stopping.set()
        deadline = time.monotonic() + FLUSH_MAX_S
        last_written, last_progress = self.written, time.monotonic()
        while self._thread.is_alive():
            self._thread.join(0.05)
            now = time.monotonic()
            if self.written != last_written:
                last_written, last_progress = self.written, now
            if now - last_progress > STALL_S or now > deadline:
                return False  # still attached: a late record is queued or dropped, never waits
        # Records logged from here on (a client's handler finishing late) are written at once;
        # the handler's lock makes the switch atomic with respect to a record being logged.
        with self.handler.lock:
            self.handler.direct = self.target
        self._drain()
        self._report_drops(final=True)
        return True

    def _run(self) -> None:
        while True:
            try:
                record = self.records.get(timeout=_POLL_S)
            except queue.Empty:
                self._report_drops()
                if self._stopping.is_set():
                    return
                continue
            self._write(record)
            if self.records.empty() or time.monotonic() - self._last_report >= DROP_REPORT_S:
                self._report_drops()

    def _drain(self) -> None:
        while True:
            try:
                self._write(self.records.get_nowait())
            except queue.Empty:
                return

    def _write(self, record: logging.LogRecord) -> None:
        self.target.handle(record)
        self.written += 1

    def _report_drops(self, final: bool = False) -> None:
        dropped = self.dropped
        new = dropped - self._reported
        if new:
            self._reported = dropped
            self._last_report = time.monotonic()
            self._write(
                log.makeRecord(
                    log.name, logging.WARNING, __file__, 0,
                    "log: %d lines dropped, stderr did not keep up (queue of %d lines full)",
                    (new, self.capacity), None,
                )
            )  # fmt: skip
        if final and dropped:
            self._write(
                log.makeRecord(
                    log.name, logging.WARNING, __file__, 0,
                    "log: %d lines dropped in all", (dropped,), None,
                )
            )  # fmt: skip
