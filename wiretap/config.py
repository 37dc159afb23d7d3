"""Configuration: built-in defaults < TOML file (``-C``) < environment < command-line flags.

Owns the key table (every ``[section] key`` with its type and range), the command-line flag table
that maps each flag onto a key, the validation that reports every problem at once (each naming
the key, the bad value and where it came from; a DSN is shown masked, by ``pg.names``). The
result is one frozen :class:`Config`; nothing else in the program reads files, flags or the
environment.

The flag table lives here rather than in ``cli`` so that a key, its flag and its help text are
written down once; ``cli`` only acts on the parsed result.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from wiretap import buildinfo
from wiretap.pg.names import SQL_FUNCTION_NAME, mask_dsn

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

GVRET_BUS_COUNT = 16  # the bus number is one nibble in GVRET frames
IFNAMSIZ = 16  # <linux/if.h>: interface names are at most 15 characters plus the NUL
SPOOL_FILE_NAME = "wiretap-spool.db"
STATE_DIRECTORY_NAME = "wiretap-server"  # as in StateDirectory= of wiretap-server.service
REPLAY_PREFIX = "replay:"


@dataclass(frozen=True)
class ServerConfig:
    iface: Tuple[str, ...] = ("can0",)
    bus_offset: int = 0
    host: str = "0.0.0.0"
    port: int = 2323
    can_fd: bool = False
    echo_console: bool = False
    colour: bool = False
    default_dir: str = "rx"
    read_only: bool = False
    allow: Tuple[str, ...] = ()
    max_clients: int = 16
    handshake_timeout: float = 5.0
    gvret_fd: str = "auto"
    gvret_flow_control: str = "auto"
    reconfigure_interfaces: bool = False
    beacon: bool = False
    beacon_address: str = "255.255.255.255"
    replay_speed: float = 1.0
    replay_loop: bool = False
    node: str = ""


@dataclass(frozen=True)
class PostgresConfig:
    enable: bool = False
    dsn: str = ""
    mode: str = "insert"
    func: str = "public.ingest_can_frame"
    batch_size: int = 1000
    flush_interval: float = 0.25
    queue_size: int = 200000
    dir: Optional[str] = None
    cache_path: str = ""
    cache_max_mb: int = 1000
    partition_interval: str = "1 day"
    retention_days: int = 0


@dataclass(frozen=True)
class StatusConfig:
    listen: str = ""  # "" = no status listener; "8023" = 127.0.0.1:8023


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    stats_interval: float = 60


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    postgres: PostgresConfig = field(default_factory=PostgresConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    status: StatusConfig = field(default_factory=StatusConfig)

    def describe(self) -> str:
        """The resolved configuration as TOML, DSN password masked (``--check-config``)."""
        lines = ["# wiretap-server resolved configuration (DSN password masked)"]
        for section_name in _SECTIONS:
            section = getattr(self, section_name)
            lines.append("")
            lines.append(f"[{section_name}]")
            for key in fields(section):
                value = getattr(section, key.name)
                if value is None:
                    lines.append(f"# {key.name} is unset")
                    continue
                lines.append(f"{key.name} = {_show(f'{section_name}.{key.name}', value)}")
        return "\n".join(lines) + "\n"


class ConfigError(Exception):
    """Every configuration problem found, one message per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors: List[str] = list(errors)


# --- value converters: (value, came_as_text) -> typed value, or _Invalid saying what is needed ---


class _Invalid(ValueError):
    """A value a key does not accept; the message says what the key needs."""


Convert = Callable[[Any, bool], Any]


def _accepts(description: str) -> Callable[[Convert], Convert]:
    """Label a converter with what it accepts, in words, for the configuration reference."""

    def label(convert: Convert) -> Convert:
        convert.accepts = description  # type: ignore[attr-defined]
        return convert

    return label


@_accepts("`true` or `false`")
def _boolean(value: Any, textual: bool) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("expected true or false")
    return value


def _check_range(value: float, low: float, high: Optional[float], low_allowed: bool) -> None:
    if high is not None and not low <= value <= high:
        raise _Invalid(f"must be between {low} and {high}")
    if low_allowed and value < low:
        raise _Invalid(f"must be {low} or more")
    if not low_allowed and value <= low:
        raise _Invalid(f"must be greater than {low}")


