"""The broker: order, fan-out, coalescing and its bound."""

from __future__ import annotations

import threading
from typing import List

from harness import wait_until

from wiretap.broker import BUSY_FRAMES, COALESCE_S, Broker, Mailbox
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
    # BUSY_FRAMES at once is a busy bus: queued, taken by the dispatcher, which then blocks in
    # deliver. They count against the bound until delivered.
    broker.publish(batch(0, BUSY_FRAMES))
    wait_until(lambda: broker.frames_in == BUSY_FRAMES)
    for start in range(BUSY_FRAMES, BUSY_FRAMES + 190, 10):
        broker.publish(batch(start, 10))
    accepted = (100 - BUSY_FRAMES) // 10 * 10
    assert broker.overflow.total == 190 - accepted
    gate.set()
    broker.stop()
    assert len(stuck.frames) == BUSY_FRAMES + accepted
    assert broker.frames_in == BUSY_FRAMES + accepted


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ThreadRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.calls: List[tuple] = []

    def deliver(self, frames) -> None:
        self.calls.append((threading.current_thread().name, len(frames)))
        super().deliver(frames)


def test_on_a_quiet_bus_a_frame_is_delivered_before_publish_returns():
    clock = FrozenClock()
    broker = Broker(clock=clock)
    recorder = ThreadRecorder()
    broker.register(recorder)
    broker.start()
    for number in range(5):
        clock.now += 0.01  # 100 frames/s
        broker.publish(batch(number, 1))
        # No thread hop: the publisher itself handed the frame over.
        assert recorder.calls[-1] == (threading.current_thread().name, 1)
    broker.stop()
    assert [f.data for f in recorder.frames] == [i.to_bytes(4, "little") for i in range(5)]
    assert broker.frames_in == 5


def test_a_busy_bus_is_coalesced_by_the_dispatcher_and_stays_in_order():
    clock = FrozenClock()  # every batch lands in one window: as busy as a bus gets
    broker = Broker(clock=clock)
    recorder = ThreadRecorder()
    broker.register(recorder)
    broker.start()
    for start in range(0, 400):
        broker.publish(batch(start, 1))
    broker.stop()
    assert [f.data for f in recorder.frames] == [i.to_bytes(4, "little") for i in range(400)]
    # The first BUSY_FRAMES - 1 frames went out at once; the rest by the dispatcher, in batches.
    main = threading.current_thread().name
    assert recorder.calls[: BUSY_FRAMES - 1] == [(main, 1)] * (BUSY_FRAMES - 1)
    later = recorder.calls[BUSY_FRAMES - 1 :]
    assert {name for name, _ in later} == {"dispatcher"}
    assert len(later) < 400 - (BUSY_FRAMES - 1)


class DispatcherBlocker:
    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def deliver(self, frames) -> None:
        if threading.current_thread().name == "dispatcher":
            self.gate.wait()


def test_a_quiet_frame_does_not_overtake_queued_ones():
    clock = FrozenClock()
    gate = threading.Event()
    broker = Broker(clock=clock)
    recorder = ThreadRecorder()
    broker.register(recorder)
    broker.register(DispatcherBlocker(gate))
    broker.start()
    # Busy: queued for the dispatcher, which blocks in the second consumer.
    for start in range(0, 20):
        broker.publish(batch(start, 1))
    wait_until(lambda: len(recorder.calls) > BUSY_FRAMES - 1, what="the dispatcher delivering")
    clock.now += 1.0  # the bus falls quiet while the dispatcher still holds queued frames
    broker.publish(batch(20, 1))
    gate.set()
    broker.stop()
    assert [f.data for f in recorder.frames] == [i.to_bytes(4, "little") for i in range(21)]


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


def test_a_busy_bus_batched_by_its_reader_goes_out_at_once():
    clock = FrozenClock()
    broker = Broker(clock=clock)
    recorder = ThreadRecorder()
    broker.register(recorder)
    broker.start()
    broker.publish(batch(0, 1))  # the first delivery
    for number in range(1, 6):
        clock.now += 1.25 * COALESCE_S  # a reader that reads its busy bus once per window
        broker.publish(batch(20 * number - 19, 20))
        # Already coalesced: no thread hop, and no second window of waiting.
        assert recorder.calls[-1] == (threading.current_thread().name, 20)
    broker.stop()
    assert broker.frames_in == 1 + 5 * 20
