"""Ingest from a real CAN socket into a real PostgreSQL (tests/pgcluster.py), in the same kernel.

Every frame ``cangen`` puts on vcan0 is a row after SIGTERM, carrying the kernel's receive time:
the very timestamps ``candump`` prints for the same frames.
"""

from __future__ import annotations

import subprocess
from typing import Callable, Iterator

import pytest
from pgcluster import PgCluster
from vcan_tools import (
    CANDUMP_OPTIONS,
    ServerProcess,
    cangen,
    parse_candump_line,
    readers,
    scaled,
    server_on,
    wait_for_readers,
)

pytestmark = pytest.mark.vcan

FRAMES = 2000


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    pg = PgCluster()
    pg.start()
    yield pg
    pg.destroy()


def test_every_frame_from_the_bus_is_a_row_with_its_kernel_timestamp(
    vcan: Callable[..., str], wiretap_server: Callable[..., ServerProcess], cluster: PgCluster
) -> None:
    iface = vcan("vcan0")
    server = server_on(wiretap_server, [iface], "--pg-enable", "--pg-dsn", cluster.dsn)
    before = readers(iface)
    candump = subprocess.Popen(
        ["candump", *CANDUMP_OPTIONS, "-n", str(FRAMES), iface], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_for_readers(iface, before + 1)
        cangen(iface, FRAMES, "-g", "1", "-I", "i", "-L", "8", "-D", "i")
        dumped, _ = candump.communicate(timeout=scaled(30))
    finally:
        candump.kill()
    stats = server.stop()

    rows = cluster.psql(
        "-At",
        "-F",
        " ",
        "-c",
        "select (extract(epoch from ts) * 1000000)::bigint, id, encode(data_bytes, 'hex'), dir"
        " from public.can_frame order by row_id",
    ).splitlines()
    assert (stats["rx"], stats["kernel_drops"], len(rows)) == (FRAMES, 0, FRAMES)
    expected = [parse_candump_line(line) for line in dumped.splitlines()]
    # cangen is another socket on this host, so every frame is stored as tx.
    assert rows == [f"{ts} {can_id} {data.hex()} tx" for ts, _, can_id, _, _, data in expected]
