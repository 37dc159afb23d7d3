"""scripts/apt-install.sh against the real dpkg lock, held here as another apt would hold it."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "apt-install.sh"
DPKG_LOCKS = ("/var/lib/dpkg/lock-frontend", "/var/lib/dpkg/lock")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None or not Path(DPKG_LOCKS[0]).exists(),
    reason="needs root on a Debian-like system (apt-get and the dpkg lock)",
)


def test_install_waits_for_another_apt_and_says_so():
    descriptors = [os.open(path, os.O_RDWR) for path in DPKG_LOCKS]
    try:
        for fd in descriptors:  # as apt does (fcntl record locks); waits if a real apt runs
            fcntl.lockf(fd, fcntl.LOCK_EX)
        # dpkg is installed everywhere, and --no-upgrade leaves it as it is: nothing to download.
        proc = subprocess.Popen([str(SCRIPT), "dpkg"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        first = proc.stdout.readline() + proc.stdout.readline()
        assert f"held by process {os.getpid()} " in first, first
        assert "another package manager is at work" in first
        assert proc.poll() is None  # waiting, not failed
    finally:
        for fd in descriptors:
            os.close(fd)  # releases the locks
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, first + rest
    assert "install: the package manager is free, going on" in rest
