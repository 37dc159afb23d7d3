"""Fixtures of the vcan tier: virtual CAN interfaces made and removed with `ip`.

These tests run as root under a kernel with CAN (inside the VM of run-in-vm.sh, or on a machine
whose kernel has vcan). They create and delete their own interfaces, so a test may also take an
interface down, delete it or re-add it.
"""

from __future__ import annotations

import socket
import subprocess
from typing import Callable, Iterator, List

import pytest

from wiretap.frames import CAN_MTU, CANFD_MTU


def ip_link(*args: str) -> None:
    subprocess.run(["ip", "link", *args], check=True, capture_output=True, text=True)


def interface_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def add_vcan(name: str, fd: bool = False) -> None:
    """Create ``name`` as a vcan interface (FD-capable when ``fd``) and bring it up."""
    ip_link("add", "dev", name, "type", "vcan")
    ip_link("set", name, "mtu", str(CANFD_MTU if fd else CAN_MTU))
    ip_link("set", "up", name)


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
