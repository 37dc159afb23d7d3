"""Frames as database rows, and rows as SQL text or binary COPY bytes. Pure: no connection.

Owns: the row tuple every part of the database path passes around (:data:`Row`), the column
list of ``public.can_frame`` the writer fills, turning frames into rows, the SQL of each write
mode, one row as a ``(…)`` SQL literal (modes ``insert`` and ``function``), and a batch of rows
as the bytes of a binary ``COPY`` (mode ``copy``). Nothing here talks to PostgreSQL or keeps
state beyond a one-second cache, so it is tested (and fuzzable) on its own.
"""

from __future__ import annotations

import struct
import time
from typing import List, Optional, Sequence, Tuple

from ..frames import TX, Frame
from .names import quote_function_name

Row = Tuple[int, int, bool, int, bool, bytes, int, str]
"""``(ts_us, can_id, extended, dlc, is_fd, data, bus, dir)``: ``ts_us`` is µs since the epoch,
``dlc`` the payload length in bytes, ``dir`` ``rx`` or ``tx``."""

COLUMNS = "ts, id, extended, dlc, is_fd, data_bytes, bus, dir"
INSERT_SQL = f"INSERT INTO public.can_frame ({COLUMNS}) VALUES %s"
COPY_SQL = f"COPY public.can_frame ({COLUMNS}) FROM STDIN WITH (FORMAT binary)"
# Each row reaches execute_values as one ready SQL literal (see render_row): letting psycopg2
# adapt eight parameters per row costs 2.5x the client CPU. The ts goes as a text literal, which
# PostgreSQL parses once; an expression per row (epoch + n * interval) cost it twice the time of
# the rest of the row.
ROW_TEMPLATE = "%s"
SQL_BOOL = ("false", "true")

COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
COPY_TRAILER = struct.pack("!h", -1)
PG_EPOCH_US = 946_684_800 * 1_000_000  # 2000-01-01T00:00:00Z, where binary timestamptz counts from
COPY_ROW = tuple(struct.Struct(f"!hiqiiiBihiBi{length}sii i2s") for length in range(65))
"""One binary COPY row, one layout per payload length 0..64: field count (8), then ``int32
length`` + value for ``ts`` (int8 µs since 2000-01-01), ``id`` (int4), ``extended`` (bool),
``dlc`` (int2), ``is_fd`` (bool), ``data_bytes`` (the payload), ``bus`` (int4) and ``dir`` (two
characters of text)."""
_PACK_COPY_ROW = tuple(layout.pack for layout in COPY_ROW)
_DIR_TEXT = {"rx": b"rx", "tx": b"tx"}


def function_sql(func: str) -> str:
    """The ``execute_values`` statement of mode ``function``: one call of ``func`` per row."""
    return (
        f"SELECT {quote_function_name(func)}"
        "(v.ts, v.extended, v.is_fd, v.id, NULL::text, v.dlc, v.data_bytes, v.bus, v.dir)"
        f" FROM (VALUES %s) AS v ({COLUMNS})"
    )


def frame_rows(frames: Sequence[Frame], rx_dir: str) -> List[Row]:
    """Rows of ``frames``; frames read from the bus get ``rx_dir``, transmit confirmations
    ``tx``."""
    return [
        (ts_ns // 1000, can_id, extended, len(data), fd, data, bus,
         TX if direction == TX else rx_dir)
        for bus, can_id, extended, _rtr, fd, _brs, _esi, data, ts_ns, direction, _origin
        in frames
    ]  # fmt: skip


class TimestampText:
    """µs since the epoch -> PostgreSQL timestamptz text in UTC, the date and time of the
    current second cached (frames arrive in time order)."""

    def __init__(self) -> None:
        self._second: Optional[int] = None
        self._prefix = ""

    def __call__(self, ts_us: int) -> str:
        second, micros = divmod(ts_us, 1_000_000)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S.", time.gmtime(second))
        return f"{self._prefix}{micros:06d}+00"


def render_row(ts_text: str, row: Row, casts: bool) -> str:
    """One row as a SQL ``(…)`` literal. Safe to paste: ``ts_text`` comes from
    :class:`TimestampText`, numbers are formatted as integers (anything else raises), the payload
    as hex, and ``dir`` is one of the validated ``rx``/``tx``. ``casts`` types the columns of a
    bare ``VALUES`` list (function mode), where nothing else would; ``dlc`` must be smallint.
    """
    _ts_us, can_id, extended, dlc, is_fd, data, bus, direction = row
    if direction not in ("rx", "tx"):
        raise ValueError(f"direction {direction!r}")
    if casts:
        return (
            f"('{ts_text}'::timestamptz,{can_id:d},{SQL_BOOL[extended]},{dlc:d}::smallint,"
            f"{SQL_BOOL[is_fd]},E'\\\\x{data.hex()}'::bytea,{bus:d},'{direction}'::text)"
        )
    return (
        f"('{ts_text}',{can_id:d},{SQL_BOOL[extended]},{dlc:d},{SQL_BOOL[is_fd]},"
        f"E'\\\\x{data.hex()}'::bytea,{bus:d},'{direction}')"
    )


def render_rows(ts_text: TimestampText, rows: Sequence[Row], casts: bool) -> List[str]:
    """:func:`render_row` of each row."""
    return [render_row(ts_text(row[0]), row, casts) for row in rows]


def encode_copy(rows: Sequence[Row]) -> bytes:
    """The whole ``COPY … FROM STDIN WITH (FORMAT binary)`` input for ``rows``: header, one
    tuple per row, trailer (PostgreSQL docs, "Binary Format" of COPY)."""
    pack_row = _PACK_COPY_ROW
    dir_text = _DIR_TEXT
    epoch = PG_EPOCH_US
    parts = [COPY_HEADER]
    append = parts.append
    for ts_us, can_id, extended, dlc, is_fd, data, bus, direction in rows:
        append(pack_row[len(data)](8, 8, ts_us - epoch, 4, can_id, 1, extended, 2, dlc, 1, is_fd,
                                   len(data), data, 4, bus, 2, dir_text[direction]))  # fmt: skip
    append(COPY_TRAILER)
    return b"".join(parts)
