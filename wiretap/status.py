"""The status listener: ``/metrics`` for Prometheus, ``/status`` as JSON, ``/`` a live page.

Owns: the optional HTTP listener (``http.server``, one short-lived thread per request, at most
``MAX_REQUESTS`` at once, the ``allow`` list applied), the sampler thread that turns counter
snapshots into per-bus rates and load and keeps a few minutes of them for the page's charts,
the Prometheus text rendering (:func:`render_metrics`), and the page itself (:data:`PAGE`, one
self-contained HTML document: no external assets, so it works offline on a phone).

It reads; it never touches the frame path. The facts come from one ``snapshot`` callable that
``app`` hands in (a dict of plain numbers and strings, shape in docs/status.md); this module
imports nothing of the rest of the program but the pure bus-load arithmetic.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from .meter import load_ratio
from .ratelimit import RateLimitedLog

log = logging.getLogger("wiretap.status")

SAMPLE_INTERVAL_S = 2.0
HISTORY_SAMPLES = 150  # five minutes of samples for the page's charts
MAX_REQUESTS = 8  # requests served at once; more are closed at once
MAX_CLIENT_SERIES = 32  # clients listed by name in /metrics and /status; all are counted
REQUEST_TIMEOUT_S = 10.0
HEALTHY_STATES = ("error-active", "error-warning")

Snapshot = Dict[str, Any]


class Sampler:
    """Keeps the rates: frames per second and bus load per bus, over the last interval and as
    a history of ``HISTORY_SAMPLES`` intervals."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot
        self.history: Dict[int, Deque[Tuple[float, float]]] = {}
        self.rates: Dict[int, Tuple[float, float]] = {}  # bus -> (fps, load ratio)
        self._last: Optional[Tuple[float, Dict[int, Snapshot]]] = None
        self._lock = threading.Lock()

    def sample(self, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        buses = {bus["bus"]: bus for bus in self.snapshot()["buses"]}
        with self._lock:
            if self._last is not None:
                then, before = self._last
                elapsed = now - then
                for number, bus in buses.items():
                    old = before.get(number)
                    if old is None or elapsed <= 0:
                        continue
                    fps = (bus["frames_total"] - old["frames_total"]) / elapsed
                    load = load_ratio(
                        bus["nominal_bits_total"] - old["nominal_bits_total"],
                        bus["fast_bits_total"] - old["fast_bits_total"],
                        elapsed,
                        bus["bitrate"],
                        bus.get("data_bitrate", 0),
                    )
                    self.rates[number] = (fps, load)
                    samples = self.history.setdefault(
                        number, collections.deque(maxlen=HISTORY_SAMPLES)
                    )
                    samples.append((fps, load))
            self._last = (now, buses)

    def view(self) -> Snapshot:
        """A fresh snapshot with the rates, health verdicts and history added."""
        facts = self.snapshot()
        with self._lock:
            rates = dict(self.rates)
            history = {bus: list(samples) for bus, samples in self.history.items()}
        for bus in facts["buses"]:
            fps, load = rates.get(bus["bus"], (0.0, 0.0))
            bus["fps"] = round(fps, 1)
            bus["load_ratio"] = round(load, 4)
            bus["healthy"] = bool(bus["up"]) and bus["state"] in HEALTHY_STATES
        database = facts.get("database")
        if database is not None:
            database["healthy"] = bool(database["connected"]) and not database.get("problem")
            if database.get("problem"):
                database["state"] = "refuses writes"
            elif not database["connected"]:
                database["state"] = "down"
            elif database["spool_frames"]:
                database["state"] = "draining spool"
            else:
                database["state"] = "writing"
        facts["history"] = {
            "interval_seconds": SAMPLE_INTERVAL_S,
            "samples": HISTORY_SAMPLES,
            "buses": {
                str(bus): {
                    "fps": [round(fps, 1) for fps, _ in samples],
                    "load_ratio": [round(load, 4) for _, load in samples],
                }
                for bus, samples in history.items()
            },
        }
        return facts


# --- Prometheus text format (exposition format 0.0.4) ---


def _label_value(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


class _Families:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def add(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[Tuple[Dict[str, object], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                text = ",".join(f'{key}="{_label_value(val)}"' for key, val in labels.items())
                self.lines.append(f"{name}{{{text}}} {_number(value)}")
            else:
                self.lines.append(f"{name} {_number(value)}")


def render_metrics(view: Snapshot) -> str:
    """The status in the Prometheus text exposition format."""
    out = _Families()
    out.add("wiretap_build_info", "gauge", "Version and git commit of the running server.",
            [({"version": view["version"], "commit": view["commit"]}, 1)])  # fmt: skip
    out.add("wiretap_uptime_seconds", "gauge", "Seconds since the server started.",
            [({}, round(view["uptime_seconds"], 3))])  # fmt: skip
    buses = view["buses"]

    def per_bus(key: str) -> List[Tuple[Dict[str, object], float]]:
        return [({"bus": str(bus["bus"]), "iface": bus["iface"]}, bus[key]) for bus in buses]

    for name, kind, key, help_text in (
        ("wiretap_frames_total", "counter", "frames_total", "Frames read from the bus."),
        ("wiretap_bytes_total", "counter", "bytes_total", "Payload bytes read from the bus."),
        ("wiretap_bus_bits_total", "counter", "bits_total",
         "Bits the bus carried for these frames (stuffing estimated)."),
        ("wiretap_bus_load_ratio", "gauge", "load_ratio",
         f"Share of the bus's bit time in use over the last {SAMPLE_INTERVAL_S:g} s."),
        ("wiretap_bus_bitrate_bits_per_second", "gauge", "bitrate", "Nominal bit rate."),
        ("wiretap_bus_up", "gauge", "up", "1 while the interface is open and up."),
        ("wiretap_bus_transmit_error_count", "gauge", "tx_errors",
         "The controller's transmit error counter (TEC), as last reported."),
        ("wiretap_bus_receive_error_count", "gauge", "rx_errors",
         "The controller's receive error counter (REC), as last reported."),
        ("wiretap_bus_error_frames_total", "counter", "error_frames_total",
         "CAN error frames the kernel reported."),
        ("wiretap_bus_off_total", "counter", "bus_off_total", "Times the controller went bus-off."),
        ("wiretap_kernel_drops_total", "counter", "kernel_drops_total",
         "Frames the kernel dropped before the server could read them."),
    ):  # fmt: skip
        if key == "bits_total":
            samples = [
                (labels, bus["nominal_bits_total"] + bus["fast_bits_total"])
                for (labels, _), bus in zip(per_bus("bus"), buses)
            ]
        else:
            samples = per_bus(key)
        out.add(name, kind, help_text, samples)
    out.add(
        "wiretap_bus_state", "gauge",
        "The controller's CAN state: 1 for the current one (error-active, error-warning, "
        "error-passive, bus-off).",
        [({"bus": str(bus["bus"]), "iface": bus["iface"], "state": state},
          1 if bus["state"] == state else 0)
         for bus in buses for state in ("error-active", "error-warning", "error-passive",
                                        "bus-off")],
    )  # fmt: skip
    out.add("wiretap_frames_dropped_total", "counter",
            "Frames lost for every consumer (the server could not queue them).",
            [({}, view["frames_dropped_total"])])  # fmt: skip
    clients = view["clients"]
    out.add("wiretap_clients", "gauge", "GVRET clients connected.",
            [({}, view["clients_connected"])])  # fmt: skip
    out.add("wiretap_client_info", "gauge", "A connected client and its GVRET dialect.",
            [({"client": c["address"], "dialect": c["dialect"]}, 1) for c in clients])  # fmt: skip
    out.add("wiretap_client_frames_sent_total", "counter", "Frames queued to this client.",
            [({"client": c["address"]}, c["frames_sent_total"]) for c in clients])  # fmt: skip
    out.add("wiretap_client_frames_dropped_total", "counter",
            "Frames this client lost because it did not keep up.",
            [({"client": c["address"]}, c["frames_dropped_total"]) for c in clients])  # fmt: skip
    out.add("wiretap_clients_frames_dropped_total", "counter",
            "Frames lost by clients that did not keep up, gone clients included.",
            [({}, view["client_frames_dropped_total"])])  # fmt: skip
    database = view.get("database")
    if database is not None:
        for name, kind, key, help_text in (
            ("wiretap_database_up", "gauge", "connected", "1 while connected to PostgreSQL."),
            ("wiretap_database_refusing", "gauge", "refusing",
             "1 while PostgreSQL refuses the server's writes (a configuration mistake)."),
            ("wiretap_database_rows_written_total", "counter", "rows_written_total",
             "Rows committed to PostgreSQL."),
            ("wiretap_database_queue_frames", "gauge", "queue_frames",
             "Frames waiting in memory for the database."),
            ("wiretap_database_spool_frames", "gauge", "spool_frames",
             "Frames parked in the on-disk spool."),
            ("wiretap_database_spool_bytes", "gauge", "spool_bytes", "Size of the spool file."),
            ("wiretap_database_lag_seconds", "gauge", "lag_seconds",
             "How long the oldest frame in memory has waited for the database."),
            ("wiretap_database_frames_dropped_total", "counter", "frames_dropped_total",
             "Frames that will never reach the database (counted, logged)."),
        ):  # fmt: skip
            value = bool(database.get("problem")) if key == "refusing" else database[key]
            out.add(name, kind, help_text, [({}, value)])
    return "\n".join(out.lines) + "\n"


# --- the HTTP side ---


class StatusServer(ThreadingHTTPServer):
    """Serves the status until ``stop()``; ``start()`` begins sampling and serving."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 16

    def __init__(
        self,
        address: Tuple[str, int],
        snapshot: Callable[[], Snapshot],
        allow: Sequence[str] = (),
    ) -> None:
        self.sampler = Sampler(snapshot)
        self.allow = [ipaddress.ip_network(entry, strict=False) for entry in allow]
        self.requests_served = 0
        self._slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self._admitted: set = set()
        self._refusals = RateLimitedLog(log)
        self._stop = threading.Event()
        self._workers: List[threading.Thread] = []
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, StatusHandler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> None:
        self.sampler.sample()
        for target, name in ((self._sample_loop, "status-sampler"),
                             (lambda: self.serve_forever(0.25), "status-http")):  # fmt: skip
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._workers.append(thread)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._workers:
            self.shutdown()
        self.server_close()
        for thread in self._workers:
            thread.join(timeout)

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            try:
                self.sampler.sample()
            except Exception:
                log.exception("status: could not sample the counters")

    def verify_request(self, request, client_address) -> bool:  # noqa: ANN001 (socketserver API)
        if self.allow:
            peer = ipaddress.ip_address(client_address[0])
            if peer.version == 6 and peer.ipv4_mapped:
                peer = peer.ipv4_mapped
            if not any(peer in network for network in self.allow):
                self._refusals.log(
                    (client_address[0], "refused"), logging.WARNING,
                    "status: refused %s, not in the allow list", client_address[0],
                )  # fmt: skip
                return False
        if not self._slots.acquire(blocking=False):
            return False
        self._admitted.add(request)
        return True

    def shutdown_request(self, request) -> None:  # noqa: ANN001 (socketserver API)
        if request in self._admitted:
            self._admitted.discard(request)
            self._slots.release()
        super().shutdown_request(request)


class StatusHandler(BaseHTTPRequestHandler):
    server: StatusServer
    timeout = REQUEST_TIMEOUT_S
    server_version = "wiretap-server"

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self._respond(head_only=False)

    def do_HEAD(self) -> None:  # noqa: N802 (http.server API)
        self._respond(head_only=True)

    def _respond(self, head_only: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path not in ("/", "/status", "/metrics"):
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", head_only)
            return
        try:
            view = self.server.sampler.view()
        except Exception:
            log.exception("status: could not collect the counters")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8",
                       b"could not collect the counters\n", head_only)  # fmt: skip
            return
        self.server.requests_served += 1
        if path == "/metrics":
            body = render_metrics(view).encode()
            kind = "text/plain; version=0.0.4; charset=utf-8"
        elif path == "/status":
            body = json.dumps(view, separators=(",", ":")).encode()
            kind = "application/json"
        else:
            # The first view rides in the page, so it shows the facts before any script runs.
            initial = json.dumps(view, separators=(",", ":")).replace("<", "\\u003c")
            body = PAGE.replace("/*INITIAL*/null", initial).encode()
            kind = "text/html; charset=utf-8"
        self._send(HTTPStatus.OK, kind, body, head_only)

    def _send(self, status: HTTPStatus, kind: str, body: bytes, head_only: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server API)
        log.debug("status: %s %s", self.address_string(), format % args)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>WireTAP Server</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#222}
header{background:#1d2b3a;color:#fff;padding:10px 16px;display:flex;gap:16px;flex-wrap:wrap;
align-items:baseline}
header h1{font-size:18px;margin:0}
header span{opacity:.8}
main{padding:12px;display:grid;gap:12px;grid-template-columns:repeat(auto-fill,minmax(320px,1fr))}
section{background:#fff;border-radius:6px;padding:10px 12px;box-shadow:0 1px 2px rgba(0,0,0,.13)}
h2{font-size:15px;margin:0 0 6px;display:flex;align-items:center;gap:8px}
.dot{width:12px;height:12px;border-radius:50%;display:inline-block;background:#999}
.ok .dot{background:#2a9d3a}.bad .dot{background:#d62828}.warn .dot{background:#e9a100}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:2px 6px 2px 0}
td.n{text-align:right;font-variant-numeric:tabular-nums}
svg{width:100%;height:40px;background:#f8f9fb;border-radius:4px;display:block}
polyline{fill:none;stroke-width:1.5;vector-effect:non-scaling-stroke}
.fps polyline{stroke:#1565c0}.fps polygon{fill:#1565c022}
.load polyline{stroke:#e07000}.load polygon{fill:#e0700022}
.legend{font-size:12px;color:#666;margin-top:4px}.stale{opacity:.5}
</style></head>
<body>
<header><h1>WireTAP Server</h1><span id="build"></span><span id="uptime"></span>
<span id="updated"></span></header>
<main id="main"></main>
<script id="initial" type="application/json">/*INITIAL*/null</script>
<script>
"use strict";
const REFRESH_MS = 2000;
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child);
  return node;
}
function fmt(n, digits) { return Number(n).toLocaleString("en", {maximumFractionDigits: digits}); }
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + Math.floor(s % 60) + "s";
}
function chart(samples, top, slots, cls) {
  // Newest sample at the right edge; the width is the whole history window.
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 300 40");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", cls);
  if (samples.length) {
    const values = samples.length > 1 ? samples : [samples[0], samples[0]];
    const step = 300 / (slots - 1), first = slots - values.length;
    const points = values.map((v, i) =>
      ((first + i) * step).toFixed(1) + "," + (39 - 35 * Math.min(v / top, 1)).toFixed(1));
    const area = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
    area.setAttribute("points", (first * step).toFixed(1) + ",40 " + points.join(" ") + " 300,40");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(area, line);
  }
  return svg;
}
function rows(pairs) {
  return el("table", {}, ...pairs.map(([k, v]) => el("tr", {}, el("th", {}, k),
    el("td", {class: "n"}, v))));
}
function render(s) {
  document.getElementById("build").textContent = "v" + s.version + " (" + s.commit + ")";
  document.getElementById("uptime").textContent = "up " + duration(s.uptime_seconds);
  document.getElementById("updated").textContent = "updated " +
    new Date().toLocaleTimeString();
  const main = document.getElementById("main");
  const cards = [];
  const minutes = fmt(s.history.samples * s.history.interval_seconds / 60, 0);
  for (const bus of s.buses) {
    const h = s.history.buses[String(bus.bus)] || {fps: [], load_ratio: []};
    const fpsTop = Math.max(1, ...h.fps) * 1.1, loadTop = Math.max(0.01, ...h.load_ratio) * 1.1;
    const verdict = !bus.healthy ? "bad" : bus.state === "error-warning" ? "warn" : "ok";
    cards.push(el("section", {class: "bus " + verdict, "data-bus": bus.bus,
        "data-iface": bus.iface, "data-fps": bus.fps, "data-load": bus.load_ratio},
      el("h2", {}, el("span", {class: "dot"}), "bus " + bus.bus + " \\u2013 " + bus.iface),
      rows([["state", (bus.up ? "" : "down, ") + bus.state],
            ["frames/s", fmt(bus.fps, 1)],
            ["load", fmt(bus.load_ratio * 100, 1) + " % of " + fmt(bus.bitrate / 1000, 0)
              + " kbit/s"],
            ["frames", fmt(bus.frames_total, 0)],
            ["tx / rx errors", bus.tx_errors + " / " + bus.rx_errors],
            ["error frames / bus-off", bus.error_frames_total + " / " + bus.bus_off_total],
            ["kernel drops", fmt(bus.kernel_drops_total, 0)]]),
      el("div", {class: "legend"}, "frames/s, last " + minutes + " min (peak " +
        fmt(Math.max(0, ...h.fps), 0) + ")"),
      chart(h.fps, fpsTop, s.history.samples, "fps"),
      el("div", {class: "legend"}, "bus load, last " + minutes + " min (peak " +
        fmt(Math.max(0, ...h.load_ratio) * 100, 1) + " %)"),
      chart(h.load_ratio, loadTop, s.history.samples, "load")));
  }
  const db = s.database;
  if (db) {
    cards.push(el("section", {class: "database " + (db.healthy ? "ok" : "bad"),
        "data-state": db.state},
      el("h2", {}, el("span", {class: "dot"}), "PostgreSQL"),
      rows([["state", db.state], ...(db.problem ? [["problem", db.problem]] : []),
            ["rows written", fmt(db.rows_written_total, 0)],
            ["queued", fmt(db.queue_frames, 0)],
            ["spool", fmt(db.spool_frames, 0) + " frames, " + fmt(db.spool_bytes / 1e6, 1) +
              " MB"],
            ["lag", fmt(db.lag_seconds, 1) + " s"],
            ["dropped", fmt(db.frames_dropped_total, 0)]])));
  }
  const clientRows = s.clients.map(c => el("tr", {class: "client"}, el("td", {}, c.address),
    el("td", {}, c.dialect), el("td", {class: "n"}, fmt(c.frames_sent_total, 0)),
    el("td", {class: "n"}, fmt(c.frames_dropped_total, 0))));
  cards.push(el("section", {class: "clients", "data-count": s.clients_connected},
    el("h2", {}, "GVRET clients: " + s.clients_connected),
    el("table", {}, el("tr", {}, el("th", {}, "address"), el("th", {}, "dialect"),
      el("th", {}, "sent"), el("th", {}, "dropped")), ...clientRows),
    el("div", {class: "legend"}, "frames lost by slow clients so far: " +
      fmt(s.client_frames_dropped_total, 0) + "; by the server: " +
      fmt(s.frames_dropped_total, 0))));
  main.replaceChildren(...cards);
  main.classList.remove("stale");
}
async function refresh() {
  try {
    const response = await fetch("status", {cache: "no-store"});
    if (!response.ok) throw new Error(response.status);
    render(await response.json());
  } catch (error) {
    document.getElementById("main").classList.add("stale");
    document.getElementById("updated").textContent = "server unreachable (" + error + ")";
  }
  setTimeout(refresh, REFRESH_MS);
}
const initial = JSON.parse(document.getElementById("initial").textContent);
if (initial) render(initial);
setTimeout(refresh, REFRESH_MS);
</script>
</body></html>
"""
