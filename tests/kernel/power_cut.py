"""The spool's power-cut drill, both sides (tests/kernel/power-cut.sh boots the VM twice).

``stream WORK DEVICE``  (guest, first boot): mount DEVICE (a disk image with ext4) at
    /tmp/spool, run the database writer with the database away so every frame goes to the spool
    on it, feed numbered frames at RATE frames/s logging ``fed N T`` to WORK/fed.log, and after
    a few seconds cut the power: ``echo b > /proc/sysrq-trigger`` reboots at once, without
    syncing anything.
``check WORK DEVICE``   (guest, second boot): mount the disk again (ext4 replays its journal),
    open the spool, check SQLite's integrity and write what it holds to WORK/check.json.
``verdict WORK``        (host): every frame fed up to one second before the cut must be in the
    spool, numbered 1..M without a hole; prints the figures; exit code 1 if not.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "pg")]

MOUNT = Path("/tmp/spool")  # the guest sees the host read-only, except /tmp and WORK
SPOOL = MOUNT / "wiretap-spool.db"
RATE = 2000  # frames/s: the guest runs without KVM, emulated, many times slower than the host
STREAM_S = 4.0
SETTLED_S = 1.0  # frames older than this at the cut must have survived it


def has_ext4(device: str) -> bool:
    try:
        with open(device, "rb") as disk:
            disk.seek(1024 + 56)  # the superblock's s_magic
            return disk.read(2) == b"\x53\xef"
    except OSError:
        return False


def mount(device: str) -> None:
    """Mount the spool disk: the one with an ext4 file system (virtio-scsi or virtio-blk, as
    the kernel names it; its drivers may be modules)."""
    MOUNT.mkdir(parents=True, exist_ok=True)
    for module in ("virtio_scsi", "sd_mod", "virtio_blk", "ext4"):
        subprocess.run(["modprobe", module], check=False)
    deadline = time.monotonic() + 30
    while True:
        found = [
            path
            for path in [device, *sorted(glob.glob("/dev/sd?") + glob.glob("/dev/vd?"))]
            if has_ext4(path)
        ]
        if found:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"no ext4 disk appeared; /dev has {sorted(os.listdir('/dev'))}")
        time.sleep(0.1)
    subprocess.run(["mount", "-t", "ext4", found[0], str(MOUNT)], check=True)


def stream(work: Path, device: str) -> None:
    from test_writer import numbered

    from wiretap.config import PostgresConfig
    from wiretap.pg.writer import PgWriter

    mount(device)
    # Nothing listens on port 1: the database is away, every frame goes to the spool.
    settings = dataclasses.replace(
        PostgresConfig(), enable=True, dsn="host=127.0.0.1 port=1", cache_path=str(SPOOL)
    )
    writer = PgWriter(settings, "rx")
    writer.start()
    log = open(work / "fed.log", "w", buffering=1)  # noqa: SIM115 (open until the power goes)
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < STREAM_S:
        delay = started + sent / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        writer.deliver(numbered(20, sent))
        sent += 20
        log.write(f"fed {sent} {time.monotonic():.3f}\n")
    log.write(f"cut {sent} {time.monotonic():.3f}\n")
    Path("/proc/sys/kernel/sysrq").write_text("1")
    Path("/proc/sysrq-trigger").write_text("b")  # no sync, no unmount: the power goes
    time.sleep(60)


def check(work: Path, device: str) -> None:
    mount(device)
    result: dict = {"exists": SPOOL.exists()}
    if SPOOL.exists():
        db = sqlite3.connect(str(SPOOL))
        result["integrity"] = db.execute("pragma integrity_check").fetchone()[0]
        seqs = [seq for (seq,) in db.execute("select seq from frames order by seq")]
        result["rows"] = len(seqs)
        result["first"] = seqs[0] if seqs else None
        result["last"] = seqs[-1] if seqs else None
        result["holes"] = (seqs[-1] - seqs[0] + 1 - len(seqs)) if seqs else 0
        db.close()
    subprocess.run(["umount", str(MOUNT)], check=False)
    (work / "check.json").write_text(json.dumps(result))


def verdict(work: Path) -> int:
    fed = []
    cut = None
    fed_log = work / "fed.log"
    for line in fed_log.read_text().splitlines() if fed_log.exists() else []:
        kind, count, when = line.split()
        if kind == "cut":
            cut = (int(count), float(when))
        else:
            fed.append((int(count), float(when)))
    check_file = work / "check.json"
    if cut is None or not check_file.exists():
        print("power-cut drill: FAILED: the guest did not stream to the cut, or did not check")
        return 1
    found = json.loads(check_file.read_text())
    read, cut_at = cut
    settled = max((n for n, when in fed if when <= cut_at - SETTLED_S), default=0)
    rows = found.get("rows", 0)
    ok = (
        found.get("exists")
        and found.get("integrity") == "ok"
        and found.get("holes") == 0
        and (rows == 0 or found.get("first") == 1)
        and rows >= settled
        and rows <= read
    )
    kept_until = max((when for n, when in fed if n <= rows), default=fed[0][1] if fed else 0)
    span = fed[-1][1] - fed[0][1] if len(fed) > 1 else 0.0
    print(
        f"power-cut drill: fed {read} frames in {span:.1f} s ({read / span if span else 0:.0f}/s"
        f" achieved in the emulated guest), then cut the power; the spool opened (integrity"
        f" {found.get('integrity')}) holding frames 1..{found.get('last')} ({rows} rows,"
        f" {found.get('holes')} holes): lost the last {read - rows} frames, those fed in the last"
        f" {cut_at - kept_until:.2f} s; required: every frame fed {SETTLED_S:g} s before the cut"
        f" ({settled}). {'PASSED' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    phase, work = sys.argv[1], Path(sys.argv[2])
    if phase == "stream":
        stream(work, sys.argv[3])
    elif phase == "check":
        check(work, sys.argv[3])
    else:
        sys.exit(verdict(work))
