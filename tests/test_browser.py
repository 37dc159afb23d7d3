"""The status page in a real browser: headless Chromium against a server playing the demo log.

Chromium comes from Debian's ``chromium`` package (scripts/install.sh --dev installs it). The
screenshot of each run is kept in ``test-artifacts/`` (not committed).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from gvret_client import SAVVYCAN_HELLO, GvretClient
from harness import ServerProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEMO_LOG = ROOT / "examples" / "demo.log"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1100,720",
)  # fmt: skip
CHROMIUM_TIMEOUT_S = 180  # a cold start on a loaded two-core box takes tens of seconds

# The test command installs Chromium into the machine its .venv runs on, so there a missing one is
# a failure; elsewhere (a userland of its own, such as the ARM tier's chroots) the test is skipped.
REQUIRED = (
    os.environ.get("CI") == "true" and Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()
)
if CHROMIUM is None and not REQUIRED:
    pytest.skip("chromium is not installed (scripts/install.sh --dev)", allow_module_level=True)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM or "chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
        env={**os.environ, "HOME": str(profile)},
        check=False,
    )


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_page_shows_both_demo_buses_with_their_rates_in_chromium(tmp_path: Path) -> None:
    server = ServerProcess(
        "--iface", f"replay:{DEMO_LOG}", "--replay-loop", "--replay-speed", "10",
        "--port", "0", "--status-listen", "127.0.0.1:0", "--stats-interval", "0",
    )  # fmt: skip
    client = None
    try:
        gvret_port = int(server.wait_line(r"listening on [^ ]+:(\d+) ", timeout=120).group(1))
        port = int(server.wait_line(r"status page on http://127\.0\.0\.1:(\d+)/", 120).group(1))
        url = f"http://127.0.0.1:{port}/"
        client = GvretClient(gvret_port, hello=SAVVYCAN_HELLO)

        def rates():
            with urllib.request.urlopen(url + "status", timeout=10) as response:
                status = json.load(response)
            return [bus["fps"] for bus in status["buses"]], status["clients_connected"]

        wait_until(
            lambda: min(rates()[0]) > 0 and rates()[1] == 1, timeout=60, what="rates on both"
        )

        dumped = chromium(tmp_path / "profile-dom", "--dump-dom", url)
        assert dumped.returncode == 0, dumped.stderr[-2000:]
        dom = dumped.stdout
        cards = {
            int(match.group(2)): (match.group(1), html.unescape(match.group(3)),
                                  float(match.group(4)))
            for match in re.finditer(
                r'<section class="bus (\w+)" data-bus="(\d+)" data-iface="([^"]*)" '
                r'data-fps="([0-9.]+)"', dom
            )
        }  # fmt: skip
        assert sorted(cards) == [0, 1], dom[-3000:]
        for bus, (verdict, iface, fps) in cards.items():
            assert verdict == "ok"
            assert iface == f"replay:{DEMO_LOG}:can{bus}"
            assert fps > 0
        # Rendered by the page's script, not present in the HTML as served.
        assert re.search(r"<th>frames/s</th><td class=\"n\">[1-9][0-9,.]*</td>", dom)
        assert re.search(r'<section class="clients" data-count="1">', dom)
        assert re.search(r"<td>127\.0\.0\.1:\d+</td><td>classic</td>", dom)
        assert dom.count("<polyline") >= 4  # frames/s and load for each bus

        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "status-page.png"
        screenshot.unlink(missing_ok=True)
        shot = chromium(tmp_path / "profile-shot", f"--screenshot={screenshot}", url)
        assert shot.returncode == 0, shot.stderr[-2000:]
        assert png_size(screenshot) == (1100, 720)
    finally:
        if client is not None:
            client.close()
        server.kill()
