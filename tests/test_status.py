"""Bus metering, the status listener's numbers and its HTTP side, with real HTTP requests."""

from __future__ import annotations

import http.client
import json
import re
import socket
from typing import Dict, List, Tuple

import pytest
from gvret_client import SAVVYCAN_HELLO, GvretClient
from harness import wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wiretap.frames import CAN_ERR_BUSOFF, CAN_ERR_CRTL, CAN_ERR_FLAG, CAN_FRAME, make_frame
from wiretap.meter import BusMeter, FrameBits, frame_bits, load_ratio
from wiretap.sources.socketcan import CAN_ERR_CNT, CAN_ERR_RESTARTED
from wiretap.status import Sampler, render_metrics

# --- bits on the wire ---


def test_classic_frame_bits_lie_between_no_stuffing_and_the_worst_case() -> None:
    # Textbook lengths with the 3-bit intermission: 47 + 8n (11-bit ID) and 67 + 8n (29-bit),
    # worst-case stuffing (Davis et al. 2007) adds floor((34 + 8n - 1) / 4) and (54 + 8n - 1) / 4.
    for length in range(9):
        standard = frame_bits(False, False, False, length)
        extended = frame_bits(True, False, False, length)
        assert standard.fast == extended.fast == 0
        assert 47 + 8 * length < standard.nominal < 47 + 8 * length + (33 + 8 * length) // 4
        assert 67 + 8 * length < extended.nominal < 67 + 8 * length + (53 + 8 * length) // 4
    assert frame_bits(False, False, False, 0) == FrameBits(34 + 33 / 8 + 13, 0)
    assert frame_bits(False, False, False, 8) == FrameBits(123.125, 0)
    assert frame_bits(True, False, False, 8) == FrameBits(145.625, 0)


def test_fd_frame_bits_split_at_the_bit_rate_switch() -> None:
    # 64 bytes, 11-bit ID: 17 arbitration bits + 2 stuff + 12 trailer at the nominal rate; ESI,
    # DLC, 512 data bits, 64.625 estimated stuff bits, stuff count, CRC-21, 7 fixed stuff bits
    # and the CRC delimiter at the data rate.
    assert frame_bits(False, True, True, 64) == FrameBits(31, 614.625)
    assert frame_bits(False, True, False, 64) == FrameBits(645.625, 0)
    assert frame_bits(False, True, True, 16).fast < frame_bits(False, True, True, 20).fast - 32
    assert frame_bits(True, True, True, 8).nominal == 36 + 35 / 8 + 12


def test_load_ratio_is_bus_time_over_wall_time() -> None:
    # 1000 frames of 123 bits in one second on a 500 kbit/s bus.
    assert load_ratio(123_000, 0, 1.0, 500_000) == pytest.approx(0.246)
    # The data phase of FD frames at 2 Mbit/s takes a quarter of the nominal time.
    assert load_ratio(31_000, 614_000, 1.0, 500_000, 2_000_000) == pytest.approx(0.062 + 0.307)
    assert load_ratio(31_000, 614_000, 1.0, 500_000) == pytest.approx(0.062 + 1.228)
    assert load_ratio(1, 0, 0.0, 500_000) == 0.0


def test_bus_meter_counts_frames_bytes_and_bits_per_bus() -> None:
    meter = BusMeter()
    batch = [make_frame(0, 0x100, bytes(8))] * 3 + [
        make_frame(1, 0x1ABCDE, b"\x01\x02", extended=True),
        make_frame(0, 0x7FF, rtr=True),
        make_frame(1, 0x10, bytes(64), fd=True, brs=True),
    ]
    meter.deliver(batch)
    meter.deliver(batch[:1])
    bus0, bus1 = meter.totals(0), meter.totals(1)
    assert (bus0.frames, bus0.bytes) == (5, 32)
    assert bus0.nominal_bits == round(4 * 123.125 + 51.125) and bus0.fast_bits == 0
    assert (bus1.frames, bus1.bytes) == (2, 66)
    assert bus1.nominal_bits == round(frame_bits(True, False, False, 2).nominal + 31)
    assert bus1.fast_bits == round(614.625)
    assert meter.totals(7) == (0, 0, 0, 0)


frame_shapes = st.builds(
    lambda bus, extended, fd, brs, length: make_frame(
        bus, 0x123, bytes(length if fd else min(length, 8)), extended=extended, fd=fd,
        brs=fd and brs,
    ),
    st.integers(0, 2), st.booleans(), st.booleans(), st.booleans(),
    st.sampled_from([0, 1, 5, 8, 12, 16, 20, 24, 32, 48, 64]),
)  # fmt: skip


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.lists(frame_shapes, max_size=40), max_size=6))
def test_bus_meter_sums_exactly_what_frame_bits_says_per_frame(batches) -> None:
    meter = BusMeter()
    for batch in batches:
        meter.deliver(batch)
    for bus in range(3):
        frames = [frame for batch in batches for frame in batch if frame.bus == bus]
        bits = [frame_bits(f.extended, f.fd, f.brs, len(f.data)) for f in frames]
        assert meter.totals(bus) == (
            len(frames),
            sum(len(frame.data) for frame in frames),
            round(sum(b.nominal for b in bits)),
            round(sum(b.fast for b in bits)),
        )


