"""The command line: parse, validate, report, then hand the configuration to ``app``.

Owns the exit codes of start-up: 2 for any configuration error (one ``config error: …`` line per
problem on stderr), 0 for ``--check-config`` with a valid configuration, otherwise whatever
``wiretap.app.run`` returns. Flags and keys themselves are defined in ``config``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from types import ModuleType
from typing import Optional, Sequence, TextIO

from wiretap import buildinfo
from wiretap.config import Config, ConfigError, parse_args, resolve
from wiretap.logqueue import LogQueue

EXIT_CONFIG_ERROR = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the server with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        args = parse_args(argv)
        config = resolve(args, os.environ)
    except SystemExit as finished:  # --help and --version print and exit 0
        return int(finished.code or 0)
    except ConfigError as error:
        for message in error.errors:
            print(f"config error: {message}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from wiretap import app  # imported late: everything above works without the runtime parts

    logs = _log_to_stderr(config.logging.level)
    try:
        code = _run(args, config, app)
    finally:
        flushed = logs.stop()
    if not flushed:
        # stderr is stalled (a pipe nobody reads): the log writer is blocked in it, and so would
        # be the interpreter's own flush of stderr on the way out. The rest of the log is lost.
        os._exit(code)
    return code


def _run(args: argparse.Namespace, config: Config, app: ModuleType) -> int:
    try:
        # What only the sources know (how many buses a replay log brings) is configuration
        # too; they are built once, here, and handed to the app.
        sources = app.build_sources(config)
    except app.StartupError as error:
        print(f"config error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.check_config:
        print(config.describe(), end="")
        return _check_database(config) if config.postgres.enable else 0
    logging.getLogger("wiretap").info("%s starting", buildinfo.describe())
    return app.run(config, sources)


def _check_database(config: Config) -> int:
    """``--check-config`` with ingest on: can the server write where it is told to? A mistake
    (a missing table or function, a refused login) is a configuration error; a database that
    is down is not (the server spools until it is back)."""
    try:
        from wiretap.pg.writer import check_target
    except ImportError as error:
        print(f"# database: not checked ({error}; pip install -r requirements.txt)")
        return 0
    verdict, text = check_target(config.postgres)
    if verdict == "mistake":
        print(f"config error: database: {text}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if verdict == "unreachable":
        print(f"# database: not reachable now ({text}); frames wait in the spool until it is")
    else:
        print(f"# database: {text}")
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record: the log queue keeps writing records
    logged after :func:`main` returned (a client's handler finishing late), and by then the
    caller (a test run in-process, say) may have swapped ``sys.stderr`` and closed the old one."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _log_to_stderr(level: str) -> LogQueue:
    """Log through a bounded queue: a thread that logs (the dispatcher counting a drop, say) must
    never wait on a stalled stderr pipe or a journald that pushes back."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.setLevel(level)
    logs = LogQueue(handler, root)
    logs.start()
    return logs
