"""The entry points: wiretap-server.py, python -m wiretap and wiretap.cli.main."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

import wiretap
from wiretap import buildinfo
from wiretap.cli import main

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINT = REPO / "wiretap-server.py"
SECRET = "s3cr3t-Pa55"


def run(args: List[str], cwd: Path, extra_env: Dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PG_DSN", "STATE_DIRECTORY")}
    env.update(extra_env)
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_check_config_prints_the_resolved_config_without_the_password(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text(
        f'[server]\niface = "can0,can1"\nport = 23\n'
        f'[postgres]\nenable = true\ndsn = "host=db password={SECRET} dbname=candor"\n'
    )
    result = run(
        [str(ENTRY_POINT), "-C", str(config), "--iface", "vcan0", "--check-config"],
        cwd=tmp_path,
        extra_env={"PG_DSN": f"postgresql://candor:{SECRET}@dbhost:5432/candor"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert 'iface = ["vcan0"]' in result.stdout.splitlines()
    assert "port = 23" in result.stdout.splitlines()
    assert "enable = true" in result.stdout.splitlines()
    assert 'dsn = "postgresql://candor:***@dbhost:5432/candor"' in result.stdout.splitlines()
    assert SECRET not in result.stdout + result.stderr


def test_check_config_reports_every_error_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        f'[server]\nport = 70000\nifcae = "can0"\n[postgres]\ndsn = "postgresql://u:{SECRET}@h/d"\n'
        'dir = "sideways"\n'
    )
    result = run(
        [sys.executable, str(ENTRY_POINT), "-C", str(config), "--check-config"],
        cwd=tmp_path,
        extra_env={},
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"config error: unknown key server.ifcae in {config} (did you mean server.iface?)",
        f"config error: server.port = 70000 (from {config}): must be between 0 and 65535",
        f'config error: postgres.dir = "sideways" (from {config}): expected one of rx, tx',
    ]
    assert SECRET not in result.stderr


def test_python_dash_m_prints_the_version(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "wiretap", "--version"], cwd=REPO, extra_env={})
    assert result.returncode == 0
    assert result.stdout == f"{buildinfo.describe()}\n"


def test_entry_point_works_through_a_symlink(tmp_path: Path) -> None:
    link = tmp_path / "wiretap-server"
    link.symlink_to(ENTRY_POINT)
    result = run([str(link), "--version"], cwd=tmp_path, extra_env={})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{buildinfo.describe()}\n"


def test_entry_point_is_an_executable_python3_script() -> None:
    assert ENTRY_POINT.read_text().startswith("#!/usr/bin/env python3\n")
    assert os.access(ENTRY_POINT, os.X_OK)


def test_main_returns_2_and_prints_one_line_per_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["--port", "x", "--default-dir", "up"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "config error: server.port = x (from --port): expected an integer",
        "config error: server.default_dir = up (from --default-dir): expected one of rx, tx",
    ]


def test_main_reports_an_unknown_flag_as_a_config_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["--ifcae", "can0"]) == 2
    assert capsys.readouterr().err == (
        "config error: unrecognized arguments: --ifcae can0 (see --help)\n"
    )


def test_main_version_and_help_return_0(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"{buildinfo.describe()}\n"
    assert main(["--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--iface", "--pg-func", "--check-config", "--allow", "--replay-loop"):
        assert flag in help_text


def test_main_check_config_prints_describe(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PG_DSN", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/pi")
    assert main(["--port", "0", "--check-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "port = 0" in lines
    assert 'cache_path = "/home/pi/.local/state/wiretap-server/wiretap-spool.db"' in lines


@pytest.mark.skipif(
    not (REPO / ".git").exists() or shutil.which("git") is None,
    reason="not a git checkout (a copy of the files), or no git",
)
def test_version_names_the_git_commit_of_a_checkout() -> None:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert buildinfo.commit() == head
    assert buildinfo.describe() == f"wiretap-server {wiretap.__version__} (commit {head})"


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_commit_is_read_from_loose_refs_packed_refs_and_worktrees(tmp_path: Path) -> None:
    def git(*args: str, cwd: Path) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()

    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "f").write_text("x")
    git("add", "f", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo)
    assert buildinfo._from_git(repo) == head[:12]
    git("pack-refs", "--all", cwd=repo)
    assert not (repo / ".git" / "refs" / "heads" / "main").exists()
    assert buildinfo._from_git(repo) == head[:12]
    git("worktree", "add", "-q", "-b", "side", str(tmp_path / "wt"), cwd=repo)
    assert buildinfo._from_git(tmp_path / "wt") == head[:12]
    git("checkout", "-q", "--detach", cwd=repo)
    assert buildinfo._from_git(repo) == head[:12]


def test_a_copy_without_git_reads_the_commit_written_at_install(tmp_path: Path) -> None:
    assert buildinfo._from_git(tmp_path) == ""
    assert buildinfo._from_file(tmp_path / "BUILD_COMMIT") == ""
    (tmp_path / "BUILD_COMMIT").write_text("0123456789ab\n")
    assert buildinfo._from_file(tmp_path / "BUILD_COMMIT") == "0123456789ab"


def test_a_copy_without_git_or_commit_file_says_unknown(tmp_path: Path) -> None:
    copy = tmp_path / "wiretap-server"
    copy.mkdir()
    for name in ("wiretap-server.py", "wiretap"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("BUILD_COMMIT"))
        else:
            (copy / name).write_bytes(source.read_bytes())
    result = run([sys.executable, str(copy / "wiretap-server.py"), "--version"], tmp_path, {})
    assert result.stdout == f"wiretap-server {wiretap.__version__} (commit unknown)\n"
    (copy / "wiretap" / "BUILD_COMMIT").write_text("feedc0ffee12\n")
    result = run([sys.executable, str(copy / "wiretap-server.py"), "--version"], tmp_path, {})
    assert result.stdout == f"wiretap-server {wiretap.__version__} (commit feedc0ffee12)\n"


def test_a_record_logged_after_main_returned_goes_to_the_stderr_of_that_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The log queue writes records that come after the shutdown (a client's handler finishing
    # late) straight to stderr; an in-process caller may have closed the stderr main() saw.
    monkeypatch.delenv("PG_DSN", raising=False)
    stderr_then, stderr_now = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", stderr_then)
    assert main(["--port", "0", "--check-config"]) == 0
    stderr_then.close()
    monkeypatch.setattr(sys, "stderr", stderr_now)
    logging.getLogger("wiretap.test").warning("client 127.0.0.1:1: disconnected late")
    written = stderr_now.getvalue()
    assert written.endswith(" WARNING wiretap.test: client 127.0.0.1:1: disconnected late\n")
    assert "Logging error" not in written