# --- rates and the Prometheus text ---


def bus_facts(bus: int, frames: int, bits: int, **extra: object) -> Dict[str, object]:
    facts: Dict[str, object] = {
        "bus": bus, "iface": f"can{bus}", "up": True, "state": "error-active",
        "bitrate": 500_000, "frames_total": frames, "bytes_total": 8 * frames,
        "nominal_bits_total": bits, "fast_bits_total": 0, "tx_errors": 0, "rx_errors": 0,
        "error_frames_total": 0, "bus_off_total": 0, "kernel_drops_total": 0,
    }  # fmt: skip
    facts.update(extra)
    return facts


def snapshot_of(buses: List[Dict[str, object]], **extra: object) -> Dict[str, object]:
    snapshot: Dict[str, object] = {
        "version": "1.0.0", "commit": "abc", "uptime_seconds": 12.5, "buses": buses,
        "clients_connected": 0, "clients": [], "client_frames_dropped_total": 0,
        "frames_dropped_total": 0, "database": None,
    }  # fmt: skip
    snapshot.update(extra)
    return snapshot


def test_sampler_turns_counters_into_rates_and_history() -> None:
    counts = {"frames": 0, "bits": 0}
    sampler = Sampler(lambda: snapshot_of([bus_facts(0, counts["frames"], counts["bits"])]))
    sampler.sample(now=100.0)
    counts.update(frames=2000, bits=2000 * 123)
    sampler.sample(now=102.0)
    counts.update(frames=2100, bits=2100 * 123)
    sampler.sample(now=104.0)
    view = sampler.view()
    (bus,) = view["buses"]
    assert bus["fps"] == 50.0
    assert bus["load_ratio"] == round(100 * 123 / 2 / 500_000, 4)
    assert bus["healthy"] is True
    assert view["history"]["buses"]["0"] == {
        "fps": [1000.0, 50.0],
        "load_ratio": [round(1000 * 123 / 500_000, 4), round(50 * 123 / 500_000, 4)],
    }


def test_health_verdicts_for_buses_and_database() -> None:
    database = {
        "connected": True, "rows_written_total": 5, "queue_frames": 0, "spool_frames": 9,
        "spool_bytes": 4096, "lag_seconds": 0.0, "frames_dropped_total": 0,
    }  # fmt: skip
    buses = [
        bus_facts(0, 0, 0, state="error-warning"),
        bus_facts(1, 0, 0, state="error-passive"),
        bus_facts(2, 0, 0, up=False),
    ]
    view = Sampler(lambda: snapshot_of(buses, database=dict(database))).view()
    assert [bus["healthy"] for bus in view["buses"]] == [True, False, False]
    assert view["database"]["state"] == "draining spool" and view["database"]["healthy"]
    database["connected"] = False
    view = Sampler(lambda: snapshot_of(buses, database=dict(database))).view()
    assert view["database"]["state"] == "down" and not view["database"]["healthy"]
    database.update(connected=True, problem="no table public.can_frame — run init_schema.sql")
    view = Sampler(lambda: snapshot_of(buses, database=dict(database))).view()
    assert view["database"]["state"] == "refuses writes" and not view["database"]["healthy"]
    assert render_metrics(view).count("\nwiretap_database_refusing 1\n") == 1


