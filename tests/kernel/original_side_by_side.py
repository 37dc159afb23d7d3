"""This server beside the original wiretap-server: CPU per frame and loss at equal rates on vcan.

Owns the side-by-side measurement: the same traffic on ``vcan0`` at a few steady rates (classic
8-byte frames from paced_sender.py, which keeps to the rate where ``cangen -g`` cannot), read by
each server in turn with one GVRET client connected and no database, while ``candump`` counts
what was on the bus. Run inside the vcan tier's guest (or on a machine whose kernel has
vcan), as root, with the original's file, which is not part of this repository::

    tests/kernel/run-in-vm.sh --run .venv/bin/python tests/kernel/original_side_by_side.py \\
        --original /path/to/original/wiretap-server.py

Both servers run under this interpreter with the same flags (the original's names were kept):
``--iface vcan0 --host 127.0.0.1 --port P --log-level INFO --stats-interval 0``. The client sends
``E7 E7 F1 07 F1 0C`` to each, and the phase starts once both replies are back, so each server
streams to it. The servers take turns (ABBA over the repeats) rather than reading the bus at the
same time, so that neither steals the other's CPU; medians over the repeats are reported.

CPU is user + system time of the server process (all threads) from ``/proc/<pid>/stat``, from
the sender's first frame (it is started beforehand) until the client's last frame. ``µs per
frame`` divides it by the frames on the bus (candump's count) and by the frames the client got;
the latter is also the server's CPU in % of one core per 10,000 frames/s. Idle CPU (client
connected, no traffic) is measured once per start.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from gvret_probe import GvretProbe  # noqa: E402
from vcan_tools import (  # noqa: E402
    REPO,
    SERVER,
    Candump,
    add_vcan,
    calibrate,
    interface_exists,
    ip_link,
    readers,
    scaled,
    wait_until,
)

IFACE = "vcan0"
SENDER = Path(__file__).resolve().parent / "paced_sender.py"
OURS = "this server"
ORIGINAL = "original"
IDLE_S = 5.0  # idle CPU window, client connected, no traffic
TCP_LISTEN = "0A"  # st column of /proc/net/tcp


def cpu_seconds(pid: int) -> Tuple[float, float]:
    """User and system CPU time of a process (all its threads) from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:``port`` (read from the kernel, no connection)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(
            fields[1] == wanted and fields[3] == TCP_LISTEN
            for fields in (line.split() for line in f.readlines()[1:])
        )