def _integer(low: int, high: Optional[int] = None) -> Convert:
    @_accepts(f"integer, {low}–{high}" if high is not None else f"integer ≥ {low}")
    def convert(value: Any, textual: bool) -> int:
        if textual:
            try:
                value = int(value, 10)
            except ValueError:
                raise _Invalid("expected an integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("expected an integer")
        _check_range(value, low, high, low_allowed=True)
        return value

    return convert


def _number(low: float, low_allowed: bool) -> Convert:
    @_accepts(f"number {'≥' if low_allowed else '>'} {low:g}")
    def convert(value: Any, textual: bool) -> float:
        if textual:
            try:
                value = float(value)
            except ValueError:
                raise _Invalid("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid("expected a number")
        if not math.isfinite(value):
            raise _Invalid("must be a finite number")
        _check_range(value, low, None, low_allowed)
        return float(value)

    return convert


def _choice(*options: str, fold_case: bool = False) -> Convert:
    wanted = "expected one of " + ", ".join(options)

    @_accepts(", ".join(f"`{option}`" for option in options) + (", any case" if fold_case else ""))
    def convert(value: Any, textual: bool) -> str:
        if not isinstance(value, str):
            raise _Invalid(wanted)
        if fold_case:
            value = value.upper()
        if value not in options:
            raise _Invalid(wanted)
        return value

    return convert


@_accepts("string")
def _text(value: Any, textual: bool) -> str:
    if not isinstance(value, str):
        raise _Invalid("expected a string")
    return value


@_accepts("non-empty string")
def _nonempty_text(value: Any, textual: bool) -> str:
    if _text(value, textual) == "":
        raise _Invalid("must not be empty")
    return value


@_accepts("SQL function name, plain or schema-qualified")
def _sql_function_name(value: Any, textual: bool) -> str:
    if not isinstance(value, str) or SQL_FUNCTION_NAME.fullmatch(value) is None:
        raise _Invalid("expected a plain or schema-qualified SQL name such as public.my_ingest")
    return value


NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,62}")


@_accepts("node name: up to 63 letters, digits, `.`, `_`, `:` or `-`; empty = the host name")
def _node(value: Any, textual: bool) -> str:
    if _text(value, textual) and NODE_NAME.fullmatch(value) is None:
        raise _Invalid(
            "expected up to 63 letters, digits, '.', '_', ':' or '-', starting with a letter or"
            " digit (empty: the host name)"
        )
    return value


PARTITION_INTERVAL = re.compile(r"(?P<count>[1-9][0-9]{0,3}) (?P<unit>hour|day)s?")


@_accepts('`"N hours"` or `"N days"`')
def _partition_interval(value: Any, textual: bool) -> str:
    match = PARTITION_INTERVAL.fullmatch(_text(value, textual))
    if match is None:
        raise _Invalid('expected a number of hours or days, e.g. "1 day" or "6 hours"')
    return value


@_accepts("IP address")
def _ip_address(value: Any, textual: bool) -> str:
    try:
        ipaddress.ip_address(_text(value, textual))
    except ValueError:
        raise _Invalid("expected an IP address") from None
    return value


_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


@_accepts("IP address (IPv4 or IPv6) or host name")
def _listen_host(value: Any, textual: bool) -> str:
    """An IPv4 or IPv6 address, or a host name (RFC 1123); a dotted number that is not an IPv4
    address (``1.2.3.999``) is refused here rather than when the server binds."""
    text = _nonempty_text(value, textual)
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    numeric = all(label.isdigit() for label in labels)
    if numeric or ":" in text:
        raise _Invalid("is not a valid IPv4 or IPv6 address")
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise _Invalid("expected an IP address (e.g. 0.0.0.0, 127.0.0.1, ::) or a host name")
    return text


def _entries(value: Any) -> List[str]:
    """A comma-separated string or an array of strings, as a list of stripped entries."""
    if isinstance(value, str):
        items = [] if value.strip() == "" else value.split(",")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = value
    else:
        raise _Invalid('expected a comma-separated string ("a,b") or an array of strings')
    entries = [item.strip() for item in items]
    if "" in entries:
        raise _Invalid("has an empty entry")
    return entries


@_accepts(
    f'interface names or `replay:PATH`, as `"a,b"` or `["a", "b"]`; '
    f"at most {GVRET_BUS_COUNT} buses in all"
)
def _interfaces(value: Any, textual: bool) -> Tuple[str, ...]:
    names = _entries(value)
    if not names:
        raise _Invalid("needs at least one interface")
    for name in names:
        if name.startswith(REPLAY_PREFIX):
            if name == REPLAY_PREFIX:
                raise _Invalid("replay: needs a file path, e.g. replay:demo.log")
            path = name[len(REPLAY_PREFIX) :]
            if not os.access(path, os.R_OK) or os.path.isdir(path):
                raise _Invalid(f"replay log {json.dumps(path)} is not a readable file")
        elif len(name) >= IFNAMSIZ or any(c.isspace() or c == "/" for c in name):
            raise _Invalid(
                f"{json.dumps(name)} is not an interface name "
                f"(at most {IFNAMSIZ - 1} characters, no spaces or '/')"
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise _Invalid("lists " + ", ".join(duplicates) + " more than once")
    return tuple(names)


@_accepts('IP addresses / CIDR networks, as `"a,b"` or `["a", "b"]`')
def _networks(value: Any, textual: bool) -> Tuple[str, ...]:
    entries = _entries(value)
    bad = []
    for entry in entries:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            bad.append(entry)
    if bad:
        raise _Invalid("not an IP address or CIDR network: " + ", ".join(bad))
    return tuple(entries)


def split_listen(value: str) -> Tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare port (on loopback) as ``(host, port)``;
    ValueError if it is none of them."""
    if value.isdigit():
        host, port = "127.0.0.1", value
    else:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(value)
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        ipaddress.ip_address(host)
    if not 0 <= int(port) <= 65535:
        raise ValueError(value)
    return host, int(port)


@_accepts('`"ADDRESS:PORT"`, a port (on 127.0.0.1), or `""` (off)')
def _listen_address(value: Any, textual: bool) -> str:
    text = _text(value, textual)
    if text == "":
        return text
    try:
        split_listen(text)
    except ValueError:
        raise _Invalid(
            'expected "ADDRESS:PORT" such as "127.0.0.1:8023", "[::1]:8023" or a port '
            '(on 127.0.0.1); "" = off'
        ) from None
    return text


@_accepts("`rx`, `tx`")
def _direction(value: Any, textual: bool) -> str:
    return _choice("rx", "tx")(value, textual)


_SECTIONS: Dict[str, Tuple[type, Dict[str, Convert]]] = {
    "server": (
        ServerConfig,
        {
            "iface": _interfaces,
            "bus_offset": _integer(0),
            "host": _listen_host,
            "port": _integer(0, 65535),
            "can_fd": _boolean,
            "echo_console": _boolean,
            "colour": _boolean,
            "default_dir": _direction,
            "read_only": _boolean,
            "allow": _networks,
            "max_clients": _integer(1),
            "handshake_timeout": _number(0, low_allowed=True),
            "gvret_fd": _choice("auto", "wiretap", "esp32ret", "classic"),
            "gvret_flow_control": _choice("auto", "off"),
            "reconfigure_interfaces": _boolean,
            "beacon": _boolean,
            "beacon_address": _ip_address,
            "replay_speed": _number(0, low_allowed=False),
            "replay_loop": _boolean,
            "node": _node,
        },
    ),
    "postgres": (
        PostgresConfig,
        {
            "enable": _boolean,
            "dsn": _text,
            "mode": _choice("insert", "function", "copy"),
            "func": _sql_function_name,
            "batch_size": _integer(1),
            "flush_interval": _number(0, low_allowed=False),
            "queue_size": _integer(1),
            "dir": _direction,
            "cache_path": _text,
            "cache_max_mb": _integer(1),
            "partition_interval": _partition_interval,
            "retention_days": _integer(0),
        },
    ),
    "logging": (
        LoggingConfig,
        {
            "level": _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold_case=True),
            "stats_interval": _number(0, low_allowed=True),
        },
    ),
    "status": (StatusConfig, {"listen": _listen_address}),
}

ALL_KEYS: Tuple[str, ...] = tuple(
    f"{section}.{key}" for section, (_, converters) in _SECTIONS.items() for key in converters
)


# --- command-line flags ---


class _Flag(NamedTuple):
    options: Tuple[str, ...]
    key: str  # "section.key" the flag sets
    metavar: Optional[str]  # None: an on/off switch (--x / --no-x)
    help: str


_FLAGS: Tuple[_Flag, ...] = (
    _Flag(("--iface",), "server.iface", "IFACE",
          "CAN interface(s), comma-separated; replay:FILE plays a candump log instead"),
    _Flag(("--bus-offset",), "server.bus_offset", "N", "GVRET bus number of the first interface"),
    _Flag(("--host",), "server.host", "HOST", "TCP listen address"),
    _Flag(("--port",), "server.port", "PORT",
          "TCP listen port (SavvyCAN can only use 23; 0 picks a free port)"),
    _Flag(("--echo",), "server.echo_console", None, "Echo frames to the console, candump style"),
    _Flag(("--colour", "--color"), "server.colour", None,  # --color: hidden alias
          "Colourise the bus tag and printable bytes in console output"),
    _Flag(("--default-dir",), "server.default_dir", "DIR",
          "Direction of frames read from the bus: rx or tx"),
    _Flag(("--can-fd",), "server.can_fd", None, "Enable CAN FD support"),
    _Flag(("--read-only",), "server.read_only", None,
          "Refuse every client transmit (a passive tap)"),
    _Flag(("--allow",), "server.allow", "ADDR[,ADDR]",
          "Accept clients only from these addresses / CIDR networks; may repeat"),
    _Flag(("--max-clients",), "server.max_clients", "N", "Most GVRET clients at once"),
    _Flag(("--handshake-timeout",), "server.handshake_timeout", "SEC",
          "Close a connection not in binary mode this long after connecting (0: never)"),
    _Flag(("--gvret-fd",), "server.gvret_fd", "DIALECT",
          "CAN FD dialect for GVRET clients: auto, wiretap, esp32ret or classic"),
    _Flag(("--gvret-flow-control",), "server.gvret_flow_control", "MODE",
          "Bound what waits for clients that send keepalives like SavvyCAN: auto or off"),
    _Flag(("--reconfigure-interfaces",), "server.reconfigure_interfaces", None,
          "Let GVRET clients change an interface's bit rate (ip link; needs CAP_NET_ADMIN)"),
    _Flag(("--beacon",), "server.beacon", None, "Send a UDP discovery beacon to port 17222"),
    _Flag(("--beacon-address",), "server.beacon_address", "ADDR",
          "Destination address of the discovery beacon"),
    _Flag(("--replay-speed",), "server.replay_speed", "FACTOR",
          "Playback speed of replay: sources (2 = twice as fast)"),
    _Flag(("--replay-loop",), "server.replay_loop", None,
          "Start replay: sources over when the log ends"),
    _Flag(("--node",), "server.node", "NAME",
          "Name of this server in the database's rows and in the logs; empty = the host name"),
    _Flag(("--pg-enable",), "postgres.enable", None, "Enable PostgreSQL ingest"),
    _Flag(("--pg-dsn",), "postgres.dsn", "DSN",
          "PostgreSQL connection string (PG_DSN keeps the password off the command line)"),
    _Flag(("--pg-mode",), "postgres.mode", "MODE",
          "How batches are written: insert, function or copy"),
    _Flag(("--pg-func",), "postgres.func", "FUNC",
          "Ingest function called once per row; selects --pg-mode function"),
    _Flag(("--pg-batch-size",), "postgres.batch_size", "N", "Frames per database transaction"),
    _Flag(("--pg-flush-interval",), "postgres.flush_interval", "SEC",
          "Write a batch at the latest this long after its first frame"),
    _Flag(("--pg-queue-size",), "postgres.queue_size", "N",
          "Frames the database writer may hold before spooling to disk"),
    _Flag(("--pg-dir",), "postgres.dir", "DIR",
          "Direction stored for frames read from the bus; unset = --default-dir"),
    _Flag(("--pg-cache-path",), "postgres.cache_path", "PATH",
          "Spool file for frames while the database is away (default: the state directory)"),
    _Flag(("--pg-partition-interval",), "postgres.partition_interval", "INTERVAL",
          'Time span of each new can_frame partition, e.g. "1 day" or "6 hours"'),
    _Flag(("--pg-retention-days",), "postgres.retention_days", "DAYS",
          "Drop partitions whose frames are older than this many days; 0 = keep everything"),
    _Flag(("--status-listen",), "status.listen", "ADDR:PORT",
          "Serve /metrics, /status and a status page over HTTP here (a bare port: on loopback)"),
    _Flag(("--log-level",), "logging.level", "LEVEL",
          "Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    _Flag(("--stats-interval",), "logging.stats_interval", "SEC",
          "Seconds between stats lines, 0 = off"),
)  # fmt: skip

# Keys that no flag sets, described for the reference (the others take their flag's help).
_FILE_ONLY_HELP: Dict[str, str] = {
    "postgres.cache_max_mb": "Largest size of the spool in megabytes",
}

_DESCRIPTION = """\
Bridge SocketCAN interfaces to GVRET TCP clients (SavvyCAN, WireTAP) and PostgreSQL.

Settings come from built-in defaults, then the TOML file given with -C, then the environment
(PG_DSN for the database DSN), then these flags; each overrides the one before."""


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a bad command line as a ConfigError, so it joins the other errors and exits 2."""

    def error(self, message: str) -> Any:
        raise ConfigError([f"{message} (see --help)"])


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="wiretap-server.py",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-C", "--config", metavar="CONFIG", help="Path to TOML config file")
    for flag in _FLAGS:
        section, key = flag.key.split(".")
        default = getattr(_SECTIONS[section][0](), key)
        shown = "unset" if default is None else _show(flag.key, default)
        help_text = f"{flag.help} ([{section}] {key}, default {shown})"
        if flag.metavar is None:
            for number, option in enumerate(flag.options):
                parser.add_argument(
                    option,
                    dest=flag.key,
                    action=argparse.BooleanOptionalAction,
                    help=help_text if number == 0 else argparse.SUPPRESS,
                )
        elif flag.key == "server.allow":
            parser.add_argument(
                *flag.options, dest=flag.key, metavar=flag.metavar, action="append", help=help_text
            )
        else:
            parser.add_argument(*flag.options, dest=flag.key, metavar=flag.metavar, help=help_text)
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="Print the resolved configuration (DSN password masked) and exit 0, or the errors "
        "and exit 2",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="Print the version and git commit, then exit"
    )
    return parser


class _VersionAction(argparse.Action):
    """``--version``: the commit is looked up only when asked for (it reads ``.git``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        print(buildinfo.describe())
        parser.exit()


class KeyReference(NamedTuple):
    """One key as the configuration reference shows it."""

    name: str  # "section.key"
    default: str  # as TOML writes it, or "unset"
    accepts: str
    options: Tuple[str, ...]  # the flags that set it, e.g. ("--echo", "--no-echo"); () if none
    metavar: Optional[str]
    help: str


def key_reference() -> List[KeyReference]:
    """Every key in table order with its default, accepted values, flag and help text (empty
    where its converter has no ``@_accepts`` label, or a key without a flag no help entry)."""
    flags = {flag.key: flag for flag in _FLAGS}
    entries = []
    for name in ALL_KEYS:
        section, key = name.split(".")
        section_type, converters = _SECTIONS[section]
        default = getattr(section_type(), key)
        flag = flags.get(name)
        if flag is None:
            options: Tuple[str, ...] = ()
            help_text = _FILE_ONLY_HELP.get(name, "")
        else:
            options = flag.options[:1]
            if flag.metavar is None:
                options += ("--no-" + flag.options[0][2:],)
            help_text = flag.help
        entries.append(
            KeyReference(
                name=name,
                default="unset" if default is None else _show(name, default),
                accepts=getattr(converters[key], "accepts", ""),
                options=options,
                metavar=flag.metavar if flag else None,
                help=help_text,
            )
        )
    return entries


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the command line; a bad one raises ConfigError, --help / --version SystemExit(0)."""
    return build_parser().parse_args(list(argv))


# --- resolution ---


class _Setting(NamedTuple):
    value: Any
    origin: str  # "default", a file path, an environment variable or a flag
    textual: bool  # came as text (flag or environment) and still needs parsing


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """The configuration from command-line arguments (without the program name) and environment."""
    return resolve(parse_args(argv), environ)


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Layer defaults, file, environment and flags; raise ConfigError listing every fault."""
    errors: List[str] = []
    settings: Dict[str, _Setting] = {}
    for section, (section_type, converters) in _SECTIONS.items():
        defaults = section_type()
        for key in converters:
            settings[f"{section}.{key}"] = _Setting(getattr(defaults, key), "default", False)
    if args.config is not None:
        settings.update(_read_file(args.config, errors))
    if environ.get("PG_DSN"):
        settings["postgres.dsn"] = _Setting(environ["PG_DSN"], "PG_DSN", True)
    settings.update(_read_flags(args))

    values: Dict[str, Any] = {}
    for dotted, setting in settings.items():
        if setting.origin == "default":
            values[dotted] = setting.value
            continue
        section, key = dotted.split(".")
        try:
            values[dotted] = _SECTIONS[section][1][key](setting.value, setting.textual)
        except _Invalid as problem:
            shown = _show(dotted, setting.value, as_typed=setting.textual)
            errors.append(f"{dotted} = {shown} (from {setting.origin}): {problem}")
    errors.extend(_check_bus_count(values))
    if errors:
        raise ConfigError(errors)

    if not values["postgres.cache_path"]:
        values["postgres.cache_path"] = _default_spool_path(environ)
    if not values["server.node"]:
        values["server.node"] = socket.gethostname()
    sections = {
        section: section_type(**{key: values[f"{section}.{key}"] for key in converters})
        for section, (section_type, converters) in _SECTIONS.items()
    }
    return Config(**sections)


def _read_file(path: str, errors: List[str]) -> Dict[str, _Setting]:
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as problem:
        errors.append(f"cannot read config file {path}: {problem.strerror or problem}")
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as problem:
        errors.append(f"config file {path} is not valid TOML: {problem}")
        return {}

    settings: Dict[str, _Setting] = {}
    for section, table in document.items():
        if not isinstance(table, dict):
            errors.append(
                f"unknown top-level key {section} in {path}: keys belong in a "
                f"[server], [postgres], [logging] or [status] section{_suggest(section, ALL_KEYS)}"
            )
        elif section not in _SECTIONS:
            errors.append(f"unknown section [{section}] in {path}{_suggest(section, _SECTIONS)}")
        else:
            for key, value in table.items():
                dotted = f"{section}.{key}"
                if dotted in ALL_KEYS:
                    settings[dotted] = _Setting(value, path, False)
                else:
                    errors.append(f"unknown key {dotted} in {path}{_suggest(dotted, ALL_KEYS)}")
    return settings


def _suggest(name: str, candidates: Sequence[str]) -> str:
    by_short_name = {candidate.split(".")[-1]: candidate for candidate in candidates}
    close = difflib.get_close_matches(name.split(".")[-1], list(by_short_name), n=1, cutoff=0.75)
    return f" (did you mean {by_short_name[close[0]]}?)" if close else ""


def _read_flags(args: argparse.Namespace) -> Dict[str, _Setting]:
    settings: Dict[str, _Setting] = {}
    for flag in _FLAGS:
        value = getattr(args, flag.key)
        if value is None:
            continue
        if isinstance(value, list):  # --allow, once per occurrence
            value = ",".join(value)
        settings[flag.key] = _Setting(value, flag.options[0], isinstance(value, str))
    if "postgres.func" in settings and "postgres.mode" not in settings:
        settings["postgres.mode"] = _Setting("function", "--pg-func", True)
    return settings


def _check_bus_count(values: Mapping[str, Any]) -> List[str]:
    if "server.iface" not in values or "server.bus_offset" not in values:
        return []  # already reported
    offset, count = values["server.bus_offset"], len(values["server.iface"])
    if offset + count <= GVRET_BUS_COUNT:
        return []
    return [
        f"server.bus_offset = {offset} with {count} interface(s) in server.iface needs GVRET "
        f"buses {offset}..{offset + count - 1}, but there are only {GVRET_BUS_COUNT} "
        f"(0..{GVRET_BUS_COUNT - 1})"
    ]


def _default_spool_path(environ: Mapping[str, str]) -> str:
    """systemd's ``StateDirectory=`` (``/var/lib/wiretap-server`` with the shipped unit), else
    the user's XDG state directory (``~/.local/state/wiretap-server``), else the working
    directory: a spool must outlive the process, so not a temporary folder."""
    # systemd joins several StateDirectory= entries with ':'; the first is ours.
    state_directory = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not state_directory:
        xdg_state = environ.get("XDG_STATE_HOME", "")
        home = environ.get("HOME", "")
        if xdg_state or home:
            base = xdg_state or os.path.join(home, ".local", "state")
            state_directory = os.path.join(base, STATE_DIRECTORY_NAME)
    return os.path.join(state_directory or ".", SPOOL_FILE_NAME)


# --- presentation ---


def _show(dotted: str, value: Any, as_typed: bool = False) -> str:
    """A value as TOML would write it, or ``as_typed`` on the command line when that reads
    unambiguously; the DSN with its password masked."""
    if dotted == "postgres.dsn" and isinstance(value, str):
        value = mask_dsn(value)
    if as_typed and isinstance(value, str) and value and not any(c.isspace() for c in value):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show("", item) for item in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)