def parse_metrics(text: str) -> Dict[str, Tuple[str, Dict[Tuple, float]]]:
    """name -> (type, {sorted label items: value}), through the reference parser (requirements-
    dev.txt; a userland without it, such as the ARM tier's, skips the rest of the test)."""
    parser = pytest.importorskip("prometheus_client.parser")
    text_string_to_metric_families = parser.text_string_to_metric_families
    families = {}
    for family in text_string_to_metric_families(text):
        samples = {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        families[family.name] = (family.type, samples)
    return families


def test_metrics_follow_the_prometheus_text_format() -> None:
    clients = [{"address": "10.0.0.5:50000", "dialect": "esp32ret", "frames_sent_total": 70,
                "frames_dropped_total": 3}]  # fmt: skip
    database = {
        "connected": True, "rows_written_total": 5, "queue_frames": 2, "spool_frames": 0,
        "spool_bytes": 4096, "lag_seconds": 0.25, "frames_dropped_total": 1,
    }  # fmt: skip
    odd = 'we"ird\\name'
    view = Sampler(
        lambda: snapshot_of(
            [bus_facts(0, 10, 1230), bus_facts(1, 4, 500, iface=odd, state="bus-off")],
            clients=clients,
            clients_connected=1,
            client_frames_dropped_total=7,
            database=database,
        )  # fmt: skip
    ).view()
    text = render_metrics(view)
    for line in text.splitlines():
        assert re.fullmatch(r"# (HELP|TYPE) \w+ .+|[a-z_]+(\{.*\})? -?[0-9.e+-]+", line), line
    families = parse_metrics(text)
    # The parser drops the _total suffix from counter family names.
    assert families["wiretap_frames"] == (
        "counter",
        {(("bus", "0"), ("iface", "can0")): 10.0, (("bus", "1"), ("iface", odd)): 4.0},
    )
    assert families["wiretap_bus_bits"][1][(("bus", "0"), ("iface", "can0"))] == 1230
    assert families["wiretap_bus_state"][0] == "gauge"
    assert families["wiretap_bus_state"][1][
        (("bus", "1"), ("iface", odd), ("state", "bus-off"))
    ] == 1.0  # fmt: skip
    assert families["wiretap_bus_state"][1][
        (("bus", "1"), ("iface", odd), ("state", "error-active"))
    ] == 0.0  # fmt: skip
    assert families["wiretap_client_frames_dropped"][1] == {(("client", "10.0.0.5:50000"),): 3}
    assert families["wiretap_client_info"][1] == {
        (("client", "10.0.0.5:50000"), ("dialect", "esp32ret")): 1
    }
    assert families["wiretap_clients_frames_dropped"][1] == {(): 7}
    assert families["wiretap_database_lag_seconds"] == ("gauge", {(): 0.25})
    assert families["wiretap_database_rows_written"] == ("counter", {(): 5})
    assert families["wiretap_build_info"][1] == {(("commit", "abc"), ("version", "1.0.0")): 1}
    assert families["wiretap_uptime_seconds"] == ("gauge", {(): 12.5})
    counters = [name for name, (kind, _) in families.items() if kind == "counter"]
    assert all(f"\n{name}_total" in text for name in counters)


# --- the real listener ---


def get(port: int, path: str) -> Tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        connection.close()


def status_of(port: int) -> dict:
    code, kind, body = get(port, "/status")
    assert (code, kind) == (200, "application/json")
    return json.loads(body)


def test_status_listener_is_off_unless_configured(harness, bus_factory) -> None:
    app = harness.start("--iface", "can0", buses={"can0": bus_factory()})
    assert app.status is None and app.meter is None


def test_listener_serves_exact_counts_per_bus_and_client(harness, bus_factory) -> None:
    can0, can1 = bus_factory(), bus_factory()
    app = harness.start(
        "--iface", "can0,can1", "--status-listen", "127.0.0.1:0",
        buses={"can0": can0, "can1": can1},
    )  # fmt: skip
    port = app.status.port
    client = GvretClient(app.port, hello=SAVVYCAN_HELLO)
    wait_until(lambda: any(c.streaming for c in app.hub.clients), what="binary mode")
    for i in range(30):
        can0.send(make_frame(0, 0x100, bytes(8)))
        if i % 3 == 0:
            can1.send(make_frame(0, 0x1ABCDE, bytes(4), extended=True))
    client.wait_frames(40)
    status = status_of(port)
    buses = {bus["iface"]: bus for bus in status["buses"]}
    assert (buses["can0"]["frames_total"], buses["can0"]["bytes_total"]) == (30, 240)
    assert buses["can0"]["nominal_bits_total"] == round(30 * 123.125)
    assert (buses["can1"]["bus"], buses["can1"]["frames_total"]) == (1, 10)
    assert buses["can0"]["state"] == "error-active" and buses["can0"]["healthy"] is True
    (listed,) = status["clients"]
    assert listed["address"] == f"127.0.0.1:{client.sock.getsockname()[1]}"
    assert (listed["dialect"], listed["frames_sent_total"]) == ("classic", 40)
    assert status["database"] is None and status["clients_connected"] == 1

    code, kind, body = get(port, "/metrics")
    assert (code, kind) == (200, "text/plain; version=0.0.4; charset=utf-8")
    families = parse_metrics(body)
    assert families["wiretap_frames"][1] == {
        (("bus", "0"), ("iface", "can0")): 30, (("bus", "1"), ("iface", "can1")): 10
    }  # fmt: skip
    assert families["wiretap_client_frames_sent"][1] == {(("client", listed["address"]),): 40}
    assert families["wiretap_clients"][1] == {(): 1}
    client.close()


def test_page_is_self_contained_and_carries_the_first_view(harness, bus_factory) -> None:
    bus = bus_factory()
    app = harness.start("--iface", "can0", "--status-listen", "127.0.0.1:0", buses={"can0": bus})
    code, kind, page = get(app.status.port, "/")
    assert (code, kind) == (200, "text/html; charset=utf-8")
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\(", page)
    assert "https://" not in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", ""
    )
    initial = re.search(r'<script id="initial" type="application/json">(.*?)</script>', page)
    assert json.loads(initial.group(1))["buses"][0]["iface"] == "can0"
    assert get(app.status.port, "/nothing-here")[0] == 404


def test_bus_off_and_recovery_show_in_status_and_metrics(harness, bus_factory) -> None:
    bus = bus_factory()
    app = harness.start("--iface", "can0", "--status-listen", "127.0.0.1:0", buses={"can0": bus})
    counters = bytes([0, 0, 0, 0, 0, 0, 0x80, 0x05])  # TEC 128, REC 5
    bus.send_raw(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_CRTL | CAN_ERR_CNT, 8, 0,
                                bytes([0, 0x20]) + counters[2:]))  # fmt: skip
    wait_until(lambda: status_of(app.status.port)["buses"][0]["state"] == "error-passive")
    (facts,) = status_of(app.status.port)["buses"]
    assert (facts["tx_errors"], facts["rx_errors"], facts["healthy"]) == (128, 5, False)
    bus.send_raw(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_BUSOFF, 8, 0, bytes(8)))
    wait_until(lambda: status_of(app.status.port)["buses"][0]["state"] == "bus-off")
    families = parse_metrics(get(app.status.port, "/metrics")[2])
    labels = (("bus", "0"), ("iface", "can0"))
    assert families["wiretap_bus_state"][1][labels + (("state", "bus-off"),)] == 1
    assert families["wiretap_bus_off"][1] == {labels: 1}
    assert families["wiretap_bus_error_frames"][1] == {labels: 2}
    bus.send_raw(CAN_FRAME.pack(CAN_ERR_FLAG | CAN_ERR_RESTARTED, 8, 0, bytes(8)))
    wait_until(lambda: status_of(app.status.port)["buses"][0]["healthy"])
    assert status_of(app.status.port)["buses"][0]["state"] == "error-active"