class Sender:
    """paced_sender.py, started and ready: ``send()`` lets it go and returns what it reports."""

    def __init__(self, rate: int, count: int) -> None:
        command = [sys.executable, str(SENDER), IFACE, str(rate), str(count)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline().strip() == "ready", "the sender did not start"

    def send(self) -> Tuple[float, int, int]:
        """Seconds the sending took, wake-ups and ENOBUFS waits."""
        output, _ = self.process.communicate("go\n")
        assert self.process.returncode == 0, "the sender failed"
        seconds, wakes, waits = output.split()
        return float(seconds), int(wakes), int(waits)


@dataclass
class Run:
    """One server at one rate, once."""

    server: str
    rate: int
    sent: int
    achieved_fps: float
    sender_wakes: int
    enobufs_waits: int
    candump: int
    client: int
    user_s: float
    sys_s: float
    window_s: float

    @property
    def frames_per_wake(self) -> float:
        return self.sent / self.sender_wakes if self.sender_wakes else 0.0

    @property
    def loss_pct(self) -> float:
        return 100.0 * (self.candump - self.client) / self.candump if self.candump else 0.0

    @property
    def us_per_bus_frame(self) -> float:
        return 1e6 * self.cpu_s / self.candump if self.candump else 0.0

    @property
    def us_per_delivered_frame(self) -> float:
        return 1e6 * self.cpu_s / self.client if self.client else 0.0

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def cpu_pct(self) -> float:
        return 100.0 * self.cpu_s / self.window_s


class Contender:
    """One server process on vcan0 with one GVRET client counting the frames it gets."""

    def __init__(self, name: str, script: Path, workdir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = workdir / f"{name.replace(' ', '-')}.log"
        command = [sys.executable, str(script), "--iface", IFACE, "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--log-level", "INFO", "--stats-interval", "0"]
        before = readers(IFACE)
        # STATE_DIRECTORY: where this server would spool (the checkout is read-only in the VM).
        environ = dict(os.environ, STATE_DIRECTORY=str(workdir))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=environ
            )
        self.received = 0
        self._stop = threading.Event()
        self.client: Optional[GvretProbe] = None
        self._counter: Optional[threading.Thread] = None
        try:
            wait_until(lambda: self._alive() and readers(IFACE) > before, f"{name} reading")
            wait_until(lambda: self._alive() and listening(self.port), f"{name} listening")
            self.client = GvretProbe(self.port)
            self._counter = threading.Thread(target=self._count, daemon=True)
            self._counter.start()
            wait_until(lambda: self.client.replies >= 2, f"{name} answering the handshake")
        except BaseException:
            self.stop()
            raise

    def _alive(self) -> bool:
        assert self.process.poll() is None, f"{self.name} exited:\n{self.log()}"
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _count(self) -> None:
        while not self._stop.is_set():
            self.received += len(self.client.take_frames(0.2))

    def cpu(self) -> Tuple[float, float]:
        return cpu_seconds(self.process.pid)

    def idle_cpu_pct(self) -> float:
        before = sum(self.cpu())
        time.sleep(IDLE_S)
        return 100.0 * (sum(self.cpu()) - before) / IDLE_S

    def phase(self, rate: int, count: int, workdir: Path) -> Run:
        """Send ``count`` frames at ``rate``, wait until the client's count stops moving, and
        measure."""
        dump = Candump(IFACE, workdir)
        sender = Sender(rate, count)
        received_before = self.received
        cpu_before = self.cpu()
        started = time.monotonic()
        sending_s, wakes, waits = sender.send()
        quiet_s = max(2.0, scaled(0.5))
        last, moved_at, cpu_end = self.received, time.monotonic(), self.cpu()
        while self.received - received_before < count:
            time.sleep(0.05)
            if self.received != last:
                last, moved_at, cpu_end = self.received, time.monotonic(), self.cpu()
            elif time.monotonic() - moved_at > quiet_s:
                break
        else:
            moved_at, cpu_end = time.monotonic(), self.cpu()
        dumped = len(dump.stop())
        return Run(
            self.name,
            rate,
            count,
            count / sending_s,
            wakes,
            waits,
            dumped,
            self.received - received_before,
            cpu_end[0] - cpu_before[0],
            cpu_end[1] - cpu_before[1],
            moved_at - started,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._counter is not None:
            self._counter.join()
        if self.client is not None:
            self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=scaled(30))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def show(run: Run) -> str:
    return (
        f"{run.server:>11} {run.rate:>5} fps: sent {run.sent} at {run.achieved_fps:,.0f} fps "
        f"({run.frames_per_wake:.1f} per wake-up, {run.enobufs_waits} ENOBUFS waits), "
        f"candump {run.candump}, client {run.client} (loss {run.loss_pct:.1f} %), "
        f"cpu {run.cpu_s:.2f} s (user {run.user_s:.2f}, system {run.sys_s:.2f}; "
        f"{run.cpu_pct:.1f} % of a core over {run.window_s:.1f} s), "
        f"{run.us_per_bus_frame:.0f} µs per bus frame, "
        f"{run.us_per_delivered_frame:.0f} µs per delivered frame"
    )


def median_table(runs: Sequence[Run], idle: Dict[str, List[float]]) -> str:
    """Medians over the repeats, one row per (rate, server), as Markdown."""
    lines = [
        "| rate asked | server | achieved fps (frames per sender wake-up) | sent | candump "
        "| client (loss) | CPU s (user + system) "
        "| CPU % of a core | µs CPU per bus frame | µs CPU per delivered frame "
        "(= CPU % per 10k fps) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rate in sorted({run.rate for run in runs}):
        for server in (OURS, ORIGINAL):
            group = [run for run in runs if run.rate == rate and run.server == server]
            if not group:
                continue
            med = {
                key: statistics.median(getattr(run, key) for run in group)
                for key in (
                    "achieved_fps", "frames_per_wake", "candump", "client", "user_s", "sys_s",
                    "cpu_s", "cpu_pct", "us_per_bus_frame", "us_per_delivered_frame",
                )
            }  # fmt: skip
            loss = " / ".join(f"{run.loss_pct:.1f}" for run in group)
            lines.append(
                f"| {rate:,} | {server} | {med['achieved_fps']:,.0f} "
                f"({med['frames_per_wake']:.1f}) | {group[0].sent:,} "
                f"| {med['candump']:,.0f} | {med['client']:,.0f} ({loss} %) "
                f"| {med['cpu_s']:.2f} ({med['user_s']:.2f} + {med['sys_s']:.2f}) "
                f"| {med['cpu_pct']:.1f} | {med['us_per_bus_frame']:.0f} "
                f"| {med['us_per_delivered_frame']:.0f} |"
            )
    lines.append("")
    for server, values in idle.items():
        shown = " / ".join(f"{value:.1f}" for value in values)
        lines.append(f"idle CPU, {server}: {shown} % of a core (client connected, no traffic)")
    return "\n".join(lines)


def ratios(runs: Sequence[Run]) -> str:
    """This server's median CPU per frame over the original's, per rate."""
    parts = []
    for rate in sorted({run.rate for run in runs}):
        medians: Dict[Tuple[str, str], float] = {}
        for server in (OURS, ORIGINAL):
            group = [run for run in runs if run.rate == rate and run.server == server]
            if not group:
                return ""
            medians[server, "bus"] = statistics.median(r.us_per_bus_frame for r in group)
            medians[server, "got"] = statistics.median(r.us_per_delivered_frame for r in group)
        parts.append(
            f"{rate:,} fps: {medians[OURS, 'bus'] / medians[ORIGINAL, 'bus']:.2f}x per bus frame, "
            f"{medians[OURS, 'got'] / medians[ORIGINAL, 'got']:.2f}x per delivered frame"
        )
    return "this server / original: " + "; ".join(parts)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--original", type=Path, required=True, help="the original server's wiretap-server.py"
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[700, 2000, 4000])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--repeats", type=int, default=3, help="starts of each server")
    args = parser.parse_args(argv)
    if not args.original.is_file():
        parser.error(f"--original: no file at {args.original}")

    subprocess.run(["modprobe", "vcan"], check=True)
    if interface_exists(IFACE):
        ip_link("del", IFACE)
    add_vcan(IFACE)
    workdir = Path(tempfile.mkdtemp(prefix="wiretap-side-by-side-"))
    start_s, slowness = calibrate()
    print(
        f"side by side: kernel {platform.release()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()} ({sys.executable}), Python starts and imports the server "
        f"in {start_s:.1f} s (waits x{slowness:.1f}), load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    scripts = {OURS: SERVER, ORIGINAL: args.original.resolve()}
    runs: List[Run] = []
    idle: Dict[str, List[float]] = {OURS: [], ORIGINAL: []}
    try:
        for repeat in range(args.repeats):
            order = [OURS, ORIGINAL] if repeat % 2 == 0 else [ORIGINAL, OURS]
            for name in order:
                contender = Contender(name, scripts[name], workdir)
                try:
                    idle[name].append(contender.idle_cpu_pct())
                    for rate in args.rates:
                        count = int(rate * args.seconds)
                        run = contender.phase(rate, count, workdir)
                        runs.append(run)
                        print(f"[repeat {repeat + 1}] {show(run)}", flush=True)
                finally:
                    contender.stop()
    finally:
        ip_link("del", IFACE)
    print(
        f"\nmedians of {args.repeats} repeats (load average now {os.getloadavg()[0]:.2f}):\n",
        flush=True,
    )
    print(median_table(runs, idle))
    print("\n" + ratios(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
