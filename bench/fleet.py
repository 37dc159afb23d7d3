"""The fleet drill: many wiretap-server processes, each its own node with its own replay log,
writing into one PostgreSQL at once; then the query cookbook timed on the result.

Owns: the drill's logs (one candump log per node, replayed in a loop at a given rate), starting
and stopping the servers, checking that every frame each server read is stored exactly once,
the writers' lag at the end, the fill to a realistic history, the timed cookbook queries with
their plans, and the disk cost of a day. ``tests/pg/test_fleet.py`` runs a short drill that
asserts exact counts; this file's ``main`` prints the full figures:

    python bench/fleet.py                           # 16 nodes x 60 s, copy and insert, both
                                                    # layouts, then >= 10 M rows and the queries
    python bench/fleet.py --nodes 4 --seconds 10 --no-queries
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import resource
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import psycopg2  # noqa: E402
from harness import ServerProcess  # noqa: E402

PLAIN_SCHEMA = REPO / "tests" / "pg" / "plain_schema.sql"
IDS_PER_NODE = 40
LOG_SECONDS = 5.0  # one pass of a node's log; the server loops it
STATS = re.compile(r" stats rx=(\d+) .* enq=(\d+) wrote=(\d+) dropped=(\d+) spooled=(\d+)")
LAG_WINDOW_S = 5  # the lag at the end: the worst row of each node's last seconds


def node_name(index: int) -> str:
    return f"fleet-{index:02d}"


def write_log(path: Path, index: int, rate: float) -> int:
    """``LOG_SECONDS`` of two buses at ``rate`` frames/s in all, IDs and payloads of this node."""
    rng = random.Random(index)
    ids = rng.sample(range(0x7FF), IDS_PER_NODE)
    count = max(int(rate * LOG_SECONDS), 2)
    step = LOG_SECONDS / count
    with open(path, "w") as log:
        for n in range(count):
            can_id = ids[n % IDS_PER_NODE]
            payload = (n & 0xFFFFFFFF).to_bytes(4, "big") + bytes(
                rng.randrange(256) for _ in range(4)
            )
            seconds, micros = divmod(round(n * step * 1e6), 1_000_000)
            log.write(f"({1_700_000_000 + seconds}.{micros:06d}) can{n % 2} {can_id:03X}#"
                      f"{payload.hex().upper()}\n")  # fmt: skip
    return count


def _log_for(work: Path, index: int, rate: float) -> Path:
    path = work / f"{node_name(index)}-{rate:g}.log"
    if not path.exists():
        write_log(path, index, rate)
    return path


@dataclass
class NodeResult:
    node: str
    read: int  # frames the server read (rx of its final stats)
    wrote: int
    dropped: int
    spooled: int  # frames left in its spool at exit (stored by its next start)
    stored: int  # rows of this node in the table
    duplicates: int  # rows of this node stored more than once (same ts)
    backlog_frames: int  # queued + spooled in its last stats line before SIGTERM
    backlog_s: float  # that backlog in seconds of its recent reading rate
    row_lag_s: float  # worst ingest_ts - ts of its rows in the last seconds (replay lateness too)


@dataclass
class Drill:
    mode: str
    layout: str
    nodes: int
    seconds: float
    asked_rate: float  # frames/s per node
    elapsed_s: float
    rows: int
    rows_per_s: float  # rows committed while the drill ran (by ingest_ts) / its length
    max_backlog_s: float
    servers_cpu_us_per_frame: float  # the servers' CPU time (all threads) per frame read
    exactly_once: bool  # every frame read is stored once (per node where rows say the node)
    per_node: List[NodeResult]


def run_drill(
    dsn: str,
    work: Path,
    nodes: int = 16,
    seconds: float = 60.0,
    rate: float = 3750.0,
    mode: str = "copy",
    layout: str = "partitioned",
    node_offset: int = 0,
) -> Drill:
    """``nodes`` servers replaying at ``rate`` frames/s each for ``seconds``, then SIGTERM."""
    names = [node_name(node_offset + i) for i in range(nodes)]
    servers: List[ServerProcess] = []
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        for index, name in enumerate(names):
            log = _log_for(work, node_offset + index, rate)
            # A spool of its own per drill: what one drill left must not drain into the next.
            state = work / f"{mode}-{layout}" / name
            state.mkdir(parents=True, exist_ok=True)
            servers.append(ServerProcess(
                "--port", "0", "--stats-interval", "1", "--iface", f"replay:{log}",
                "--replay-loop", "--node", name, "--pg-enable", "--pg-dsn", dsn,
                "--pg-mode", mode, env={"STATE_DIRECTORY": str(state)},
            ))  # fmt: skip
        for server in servers:
            server.wait_line("connected to PostgreSQL", timeout=120)
        started_wall, started = time.time(), time.monotonic()
        time.sleep(seconds)
        seen = [len(server.lines) for server in servers]
        ended_wall = time.time()
        for server in servers:
            server.proc.send_signal(signal.SIGTERM)
        elapsed = time.monotonic() - started
        codes = [server.exit_code(60) for server in servers]
        if any(codes):
            raise RuntimeError(f"servers exited with {codes}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        servers_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
        has_node = _query_one(
            dsn, "select count(*) from pg_attribute where attrelid = 'public.can_frame'::regclass"
            " and attname = 'node'"
        )[0] == 1  # fmt: skip
        per_node = [
            _result(dsn, name, server, server.lines[:count], has_node)
            for name, server, count in zip(names, servers, seen)
        ]
    finally:
        for server in servers:
            server.kill()
    rows, in_window = _query_one(
        dsn,
        f"select count(*), count(*) filter (where ingest_ts >= to_timestamp({started_wall})"
        f" and ingest_ts < to_timestamp({ended_wall})) from public.can_frame",
    )
    read = sum(result.read for result in per_node)
    if has_node:
        exactly_once = all(r.stored == r.read and not r.duplicates for r in per_node)
    else:
        exactly_once = rows == read
    return Drill(
        mode=mode,
        layout=layout,
        nodes=nodes,
        seconds=seconds,
        asked_rate=rate,
        elapsed_s=round(elapsed, 2),
        rows=rows,
        rows_per_s=round(in_window / (ended_wall - started_wall)),
        max_backlog_s=max(result.backlog_s for result in per_node),
        servers_cpu_us_per_frame=round(servers_cpu * 1e6 / max(read, 1), 1),
        exactly_once=exactly_once,
        per_node=per_node,
    )


STATS_FIELD = re.compile(r" (fps|queued|spooled)=([\d.]+)")


def _result(
    dsn: str,
    name: str,
    server: ServerProcess,
    before_stop: List[str],
    has_node: bool,
) -> NodeResult:
    read, _enq, wrote, dropped, spooled = map(int, STATS.search(server.final_stats()).groups())
    periodic = [line for line in before_stop if " stats rx=" in line]
    last = dict(STATS_FIELD.findall(periodic[-1])) if periodic else {}
    backlog = int(last.get("queued", 0)) + int(last.get("spooled", 0))
    # In seconds of the node's reading rate over its last ten stats lines: a starved process's
    # last one-second fps alone can be near 0.
    recent = [float(dict(STATS_FIELD.findall(line)).get("fps", 0)) for line in periodic[-10:]]
    backlog_s = backlog / max(statistics.mean(recent) if recent else 0.0, 1.0)
    stored = duplicates = -1  # the plain layout has no node column: run_drill counts its total
    lag = 0.0
    if has_node:
        with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "select count(*), count(*) - count(distinct ts) from public.can_frame"
                " where node = %s",
                (name,),
            )
            stored, duplicates = cur.fetchone()
            cur.execute(
                "select coalesce(extract(epoch from max(ingest_ts - ts)), 0) from public.can_frame"
                " where node = %s and ts > (select max(ts) from public.can_frame where node = %s)"
                " - make_interval(secs => %s)",
                (name, name, LAG_WINDOW_S),
            )
            (lag,) = cur.fetchone()
        conn.close()
    return NodeResult(
        name, read, wrote, dropped, spooled, stored, duplicates, backlog, round(backlog_s, 2),
        round(float(lag), 3),
    )  # fmt: skip


def _query_one(dsn: str, sql: str) -> tuple:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    conn.close()
    return row


# -- history and the cookbook ----------------------------------------------------------------

FILL_SQL = """
insert into public.can_frame (ts, id, extended, dlc, is_fd, data_bytes, bus, dir, node)
select %(start)s + n * interval '1 microsecond' * %(step_us)s,
       (hashint4(n %% 40 + %(node_no)s * 100) & 2047), false, 8, false,
       int8send(hashint8(n)), n %% 2, 'rx', %(node)s
