"""Helpers of the vcan tier: interfaces with `ip`, the server as a process, can-utils.

vcan delivers a frame only to sockets already open, so every reader is waited for (by its entry in
the kernel's receive list, ``/proc/net/can/rcvlist_all``) before anything is sent.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from wiretap.frames import CAN_MTU, CANFD_MTU

REPO = Path(__file__).resolve().parent.parent.parent
SERVER = REPO / "wiretap-server.py"
RECEIVE_LIST = Path("/proc/net/can/rcvlist_all")
TIMEOUT = 20.0
"""The base wait for anything the tier waits for, right for a machine that starts Python and
imports the server in :data:`REFERENCE_START_S`; every wait is :func:`scaled` to this one."""
REFERENCE_START_S = 1.0
# Log format, and a receive buffer large enough that a slow guest's candump drops nothing.
CANDUMP_OPTIONS = ("-L", "-r", str(4 * 1024 * 1024))

_slowness = 1.0


def calibrate() -> Tuple[float, float]:
    """Measures how slow this machine is now and scales every wait of the tier to it.

    The yardstick is what the server does before it listens: start Python and import itself (and
    psycopg2), the slower of two runs. A VM without KVM on a loaded host is many times slower
    than a quiet one; a fixed wait either fails there or hides a hang everywhere else. Returns
    the time measured and the factor the waits are scaled by (at least 1).
    """
    global _slowness
    runs = []
    for _ in range(2):
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", "import psycopg2, wiretap.app, wiretap.pg.writer"],
            cwd=REPO, check=True,
        )  # fmt: skip
        runs.append(time.monotonic() - started)
    _slowness = max(1.0, max(runs) / REFERENCE_START_S)
    return max(runs), _slowness


def scaled(seconds: float) -> float:
    """``seconds`` on the reference machine, as long as it takes on this one (see calibrate)."""
    return seconds * _slowness


def wait_until(
    condition: Callable[[], object],
    what: str,
    timeout: Optional[float] = None,
    log: Optional[Callable[[], str]] = None,
) -> None:
    """Polls ``condition`` for ``timeout`` s (default: :data:`TIMEOUT`, scaled); on a timeout the
    AssertionError names ``what`` and shows ``log()``, the log of whatever did not happen."""
    deadline = time.monotonic() + (timeout if timeout is not None else scaled(TIMEOUT))
    while not condition():
        if time.monotonic() >= deadline:
            shown = f"\n--- server log ---\n{log()}" if log is not None else ""
            raise AssertionError(f"timed out waiting for {what}{shown}")
        time.sleep(0.05)


def ip_link(*args: str) -> None:
    subprocess.run(["ip", "link", *args], check=True, capture_output=True, text=True)


def interface_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def add_vcan(name: str, fd: bool = False) -> None:
    """Create ``name`` as a vcan interface (FD-capable when ``fd``) and bring it up."""
    ip_link("add", "dev", name, "type", "vcan")
    ip_link("set", name, "mtu", str(CANFD_MTU if fd else CAN_MTU))
    ip_link("set", "up", name)


def readers(iface: str) -> int:
    """Raw sockets with an all-IDs filter registered on ``iface`` (one per candump or server)."""
    lines = RECEIVE_LIST.read_text().splitlines()
    return sum(1 for line in lines if line.split()[:1] == [iface])


def wait_for_readers(iface: str, count: int) -> None:
    wait_until(lambda: readers(iface) >= count, f"{count} reader(s) on {iface}")


class ServerProcess:
    """``wiretap-server.py`` on 127.0.0.1 at a free port, its stderr log and stdout kept."""

    def __init__(self, args: List[str], workdir: Path) -> None:
        self.log_path = workdir / "server.log"
        self.out_path = workdir / "server.out"
        command = [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", "0"]
        command += ["--log-level", "DEBUG", "--stats-interval", "1", *args]
        with open(self.log_path, "wb") as log, open(self.out_path, "wb") as out:
            # STATE_DIRECTORY: where the database spool goes (the checkout may be read-only).
            environ = dict(os.environ, STATE_DIRECTORY=str(workdir))
            self.process = subprocess.Popen(command, stdout=out, stderr=log, cwd=REPO, env=environ)
        self.port = 0
        try:
            wait_until(self._listening, "the server to listen", log=self.log)
        except AssertionError:
            self.kill()
            raise

    def _listening(self) -> bool:
        assert self.process.poll() is None, f"server exited early:\n{self.log()}"
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())
        if match:
            self.port = int(match.group(1))
        return bool(match)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def log_lines(self, text: str) -> List[str]:
        return [line for line in self.log().splitlines() if text in line]

    def wait_for_log(self, text: str, count: int = 1) -> None:
        what = f"{count} log line(s) '{text}'"
        wait_until(lambda: len(self.log_lines(text)) >= count, what, log=self.log)

    def stop(self) -> Dict[str, int]:
        """SIGTERM; asserts a clean exit and returns the final stats line's counters."""
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=scaled(30)) == 0, self.log()
        return self.last_stats()

    def last_stats(self) -> Dict[str, int]:
        lines = self.log_lines(" stats rx=")
        assert lines, f"no stats line:\n{self.log()}"
        fields = lines[-1].split(" stats ", 1)[1].split()
        pairs = (field.split("=", 1) for field in fields)
        # Counters only: the line also names the node (node=pi-7).
        return {name: int(float(value)) for name, value in pairs if name != "node"}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Candump:
    """``candump -L`` on one interface: lines like ``(1700000000.123456) vcan0 123#1122``."""

    def __init__(self, iface: str, workdir: Path) -> None:
        self.path = workdir / f"candump-{iface}.log"
        before = readers(iface)
        with open(self.path, "wb") as out:
            self.process = subprocess.Popen(["candump", *CANDUMP_OPTIONS, iface], stdout=out)
        wait_for_readers(iface, before + 1)

    def stop(self) -> List[str]:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=scaled(10))
        return self.path.read_text().splitlines()


def cansend(iface: str, frame: str) -> None:
    subprocess.run(["cansend", iface, frame], check=True)


def cangen(iface: str, count: int, *options: str) -> None:
    subprocess.run(["cangen", iface, "-n", str(count), *options], check=True)


def parse_candump_line(line: str) -> Tuple[int, str, int, bool, bool, bytes]:
    """``(ts_us, iface, can_id, extended, fd, data)`` of a ``candump -L`` line."""
    stamp, iface, frame = line.split()
    seconds, micros = stamp.strip("()").split(".")
    ident, _, payload = frame.partition("#")
    fd = payload.startswith("#")
    data = bytes.fromhex(payload[2:] if fd else payload)
    return int(seconds) * 1_000_000 + int(micros), iface, int(ident, 16), len(ident) == 8, fd, data


def server_on(start: Callable[..., ServerProcess], ifaces: List[str], *args: str) -> ServerProcess:
    """Start the server on interfaces that exist and wait until it reads each of them."""
    before = {iface: readers(iface) for iface in ifaces}
    server = start("--iface", ",".join(ifaces), *args)
    for iface in ifaces:
        wait_for_readers(iface, before[iface] + 1)
    return server
