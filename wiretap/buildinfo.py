"""Which build is running: the version and the git commit the code came from.

Owns the commit lookup: the checkout's ``HEAD`` when the code runs from a git checkout (read from
the files under ``.git``, not by running ``git``: no subprocess at start-up, which on a slow SD
card or an emulated VM would hold the start back), else the commit ``scripts/install.sh`` wrote
into ``wiretap/BUILD_COMMIT`` (a copy deployed without ``.git``), else ``unknown``.
``--version`` and the first log line both say :func:`describe`.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Optional

from wiretap import __version__

PACKAGE_DIR = Path(__file__).resolve().parent
COMMIT_FILE = PACKAGE_DIR / "BUILD_COMMIT"
ABBREV = 12
_HASH = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1, or SHA-256 repositories


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _git_dir(checkout: Path) -> Optional[Path]:
    dot_git = checkout / ".git"
    if dot_git.is_dir():
        return dot_git
    pointer = _read(dot_git)  # a worktree or submodule: "gitdir: <path>"
    if pointer and pointer.startswith("gitdir:"):
        return (checkout / pointer[len("gitdir:") :].strip()).resolve()
    return None


def _resolve_ref(git_dir: Path, ref: str) -> Optional[str]:
    common = _read(git_dir / "commondir")
    places = [git_dir] + ([(git_dir / common).resolve()] if common else [])
    for place in places:
        loose = _read(place / ref)
        if loose:
            return loose
        for line in (_read(place / "packed-refs") or "").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return None


def _from_git(checkout: Path) -> str:
    """The abbreviated commit of ``checkout``'s HEAD, or "" if it is not a git checkout."""
    git_dir = _git_dir(checkout)
    head = _read(git_dir / "HEAD") if git_dir else None
    if head and head.startswith("ref:"):
        head = _resolve_ref(git_dir, head[len("ref:") :].strip())  # type: ignore[arg-type]
    return head[:ABBREV] if head and _HASH.fullmatch(head) else ""


def _from_file(path: Path) -> str:
    return _read(path) or ""


@functools.lru_cache(maxsize=1)
def commit() -> str:
    """The git commit of the running code (12 hex digits), or ``unknown``."""
    return _from_git(PACKAGE_DIR.parent) or _from_file(COMMIT_FILE) or "unknown"


def describe() -> str:
    """``wiretap-server 1.0.0 (commit 0123abcd4567)``."""
    return f"wiretap-server {__version__} (commit {commit()})"
