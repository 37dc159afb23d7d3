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


def test_each_server_thread_counts_in_its_stage() -> None:
    from bench import roles

    stages = roles.stage_cpu(
        {
            "reader-can0": 1.0,
            "dispatcher": 2.0,
            "writer-127.0.0.1:5000": 0.5,
            "writer-127.0.0.1:5001": 0.25,
            "Thread-3 (process_request_thread)": 0.125,
            "pg-writer": 4.0,
            "pg-keeper": 8.0,
            "MainThread": 16.0,
        }
    )
    assert stages == {
        "reader": 1.0,
        "dispatch+encode": 2.0,
        "send": 0.75,
        "handlers": 0.125,
        "db writer": 4.0,
        "other": 24.0,
    }
