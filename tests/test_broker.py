"""The broker: order, fan-out, coalescing and its bound."""

from __future__ import annotations

import threading
from typing import List

from harness import wait_until

from wiretap.broker import Broker, Mailbox
from wiretap.frames import Frame, make_frame


class Recorder:
    def __init__(self, gate: threading.Event = None) -> None:
        self.frames: List[Frame] = []
        self.gate = gate

    def deliver(self, frames) -> None:
        if self.gate is not None:
            self.gate.wait()
        self.frames.extend(frames)


def batch(start: int, count: int) -> List[Frame]:
    return [make_frame(0, 0x100, i.to_bytes(4, "little")) for i in range(start, start + count)]


def test_every_consumer_gets_every_frame_in_order():
    broker = Broker()
    first, second = Recorder(), Recorder()
    broker.register(first)
    broker.register(second)
    broker.start()
    for start in range(0, 10_000, 7):
        broker.publish(batch(start, min(7, 10_000 - start)))
    broker.stop()
    expected = [i.to_bytes(4, "little") for i in range(10_000)]
    assert [f.data for f in first.frames] == expected
    assert [f.data for f in second.frames] == expected
    assert broker.frames_in == 10_000


def test_a_full_broker_drops_whole_batches_and_counts_them():
    gate = threading.Event()
    broker = Broker(max_queued_frames=100)
    stuck = Recorder(gate)
    broker.register(stuck)
    broker.start()
    broker.publish(batch(0, 10))  # taken by the dispatcher, which then blocks in deliver
    wait_until(lambda: broker.frames_in == 10)
    for start in range(10, 200, 10):
        broker.publish(batch(start, 10))
    assert broker.overflow.total == 90
    gate.set()
    broker.stop()
    assert len(stuck.frames) == 110
    assert broker.frames_in == 110


def test_a_failing_consumer_does_not_stop_the_others(caplog):
    class Broken:
        def deliver(self, frames) -> None:
            raise RuntimeError("boom")

    broker = Broker()
    good = Recorder()
    broker.register(Broken())
    broker.register(good)
    broker.start()
    broker.publish(batch(0, 3))
    broker.stop()
    assert len(good.frames) == 3
    assert sum("failed to take a batch" in r.getMessage() for r in caplog.records) == 1


def test_mailbox_keeps_the_oldest_and_counts_the_rest(caplog):
    box = Mailbox("test consumer", capacity=5)
    assert box.put(batch(0, 3)) == 3
    assert box.put(batch(3, 4)) == 2
    assert box.drops.total == 2
    assert [f.data[0] for f in box.get(10, 0)] == [0, 1, 2, 3, 4]
    assert "test consumer is not keeping up, dropped 2 frames" in caplog.text
