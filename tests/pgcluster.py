"""A throw-away PostgreSQL cluster for the tests and for trying ingest locally.

Owns: finding PostgreSQL's server binaries (Debian: ``/usr/lib/postgresql/<version>/bin``),
installing the Debian ``postgresql`` package when they are missing and we are root, ``initdb``
into a temporary directory (as an unprivileged user, since ``initdb`` refuses root), starting the
server on 127.0.0.1 at a free port and on a Unix socket inside that directory, loading
``init_schema.sql``, and stopping and removing it all afterwards.

Run it directly to get a database for a while::

    python tests/pgcluster.py                      # prints PG_DSN, Ctrl+C removes the cluster
    python tests/pgcluster.py -- CMD [ARGS...]     # runs CMD with PG_DSN set, then removes it
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

log = logging.getLogger("pgcluster")

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "init_schema.sql"
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
UNPRIVILEGED_USER = "nobody"
SUPERUSER = "wiretap"
DATABASE = "wiretap"

# Durability is worthless for a database that lives for one test run; speed is not.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "40",
    "shared_buffers": "32MB",
}


class PgClusterError(RuntimeError):
    pass


def _version_key(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def find_bindir() -> Optional[Path]:
    """The newest PostgreSQL server bin directory, or ``None`` when none is installed."""
    candidates = sorted(glob.glob(f"{DEBIAN_BIN_GLOB}/initdb"), key=_version_key)
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def install_postgresql() -> None:
    """``apt-get install postgresql`` (Debian/Ubuntu, as root only)."""
    if os.geteuid() != 0:
        raise PgClusterError(
            "PostgreSQL server binaries not found; install them with "
            "`sudo apt-get install -y postgresql` (or run this as root)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("installing the Debian postgresql package")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"], check=True, env=env
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgCluster:
    """One temporary cluster: ``start()``, use ``dsn``, ``stop()``/``start()``, ``destroy()``."""

    def __init__(self, schema: Optional[Path] = SCHEMA, port: int = 0) -> None:
        self.schema = schema
        self.port = port or free_port()
        self.bindir: Optional[Path] = None
        self.root: Optional[Path] = None
        self._initialised = False

    @property
    def dsn(self) -> str:
        return self.dsn_for(DATABASE)

    def dsn_for(self, dbname: str, user: str = SUPERUSER) -> str:
        return f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}"

    def create_database(self, dbname: str, schema: Optional[Path] = None) -> str:
        """A fresh database (dropped first if it exists) with ``schema`` loaded; its DSN."""
        self._psql("postgres", "-c", f"drop database if exists {dbname}")
        self._psql("postgres", "-c", f"create database {dbname}")
        if schema is not None:
            self._psql(dbname, "-f", str(schema))
        return self.dsn_for(dbname)

    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def start(self) -> None:
        """Create the cluster on first use, then start the server and wait until it accepts."""
        if not self._initialised:
            self._create()
        for attempt in range(3):
            try:
                self._pg_ctl(
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    str(self.root / "server.log"),
                    "-o",
                    self._server_options(),
                )
                break
            except PgClusterError:
                # Another process took the free port between our probe and the server's bind.
                if self._initialised or attempt == 2 or "could not bind" not in self.server_log():
                    raise
                self.port = free_port()
        if not self._initialised:
            self._psql("postgres", "-c", f"create database {DATABASE}")
            if self.schema is not None:
                self.load_schema()
            self._initialised = True

    def stop(self) -> None:
        """Stop the server (fast: open sessions are cut, as in a real outage)."""
        if self.root is not None and (self.datadir / "postmaster.pid").exists():
            self._pg_ctl("stop", "-w", "-m", "fast")

    def destroy(self) -> None:
        self.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def server_pids(self) -> List[int]:
        """The postmaster and every process it started (backends, checkpointer, WAL writer...)."""
        postmaster = int((self.datadir / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True
        ).stdout.split()
        return [postmaster, *map(int, children)]

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every server process stopped with SIGSTOP: a database that accepts TCP connections
        (the kernel does) but answers nothing, as behind a network black hole. SIGCONT after."""
        pids = self.server_pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    def load_schema(self, path: Optional[Path] = None) -> None:
        self._psql(DATABASE, "-f", str(path or self.schema))

    def psql(self, *args: str) -> str:
        """Run psql against the test database; returns its stdout."""
        return self._psql(DATABASE, *args)

    def server_log(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def _create(self) -> None:
        self.bindir = find_bindir()
        if self.bindir is None:
            install_postgresql()
            self.bindir = find_bindir()
            if self.bindir is None:
                raise PgClusterError("installed postgresql, but found no initdb")
        self.root = Path(tempfile.mkdtemp(prefix="wiretap-pg-"))
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._as_owner(
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )

    def _server_options(self) -> str:
        settings = dict(SERVER_SETTINGS, port=self.port, unix_socket_directories=self.root)
        return " ".join(f"-c {name}={value}" for name, value in settings.items())

    def _pg_ctl(self, *args: str) -> None:
        self._as_owner(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args)

    def _as_owner(self, *command: str) -> None:
        if os.geteuid() == 0:
            command = ("runuser", "-u", UNPRIVILEGED_USER, "--", *command)
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.root)
        if result.returncode != 0:
            raise PgClusterError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}"
                f"{result.stderr}\n{self.server_log()[-2000:]}"
            )

    def _psql(self, dbname: str, *args: str) -> str:
        psql = shutil.which("psql") or str(self.bindir / "psql")
        command = [
            psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
            "-U", SUPERUSER, "-d", dbname, *args,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise PgClusterError(f"psql {' '.join(args)} failed:\n{result.stderr}")
        return result.stdout


def run_command(command: List[str], dsn: str) -> int:
    """Run ``command`` with ``PG_DSN`` set and wait for it however long its shutdown takes.

    Ctrl+C reaches the command as well (same process group) and it shuts down on its own (a
    server flushes its queue first), so we keep waiting; a SIGTERM sent to us is passed on.
    """
    child = subprocess.Popen(command, env=dict(os.environ, PG_DSN=dsn))
    signal.signal(signal.SIGTERM, lambda _signum, _frame: child.send_signal(signal.SIGTERM))
    while True:
        try:
            code = child.wait()
            return 128 - code if code < 0 else code
        except KeyboardInterrupt:
            continue


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start a throw-away PostgreSQL with the WireTAP schema; remove it on exit.",
        epilog="Example: python tests/pgcluster.py -- python wiretap-server.py "
        "--iface replay:examples/demo.log --pg-enable",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS: run with PG_DSN")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cluster = PgCluster(port=args.port)
    # SIGTERM must remove the cluster too, exactly like Ctrl+C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        cluster.start()
        print(f"PG_DSN='{cluster.dsn}'", flush=True)
        if command:
            return run_command(command, cluster.dsn)
        print(f"psql '{cluster.dsn}'   # to look at the rows; Ctrl+C stops and removes the cluster")
        signal.pause()
        return 0
    except KeyboardInterrupt:
        return 0
    except PgClusterError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        cluster.destroy()


if __name__ == "__main__":
    sys.exit(main())
