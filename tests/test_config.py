"""Configuration layering, validation and DSN masking (wiretap/config.py)."""

from __future__ import annotations

import dataclasses
import re
import socket
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from wiretap.config import (
    ALL_KEYS,
    Config,
    ConfigError,
    LoggingConfig,
    PostgresConfig,
    ServerConfig,
    StatusConfig,
    load_config,
    mask_dsn,
    split_listen,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SHIPPED_FILE = REPO / "wiretap-server.toml"
DEFAULT_SPOOL = "./wiretap-spool.db"


def load(
    tmp_path: Path,
    toml: Optional[str] = None,
    flags: Sequence[str] = (),
    env: Optional[Dict[str, str]] = None,
) -> Config:
    argv: List[str] = []
    if toml is not None:
        path = tmp_path / "wiretap-server.toml"
        path.write_text(toml)
        argv = ["-C", str(path)]
    return load_config(argv + list(flags), env or {})


def errors_of(tmp_path: Path, toml: Optional[str] = None, flags: Sequence[str] = ()) -> List[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, toml, flags)
    return caught.value.errors


def test_defaults_without_file_match_the_spec() -> None:
    config = load_config([], {})
    assert config == Config(
        server=ServerConfig(node=socket.gethostname()),
        postgres=PostgresConfig(cache_path=DEFAULT_SPOOL),
    )
    assert config.server.iface == ("can0",)
    assert config.server.port == 2323
    assert config.postgres.dir is None
    assert config.logging.level == "INFO"


def test_key_table_covers_every_dataclass_field() -> None:
    expected = [
        f"{section}.{field.name}"
        for section, section_type in (
            ("server", ServerConfig),
            ("postgres", PostgresConfig),
            ("logging", LoggingConfig),
            ("status", StatusConfig),
        )
        for field in dataclasses.fields(section_type)
    ]
    assert list(ALL_KEYS) == expected


def test_spool_path_follows_systemd_state_directory() -> None:
    config = load_config([], {"STATE_DIRECTORY": "/var/lib/wiretap:/var/lib/other"})
    assert config.postgres.cache_path == "/var/lib/wiretap/wiretap-spool.db"


@pytest.mark.parametrize(
    ("environ", "path"),
    [
        ({"STATE_DIRECTORY": "/var/lib/wiretap-server", "HOME": "/root"},
         "/var/lib/wiretap-server/wiretap-spool.db"),
        ({"XDG_STATE_HOME": "/xdg", "HOME": "/home/pi"}, "/xdg/wiretap-server/wiretap-spool.db"),
        ({"HOME": "/home/pi"}, "/home/pi/.local/state/wiretap-server/wiretap-spool.db"),
        ({}, "./wiretap-spool.db"),
    ],
)  # fmt: skip
def test_spool_path_outside_systemd_is_the_users_state_directory(environ, path) -> None:
    assert load_config([], environ).postgres.cache_path == path


def test_pg_cache_path_flag_sets_the_spool() -> None:
    config = load_config(["--pg-cache-path", "/data/spool.db"], {"HOME": "/root"})
    assert config.postgres.cache_path == "/data/spool.db"


def test_explicit_cache_path_is_kept(tmp_path: Path) -> None:
    config = load(tmp_path, '[postgres]\ncache_path = "/data/spool.db"\n', env=None)
    assert config.postgres.cache_path == "/data/spool.db"


# --- precedence: defaults < file < environment < flags ---

FILE = """
[server]
iface = "can1"
port = 1000
echo_console = true
allow = ["10.0.0.0/8"]
[postgres]
dsn = "postgresql://file@h/db"
batch_size = 10
[logging]
level = "debug"
"""


def test_file_overrides_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, FILE)
    assert config.server.iface == ("can1",)
    assert config.server.port == 1000
    assert config.server.echo_console is True
    assert config.server.allow == ("10.0.0.0/8",)
    assert config.postgres.dsn == "postgresql://file@h/db"
    assert config.postgres.batch_size == 10
    assert config.logging.level == "DEBUG"
    assert config.server.host == "0.0.0.0"  # not in the file: still the default


def test_environment_overrides_file_dsn(tmp_path: Path) -> None:
    config = load(tmp_path, FILE, env={"PG_DSN": "postgresql://env@h/db"})
    assert config.postgres.dsn == "postgresql://env@h/db"


