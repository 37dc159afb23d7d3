"""Which build is running: the version and the git commit the code came from.

Owns the commit lookup: ``git describe`` when the code runs from a git checkout, else the commit
``scripts/install.sh`` wrote into ``wiretap/BUILD_COMMIT`` (a copy deployed without ``.git``),
else ``unknown``. ``--version`` and the first log line both say :func:`describe`.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from wiretap import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
COMMIT_FILE = PACKAGE_DIR / "BUILD_COMMIT"


def _from_git(checkout: Path) -> str:
    if not (checkout / ".git").exists():
        return ""
    try:
        return subprocess.run(
            # safe.directory: the service user may not own the checkout (git >= 2.35.2 refuses).
            ["git", "-c", f"safe.directory={checkout}", "-C", str(checkout),
             "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""


def _from_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """The git commit of the running code, ``-dirty`` if it had local changes, or ``unknown``."""
    return _from_git(PACKAGE_DIR.parent) or _from_file(COMMIT_FILE) or "unknown"


def describe() -> str:
    """``wiretap-server 1.0.0 (commit 0123abcd4567)``."""
    return f"wiretap-server {__version__} (commit {commit()})"
