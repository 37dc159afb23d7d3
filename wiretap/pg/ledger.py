"""The database path's accounting: where every frame offered to it is, at every moment.

Owns: the writer's in-memory queue (numbered chunks of frames, bounded) and every counter of the
identity ::

    offered + carried == committed + spooled + in_memory + dropped

``offered`` frames were handed over by the broker; ``carried`` rows were in the spool when the
run started; ``committed`` rows are in PostgreSQL; ``spooled`` rows wait in the spool;
``in_memory`` frames are queued or held by a thread (a batch being written, a chunk being
spooled); ``dropped`` frames are lost, each counted under a reason. Every move of a frame between
these places is one method here, under one lock, so a snapshot balances at any moment.

Each frame gets a number when it is offered (continuing after the spool's highest, so a frame
keeps its place in line wherever it goes); the spool keeps rows in that order.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Deque, Dict, List, Sequence, Tuple

from ..frames import Frame

# Why a frame was lost. Each is counted on its own and all add up to ``dropped``.
QUEUE_FULL = "queue_full"  # the queue was full (the database and the spool were both behind)
REJECTED = "rejected"  # the database refused the row itself (bad content for a DBA's function)
SHUTDOWN = "shutdown"  # still in memory at exit and the spool had no room
WRITER_ERROR = "writer_error"  # a batch that kept failing with an unexpected error
DROP_REASONS = (QUEUE_FULL, REJECTED, SHUTDOWN, WRITER_ERROR)

Chunk = Tuple[int, List[Frame]]
"""Consecutive frames and the number of the first."""
_Queued = Tuple[int, List[Frame], float]  # a chunk and when it was queued (monotonic)


class Ledger:
    """The bounded queue and the counters of the identity; thread-safe."""

    def __init__(self, queue_limit: int, carried: int = 0, first_number: int = 1) -> None:
        self.queue_limit = queue_limit
        self._lock = threading.Lock()
        self._chunks: Deque[_Queued] = collections.deque()
        self._next_number = first_number
        self.offered = 0
        self.carried = carried
        self.committed = 0
        self.spooled = carried
        self.queued = 0  # frames in the queue
        self.in_flight = 0  # taken by the writer: a batch being written
        self.moving = 0  # taken by the keeper: a chunk on its way to the spool
        self.dropped: Dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    # -- the queue ------------------------------------------------------------------------------

    def offer(self, frames: Sequence[Frame]) -> Tuple[int, int]:
        """Queue what fits (frames held by a thread count against the limit too); the rest is
        dropped as ``queue_full``. Returns ``(accepted, queue length after)``."""
        with self._lock:
            room = self.queue_limit - self.queued - self.in_flight - self.moving
            count = len(frames)
            self.offered += count
            if count > room:
                room = max(room, 0)
                self.dropped[QUEUE_FULL] += count - room
                frames = frames[:room]
                count = room
            if count:
                self._chunks.append((self._next_number, frames, time.monotonic()))  # type: ignore[arg-type]
                self._next_number += count
                self.queued += count
            return count, self.queued

    def _take(self, limit: int) -> Chunk:
        chunks = self._chunks
        first, frames, queued_at = chunks.popleft()
        if len(frames) > limit:
            chunks.appendleft((first + limit, frames[limit:], queued_at))
            frames = frames[:limit]
        else:
            frames = list(frames)
            while chunks and len(frames) < limit:
                number, more, queued_at = chunks[0]
                if number != first + len(frames):
                    break  # a chunk given back after a gap: it starts a new run of numbers
                want = limit - len(frames)
                chunks.popleft()
                if len(more) > want:
                    chunks.appendleft((number + want, more[want:], queued_at))
                    more = more[:want]
                frames.extend(more)
        self.queued -= len(frames)
        return first, frames

    def take_batch(self, limit: int) -> Chunk:
        """Up to ``limit`` frames from the head for the writer; none while the spool holds rows
        or the keeper holds a chunk (they are older, and go first)."""
        with self._lock:
            if not self._chunks or self.spooled or self.moving:
                return 0, []
            first, frames = self._take(limit)
            self.in_flight += len(frames)
            return first, frames

    def take_for_spool(self, limit: int) -> Chunk:
        """Up to ``limit`` frames from the head for the keeper to spool."""
        with self._lock:
            if not self._chunks:
                return 0, []
            first, frames = self._take(limit)
            self.moving += len(frames)
            return first, frames

    def give_back(self, first: int, frames: List[Frame], by_writer: bool) -> None:
        """Frames taken from the head go back to it (the spool had no room for them)."""
        if not frames:
            return
        with self._lock:
            self._chunks.appendleft((first, frames, time.monotonic()))
            self.queued += len(frames)
            self._release(len(frames), by_writer)

    def _release(self, count: int, by_writer: bool) -> None:
        if by_writer:
            self.in_flight -= count
        else:
            self.moving -= count

    # -- moves ----------------------------------------------------------------------------------

    def committed_from_memory(self, count: int) -> None:
        with self._lock:
            self.in_flight -= count
            self.committed += count

    def committed_from_spool(self, count: int) -> None:
        with self._lock:
            self.spooled -= count
            self.committed += count

    def spooled_from_memory(self, count: int, by_writer: bool) -> None:
        with self._lock:
            self._release(count, by_writer)
            self.spooled += count

    def dropped_from_memory(self, count: int, reason: str, by_writer: bool) -> None:
        with self._lock:
            self._release(count, by_writer)
            self.dropped[reason] += count

    def dropped_from_spool(self, count: int, reason: str) -> None:
        with self._lock:
            self.spooled -= count
            self.dropped[reason] += count

    def drop_queue(self, reason: str) -> int:
        """Everything still queued is lost (shutdown with a full spool); returns how many."""
        with self._lock:
            count = self.queued
            self._chunks.clear()
            self.queued = 0
            self.dropped[reason] += count
            return count

    # -- reading --------------------------------------------------------------------------------

    def oldest_wait(self) -> float:
        """Seconds the frame at the queue's head has waited (0 for an empty queue)."""
        chunks = self._chunks
        try:
            return time.monotonic() - chunks[0][2]
        except IndexError:
            return 0.0

    @property
    def in_memory(self) -> int:
        return self.queued + self.in_flight + self.moving

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def snapshot(self) -> Dict[str, int]:
        """Every term of the identity at one instant, drops by reason as ``dropped_<reason>``."""
        with self._lock:
            values = {
                "offered": self.offered,
                "carried": self.carried,
                "committed": self.committed,
                "spooled": self.spooled,
                "queued": self.queued,
                "in_flight": self.in_flight + self.moving,
                "in_memory": self.in_memory,
                "dropped": self.dropped_total,
            }
            values.update({f"dropped_{reason}": n for reason, n in self.dropped.items()})
            return values

    @staticmethod
    def balances(snapshot: Dict[str, int]) -> bool:
        """Whether a :meth:`snapshot` satisfies the identity."""
        return snapshot["offered"] + snapshot["carried"] == (
            snapshot["committed"] + snapshot["spooled"] + snapshot["in_memory"]
            + snapshot["dropped"]
        )  # fmt: skip