from generate_series(0, %(rows)s - 1) n
"""


def fill(dsn: str, day: datetime, nodes: int, rows_per_node: int, rate: float) -> None:
    """``rows_per_node`` rows of each node at ``rate`` frames/s, starting at 01:00 of ``day``."""
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        for index in range(nodes):
            cur.execute(FILL_SQL, {
                "start": day + timedelta(hours=1), "step_us": round(1e6 / rate),
                "node_no": index, "node": node_name(index), "rows": rows_per_node,
            })  # fmt: skip
            conn.commit()
        cur.execute("analyze public.can_frame")
        cur.execute("analyze public.can_inventory")
    conn.close()


def cookbook(now: datetime) -> Dict[str, tuple]:
    """The docs' queries with the parameters the drill's data gives them."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    window_start = today - timedelta(days=1) + timedelta(hours=1, seconds=30)
    return {
        "last_10s_one_id_one_node": (
            "select ts, bus, id_hex, data_hex from public.can_frame"
            " where node = %s and id = %s and ts > now() - interval '10 seconds' order by ts",
            (node_name(3), None),
        ),
        "window_one_bus": (
            "select ts, id_hex, data_hex from public.can_frame"
            " where node = %s and bus = %s and ts >= %s and ts < %s order by ts",
            (node_name(5), 1, window_start, window_start + timedelta(seconds=5)),
        ),
        "inventory_one_node_day": (
            "select bus, upper(lpad(to_hex(id), case when extended then 8 else 3 end, '0')) as"
            " id_hex, sum(frames) as frames, min(first_ts) as first_seen,"
            " max(last_ts) as last_seen from public.can_inventory"
            " where node = %s and hour >= %s and hour < %s group by 1, 2 order by 1, 2",
            (node_name(7), today, today + timedelta(days=1)),
        ),
        "inventory_fleet_day": (
            "select node, bus, count(*) as ids, sum(frames) as frames from public.can_inventory"
            " where hour >= %s and hour < %s group by 1, 2 order by 1, 2",
            (today, today + timedelta(days=1)),
        ),
        "rows_per_day": (
            "select date_bin('1 day', hour, timestamptz '2000-01-01 00:00:00+00') as day,"
            " node, sum(frames) as frames from public.can_inventory group by 1, 2 order by 1, 2",
            (),
        ),
    }