def test_flags_override_file_and_environment(tmp_path: Path) -> None:
    flags = [
        "--iface", "can2,can3", "--port", "0", "--no-echo", "--allow", "192.168.1.0/24",
        "--pg-dsn", "postgresql://flag@h/db", "--pg-batch-size", "20", "--log-level", "ERROR",
    ]  # fmt: skip
    config = load(tmp_path, FILE, flags, env={"PG_DSN": "postgresql://env@h/db"})
    assert config.server.iface == ("can2", "can3")
    assert config.server.port == 0
    assert config.server.echo_console is False
    assert config.server.allow == ("192.168.1.0/24",)
    assert config.postgres.dsn == "postgresql://flag@h/db"
    assert config.postgres.batch_size == 20
    assert config.logging.level == "ERROR"


def test_every_flag_sets_its_key(tmp_path: Path) -> None:
    flags = [
        "--iface", "vcan0", "--bus-offset", "3", "--host", "127.0.0.1", "--port", "23",
        "--echo", "--color", "--default-dir", "tx", "--can-fd", "--read-only",
        "--allow", "10.0.0.1", "--allow", "::1,fd00::/8", "--max-clients", "2",
        "--handshake-timeout", "0", "--gvret-fd", "esp32ret", "--beacon",
        "--beacon-address", "192.168.1.255",
        "--replay-speed", "2.5", "--replay-loop", "--node", "rig-7.lab", "--pg-enable",
        "--pg-dsn", "dbname=x", "--pg-mode", "copy", "--pg-func", "ingest", "--pg-batch-size",
        "5", "--pg-flush-interval", "1.5", "--pg-queue-size", "50", "--pg-dir", "tx",
        "--pg-partition-interval", "6 hours", "--pg-retention-days", "30",
        "--log-level", "warning", "--stats-interval", "0",
    ]  # fmt: skip
    config = load(tmp_path, None, flags)
    assert config.server == ServerConfig(
        iface=("vcan0",), bus_offset=3, host="127.0.0.1", port=23, can_fd=True,
        echo_console=True, colour=True, default_dir="tx", read_only=True,
        allow=("10.0.0.1", "::1", "fd00::/8"), max_clients=2, handshake_timeout=0.0,
        gvret_fd="esp32ret", beacon=True, beacon_address="192.168.1.255", replay_speed=2.5,
        replay_loop=True, node="rig-7.lab",
    )  # fmt: skip
    assert config.postgres == PostgresConfig(
        enable=True, dsn="dbname=x", mode="copy", func="ingest", batch_size=5,
        flush_interval=1.5, queue_size=50, dir="tx", cache_path=DEFAULT_SPOOL, cache_max_mb=1000,
        partition_interval="6 hours", retention_days=30,
    )  # fmt: skip
    assert config.logging == LoggingConfig(level="WARNING", stats_interval=0.0)


def test_unset_flags_leave_the_file_alone(tmp_path: Path) -> None:
    toml = '[server]\ncan_fd = true\nport = 4000\n[postgres]\nmode = "copy"\n'
    config = load(tmp_path, toml, ["--host", "127.0.0.1"])
    assert (config.server.can_fd, config.server.port) == (True, 4000)
    assert config.postgres.mode == "copy"


def test_pg_func_selects_function_mode_unless_mode_is_given(tmp_path: Path) -> None:
    toml = '[postgres]\nmode = "copy"\n'
    assert load(tmp_path, toml, ["--pg-func", "s.f"]).postgres.mode == "function"
    assert load(tmp_path, toml, ["--pg-func", "s.f", "--pg-mode", "insert"]).postgres.mode == (
        "insert"
    )
    assert load(tmp_path, '[postgres]\nfunc = "s.f"\n').postgres.mode == "insert"


def test_iface_comma_string_equals_array(tmp_path: Path) -> None:
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo.log"
    as_string = load(tmp_path, f'[server]\niface = "can0, can1,replay:{demo}"\n')
    as_array = load(tmp_path, f'[server]\niface = ["can0", "can1", "replay:{demo}"]\n')
    assert as_string.server.iface == ("can0", "can1", f"replay:{demo}")
    assert as_array == as_string


def test_allow_accepts_comma_string_and_empty(tmp_path: Path) -> None:
    config = load(tmp_path, '[server]\nallow = "10.0.0.0/8,127.0.0.1"\n')
    assert config.server.allow == ("10.0.0.0/8", "127.0.0.1")
    assert load(tmp_path, '[server]\nallow = ["10.0.0.0/8"]\n', ["--allow", ""]).server.allow == ()


def test_integers_are_accepted_where_numbers_are_expected(tmp_path: Path) -> None:
    config = load(tmp_path, "[postgres]\nflush_interval = 2\n[logging]\nstats_interval = 0\n")
    assert config.postgres.flush_interval == 2.0
    assert config.logging.stats_interval == 0.0


