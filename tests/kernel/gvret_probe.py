"""A minimal GVRET client for the vcan tier: binary mode, frame parsing, transmit.

It behaves like the WireTAP desktop (``E7 E7 F1 07 F1 0C``, never ``F1 09`` / ``F1 06``), so the
server gives it the wiretap FD dialect: cmd ``00`` with the FD DLC code in the low nibble of the
length byte. (A client that sends only ``E7`` could still be SavvyCAN with the rest of its
handshake on the way: for its first second, long FD frames are held back from it.)
Written from the wire contract on purpose (not with ``wiretap.gvret``), so a bug shared by the
server's encoder and a test's decoder cannot hide.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from typing import List, NamedTuple, Optional

from vcan_tools import TIMEOUT, scaled

FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)
EXTENDED_BIT = 0x80000000
WIRETAP_HELLO = b"\xe7\xe7\xf1\x07\xf1\x0c"
REPLY_SIZES = {b"\xf1\x07": 8, b"\xf1\x0c": 3}  # the replies to WIRETAP_HELLO, whole

FRAME_HEAD = struct.Struct("<2sIIB")
"""Server -> client frame head: ``F1 00``, timestamp u32 µs, ID u32 (bit 31 = extended),
length byte (low nibble: length or FD DLC code, high nibble: bus); then data and one ``00``."""

TRANSMIT_HEAD = struct.Struct("<2sIBB")
"""Client -> server transmit: ``F1 00``, ID u32 (bit 31 = extended), bus u8, length u8 (bytes);
then data and one trailing ``00``."""


class GvretFrame(NamedTuple):
    ts_us: int
    can_id: int
    extended: bool
    bus: int
    data: bytes


class GvretProbe:
    """One client connection; ``read_frames(n)`` returns exactly the next ``n`` frames."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=scaled(10))
        self.sock.sendall(WIRETAP_HELLO)
        self._buffer = b""
        self._frames: List[GvretFrame] = []
        self.replies = 0  # whole handshake replies received so far

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GvretProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def transmit(self, can_id: int, data: bytes, bus: int = 0, extended: bool = False) -> None:
        raw_id = can_id | (EXTENDED_BIT if extended else 0)
        self.sock.sendall(TRANSMIT_HEAD.pack(b"\xf1\x00", raw_id, bus, len(data)) + data + b"\0")

    def read_frames(self, count: int, timeout: Optional[float] = None) -> List[GvretFrame]:
        """The next ``count`` frames; AssertionError naming how many came if they do not."""
        deadline = time.monotonic() + (timeout if timeout is not None else scaled(TIMEOUT))
        while len(self._frames) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"expected {count} frames, got {len(self._frames)}"
            self._receive(remaining)
        taken, self._frames = self._frames[:count], self._frames[count:]
        return taken

    def read_available(self, quiet: float = 1.0) -> List[GvretFrame]:
        """Every frame that arrives until the stream has been quiet for ``quiet`` seconds."""
        while self._receive(quiet):
            pass
        taken, self._frames = self._frames, []
        return taken

    def take_frames(self, timeout: float) -> List[GvretFrame]:
        """The frames of at most one read, waiting up to ``timeout`` seconds for it."""
        self._receive(timeout)
        taken, self._frames = self._frames, []
        return taken

    def _receive(self, timeout: float) -> bool:
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if not readable:
            return False
        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        self._buffer += chunk
        self._parse()
        return True

    def _parse(self) -> None:
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= 2:
            reply_size = REPLY_SIZES.get(buffer[offset : offset + 2])
            if reply_size is not None:
                if len(buffer) - offset < reply_size:
                    break
                offset += reply_size
                self.replies += 1
                continue
            if len(buffer) - offset < FRAME_HEAD.size:
                break
            command, ts_us, raw_id, length_byte = FRAME_HEAD.unpack_from(buffer, offset)
            assert command == b"\xf1\x00", (
                f"unexpected message {buffer[offset : offset + 16].hex()}"
            )
            length = FD_LENGTHS[length_byte & 0x0F]
            end = offset + FRAME_HEAD.size + length + 1
            if len(buffer) < end:
                break
            assert buffer[end - 1] == 0, "frame not closed by 00"
            self._frames.append(
                GvretFrame(
                    ts_us,
                    raw_id & ~EXTENDED_BIT,
                    bool(raw_id & EXTENDED_BIT),
                    length_byte >> 4,
                    bytes(buffer[offset + FRAME_HEAD.size : end - 1]),
                )
            )
            offset = end
        self._buffer = buffer[offset:]
