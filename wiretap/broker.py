"""The broker: one queue from every source, one dispatcher thread, many consumers.

Owns: the ``queue.Queue`` that readers hand batches of frames to, the dispatcher thread that
offers each batch to every registered consumer (stamping ``heartbeat`` each time round, idle or
not, so a wedged dispatcher can be told from a quiet one), and :class:`Mailbox`, the bounded
per-consumer buffer with its drop counter and rate-limited "not keeping up" log line. A consumer's
``deliver`` must never block: whatever it cannot take it drops and counts, so one slow consumer
costs frames for itself only.

Batching only when there is a batch: on a quiet bus (fewer than ``BUSY_FRAMES`` frames in the
last ``COALESCE_S``), or when the previous delivery is ``COALESCE_S`` old (a reader that batches
a busy bus itself), the reader that publishes a batch hands it to the consumers itself, at once,
with no thread hop; a client then usually gets it written straight to its socket. When the buses
are busy, batches go through the queue: the dispatcher delivers at most once per ``COALESCE_S``,
handing the consumers everything that arrived meanwhile as one batch (up to ``MAX_DELIVERY``
frames); it sleeps out the rest of each window rather than being woken by every batch, since
per-batch work (a wake-up per consumer, one encode and one ``send`` per client) is what a busy
server spends its CPU on. Either way one delivery runs at a time, in order.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable, Deque, List, Optional, Protocol, Sequence

from .frames import Frame

log = logging.getLogger("wiretap.broker")

DROP_LOG_INTERVAL_S = 10.0
COALESCE_S = 0.004  # as long as a SocketCAN reader pauses on a busy bus (READ_PAUSE_S)
COALESCE_BELOW = 64  # a batch this small waits COALESCE_S for the next reads to join it
# Busy: this many frames within COALESCE_S (4,000 frames/s). Below it a frame goes out at once.
BUSY_FRAMES = 16
MAX_DELIVERY = 2048  # frames per delivery: well inside a client's outbox (~13,000 frames)
# Frames read but not yet dispatched, at most: ~28 s of a saturated 1 Mbit/s bus, ~50 MB. Only a
# dispatcher that stopped keeping up (a consumer breaking the never-block rule) gets near it.
MAX_QUEUED_FRAMES = 250_000
# The dispatcher wakes at least this often when the buses are quiet, so that ``heartbeat`` shows
# it is alive (the systemd watchdog is fed from it).
HEARTBEAT_S = 0.5


class Consumer(Protocol):
    """Anything the broker hands batches to. ``deliver`` must return at once; it is called by
    one thread at a time (the dispatcher, or on a quiet bus the reader that published)."""

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
    """Sources ``publish`` batches; each batch is offered to every consumer, at once on a quiet
    bus, else by the dispatcher thread, coalesced."""

    def __init__(
        self,
        max_queued_frames: int = MAX_QUEUED_FRAMES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._queue: queue.Queue[List[Frame] | None] = queue.Queue()
        self.max_queued_frames = max_queued_frames
        self._queued_frames = 0
        self._queued_batches = 0  # published through the queue and not yet delivered
        self._queued_lock = threading.Lock()
        self._delivering = threading.Lock()
        self._clock = clock
        self._window_start = float("-inf")
        self._window_frames = 0
        self._previous_window_frames = 0
        self._busy_now = False
        self._last_delivery = float("inf")  # by self._clock; none yet: not "spaced"
        self._consumers: List[Consumer] = []
        self._consumers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._dispatch, name="dispatcher", daemon=True)
        self.frames_in = 0
        self.overflow = DropReporter("broker")
        self.heartbeat = time.monotonic()  # when the dispatcher last went round its loop
        self._delivery_started: Optional[float] = None

    @property
    def pending(self) -> int:
        """Frames published and not yet handed to the consumers."""
        return self._queued_frames

    def register(self, consumer: Consumer) -> None:
        with self._consumers_lock:
            self._consumers = self._consumers + [consumer]

    def publish(self, frames: List[Frame]) -> None:
        """Hand a batch over; called from reader threads. On a quiet bus the consumers get it
        before this returns; otherwise it is queued, never blocking: beyond
        ``max_queued_frames`` waiting, the batch is dropped and counted (``overflow``)."""
        if not frames:
            return
        now = self._clock()
        busy = self._busy(len(frames), now)
        # A reader that batches a busy bus itself (publishing at most once per COALESCE_S) has
        # done the coalescing already: its batch goes out at once too, with no thread hop.
        spaced = now - self._last_delivery >= COALESCE_S
        if (not busy or spaced) and self._delivering.acquire(blocking=False):
            try:
                # Nothing queued may still be waiting, or this batch would overtake it.
                if not self._queued_batches:
                    self._deliver(frames, now)
                    return
            finally:
                self._delivering.release()
        with self._queued_lock:
            if self._queued_frames + len(frames) > self.max_queued_frames:
                full = True
            else:
                full = False
                self._queued_frames += len(frames)
                self._queued_batches += 1
        if full:
            self.overflow.add(len(frames))
        else:
            self._queue.put_nowait(frames)

    def _busy(self, count: int, now: float) -> bool:
        """Count ``count`` frames into the current ``COALESCE_S`` window; True while this window
        or the one before holds ``BUSY_FRAMES`` or more. Readers may race on these counters:
        an estimate is all the choice between at once and coalesced needs."""
        elapsed = now - self._window_start
        if elapsed >= COALESCE_S:
            self._previous_window_frames = self._window_frames if elapsed < 2 * COALESCE_S else 0
            self._window_start = now
            self._window_frames = 0
        self._window_frames += count
        self._busy_now = max(self._window_frames, self._previous_window_frames) >= BUSY_FRAMES
        return self._busy_now

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
        last_delivery = float("-inf")
        backlog = False  # the last delivery was cut at MAX_DELIVERY: no pause before the next
        while not stopping:
            self.heartbeat = time.monotonic()
            if self._busy_now and not backlog:
                # Busy: at most one delivery per COALESCE_S, so that each consumer wakes (and
                # each client is written to) once per few ms, not once per frame. The rest of
                # the window is waited out before looking at the queue, so that the readers'
                # batches meanwhile wake nobody.
                wait = last_delivery + COALESCE_S - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            try:
                frames = get_nowait()
            except queue.Empty:
                try:
                    frames = get(timeout=HEARTBEAT_S)
                except queue.Empty:
                    continue
                if frames is not None and len(frames) < COALESCE_BELOW and self._busy_now:
                    # Woken by a small batch of a busy bus: let the next reads join it. (On a
                    # quiet bus a batch is queued only when another reader was delivering.)
                    time.sleep(COALESCE_S)
            if frames is None:
                return
            merged = None
            batches = 1
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
                batches += 1
            backlog = len(frames) >= MAX_DELIVERY
            with self._delivering:
                last_delivery = time.monotonic()
                self._deliver(frames, self._clock())
                with self._queued_lock:
                    self._queued_frames -= len(frames)
                    self._queued_batches -= batches

    def last_sign_of_life(self) -> float:
        """When a delivery now under way began (in a reader or the dispatcher), else when the
        dispatcher last went round its loop: how a wedged consumer shows, whichever thread it
        holds (the systemd watchdog is fed from this). In ``time.monotonic`` time, as is the
        broker's clock unless a test gives it another."""
        started = self._delivery_started
        return self.heartbeat if started is None else started

    def _deliver(self, frames: Sequence[Frame], now: float) -> None:
        self._last_delivery = self._delivery_started = now
        try:
            self._deliver_to_all(frames)
        finally:
            self._delivery_started = None

    def _deliver_to_all(self, frames: Sequence[Frame]) -> None:
        self.frames_in += len(frames)
        for consumer in self._consumers:
            try:
                consumer.deliver(frames)
            except Exception:
                log.exception("consumer %r failed to take a batch", consumer)
