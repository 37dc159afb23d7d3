"""The status listener's database facts against a real PostgreSQL, through an outage."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest
from harness import wait_until

from wiretap.frames import make_frame

pytestmark = pytest.mark.pg


def get(port: int, path: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()


def database(port: int) -> dict:
    return json.loads(get(port, "/status"))["database"]


def metric(port: int, name: str) -> float:
    parser = pytest.importorskip("prometheus_client.parser")
    for family in parser.text_string_to_metric_families(get(port, "/metrics")):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name}")


def test_database_state_rows_and_spool_through_an_outage(pg, harness, bus_factory, tmp_path: Path):
    bus = bus_factory()
    app = harness.start(
        "--iface", "can0", "--status-listen", "127.0.0.1:0", "--pg-enable", "--pg-dsn", pg.dsn,
        "--pg-flush-interval", "0.05",
        buses={"can0": bus}, environ={"STATE_DIRECTORY": str(tmp_path)},
    )  # fmt: skip
    port = app.status.port
    for number in range(50):
        bus.send(make_frame(0, 0x100, number.to_bytes(2, "big")))
    wait_until(lambda: database(port)["rows_written_total"] == 50, timeout=30, what="50 rows")
    facts = database(port)
    assert (facts["state"], facts["healthy"], facts["connected"]) == ("writing", True, True)
    assert (facts["queue_frames"], facts["spool_frames"], facts["frames_dropped_total"]) == (
        0,
        0,
        0,
    )
    assert metric(port, "wiretap_database_up") == 1
    assert metric(port, "wiretap_database_rows_written_total") == 50

    pg.stop()
    for number in range(40):
        bus.send(make_frame(0, 0x200, number.to_bytes(2, "big")))
    wait_until(
        lambda: (
            database(port)["state"] == "down"
            and database(port)["queue_frames"] + database(port)["spool_frames"] == 40
        ),
        timeout=60,
        what="the outage seen, the frames held",
    )
    facts = database(port)
    assert facts["healthy"] is False
    assert facts["spool_bytes"] > 0 and facts["frames_dropped_total"] == 0
    assert metric(port, "wiretap_database_up") == 0
    assert metric(port, "wiretap_database_spool_frames") == facts["spool_frames"]

    pg.start()
    wait_until(lambda: database(port)["rows_written_total"] == 90, timeout=60, what="spool drained")
    facts = database(port)
    assert (facts["state"], facts["spool_frames"], facts["frames_dropped_total"]) == (
        "writing", 0, 0,
    )  # fmt: skip
