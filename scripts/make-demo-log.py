#!/usr/bin/env python3
"""Generate examples/demo.log: one minute of synthetic traffic on can0 and can1, candump -l format.

Deterministic (fixed seed, fixed start time), so regenerating gives the same file byte for byte.
Contents, chosen so a GVRET client has something of every kind to show:

- can0: engine 0x0C9 every 50 ms, wheel speeds 0x1A0 every 100 ms, a VIN fragment 0x3E9 in
  printable ASCII every 500 ms, an OBD-II engine-speed request 0x7DF answered by 0x7E8 every
  10 s, and one RTR frame (0x5A1).
- can1: J1939 EEC1 0x0CF00400 every 50 ms, CCVS 0x18FEF100 every 100 ms, engine temperature
  0x18FEEE00 every second, and three CAN FD frames (12, 32 and 64 bytes, with BRS / ESI).

Usage: scripts/make-demo-log.py [OUTPUT]   (default: examples/demo.log next to this script's repo)
"""

from __future__ import annotations

import math
import pathlib
import random
import sys
from typing import List, Tuple

START_US = 1_700_000_000_000_000
DURATION_US = 60_000_000
SEED = 2323

Event = Tuple[int, int, str, str]  # (time in µs since start, sequence, interface, frame text)


def std(can_id: int, data: bytes) -> str:
    return f"{can_id:03X}#{data.hex().upper()}"


def ext(can_id: int, data: bytes) -> str:
    return f"{can_id:08X}#{data.hex().upper()}"


def engine_rpm(t_us: int) -> int:
    """A slow rev sweep between idle and 3,000 rpm."""
    return int(1800 + 1000 * math.sin(t_us / 7_000_000))


def periodic(rng: random.Random, period_us: int, phase_us: int) -> List[int]:
    """Send times with up to ±300 µs of jitter, as a real ECU's would have."""
    return [t + rng.randint(-300, 300) if t else t for t in range(phase_us, DURATION_US, period_us)]


def generate() -> List[Event]:
    rng = random.Random(SEED)
    events: List[Tuple[int, str, str]] = []

    for count, t in enumerate(periodic(rng, 50_000, 0)):
        rpm = engine_rpm(t) * 4  # 0.25 rpm per bit
        throttle = rng.randint(20, 60)
        events.append((t, "can0", std(0x0C9, bytes([rpm >> 8, rpm & 0xFF, throttle, 0, 0, 0,
                                                     0x80, count & 0xFF]))))  # fmt: skip
    for t in periodic(rng, 100_000, 7_000):
        speed = int(50 + 30 * math.sin(t / 11_000_000)) * 100
        wheels = b"".join((speed + rng.randint(-20, 20)).to_bytes(2, "big") for _ in range(4))
        events.append((t, "can0", std(0x1A0, wheels)))
    vin = b"WTAPDEMO00000001"
    for count, t in enumerate(periodic(rng, 500_000, 13_000)):
        part = count % 2
        events.append((t, "can0", std(0x3E9, bytes([part]) + vin[part * 7 : part * 7 + 7])))

    for t in range(4_000_000, DURATION_US, 10_000_000):
        events.append(
            (t, "can0", std(0x7DF, bytes([0x02, 0x01, 0x0C, 0x55, 0x55, 0x55, 0x55, 0x55])))
        )
        rpm = engine_rpm(t) * 4
        answer = bytes([0x04, 0x41, 0x0C, rpm >> 8, rpm & 0xFF, 0xAA, 0xAA, 0xAA])
        events.append((t + rng.randint(2_000, 12_000), "can0", std(0x7E8, answer)))
    events.append((30_000_250, "can0", "5A1#R"))

    for count, t in enumerate(periodic(rng, 50_000, 3_000)):
        rpm = engine_rpm(t) * 8  # J1939 SPN 190: 0.125 rpm per bit
        eec1 = bytes([0xF0, 0x7D, 0x7D + count % 40, rpm & 0xFF, rpm >> 8, 0x00, 0xF0, 0x7D])
        events.append((t, "can1", ext(0x0CF00400, eec1)))
    for t in periodic(rng, 100_000, 21_000):
        speed = int((50 + 30 * math.sin(t / 11_000_000)) * 256)
        ccvs = bytes([0xF3, speed & 0xFF, speed >> 8, 0x00, 0x00, 0x00, 0x00, 0xFF])
        events.append((t, "can1", ext(0x18FEF100, ccvs)))
    for t in periodic(rng, 1_000_000, 500_000):
        coolant = 40 + 88 + min(t // 2_000_000, 50)  # offset -40 °C
        events.append((t, "can1", ext(0x18FEEE00, bytes([coolant, 0xFF] * 4))))

    fd_frames = [
        (5_000_500, "123##1", bytes(range(12))),
        (20_000_500, "456##3", b"WireTAP CAN FD demo, 32 bytes.!!"),
        (40_000_500, "18DAF110##1", bytes(rng.randrange(256) for _ in range(64))),
    ]
    for t, head, data in fd_frames:
        events.append((t, "can1", head + data.hex().upper()))

    return sorted((t, seq, iface, frame) for seq, (t, iface, frame) in enumerate(events))


def main() -> int:
    default = pathlib.Path(__file__).resolve().parent.parent / "examples" / "demo.log"
    output = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else default
    lines = []
    for t, _seq, iface, frame in generate():
        seconds, micros = divmod(START_US + t, 1_000_000)
        lines.append(f"({seconds:010d}.{micros:06d}) {iface} {frame}\n")
    output.write_text("".join(lines), encoding="ascii")
    print(f"{output}: {len(lines)} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