def time_queries(dsn: str, repeats: int = 7) -> Dict[str, dict]:
    """Median and best of ``repeats`` runs of each cookbook query, with its plan."""
    results: Dict[str, dict] = {}
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("select now()")
        (now,) = cur.fetchone()
        for name, (sql, params) in cookbook(now).items():
            if name == "last_10s_one_id_one_node":
                cur.execute("select id from public.can_frame where node = %s and ts > now() -"
                            " interval '10 seconds' limit 1", (params[0],))  # fmt: skip
                found = cur.fetchone()
                params = (params[0], found[0] if found else 0)
            timings, rows = [], 0
            for _ in range(repeats):
                began = time.perf_counter()
                cur.execute(sql, params)
                rows = len(cur.fetchall())
                timings.append((time.perf_counter() - began) * 1000)
            cur.execute("explain (analyze, costs off, timing off, summary off) " + sql, params)
            plan = [line for (line,) in cur.fetchall()]
            results[name] = {
                "median_ms": round(statistics.median(timings), 2),
                "best_ms": round(min(timings), 2),
                "rows": rows,
                "plan": plan,
            }
    conn.close()
    return results


def disk_per_day(dsn: str, day: datetime) -> dict:
    """Bytes per row of ``day``'s partition, indexes included, and what a day costs at rates."""
    name = f"can_frame_{day:%Y%m%d}"
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"select count(*), pg_total_relation_size('public.{name}'),"
                    f" pg_relation_size('public.{name}') from public.{name}")  # fmt: skip
        rows, total, heap = cur.fetchone()
        cur.execute("select pg_total_relation_size('public.can_inventory')")
        (inventory,) = cur.fetchone()
    conn.close()
    per_row = total / rows
    return {
        "partition": name,
        "rows": rows,
        "bytes_per_row": round(per_row, 1),
        "heap_bytes_per_row": round(heap / rows, 1),
        "gb_per_day_at_2000_fps": round(per_row * 2000 * 86400 / 1e9, 1),
        "gb_per_day_at_8700_fps": round(per_row * 8700 * 86400 / 1e9, 1),
        "inventory_bytes": inventory,
    }