# --- validation: every kind of error names the key and the bad value ---

INVALID_VALUES = [
    ("port_high", '[server]\nport = 65536', "server.port = 65536", "between 0 and 65535"),
    ("port_negative", "[server]\nport = -1", "server.port = -1", "between 0 and 65535"),
    ("port_bool", "[server]\nport = true", "server.port = true", "expected an integer"),
    ("port_string", '[server]\nport = "2323"', 'server.port = "2323"', "expected an integer"),
    ("port_float", "[server]\nport = 23.0", "server.port = 23.0", "expected an integer"),
    ("switch_int", "[server]\ncan_fd = 1", "server.can_fd = 1", "expected true or false"),
    ("number_bool", "[postgres]\nflush_interval = true", "postgres.flush_interval = true",
     "expected a number"),
    ("default_dir", '[server]\ndefault_dir = "in"', 'server.default_dir = "in"', "rx, tx"),
    ("pg_dir", '[postgres]\ndir = "RX"', 'postgres.dir = "RX"', "rx, tx"),
    ("bus_offset", "[server]\nbus_offset = -1", "server.bus_offset = -1", "0 or more"),
    ("batch_size", "[postgres]\nbatch_size = 0", "postgres.batch_size = 0", "1 or more"),
    ("queue_size", "[postgres]\nqueue_size = -5", "postgres.queue_size = -5", "1 or more"),
    ("max_clients", "[server]\nmax_clients = 0", "server.max_clients = 0", "1 or more"),
    ("cache_max_mb", "[postgres]\ncache_max_mb = 0", "postgres.cache_max_mb = 0", "1 or more"),
    ("flush_interval", "[postgres]\nflush_interval = 0.0", "postgres.flush_interval = 0.0",
     "greater than 0"),
    ("flush_interval_nan", "[postgres]\nflush_interval = nan", "postgres.flush_interval = nan",
     "finite"),
    ("replay_speed", "[server]\nreplay_speed = -1.0", "server.replay_speed = -1.0",
     "greater than 0"),
    ("stats_interval", "[logging]\nstats_interval = -1", "logging.stats_interval = -1",
     "0 or more"),
    ("func", '[postgres]\nfunc = "x; drop table can_frame"',
     'postgres.func = "x; drop table can_frame"', "schema-qualified SQL name"),
    ("func_two_dots", '[postgres]\nfunc = "a.b.c"', 'postgres.func = "a.b.c"', "SQL name"),
    ("gvret_fd", '[server]\ngvret_fd = "fast"', 'server.gvret_fd = "fast"',
     "auto, wiretap, esp32ret, classic"),
    ("mode", '[postgres]\nmode = "upsert"', 'postgres.mode = "upsert"', "insert, function, copy"),
    ("level", '[logging]\nlevel = "LOUD"', 'logging.level = "LOUD"', "DEBUG, INFO"),
    ("allow", '[server]\nallow = ["10.0.0.0/8", "my-laptop"]',
     'server.allow = ["10.0.0.0/8", "my-laptop"]', "CIDR network: my-laptop"),
    ("allow_type", "[server]\nallow = [1]", "server.allow = [1]", "array of strings"),
    ("iface_empty", '[server]\niface = ""', 'server.iface = ""', "at least one interface"),
    ("iface_empty_array", "[server]\niface = []", "server.iface = []", "at least one interface"),
    ("iface_empty_entry", '[server]\niface = "can0,,can1"', 'server.iface = "can0,,can1"',
     "empty entry"),
    ("iface_too_long", '[server]\niface = "can0123456789abcd"',
     'server.iface = "can0123456789abcd"', "not an interface name"),
    ("iface_twice", '[server]\niface = "can0,can0"', 'server.iface = "can0,can0"',
     "can0 more than once"),
    ("iface_replay_no_path", '[server]\niface = "replay:"', 'server.iface = "replay:"',
     "needs a file path"),
    ("host_empty", '[server]\nhost = ""', 'server.host = ""', "must not be empty"),
    ("host_octet", '[server]\nhost = "1.2.3.999"', 'server.host = "1.2.3.999"',
     "not a valid IPv4 or IPv6 address"),
    ("host_ipv6", '[server]\nhost = "fe80::1::2"', 'server.host = "fe80::1::2"',
     "not a valid IPv4 or IPv6 address"),
    ("host_name", '[server]\nhost = "my pi"', 'server.host = "my pi"', "or a host name"),
    ("beacon_address", '[server]\nbeacon_address = "everyone"',
     'server.beacon_address = "everyone"', "IP address"),
    ("dsn_type", "[postgres]\ndsn = 5", "postgres.dsn = 5", "expected a string"),
    ("node", '[server]\nnode = "truck 12"', 'server.node = "truck 12"', "letters, digits"),
    ("node_dash", '[server]\nnode = "-x"', 'server.node = "-x"', "starting with a letter"),
    ("partition_interval", '[postgres]\npartition_interval = "30 minutes"',
     'postgres.partition_interval = "30 minutes"', "number of hours or days"),
    ("partition_interval_zero", '[postgres]\npartition_interval = "0 days"',
     'postgres.partition_interval = "0 days"', "number of hours or days"),
    ("retention_days", "[postgres]\nretention_days = -1", "postgres.retention_days = -1",
     "0 or more"),
]  # fmt: skip


