"""Test helpers: an in-process server fed through the socket-pair seam, and the real program in a
subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
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


SERVER = Path(__file__).resolve().parent.parent / "wiretap-server.py"


class ServerProcess:
    """``wiretap-server.py`` as a user runs it, stderr collected line by line."""

    def __init__(self, *args: str, env: Optional[Dict[str, str]] = None) -> None:
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        environ.pop("PG_DSN", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--host", "127.0.0.1", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
        )
        self.lines: List[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first log line matching ``pattern``, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in:\n" + "\n".join(self.lines))

    def wait_listening(self) -> int:
        return int(self.wait_line(r"listening on [^ ]+:(\d+) ").group(1))

    def final_stats(self) -> str:
        return [line for line in self.lines if " stats rx=" in line][-1]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def exit_code(self, timeout: float = 20) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
