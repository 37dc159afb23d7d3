"""A GVRET client that vanishes without a FIN, as one whose Wi-Fi dropped does; run by
test_hostile inside a private network namespace (``unshare -n``), never in the host's.

Prints one JSON object: the server's log lines about the client, how many max_clients places
are still taken once it was dropped, and the seconds that took. ``--kernel-timers`` shortens the
keepalive and TCP_USER_TIMEOUT settings to 1 s / 1 s / 3 s so the test does not wait 30 s; without
it the shipped settings are used (to measure them).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Bus, Harness, wait_until  # noqa: E402

from wiretap import server  # noqa: E402

PEER = "127.0.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> None:
    if "--kernel-timers" in sys.argv:
        server.KEEPALIVE_IDLE_S, server.KEEPALIVE_INTERVAL_S, server.USER_TIMEOUT_MS = 1, 1, 3000
    ip("link", "set", "lo", "up")
    # Local addresses are found by the rule at preference 0; move that lookup behind a rule
    # that can send everything for the peer's address into a black hole.
    ip("rule", "del", "pref", "0")
    ip("rule", "add", "pref", "100", "lookup", "local")
    lines = Lines()
    logging.getLogger("wiretap.server").addHandler(lines)
    logging.getLogger("wiretap.server").setLevel(logging.INFO)
    harness = Harness()
    app = harness.start("--iface", "can0", buses={"can0": Bus()})
    peer = socket.socket()
    peer.bind((PEER, 0))
    peer.connect(("127.0.0.1", app.port))
    peer.sendall(b"\xe7\xe7\xf1\x09")
    peer.settimeout(10)
    assert peer.recv(4) == b"\xf1\x09\xde\xad"
    wait_until(lambda: any(c.streaming for c in app.hub.clients), what="binary mode")
    ip("rule", "add", "pref", "10", "to", PEER, "blackhole")  # from now on the peer is gone
    vanished = time.monotonic()
    wait_until(lambda: not app.hub.clients, timeout=120, what="the dead peer to be dropped")
    seconds = time.monotonic() - vanished
    active = app.server._active
    harness.stop_all()
    print(json.dumps({"lines": lines.lines, "active": active, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
