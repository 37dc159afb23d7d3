"""Names the database path shows or pastes: a DSN fit for a log line, a function name fit for SQL.

Owns: :func:`mask_dsn` (the password never reaches a log), :func:`describe_dsn` (what an empty
DSN means), and the rule for an ingest function name (:data:`SQL_FUNCTION_NAME`,
:func:`quote_function_name`). Standard library only, so the configuration checks the same rule
the writer applies.
"""

from __future__ import annotations

import re

SQL_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")

_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URI_PASSWORD_PARAMETER = re.compile(r"(?P<key>[?&]password=)[^&#]*", re.IGNORECASE)
# libpq keyword form: password=secret, password = 'quoted \' value'; an unclosed quote runs to
# the end, so a malformed DSN is masked too much rather than too little.
_KEYWORD_PASSWORD = re.compile(
    r"(?P<key>\bpassword\s*=\s*)(?:'(?:\\.|[^'\\])*(?:'|.*$)|\S*)", re.IGNORECASE | re.DOTALL
)
MASK = "***"
LIBPQ_DEFAULTS = "libpq defaults (PGHOST, PGPORT, PGUSER, PGDATABASE, ...)"


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, in URI or keyword=value form."""
    scheme = _URI_SCHEME.match(dsn)
    if scheme is None:
        return _KEYWORD_PASSWORD.sub(rf"\g<key>{MASK}", dsn)
    rest = dsn[scheme.end() :]
    # The last '@' ends the user info even when a password holds an unencoded '/', '?' or '@'.
    if "@" in rest:
        userinfo, hosts = rest.rsplit("@", 1)
        if ":" in userinfo:
            rest = f"{userinfo.split(':', 1)[0]}:{MASK}@{hosts}"
    return scheme.group() + _URI_PASSWORD_PARAMETER.sub(rf"\g<key>{MASK}", rest)


def describe_dsn(dsn: str) -> str:
    """The DSN for a log line: masked, or what libpq falls back to when it is empty."""
    return mask_dsn(dsn) if dsn.strip() else LIBPQ_DEFAULTS


def quote_function_name(name: str) -> str:
    """``schema.func`` as a quoted SQL identifier; ``ValueError`` unless it is a plain one.
    Checked here as well as in the configuration, since this is where it is pasted into SQL."""
    if not SQL_FUNCTION_NAME.fullmatch(name):
        raise ValueError(f"not a plain or schema-qualified SQL identifier: {name!r}")
    return ".".join(f'"{part}"' for part in name.split("."))
