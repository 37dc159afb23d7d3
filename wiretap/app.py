"""Wiring: builds sources, broker and consumers from a Config, and shuts them down in order.

Owns: which source serves which bus, the transmit route from a client back to its bus, the
stats collection, signal handling, and the shutdown order (sources -> broker -> consumers), each
joined with a timeout so a stop completes within 10 s. The only module that knows them all.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional

from . import facts, gvret
from .broker import Broker
from .config import GVRET_BUS_COUNT, REPLAY_PREFIX, Config, split_listen
from .console import ConsoleEcho
from .frames import Frame
from .meter import BusMeter
from .server import Beacon, ClientHub, GvretServer
from .sources import Source, TransmitResult
from .sources.replay import ReplaySource
from .sources.socketcan import SocketCanSource
from .stats import StatsReporter, format_line
from .status import StatusServer
from .systemd import Notifier

log = logging.getLogger("wiretap.app")

SHUTDOWN_S = 9.0  # server.md §5: exit within 10 s of SIGTERM
SocketFactory = Callable[[], socket.socket]


class StartupError(Exception):
    """A problem that stops the server from starting; ``exit_code`` is what the process returns."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def build_sources(
    config: Config, socket_factories: Optional[Mapping[str, SocketFactory]] = None
) -> List[Source]:
    """One source per ``iface`` entry, numbered from ``bus_offset`` in order."""
    server = config.server
    factories = socket_factories or {}
    sources: List[Source] = []
    bus = server.bus_offset
    for name in server.iface:
        if name.startswith(REPLAY_PREFIX):
            path = name[len(REPLAY_PREFIX) :]
            try:
                source: Source = ReplaySource(
                    path,
                    bus,
                    can_fd=server.can_fd,
                    speed=server.replay_speed,
                    loop=server.replay_loop,
                )
            except OSError as exc:
                raise StartupError(f"replay log {path}: {exc.strerror or exc}", 2) from exc
        else:
            source = SocketCanSource(
                name,
                bus,
                can_fd=server.can_fd,
                open_socket=factories.get(name),
            )
        sources.append(source)
        bus += source.bus_count
    if bus > GVRET_BUS_COUNT:
        raise StartupError(
            f"server.iface = {','.join(server.iface)} with bus_offset {server.bus_offset} needs "
            f"GVRET buses {server.bus_offset}..{bus - 1} (a replay log brings one per interface "
            f"in it), but there are only {GVRET_BUS_COUNT} (0..{GVRET_BUS_COUNT - 1})",
            2,
        )
    return sources


