"""Flow control end to end: the real server, the seam, and a model SavvyCAN over real TCP.

The model (tests/savvycan_model.py) reads as SavvyCAN does, everything queued at once at a cost
quadratic in its size, and sends ``F1 09`` every 250 ms only while idle. It and the feeder run in
processes of their own, so neither shares the server's GIL. Every frame carries a sequence
number, so the client checks that what it got is whole and in order, and the server's drop
count can be compared with the frames that are missing at the client, exactly.

The run at five times the rate lasts 8 s here: the window's cycle (a full window read at once,
about 4 s of the model's time, then a smaller one) repeats within that; tests/test_connection.py
runs the same model for a whole minute on a fake clock, and bench/run.py --savvycan over real
sockets.
"""

from __future__ import annotations

import logging
import multiprocessing
import time

import pytest
from harness import Bus, wait_until
from savvycan_model import DENSE_FPS, READ_LIMIT, Figures, feeder, model_client

from wiretap.app import App
from wiretap.gvret import WINDOW_MAX
from wiretap.server import REFUSAL_LOG_INTERVAL_S

CONTEXT = multiprocessing.get_context("fork")


class Rig:
    """A model client and a feeder process around one server."""

    def __init__(self, app: App, bus: Bus) -> None:
        self.app = app
        self.feeder_pipe, child = CONTEXT.Pipe()
        self.feeder = CONTEXT.Process(target=feeder, args=(child, bus.test_end), daemon=True)
        self.feeder.start()
        self.client_pipe, child = CONTEXT.Pipe()
        self.client = CONTEXT.Process(target=model_client, args=(child, app.port), daemon=True)
        self.client.start()
        assert self.client_pipe.poll(20) and self.client_pipe.recv() == "connected"
        wait_until(
            lambda: len(app.hub.clients) == 1 and app.hub.clients[0].protocol.flow_controlled,
            what="the model client to be flow-controlled",
        )
        self.connection = app.hub.clients[0]
        self.fed = 0

    def feed(self, count: int, fps: int) -> None:
        self.feeder_pipe.send((count, fps))
        assert self.feeder_pipe.poll(count / fps * 10 + 30), "the feeder did not finish"
        self.fed += self.feeder_pipe.recv()

    def report(self) -> Figures:
        self.client_pipe.send("report")
        assert self.client_pipe.poll(30)
        return self.client_pipe.recv()

    def drain(self) -> Figures:
        """Wait until the server has handed out or dropped every frame fed, and the client has
        read every frame handed out; the client's figures then."""
        connection = self.connection
        wait_until(
            lambda: (
                self.app.broker.frames_in == self.fed
                and connection.frames_sent + connection.dropped == self.fed
            ),
            timeout=60,
            what="the server to deal with every frame",
        )
        wait_until(
            lambda: self.report().received == connection.frames_sent,
            timeout=60,
            what="the client to read every frame sent",
        )
        return self.report()

    def close(self) -> None:
        self.client_pipe.send("stop")
        self.feeder_pipe.send(None)
        for process in (self.client, self.feeder):
            process.join(10)
            if process.is_alive():
                process.kill()


@pytest.fixture
def rig(harness, bus_factory):
    bus = bus_factory()
    app = harness.start("--iface", "can0", buses={"can0": bus})
    rig = Rig(app, bus)
    yield rig
    rig.close()


def check(figures: Figures, rig: Rig) -> None:
    assert figures.error == ""
    assert figures.order_errors == 0
    assert figures.largest_read <= READ_LIMIT
    # Every frame missing at the client is one the server counted as dropped for it.
    assert rig.fed - figures.received == rig.connection.dropped
    assert rig.app.counters()["client_drops"] == rig.connection.dropped
    assert figures.keepalive_replies >= figures.keepalives_sent  # + the handshake's - one late


def open_window(rig: Rig) -> None:
    """Wait until the client has acknowledged all it was sent and its window is full again."""
    protocol = rig.connection.protocol
    wait_until(
        lambda: protocol.window == WINDOW_MAX and protocol.unacknowledged == 0,
        what="an open window",
    )


def lossless_run(rig: Rig, count: int, fps: int, attempts: int = 5) -> Figures:
    """Feed ``count`` frames at ``fps`` until one run loses nothing; every run must keep the
    bounds and count every loss. (The model is SavvyCAN: a pause of its process of a few tens
    of ms, which a loaded test machine can cause, makes one read too large to keep up; then
    losing frames is right. So a run may lose some, but one in ``attempts`` must not.)"""
    for _ in range(attempts):
        open_window(rig)
        dropped = rig.connection.dropped
        before = rig.report().received
        rig.feed(count, fps)
        figures = rig.drain()
        check(figures, rig)
        if rig.connection.dropped == dropped:
            assert figures.received - before == count
            return figures
    raise AssertionError(f"lost frames at {fps} fps in each of {attempts} runs")


def test_model_savvycan_at_one_saturated_bus_gets_every_frame(rig):
    figures = lossless_run(rig, DENSE_FPS, DENSE_FPS)
    assert figures.largest_read <= READ_LIMIT


def test_model_savvycan_at_five_times_the_rate(rig, caplog):
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="wiretap.server"):
        rig.feed(8 * 5 * DENSE_FPS, 5 * DENSE_FPS)
        figures = rig.drain()
    took = time.monotonic() - began
    check(figures, rig)
    assert rig.connection.dropped > 0
    assert figures.received > 0
    lines = [r.getMessage() for r in caplog.records if "frames dropped for it" in r.getMessage()]
    assert 1 <= len(lines) <= 1 + took // REFUSAL_LOG_INTERVAL_S  # at most one per 10 s
    # When the load drops, it gets every frame again, by itself.
    lossless_run(rig, DENSE_FPS // 2, DENSE_FPS // 10)
