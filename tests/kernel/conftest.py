"""Fixtures of the vcan tier: virtual CAN interfaces, the server as a process, candump.

These tests run as root under a kernel with CAN (inside the VM of run-in-vm.sh, or on a machine
whose kernel has vcan). They create and delete their own interfaces, so a test may also take an
interface down, delete it or re-add it.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterator, List

import pytest
from vcan_tools import (
    REFERENCE_START_S,
    Candump,
    ServerProcess,
    add_vcan,
    calibrate,
    interface_exists,
    ip_link,
)


@pytest.fixture(scope="session", autouse=True)
def machine_speed(request: pytest.FixtureRequest) -> float:
    """Scale every wait of the tier to how slow this machine (a VM on a loaded host) is now."""
    measured, factor = calibrate()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"vcan tier: Python starts and imports the server in {measured:.1f} s here: every "
            f"wait is {factor:.1f} x the one written for {REFERENCE_START_S:.1f} s"
        )
    return factor


@pytest.fixture(scope="session", autouse=True)
def kernel_can() -> None:
    """Fail (never skip) at once when this kernel has no CAN: the tier exists to test it."""
    subprocess.run(["modprobe", "vcan"], capture_output=True)
    try:
        socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW).close()
    except OSError as exc:
        pytest.fail(f"no CAN in this kernel ({exc}): run the tier with tests/kernel/run-in-vm.sh")


@pytest.fixture
def vcan() -> Iterator[Callable[..., str]]:
    """Factory: ``vcan("vcan0", fd=True)`` creates the interface; all are deleted afterwards."""
    created: List[str] = []

    def make(name: str = "vcan0", fd: bool = False) -> str:
        if interface_exists(name):
            ip_link("del", name)
        add_vcan(name, fd)
        created.append(name)
        return name

    yield make
    for name in created:
        if interface_exists(name):
            ip_link("del", name)


@pytest.fixture
def wiretap_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``wiretap_server("--iface", "vcan0")`` starts the server; killed afterwards."""
    started: List[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = ServerProcess(list(args), tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
        # Captured output: pytest shows it only when the test failed.
        print(f"--- server log ---\n{server.log()}--- server stdout ---\n{server.output()}")


@pytest.fixture
def candump(tmp_path: Path) -> Iterator[Callable[[str], Candump]]:
    running: List[Candump] = []

    def start(iface: str) -> Candump:
        dump = Candump(iface, tmp_path)
        running.append(dump)
        return dump

    yield start
    for dump in running:
        if dump.process.poll() is None:
            dump.process.kill()
            dump.process.wait()
