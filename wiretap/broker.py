"""The broker: one queue from every source, one dispatcher thread, many consumers.

Owns: the ``queue.Queue`` that readers hand batches of frames to, the dispatcher thread that
offers each batch to every registered consumer (stamping ``heartbeat`` each time round, idle or
not, so a wedged dispatcher can be told from a quiet one), and :class:`Mailbox`, the bounded
per-consumer buffer with its drop counter and rate-limited "not keeping up" log line. A consumer's
``deliver`` must never block: whatever it cannot take it drops and counts, so one slow consumer
costs frames for itself only.

When the buses are quiet the dispatcher waits 2 ms after a small batch and hands the consumers
everything that arrived meanwhile as one batch (up to ``MAX_DELIVERY`` frames): per-batch work
(a wake-up per consumer, one encode and one ``send`` per client) is what a busy server spends its
CPU on at modest rates.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Deque, List, Protocol, Sequence

from .frames import Frame

log = logging.getLogger("wiretap.broker")

DROP_LOG_INTERVAL_S = 10.0
COALESCE_S = 0.002
COALESCE_BELOW = 64  # a batch this small waits COALESCE_S for the next reads to join it
MAX_DELIVERY = 2048  # frames per delivery: well inside a client's outbox (~13,000 frames)
# Frames read but not yet dispatched, at most: ~28 s of a saturated 1 Mbit/s bus, ~50 MB. Only a
# dispatcher that stopped keeping up (a consumer breaking the never-block rule) gets near it.
MAX_QUEUED_FRAMES = 250_000
# The dispatcher wakes at least this often when the buses are quiet, so that ``heartbeat`` shows
# it is alive (the systemd watchdog is fed from it).
HEARTBEAT_S = 0.5


class Consumer(Protocol):
    """Anything the dispatcher hands batches to. ``deliver`` must return at once."""

    def deliver(self, frames: Sequence[Frame]) -> None: ...


class DropReporter:
    """Counts frames a consumer lost and logs it at most once per ``interval`` seconds."""

    def __init__(self, who: str, interval: float = DROP_LOG_INTERVAL_S) -> None:
        self.who = who
        self.interval = interval
        self.total = 0
        self._unlogged = 0
        self._last_log = float("-inf")
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        if count <= 0:
            return
        with self._lock:
            self.total += count
            self._unlogged += count
            now = time.monotonic()
            if now - self._last_log < self.interval:
                return
            unlogged, self._unlogged, self._last_log = self._unlogged, 0, now
        log.warning("%s is not keeping up, dropped %d frames", self.who, unlogged)


class Mailbox:
    """A bounded FIFO of frames between the dispatcher and one consumer thread.

    ``put`` never blocks: frames beyond ``capacity`` are dropped (newest first) and counted.
    """

    def __init__(self, who: str, capacity: int) -> None:
        self.capacity = capacity
        self.drops = DropReporter(who)
        self._items: Deque[Frame] = collections.deque()
        self._ready = threading.Condition(threading.Lock())

    def put(self, frames: Sequence[Frame]) -> int:
        """Queue as many of ``frames`` as fit; returns how many were accepted."""
        with self._ready:
            room = self.capacity - len(self._items)
            taken = frames if len(frames) <= room else frames[: max(room, 0)]
            self._items.extend(taken)
            if taken:
                self._ready.notify()
        self.drops.add(len(frames) - len(taken))
        return len(taken)

    def get(self, max_items: int, timeout: float) -> List[Frame]:
        """Up to ``max_items`` frames, oldest first; waits up to ``timeout`` s for the first."""
        with self._ready:
            if not self._items:
                self._ready.wait(timeout)
            items = self._items
            count = min(max_items, len(items))
            return [items.popleft() for _ in range(count)]

    def __len__(self) -> int:
        return len(self._items)


class Broker:
    """Sources ``publish`` batches; the dispatcher thread offers each batch to every consumer."""

    def __init__(self, max_queued_frames: int = MAX_QUEUED_FRAMES) -> None:
        self._queue: queue.Queue[List[Frame] | None] = queue.Queue()
        self.max_queued_frames = max_queued_frames
        self._queued_frames = 0
        self._queued_lock = threading.Lock()
        self._consumers: List[Consumer] = []
        self._consumers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)
        self.frames_in = 0
        self.overflow = DropReporter("broker")
        self.heartbeat = time.monotonic()  # when the dispatcher last went round its loop

    @property
    def pending(self) -> int:
        """Frames published and not yet handed to the consumers."""
        return self._queued_frames

    def register(self, consumer: Consumer) -> None:
        with self._consumers_lock:
            self._consumers = self._consumers + [consumer]

    def publish(self, frames: List[Frame]) -> None:
        """Hand a batch over; called from reader threads, never blocks: beyond
        ``max_queued_frames`` waiting, the batch is dropped and counted (``overflow``)."""
        if not frames:
            return
        with self._queued_lock:
            if self._queued_frames + len(frames) > self.max_queued_frames:
                full = True
            else:
                full = False
                self._queued_frames += len(frames)
        if full:
            self.overflow.add(len(frames))
        else:
            self._queue.put_nowait(frames)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued, then stop the dispatcher."""
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout)

    def _dispatch(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stopping = False
        while not stopping:
            self.heartbeat = time.monotonic()
            try:
                frames = get(timeout=HEARTBEAT_S)
            except queue.Empty:
                continue
            if frames is None:
                return
            if len(frames) < COALESCE_BELOW:
                # A quiet moment: let a few more reads arrive so that each consumer wakes (and
                # each client is written to) once per few ms, not once per frame.
                time.sleep(COALESCE_S)
            merged = None
            while len(frames) < MAX_DELIVERY:
                try:
                    more = get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                if merged is None:
                    merged = frames = list(frames)
                merged.extend(more)
            with self._queued_lock:
                self._queued_frames -= len(frames)
            self.frames_in += len(frames)
            for consumer in self._consumers:
                try:
                    consumer.deliver(frames)
                except Exception:
                    log.exception("consumer %r failed to take a batch", consumer)
