"""Test helpers: an in-process server fed through the socket-pair seam."""

from __future__ import annotations

import socket
import time
from typing import Callable, Dict, List, Optional

from wiretap.app import App
from wiretap.config import load_config
from wiretap.frames import Frame, encode


class Bus:
    """The test's end of a seam socket pair: write frames as the kernel would deliver them."""

    def __init__(self) -> None:
        self.reader_end, self.test_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.test_end.settimeout(10)

    def send(self, frame: Frame) -> None:
        self.test_end.send(encode(frame))

    def send_raw(self, data: bytes) -> None:
        self.test_end.send(data)

    def receive(self) -> bytes:
        return self.test_end.recv(128)


class Harness:
    """Starts :class:`App` instances with seam buses; stops them all at the end."""

    def __init__(self) -> None:
        self.apps: List[App] = []

    def start(
        self,
        *args: str,
        buses: Optional[Dict[str, Bus]] = None,
        environ: Optional[Dict[str, str]] = None,
    ) -> App:
        argv = ["--host", "127.0.0.1", "--port", "0", "--stats-interval", "0", *args]
        config = load_config(argv, environ or {})
        factories: Dict[str, Callable[[], socket.socket]] = {
            name: (lambda bus=bus: bus.reader_end) for name, bus in (buses or {}).items()
        }
        app = App(config, factories)
        app.start()
        self.apps.append(app)
        return app

    def stop_all(self) -> None:
        for app in self.apps:
            app.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what or condition}")
