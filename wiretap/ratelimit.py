"""Rate-limited log lines: the one shape for every log line a peer, a bus or a database can repeat.

Owns: :class:`RateLimitedLog`, which emits a line for a key at most once per interval and counts
what it held back, so that a client sending the same bad command in a loop costs one line per
interval, not one per command, and the line that does appear says how many were suppressed.
Imports the standard library only, so every room may use it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Hashable, Tuple

DEFAULT_INTERVAL_S = 10.0
# Keys remembered at most: a key per (client, kind) would otherwise grow with every client that
# ever connected. Past this, the oldest-used half is forgotten (their suppressed counts with it).
MAX_KEYS = 4096


class RateLimitedLog:
    """Logs through ``logger`` at most once per ``interval`` seconds for each key.

    ``log(key, level, msg, *args)`` returns True when the line was emitted (``exc_info=True``
    adds the traceback of the exception being handled, as with ``logging``). A line emitted after
    others were held back ends with ``(N more suppressed)``; ``suppressed_total`` counts all of
    them since start.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.suppressed_total = 0
        self._clock = clock
        self._keys: Dict[Hashable, Tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(
        self, key: Hashable, level: int, msg: str, *args: object, exc_info: bool = False
    ) -> bool:
        now = self._clock()
        with self._lock:
            last, held = self._keys.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._keys[key] = (last, held + 1)
                self.suppressed_total += 1
                return False
            if len(self._keys) >= MAX_KEYS and key not in self._keys:
                self._forget_oldest()
            self._keys[key] = (now, 0)
        if held:
            msg = f"{msg} (%d more suppressed)"
            args = (*args, held)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def forget(self, owner: Hashable) -> int:
        """Drops ``owner``'s keys (``owner`` itself and tuples starting with it: a client that
        left); returns how many of their lines were still held back."""
        with self._lock:
            mine = [
                k for k in self._keys if k == owner or (isinstance(k, tuple) and k[:1] == (owner,))
            ]
            return sum(self._keys.pop(k)[1] for k in mine)

    def _forget_oldest(self) -> None:
        by_age = sorted(self._keys.items(), key=lambda item: item[1][0])
        for key, _ in by_age[: len(by_age) // 2]:
            del self._keys[key]
