"""Smoke test of the benchmark: ``bench/run.py --quick`` still runs and loses nothing.

Asserts nothing about speed (that varies from machine to machine), only that every client
received every frame at a modest rate and that the figures file says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_bench_loses_nothing(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--json", str(figures_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(figures_path.read_text())
    assert figures["mode"] == "quick"
    assert figures["fed"] == 6000
    assert figures["loss"] == [0, 0]
    assert figures["order_errors"] == 0
    assert figures["client_errors"] == []
    assert figures["keepalives"] > 0
    assert "| loss per client" in result.stdout
