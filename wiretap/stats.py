"""Counters and the periodic stats line.

Owns the format of the one-line summary operators grep for (``stats rx=… fps=… clients=… …
queued=… enq=… wrote=… dropped=… spooled=… conn=… carried=… outside=… node=… error_frames=…
bus_off=…``; new fields only ever go at the end, so existing greps keep working) and the timer
thread that logs it every ``stats_interval`` seconds. It knows no other module: ``app`` hands it
a function that collects the current counter values.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Mapping, Optional

log = logging.getLogger("wiretap.stats")

FIELDS = (
    "rx", "fps", "clients", "client_drops", "kernel_drops", "tx", "tx_fail",
    "queued", "enq", "wrote", "dropped", "spooled", "conn", "carried", "outside", "node",
    "error_frames", "bus_off",
)  # fmt: skip


def format_line(values: Mapping[str, object]) -> str:
    """The stats line, fields in the documented order; a field not given is printed as 0."""
    parts = []
    for name in FIELDS:
        value = values.get(name, 0)
        if isinstance(value, float):
            value = f"{value:.1f}"
        parts.append(f"{name}={value}")
    return "stats " + " ".join(parts)


class StatsReporter:
    """Logs :func:`format_line` every ``interval`` seconds; ``fps`` is rx since the last line."""

    def __init__(self, interval: float, collect: Callable[[], Dict[str, object]]) -> None:
        self.interval = interval
        self.collect = collect
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_rx = 0
        self._last_time = time.monotonic()

    def snapshot(self) -> Dict[str, object]:
        values = dict(self.collect())
        now = time.monotonic()
        rx = int(values.get("rx", 0))
        elapsed = now - self._last_time
        values["fps"] = (rx - self._last_rx) / elapsed if elapsed > 0 else 0.0
        self._last_rx, self._last_time = rx, now
        return values

    def start(self) -> None:
        if self.interval <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def log_now(self) -> None:
        log.info("%s", format_line(self.snapshot()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.log_now()
            except Exception:
                log.exception("stats: could not collect the counters")
