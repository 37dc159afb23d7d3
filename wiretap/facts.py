"""The facts the status listener shows, gathered from the running server's parts.

Owns the shape of the status snapshot (documented in docs/status.md): per bus its counters from
the :class:`~wiretap.meter.BusMeter` and its health from its source, per client what it was sent
and lost, and the database writer's state. Plain numbers and strings only, so that ``status``
renders them without knowing any of the parts.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Dict

from . import buildinfo
from .meter import BusMeter
from .status import MAX_CLIENT_SERIES

if TYPE_CHECKING:
    from .app import App


def collect(app: App) -> Dict[str, object]:
    """One snapshot of ``app``; cheap enough to take per HTTP request."""
    meter = app.meter or BusMeter()
    buses = []
    for source in app.sources:
        for offset, name in enumerate(source.bus_names()):
            bus = source.first_bus + offset
            totals = meter.totals(bus)
            health = source.health(bus)
            buses.append({
                "bus": bus, "iface": name, "up": health.up, "state": health.state,
                "bitrate": source.bus_info(bus).bitrate,
                "frames_total": totals.frames, "bytes_total": totals.bytes,
                "nominal_bits_total": totals.nominal_bits, "fast_bits_total": totals.fast_bits,
                "tx_errors": health.tx_errors, "rx_errors": health.rx_errors,
                "error_frames_total": health.error_frames, "bus_off_total": health.bus_off,
                "kernel_drops_total": health.kernel_drops,
            })  # fmt: skip
    clients = app.hub.clients
    snapshot: Dict[str, object] = {
        "version": buildinfo.__version__,
        "commit": buildinfo.commit(),
        "uptime_seconds": (time.time_ns() - app.start_ns) / 1e9,
        "buses": buses,
        "clients_connected": len(clients),
        "clients": [
            {
                "address": client.who,
                "dialect": client.dialect.value if client.dialect else "auto",
                "frames_sent_total": client.frames_sent,
                "frames_dropped_total": client.dropped,
            }
            for client in clients[:MAX_CLIENT_SERIES]
        ],  # fmt: skip
        "client_frames_dropped_total": app.hub.client_drops(),
        "frames_dropped_total": app.broker.overflow.total,
        "database": None,
    }
    if app.pg is not None:
        counters = app.pg.counters()
        try:
            spool_bytes = os.path.getsize(app.config.postgres.cache_path)
        except OSError:
            spool_bytes = 0
        snapshot["database"] = {
            "connected": bool(counters["conn"]),
            "problem": app.pg.config_problem,
            "rows_written_total": counters["wrote"],
            "queue_frames": counters["queued"],
            "spool_frames": counters["spooled"],
            "spool_bytes": spool_bytes,
            "lag_seconds": round(app.pg.ledger.oldest_wait(), 3),
            "frames_dropped_total": counters["dropped"],
        }
    return snapshot