@pytest.mark.parametrize(
    "toml, names_key_and_value, says",
    [case[1:] for case in INVALID_VALUES],
    ids=[case[0] for case in INVALID_VALUES],
)
def test_invalid_value_is_reported_with_key_value_and_origin(
    tmp_path: Path, toml: str, names_key_and_value: str, says: str
) -> None:
    errors = errors_of(tmp_path, toml + "\n")
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{names_key_and_value} (from {tmp_path / 'wiretap-server.toml'})")
    assert says in errors[0]


INVALID_FLAGS = [
    (["--port", "http"], "server.port = http (from --port): expected an integer"),
    (["--port", "70000"], "server.port = 70000 (from --port): must be between 0 and 65535"),
    (["--bus-offset=-2"], "server.bus_offset = -2 (from --bus-offset): must be 0 or more"),
    (["--pg-flush-interval", "soon"], "postgres.flush_interval = soon (from --pg-flush-interval)"),
    (["--pg-dir", "both"], "postgres.dir = both (from --pg-dir): expected one of rx, tx"),
    (["--iface", ""], 'server.iface = "" (from --iface): needs at least one interface'),
    (["--stats-interval", "inf"], "logging.stats_interval = inf (from --stats-interval)"),
    (["--host", "1.2.3.999"], "server.host = 1.2.3.999 (from --host): is not a valid IPv4"),
]


@pytest.mark.parametrize("flags, message", INVALID_FLAGS, ids=[f[0][0] for f in INVALID_FLAGS])
def test_invalid_flag_value_is_reported(tmp_path: Path, flags: List[str], message: str) -> None:
    errors = errors_of(tmp_path, None, flags)
    assert len(errors) == 1, errors
    assert errors[0].startswith(message)


def test_too_many_buses(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, '[server]\niface = "can0,can1"\nbus_offset = 15\n')
    assert errors == [
        "server.bus_offset = 15 with 2 interface(s) in server.iface needs GVRET buses 15..16, "
        "but there are only 16 (0..15)"
    ]
    fits = load(tmp_path, '[server]\niface = "can0,can1"\nbus_offset = 14\n')
    assert fits.server.bus_offset == 14


def test_all_errors_are_reported_together(tmp_path: Path) -> None:
    toml = '[server]\nport = 99999\ndefault_dir = "up"\nprot = 1\n[postgres]\nbatch_size = 0\n'
    errors = errors_of(tmp_path, toml, ["--log-level", "chatty", "--max-clients", "0"])
    keys = sorted(re.match(r"(unknown key )?(\S+)", error).group(2) for error in errors)
    assert keys == [
        "logging.level", "postgres.batch_size", "server.default_dir", "server.max_clients",
        "server.port", "server.prot",
    ]  # fmt: skip


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "wiretap-server.toml"
    assert errors_of(tmp_path, "[server]\nprot = 23\n") == [
        f"unknown key server.prot in {path} (did you mean server.port?)"
    ]
    assert errors_of(tmp_path, "[postgres]\nwhatever = 1\n") == [
        f"unknown key postgres.whatever in {path}"
    ]


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "wiretap-server.toml"
    assert errors_of(tmp_path, "[serverr]\nport = 23\n[database]\n") == [
        f"unknown section [serverr] in {path} (did you mean server?)",
        f"unknown section [database] in {path}",
    ]