class App:
    """The running server. ``start()`` then ``stop()``; ``port`` is the bound TCP port."""

    def __init__(
        self,
        config: Config,
        socket_factories: Optional[Mapping[str, SocketFactory]] = None,
        sources: Optional[List[Source]] = None,
        environ: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.config = config
        self.start_ns = time.time_ns()
        self.sources = sources if sources is not None else build_sources(config, socket_factories)
        self.bus_to_source: Dict[int, Source] = {
            source.first_bus + offset: source
            for source in self.sources
            for offset in range(source.bus_count)
        }
        self.bus_count = max(self.bus_to_source, default=config.server.bus_offset) + 1
        self.broker = Broker()
        self.hub = ClientHub(self.start_ns)
        self.broker.register(self.hub)
        self.echo: Optional[ConsoleEcho] = None
        if config.server.echo_console:
            server = config.server
            self.echo = ConsoleEcho(
                sys.stdout, server.colour, self.start_ns, default_dir=server.default_dir
            )
            self.broker.register(self.echo)
        self.pg = None
        self.partitions = None
        if config.postgres.enable:
            from .pg.partitions import PartitionKeeper
            from .pg.writer import PgWriter

            self.pg = PgWriter(config.postgres, config.server.default_dir, node=config.server.node)
            self.broker.register(self.pg)
            self.partitions = PartitionKeeper(
                config.postgres.dsn,
                config.server.node,
                config.postgres.partition_interval,
                config.postgres.retention_days,
            )
        self.server = self._bind()
        self.meter: Optional[BusMeter] = None
        self.status: Optional[StatusServer] = None
        if config.status.listen:
            self.meter = BusMeter()
            self.broker.register(self.meter)
            self.status = self._bind_status(config.status.listen)
        self.beacon = Beacon(config.server.beacon_address) if config.server.beacon else None
        self.stats = StatsReporter(config.logging.stats_interval, self.counters)
        status_stats = StatsReporter(0, self.counters)  # its own fps, apart from the log line's
        self.systemd = Notifier(
            os.environ if environ is None else environ,
            heartbeat=self.broker.last_sign_of_life,
            status_line=lambda: format_line(status_stats.snapshot()).removeprefix("stats "),
        )
        self._server_thread = threading.Thread(
            target=self.server.serve_forever, args=(0.25,), name="gvret-accept", daemon=True
        )

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def _bind(self) -> GvretServer:
        server = self.config.server
        try:
            return GvretServer(
                (server.host, server.port),
                self.hub,
                bus_count=self.bus_count,
                bus_params=self.bus_params,
                transmit=self.transmit,
                read_only=server.read_only,
                allow=server.allow,
                max_clients=server.max_clients,
                handshake_timeout=server.handshake_timeout,
                dialect=server.gvret_fd,
                flow_control=server.gvret_flow_control,
                set_bitrate=self.set_bitrate if server.reconfigure_interfaces else None,
            )
        except OSError as exc:
            where = f"{server.host}:{server.port}"
            if exc.errno == errno.EADDRINUSE:
                message = f"cannot listen on {where}: the port is already in use"
            elif exc.errno == errno.EACCES:
                message = (
                    f"cannot listen on {where}: permission denied (ports below 1024 need "
                    "CAP_NET_BIND_SERVICE: run under the shipped systemd unit, or use port 2323)"
                )
            else:
                message = f"cannot listen on {where}: {exc.strerror or exc}"
            raise StartupError(message) from exc

    def _bind_status(self, listen: str) -> StatusServer:
        try:
            address = split_listen(listen)
            return StatusServer(address, lambda: facts.collect(self), self.config.server.allow)
        except OSError as exc:
            self.server.server_close()
            raise StartupError(
                f"cannot listen on {listen} for the status page: {exc.strerror or exc}"
            ) from exc

    def bus_params(self, bus: int) -> gvret.BusParams:
        source = self.bus_to_source.get(bus)
        if source is None:
            return gvret.DISABLED_BUS
        info = source.bus_info(bus)
        return gvret.BusParams(info.enabled, info.listen_only, info.bitrate)

    def set_bitrate(self, bus: int, bitrate: int) -> str:
        """A client's bus-speed request, when the operator allows it (``reconfigure_interfaces``);
        raises RuntimeError when it cannot be applied."""
        source = self.bus_to_source.get(bus)
        if not isinstance(source, SocketCanSource):
            raise RuntimeError(f"bus {bus} is not a CAN interface")
        return source.set_bitrate(bitrate)

    def transmit(self, frame: Frame, origin: int) -> Optional[str]:
        source = self.bus_to_source.get(frame.bus)
        if source is None:
            return "no such bus"
        result = source.transmit(frame, origin)
        if result is TransmitResult.SENT:
            return None
        if result is TransmitResult.REFUSED:
            return f"{len(frame.data)}-byte frame on a classic CAN bus"
        return f"{source.name}: {result.value}"

    def counters(self) -> Dict[str, object]:
        """The stats line's values. With a database, its fields balance:
        ``rx + carried == wrote + spooled + queued + dropped`` (``rx`` counts every frame read,
        ``queued`` every frame in memory on its way to the database, ``dropped`` every frame lost
        on the way, ``carried`` the rows a previous run left in the spool)."""
        broker = self.broker
        values: Dict[str, object] = {
            "rx": broker.frames_in + broker.overflow.total + broker.pending,
            "clients": len(self.hub.clients),
            "client_drops": self.hub.client_drops(),
            "conn": 0,
        }
        for source in self.sources:
            for name, value in source.counters().items():
                values[name] = int(values.get(name, 0)) + value  # type: ignore[call-overload]
        values["tx_fail"] = int(values.get("tx_fail", 0)) + self.hub.transmits_refused()
        if self.pg is not None:
            values.update(self.pg.counters())
            values["queued"] = int(values["queued"]) + broker.pending
        if self.partitions is not None:
            values.update(self.partitions.counters())
        values["node"] = self.config.server.node
        # Frames the broker could not queue were lost for every consumer, the database included.
        values["dropped"] = int(values.get("dropped", 0)) + broker.overflow.total
        return values

    def start(self) -> None:
        log.info(
            "node %s listening on %s:%d for GVRET clients; buses: %s",
            self.config.server.node,
            self.config.server.host,
            self.port,
            ", ".join(
                f"{name}={source.first_bus + offset}"
                for source in self.sources
                for offset, name in enumerate(source.bus_names())
            ),
        )
        for consumer in (self.echo, self.pg):
            if consumer is not None:
                consumer.start()
        if self.partitions is not None:
            self.partitions.start()
        self.broker.start()
        for source in self.sources:
            source.start(self.broker.publish)
        self._server_thread.start()
        if self.beacon is not None:
            self.beacon.start()
        if self.status is not None:
            self.status.start()
            log.info(
                "status page on http://%s:%d/ (metrics at /metrics)",
                *self.status.server_address[:2],
            )
        self.stats.start()
        self.systemd.ready(f"listening on {self.config.server.host}:{self.port}")
        self.systemd.start()

    def stop(self, timeout: float = SHUTDOWN_S) -> None:
        """Stop reading, deliver what was read, close clients, flush the database; all within
        ``timeout`` seconds, most of it left for the database."""
        deadline = time.monotonic() + timeout

        def budget(at_most: float) -> float:
            return max(0.1, min(at_most, deadline - time.monotonic()))

        self.systemd.stopping()
        self.systemd.stop()
        if self.status is not None:
            self.status.stop(budget(1.0))
        self.stats.stop()
        if self.beacon is not None:
            self.beacon.stop()
        for source in self.sources:
            source.stop()
        for source in self.sources:
            source.join(budget(2.0))
        self.broker.stop(budget(2.0))
        # Close the door before closing the clients: a handler that registers from now on ends
        # its own connection, so none is left open by having come in during the shutdown.
        clients = self.hub.close()
        if self._server_thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        for client in clients:  # all at once: a stalled client's writer unblocks on shutdown
            client.close()
        for client in clients:
            client.stop_writer(budget(1.0))
        if self.echo is not None:
            self.echo.stop(budget(1.0))
        if self.partitions is not None:
            self.partitions.stop(budget(0.5))
        if self.pg is not None:
            self.pg.stop(budget(timeout))
        self.stats.log_now()


def run(config: Config, sources: Optional[List[Source]] = None) -> int:
    """Run until SIGINT, SIGTERM or SIGHUP; the process exit code. ``sources`` as
    :func:`build_sources` made them, if the caller already did."""
    try:
        app = App(config, sources=sources)
    except StartupError as exc:
        log.error("%s", exc)
        return exc.exit_code
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    # SIGHUP too: it is what closing the terminal or SSH session of scripts/run.sh sends, and
    # its default action would end the process without flushing a single queued frame.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        app.start()
    except (OSError, sqlite3.Error) as exc:
        # The database spool could not be opened (cache_path in a missing or read-only folder).
        log.error("cannot start: %s", exc)
        app.stop()
        return 1
    while not stop.wait(1.0):
        pass
    app.stop()
    return 0