def test_allow_list_applies_to_the_status_listener(harness, bus_factory) -> None:
    app = harness.start(
        "--iface", "can0", "--status-listen", "127.0.0.1:0", "--allow", "10.0.0.0/8",
        buses={"can0": bus_factory()},
    )  # fmt: skip
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        get(app.status.port, "/metrics")
    assert app.status.requests_served == 0


def test_status_port_in_use_stops_the_start_with_one_clear_error(harness, bus_factory) -> None:
    app = harness.start(
        "--iface", "can0", "--status-listen", "127.0.0.1:0", buses={"can0": bus_factory()}
    )
    from wiretap.app import App, StartupError
    from wiretap.config import load_config

    config = load_config(
        ["--host", "127.0.0.1", "--port", "0", "--iface", "can0",
         "--status-listen", f"127.0.0.1:{app.status.port}"], {}
    )  # fmt: skip
    with pytest.raises(StartupError) as raised:
        App(config, {"can0": lambda: bus_factory().reader_end})
    assert str(raised.value).startswith(
        f"cannot listen on 127.0.0.1:{app.status.port} for the status page: "
    )


def test_a_client_that_does_not_read_shows_its_drops(harness, bus_factory) -> None:
    bus = bus_factory()
    app = harness.start("--iface", "can0", "--status-listen", "127.0.0.1:0", buses={"can0": bus})
    stalled = socket.create_connection(("127.0.0.1", app.port), timeout=10)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(SAVVYCAN_HELLO)
    wait_until(lambda: any(c.streaming for c in app.hub.clients), what="binary mode")
    try:
        frame = make_frame(0, 0x100, bytes(8))

        def burst_then_look() -> bool:
            for _ in range(500):
                bus.send(frame)
            return status_of(app.status.port)["clients"][0]["frames_dropped_total"] > 0

        wait_until(burst_then_look, timeout=60, what="drops for the stalled client")
        (client,) = app.hub.clients
        (listed,) = status_of(app.status.port)["clients"]
        assert listed["frames_dropped_total"] <= client.dropped
        assert listed["frames_sent_total"] <= client.frames_sent
        families = parse_metrics(get(app.status.port, "/metrics")[2])
        dropped = families["wiretap_client_frames_dropped"][1][(("client", client.who),)]
        assert 0 < dropped <= client.dropped
        assert families["wiretap_clients_frames_dropped"][1][()] >= dropped
    finally:
        stalled.close()