# -- what each index and the inventory cost on ingest ------------------------------------------

INDEX_VARIANTS = {
    "all": (),
    "without_brin_ts": ("drop index public.can_frame_ts_brin",),
    "without_node_id_ts": ("drop index public.can_frame_node_id_ts_idx",),
    "without_node_bus_ts": ("drop index public.can_frame_node_bus_ts_idx",),
    "without_any_index": (
        "drop index public.can_frame_ts_brin, public.can_frame_node_id_ts_idx,"
        " public.can_frame_node_bus_ts_idx",
    ),
    "without_inventory_trigger": (
        "alter table public.can_frame disable trigger can_frame_inventory",
    ),
}


def _backend_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a PostgreSQL backend (``/proc/<pid>/stat`` fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _batches(rows: int, batch: int) -> List[list]:
    """Row tuples as the writer makes them: 40 IDs on two buses, 8-byte payloads, 250 µs apart."""
    base_us = time.time_ns() // 1000
    rng = random.Random(7)
    ids = rng.sample(range(0x7FF), IDS_PER_NODE)
    made = [
        (base_us + n * 250, ids[n % IDS_PER_NODE], False, 8, False,
         n.to_bytes(4, "big") + rng.randbytes(4), n % 2, "rx")
        for n in range(rows)
    ]  # fmt: skip
    return [made[i : i + batch] for i in range(0, rows, batch)]


class _CopyCapture:
    """Stands in for a cursor to keep the COPY data the writer would send."""

    data = b""

    def copy_expert(self, _sql: str, data: Any, size: int = 0) -> None:
        self.data = data.read()


def _ingest_cost(dsn: str, mode: str, batches: List[list]) -> Dict[str, float]:
    """Backend CPU µs per row (what the database pays, hardly moved by other load on the box)
    and rows/s, writing ``batches`` the way the writer does, one transaction each."""
    from wiretap.pg import writer as pgwriter

    render = pgwriter.TimestampText()
    payloads = []
    for rows in batches:
        if mode == "copy":
            capture = _CopyCapture()
            pgwriter.PgWriter._copy(None, capture, rows)
            payloads.append(capture.data)
        else:
            values = ",".join(pgwriter.render_row(render(r[0]), r, False).getquoted().decode()
                              for r in rows)  # fmt: skip
            payloads.append(pgwriter.INSERT_SQL.replace("%s", values))
    conn = psycopg2.connect(dsn)
    with conn.cursor() as cur:
        cur.execute("select set_config('wiretap.node', 'cost', false)")
    conn.commit()
    pid = conn.get_backend_pid()
    cpu, began = _backend_cpu_s(pid), time.perf_counter()
    with conn.cursor() as cur:
        for payload in payloads:
            if mode == "copy":
                cur.copy_expert(pgwriter.COPY_SQL, io.BytesIO(payload))
            else:
                cur.execute(payload)
            conn.commit()
    wall, cpu = time.perf_counter() - began, _backend_cpu_s(pid) - cpu
    conn.close()
    count = sum(len(rows) for rows in batches)
    return {"cpu_us_per_row": round(cpu * 1e6 / count, 2), "rows_per_s": round(count / wall)}


def ingest_costs(cluster: Any, rows: int = 200_000, repeats: int = 3) -> Dict[str, dict]:
    """What the database pays per row with each index (or the inventory) taken away in turn,
    and on the plain table: the best of ``repeats`` runs per mode, batches of 1,000 rows."""
    batches = _batches(rows, 1000)
    variants = dict(INDEX_VARIANTS, plain_table=())
    results: Dict[str, dict] = {}
    for variant, statements in variants.items():
        schema = PLAIN_SCHEMA if variant == "plain_table" else REPO / "init_schema.sql"
        dsn = cluster.create_database("costs", schema)
        for statement in statements:
            cluster.psql("-d", "costs", "-c", statement)
        results[variant] = {}
        for mode in ("copy", "insert"):
            runs = []
            for _ in range(repeats):
                cluster.psql("-d", "costs", "-c", "truncate public.can_frame")
                runs.append(_ingest_cost(dsn, mode, batches))
            results[variant][mode] = {
                "cpu_us_per_row": min(run["cpu_us_per_row"] for run in runs),
                "rows_per_s": max(run["rows_per_s"] for run in runs),
            }
        _log(f"  {variant}: {results[variant]}")
    return results


# -- main ---------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/fleet.py", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=3750.0, help="frames/s per node")
    parser.add_argument("--modes", default="copy,insert")
    parser.add_argument("--no-plain", dest="plain", action="store_false",
                        help="skip the plain table's drills")  # fmt: skip
    parser.add_argument("--no-queries", dest="queries", action="store_false")
    parser.add_argument("--history-rows", type=int, default=10_000_000,
                        help="rows in the table when the queries are timed")  # fmt: skip
    parser.add_argument("--no-costs", dest="costs", action="store_false",
                        help="skip the per-index ingest costs")  # fmt: skip
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)

    from pgcluster import PgCluster

    figures: Dict[str, object] = {}
    cluster = PgCluster()
    cluster.start()
    try:
        with tempfile.TemporaryDirectory(prefix="wiretap-fleet-") as tmp:
            work = Path(tmp)
            if args.costs:
                _log("ingest cost of each index and of the inventory (backend CPU, best of 3)")
                figures["ingest_costs"] = ingest_costs(cluster)
            drills = []
            layouts = [("partitioned", cluster.dsn)]
            if args.plain:
                layouts.append(("plain", cluster.create_database("plain", PLAIN_SCHEMA)))
            for mode in filter(None, args.modes.split(",")):
                for layout, dsn in layouts:
                    _log(f"drill: {args.nodes} nodes, {mode}, {layout}")
                    drill = run_drill(dsn, work, args.nodes, args.seconds, args.rate, mode, layout)
                    _log(f"  {drill.rows:,} rows, {drill.rows_per_s:,} rows/s, writers at most"
                         f" {drill.max_backlog_s} s behind at the end, exactly once:"
                         f" {drill.exactly_once}, servers' CPU"
                         f" {drill.servers_cpu_us_per_frame} us/frame")  # fmt: skip
                    drills.append(asdict(drill))
                    if layout == "plain":
                        cluster.psql("-d", "plain", "-c", "truncate public.can_frame")
                    elif mode != args.modes.split(",")[-1]:
                        cluster.psql("-c", "truncate public.can_frame, public.can_inventory")
            figures["drills"] = drills
            if args.queries:
                with psycopg2.connect(cluster.dsn) as conn, conn.cursor() as cur:
                    cur.execute("select count(*) from public.can_frame")
                    (have,) = cur.fetchone()
                conn.close()
                today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0,
                                                           microsecond=0)  # fmt: skip
                missing = max(args.history_rows - have, 0)
                per_node = -(-missing // (2 * args.nodes))
                _log(f"fill: {have:,} rows from the drills, {2 * args.nodes * per_node:,} more")
                began = time.monotonic()
                for day in (today - timedelta(days=1), today - timedelta(days=2)):
                    fill(cluster.dsn, day, args.nodes, per_node, args.rate)
                figures["fill_rows_per_s"] = round(2 * args.nodes * per_node
                                                   / (time.monotonic() - began))  # fmt: skip
                # "The last 10 s" needs a live writer: one server of the fleet runs meanwhile.
                live = ServerProcess(
                    "--port", "0", "--stats-interval", "0", "--iface",
                    f"replay:{_log_for(work, 3, args.rate)}", "--replay-loop", "--node",
                    node_name(3), "--pg-enable", "--pg-dsn", cluster.dsn, "--pg-mode", "copy",
                    env={"STATE_DIRECTORY": str(work)},
                )  # fmt: skip
                try:
                    live.wait_line("connected to PostgreSQL", timeout=120)
                    time.sleep(12)
                    figures["queries"] = time_queries(cluster.dsn)
                finally:
                    live.stop()
                for name, result in figures["queries"].items():
                    _log(f"  {name}: median {result['median_ms']} ms, {result['rows']} rows")
                figures["disk"] = disk_per_day(cluster.dsn, today - timedelta(days=1))
                _log(f"disk: {figures['disk']}")
    finally:
        cluster.destroy()
    text = json.dumps(figures, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
