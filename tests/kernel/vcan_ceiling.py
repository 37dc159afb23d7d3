"""The vcan ceiling figure: how much of a full-speed flood the server reads, next to candump.

Run inside the vcan tier's guest (or on a machine whose kernel has vcan), as root::

    tests/kernel/run-in-vm.sh --run .venv/bin/python tests/kernel/vcan_ceiling.py [--frames N]

``cangen -g 0`` floods vcan0 while ``candump`` (C) and the server (with one GVRET client) both
read it, each with a 4 MiB receive buffer. Prints one ``key=value`` line; ``ratio`` is server
frames / candump frames (1.00 = the server keeps up with the C reader).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from gvret_probe import GvretProbe  # noqa: E402
from vcan_tools import (  # noqa: E402
    Candump,
    ServerProcess,
    add_vcan,
    interface_exists,
    ip_link,
    wait_for_readers,
)

IFACE = "vcan0"


def count_client_frames(client: GvretProbe, counted: List[int], stop: threading.Event) -> None:
    while not stop.is_set():
        counted[0] += len(client.read_available(quiet=0.5))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20000, help="frames cangen sends")
    args = parser.parse_args(argv)

    subprocess.run(["modprobe", "vcan"], check=True)
    if interface_exists(IFACE):
        ip_link("del", IFACE)
    add_vcan(IFACE)
    workdir = Path(tempfile.mkdtemp(prefix="wiretap-ceiling-"))
    server = ServerProcess(["--iface", IFACE, "--log-level", "INFO"], workdir)
    try:
        wait_for_readers(IFACE, 1)
        client = GvretProbe(server.port)
        server.wait_for_log("binary mode")
        counted = [0]
        stop = threading.Event()
        counter = threading.Thread(target=count_client_frames, args=(client, counted, stop))
        counter.start()
        dump = Candump(IFACE, workdir)
        started = time.monotonic()
        subprocess.run(["cangen", IFACE, "-g", "0", "-n", str(args.frames), "-L", "8"], check=True)
        flood_s = time.monotonic() - started
        before = -1
        while counted[0] != before:  # until the client stops receiving
            before = counted[0]
            time.sleep(1.0)
        # The kernel reports a socket's drop count only with the next frame it queues: one last
        # frame after the flood carries the final count (it is subtracted below).
        subprocess.run(["cansend", IFACE, "7FF#FF"], check=True)
        while counted[0] == before:
            time.sleep(0.1)
        stop.set()
        counter.join()
        dumped = len(dump.stop()) - 1
        stats = server.stop()
        stats["rx"] -= 1
        counted[0] -= 1
    finally:
        server.kill()
        ip_link("del", IFACE)
    print(
        f"vcan_ceiling sent={args.frames} flood_s={flood_s:.2f} candump={dumped} "
        f"server_rx={stats['rx']} kernel_drops={stats['kernel_drops']} client={counted[0]} "
        f"client_drops={stats['client_drops']} ratio={stats['rx'] / max(dumped, 1):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
