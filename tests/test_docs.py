"""The documentation against the program: the configuration reference is generated and complete,
links between our Markdown files resolve, and the README's first screen reaches SavvyCAN."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

from wiretap import config, reference

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
REFERENCE = REPO / "docs" / "configuration.md"
MARKDOWN = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "bench" / "RESULTS.md"]

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(path: Path) -> List[Tuple[int, str]]:
    """(line number, text) of every line outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def anchors(path: Path) -> Set[str]:
    """The anchors GitHub gives the headings of a Markdown file."""
    seen: Dict[str, int] = {}
    for _, line in prose_lines(path):
        heading = HEADING.match(line)
        if heading is None:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def test_configuration_reference_is_what_the_generator_writes() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == reference.render(), (
        "docs/configuration.md is out of date: "
        ".venv/bin/python -m wiretap.reference > docs/configuration.md"
    )


def test_every_flag_of_help_is_in_the_reference() -> None:
    help_text = subprocess.run(
        [sys.executable, str(REPO / "wiretap-server.py"), "--help"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    flags = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))
    assert {"-h", "-C", "--iface", "--no-echo", "--pg-dsn", "--check-config"} <= flags
    generated = reference.render()
    missing = [
        flag for flag in sorted(flags) if not re.search(rf"`{re.escape(flag)}[` ]", generated)
    ]
    assert missing == []


def shipped_keys() -> Set[str]:
    """Every ``section.key`` in wiretap-server.toml, the commented-out examples included."""
    keys, section = set(), None
    for line in (REPO / "wiretap-server.toml").read_text(encoding="utf-8").splitlines():
        header = re.match(r"^\[(\w+)\]", line)
        if header:
            section = header.group(1)
        key = re.match(r"^#?\s?(\w+)\s*=", line)
        if key and section:
            keys.add(f"{section}.{key.group(1)}")
    return keys


def reference_keys(text: str) -> Set[str]:
    keys, section = set(), None
    for line in text.splitlines():
        header = re.match(r"^## `\[(\w+)\]`", line)
        if header:
            section = header.group(1)
        row = re.match(r"^\| `(\w+)` \|", line)
        if row and section:
            keys.add(f"{section}.{row.group(1)}")
    return keys


def test_every_key_of_the_shipped_file_is_in_the_reference() -> None:
    shipped = shipped_keys()
    assert {"server.port", "postgres.dir", "logging.level"} <= shipped
    documented = reference_keys(reference.render())
    assert documented == set(config.ALL_KEYS)
    assert shipped - documented == set()


def test_every_key_has_a_description_and_what_it_accepts() -> None:
    entries = config.key_reference()
    assert [e.name for e in entries if not e.accepts] == [], "label its converter with @_accepts"
    assert [e.name for e in entries if not e.help] == [], "a key without a flag: _FILE_ONLY_HELP"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    broken = []
    for number, line in prose_lines(path):
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}:{number}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{path.name}:{number}: {target} (no such heading)")
    assert broken == []


REPO_PATH = re.compile(r"(?<![\w/.-])((?:scripts|tests|examples|docs|bench|wiretap)/[\w./-]*\w)")


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(REPO)))
def test_files_the_docs_name_exist(path: Path) -> None:
    named = set(REPO_PATH.findall(path.read_text(encoding="utf-8")))
    assert sorted(name for name in named if not (REPO / name).exists()) == []


def test_the_link_check_sees_links_and_anchors() -> None:
    readme_links = [t for _, line in prose_lines(README) for t in LINK.findall(line)]
    assert any(target.startswith("docs/") for target in readme_links)
    assert any(target.startswith("#") for target in readme_links)
    assert "troubleshooting" in anchors(README)
    assert {"scripts/run.sh", "scripts/test.sh"} <= set(REPO_PATH.findall(README.read_text()))


def test_the_first_60_lines_of_the_readme_get_a_newcomer_to_savvycan() -> None:
    first_screen = "\n".join(README.read_text(encoding="utf-8").splitlines()[:60]).lower()
    for needed in (
        "git clone",
        "scripts/run.sh",
        "scripts/test.sh",
        "--port 23",
        "network connection (gvret)",
        "2323",
    ):
        assert needed.lower() in first_screen, needed


# The word issue before a number, or a hash before one; not candump's "123#11" nor an anchor.
ISSUE_NUMBER = re.compile(r"\bissues?\s*(?:#|no\.?\s*)?\d+|(?<![^\s(\[])#\d+(?![\w{-])", re.I)


def test_no_issue_numbers_in_the_repository() -> None:
    found = []
    for directory, subdirectories, files in os.walk(REPO):
        subdirectories[:] = [d for d in subdirectories if d not in {".git", ".venv", "__pycache__"}]
        for name in files:
            path = Path(directory, name)
            if path.suffix not in {".py", ".md", ".sh", ".toml", ".service", ".sql", ".txt", ""}:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            found += [f"{path.relative_to(REPO)}: {m.group()}" for m in ISSUE_NUMBER.finditer(text)]
    assert found == []
