"""Sends classic CAN frames at a steady rate: ``paced_sender.py IFACE RATE COUNT``.

``cangen -g`` sleeps its gap after each frame, so its rate is 1 / (gap + its own time per frame);
in an emulated guest that time is hundreds of µs and moves with the load, which caps cangen near
1,500 frames/s there and makes two runs with the same gap differ. This sender keeps to absolute
deadlines instead: it sleeps until the next frame is due, then sends every frame that is due, so
its average rate is the one asked (frames come two or three at a time only when it wakes late).
Frames are standard IDs 0x000-0x7FF and 8 random data bytes, as ``cangen -L 8`` sends.

It prints ``ready`` once its socket is bound and its frames are built, and starts sending when a
line arrives on stdin, so that whoever measures around it does not count its start-up. At the end
it prints the seconds the sending took, how many times it woke to send (frames per wake-up is how
bursty the traffic was) and how many sends had to wait for buffer space (ENOBUFS).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import time
from typing import List, Optional

CAN_FRAME = struct.Struct("<IB3x8s")
"""``struct can_frame`` (<linux/can.h>): can_id u32, len u8, 3 bytes of padding, data[8]."""
ENOBUFS_PAUSE_S = 0.001


def frames(count: int) -> List[bytes]:
    data = os.urandom(8 * count)
    ids = os.urandom(2 * count)
    return [
        CAN_FRAME.pack(
            int.from_bytes(ids[2 * i : 2 * i + 2], "little") & 0x7FF, 8, data[8 * i : 8 * i + 8]
        )
        for i in range(count)
    ]


def main(argv: Optional[List[str]] = None) -> int:
    iface, rate_text, count_text = argv if argv is not None else sys.argv[1:]
    rate, count = float(rate_text), int(count_text)
    pending = frames(count)
    with socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW) as sock:
        sock.bind((iface,))
        waits = sent = wakes = 0
        print("ready", flush=True)
        sys.stdin.readline()
        started = time.monotonic()
        while sent < count:
            due = min(count, int((time.monotonic() - started) * rate) + 1)
            wakes += 1
            while sent < due:
                try:
                    sock.send(pending[sent])
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    waits += 1
                    time.sleep(ENOBUFS_PAUSE_S)
                    continue
                sent += 1
            delay = started + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        print(f"{time.monotonic() - started:.6f} {wakes} {waits}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
