"""What a database error means for the writer: an outage, a configuration mistake, or bad rows.

Owns the classification of psycopg2 errors by SQLSTATE class (and, for errors raised while
connecting, which carry no SQLSTATE, by libpq's message), and the cause-and-fix text of each
configuration mistake. An outage (connection refused or lost, admin shutdown, a timeout) passes
by itself; a mistake (a missing table or function, a role without rights, a wrong password) does
not, and the operator must be told what to change. Pure: no connection.
"""

from __future__ import annotations

import re
from typing import NamedTuple

OUTAGE = "outage"
CONFIG = "config"
CONTENT = "content"

# SQLSTATE classes that blame the rows, not the connection: data exception, integrity
# constraint, SQL routine / external routine / trigger exceptions, PL/pgSQL raise, check option.
CONTENT_CLASSES = frozenset({"22", "23", "2F", "38", "39", "P0", "44"})
# Classes that blame the setup: feature not supported, invalid grantor, invalid role
# specification, invalid authorization, invalid catalog name (database), invalid schema name,
# syntax error or access rule violation (missing table, function or column; no privilege).
CONFIG_CLASSES = frozenset({"0A", "0L", "0P", "28", "3D", "3F", "42"})

SCHEMA_FIX = "load init_schema.sql into that database (psql -v ON_ERROR_STOP=1 -f init_schema.sql)"
DSN_FIX = "correct the DSN (PG_DSN, --pg-dsn or [postgres] dsn)"
_FIXES = {
    "42P01": f"the table public.can_frame is missing: {SCHEMA_FIX}",
    "42703": f"public.can_frame lacks a column the server writes: {SCHEMA_FIX}",
    "42883": "the ingest function does not exist with the arguments the server passes: correct "
    f"[postgres] func (--pg-func), or {SCHEMA_FIX}",
    "42501": "the database role lacks a privilege: GRANT INSERT ON public.can_frame (mode insert "
    "or copy) or EXECUTE on the ingest function (mode function) to it",
    "3F000": "the schema does not exist: correct [postgres] func (--pg-func), or " + SCHEMA_FIX,
    "3D000": f"the database does not exist: create it, or {DSN_FIX}",
}
_CLASS_FIXES = {
    "28": f"the server refused the login: {DSN_FIX} (user, password) or pg_hba.conf",
    "42": f"the database does not accept the server's statement: {SCHEMA_FIX}, and check "
    "[postgres] mode and func",
}
# Connection failures come from libpq as text only.
_CONNECT_MISTAKES = (
    (re.compile(r"password authentication failed|no pg_hba\.conf entry|role \S+ does not exist"
                r"|authentication failed|no password supplied"),
     _CLASS_FIXES["28"]),
    (re.compile(r"database \S+ does not exist"), _FIXES["3D000"]),
    (re.compile(r"invalid (dsn|connection option|port number|integer value|sslmode)"
                r"|missing \"=\" after|unterminated quoted string"),
     f"libpq cannot use the connection string: {DSN_FIX}"),
)  # fmt: skip


class Diagnosis(NamedTuple):
    kind: str  # OUTAGE, CONFIG or CONTENT
    cause: str  # the database's own words, first line
    fix: str  # for CONFIG: what the operator should change


def first_line(error: BaseException) -> str:
    text = getattr(error, "pgerror", None) or str(error) or type(error).__name__
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


def diagnose(error: BaseException, sqlstate: str = "") -> Diagnosis:
    """Classify a psycopg2 error (``sqlstate`` defaults to its ``pgcode``)."""
    code = sqlstate or getattr(error, "pgcode", None) or ""
    cause = first_line(error)
    if code:
        if code[:2] in CONTENT_CLASSES:
            return Diagnosis(CONTENT, cause, "")
        if code[:2] in CONFIG_CLASSES:
            fix = (
                _FIXES.get(code)
                or _CLASS_FIXES.get(code[:2])
                or (f"SQLSTATE {code}: check the database setup ({SCHEMA_FIX}) and the DSN")
            )
            return Diagnosis(CONFIG, cause, fix)
        return Diagnosis(OUTAGE, cause, "")
    for pattern, fix in _CONNECT_MISTAKES:
        if pattern.search(str(error)):
            return Diagnosis(CONFIG, cause, fix)
    return Diagnosis(OUTAGE, cause, "")