def test_top_level_key_is_an_error(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "port = 23\n[server]\n")
    assert errors == [
        f"unknown top-level key port in {tmp_path / 'wiretap-server.toml'}: keys belong in a "
        "[server], [postgres], [logging] or [status] section (did you mean server.port?)"
    ]


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(["-C", str(missing), "--port", "x"], {})
    assert caught.value.errors[0] == (
        f"cannot read config file {missing}: No such file or directory"
    )
    assert len(caught.value.errors) == 2  # the flag error is still reported


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "[server\nport = 1\n")
    assert len(errors) == 1
    assert errors[0].startswith(f"config file {tmp_path / 'wiretap-server.toml'} is not valid TOML")


def test_unknown_flag_is_a_config_error(tmp_path: Path) -> None:
    assert errors_of(tmp_path, None, ["--prot", "23"]) == [
        "unrecognized arguments: --prot 23 (see --help)"
    ]


# --- DSN masking ---

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "dsn, masked",
    [
        (f"postgresql://candor:{SECRET}@dbhost:5432/candor",
         "postgresql://candor:***@dbhost:5432/candor"),
        (f"postgres://u:{SECRET}@h1:5432,h2:5432/db?sslmode=require",
         "postgres://u:***@h1:5432,h2:5432/db?sslmode=require"),
        (f"postgresql://u:{SECRET}/x?y@h/db", "postgresql://u:***@h/db"),
        (f"postgresql://h/db?sslmode=require&password={SECRET}&user=u",
         "postgresql://h/db?sslmode=require&password=***&user=u"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        (f"host=h password={SECRET} dbname=d", "host=h password=*** dbname=d"),
        (f"host=h password = '{SECRET} \\' x' dbname=d", "host=h password = *** dbname=d"),
        (f"password='{SECRET}", "password=***"),
        ("host=h dbname=d", "host=h dbname=d"),
        ("", ""),
    ],
)  # fmt: skip
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_describe_is_toml_of_the_resolved_config_with_the_password_masked(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        FILE,
        ["--pg-dir", "tx"],
        env={"PG_DSN": f"postgresql://u:{SECRET}@h/db"},
    )
    text = config.describe()
    assert SECRET not in text
    described = tomllib.loads(text)
    assert described["postgres"]["dsn"] == "postgresql://u:***@h/db"
    assert described["server"]["iface"] == ["can1"]
    assert described["postgres"]["dir"] == "tx"
    masked = dataclasses.replace(config.postgres, dsn="postgresql://u:***@h/db")
    path = tmp_path / "described.toml"
    path.write_text(text)
    assert load_config(["-C", str(path)], {}) == dataclasses.replace(config, postgres=masked)


# --- the shipped file ---


def test_shipped_file_loads_and_equals_the_defaults() -> None:
    config = load_config(["-C", str(SHIPPED_FILE)], {})
    assert config == load_config([], {})
    assert config.server.iface == ("can0",)


def test_shipped_file_documents_every_key() -> None:
    text = SHIPPED_FILE.read_text()
    document = tomllib.loads(text)
    set_keys = {f"{section}.{key}" for section, table in document.items() for key in table}
    assert set_keys == set(ALL_KEYS) - {"postgres.dir"}
    assert re.search(r"^# dir = \"rx\"$", text, re.MULTILINE)


def test_a_replay_log_that_cannot_be_read_is_a_configuration_error(tmp_path):
    missing = tmp_path / "nope.log"
    with pytest.raises(ConfigError) as caught:
        load_config(["--iface", f"can0,replay:{missing}"], {})
    assert any(str(missing) in error and "server.iface" in error for error in caught.value.errors)


@pytest.mark.parametrize("host", ["0.0.0.0", "127.0.0.1", "::", "::1", "localhost", "pi-4.local"])
def test_listen_host_accepts_addresses_and_host_names(tmp_path: Path, host: str) -> None:
    assert load(tmp_path, None, ["--host", host]).server.host == host


@pytest.mark.parametrize(
    "given, address",
    [("127.0.0.1:8023", ("127.0.0.1", 8023)), ("8023", ("127.0.0.1", 8023)),
     ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:9000", ("::1", 9000))],
)  # fmt: skip
def test_status_listen_takes_address_port_or_a_port_on_loopback(given, address) -> None:
    config = load_config(["--status-listen", given], {})
    assert config.status.listen == given
    assert split_listen(given) == address


@pytest.mark.parametrize("given", ["localhost:8023", "127.0.0.1", "1.2.3.4:99999", ":80", "x"])
def test_status_listen_rejects_what_cannot_be_bound(given) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config(["--status-listen", given], {})
    assert raised.value.errors[0].startswith(f"status.listen = {given} (from --status-listen): ")


def test_status_listener_is_off_unless_configured() -> None:
    assert load_config([], {}).status.listen == ""
