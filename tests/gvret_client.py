"""A GVRET TCP client for tests: SavvyCAN's handshake, a decoder of everything a server sends.

Written from docs/gvret.md independently of wiretap/gvret.py, so a test that uses it checks the
server against the contract, not against its own encoder.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from typing import Callable, List, NamedTuple, Optional

SAVVYCAN_HELLO = bytes.fromhex("E7E7F10CF106F107F101F109")
WIRETAP_HELLO = bytes.fromhex("E7E7F107F10C")
FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)
REPLY_SIZES = {0x01: 4, 0x02: 2, 0x06: 10, 0x07: 6, 0x09: 2, 0x0C: 1, 0x0D: 15}


class RxFrame(NamedTuple):
    ts_us: int
    bus: int
    can_id: int
    extended: bool
    data: bytes
    cmd: int


class Reply(NamedTuple):
    cmd: int
    payload: bytes
    at: float


class StreamDecoder:
    """Splits a server -> client byte stream into replies and frames; raises on anything else."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> List[object]:
        self.buf += data
        out: List[object] = []
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 2:
            if buf[pos] != 0xF1:
                raise AssertionError(f"stream out of step at byte {buf[pos]:02X}")
            cmd = buf[pos + 1]
            if cmd == 0x00:
                if len(buf) - pos < 11:
                    break
                ts, raw_id, nibbles = struct.unpack_from("<IIB", buf, pos + 2)
                length = FD_LENGTHS[nibbles & 0x0F]
                end = pos + 11 + length + 1
                if len(buf) < end:
                    break
                assert buf[end - 1] == 0, "frame trailer is not 00"
                out.append(
                    RxFrame(
                        ts,
                        nibbles >> 4,
                        raw_id & 0x7FFFFFFF,
                        bool(raw_id >> 31),
                        bytes(buf[pos + 11 : end - 1]),
                        0x00,
                    )
                )
                pos = end
            elif cmd == 0x14:
                if len(buf) - pos < 12:
                    break
                ts, raw_id, length, bus = struct.unpack_from("<IIBB", buf, pos + 2)
                end = pos + 12 + length + 1
                if len(buf) < end:
                    break
                out.append(
                    RxFrame(
                        ts,
                        bus,
                        raw_id & 0x7FFFFFFF,
                        bool(raw_id >> 31),
                        bytes(buf[pos + 12 : end - 1]),
                        0x14,
                    )
                )
                pos = end
            elif cmd in REPLY_SIZES:
                end = pos + 2 + REPLY_SIZES[cmd]
                if len(buf) < end:
                    break
                out.append(Reply(cmd, bytes(buf[pos + 2 : end]), time.monotonic()))
                pos = end
            else:
                raise AssertionError(f"unexpected command byte {cmd:02X} from the server")
        del buf[:pos]
        return out


class GvretClient:
    """A connected client whose background thread decodes everything the server sends."""

    def __init__(self, port: int, hello: bytes = WIRETAP_HELLO, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.frames: List[RxFrame] = []
        self.replies: List[Reply] = []
        self.raw = bytearray()
        self.closed = threading.Event()
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if hello:
            self.send(hello)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> None:
        decoder = StreamDecoder()
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                items = decoder.feed(data)
                with self._lock:
                    self.raw += data
                    for item in items:
                        (self.frames if isinstance(item, RxFrame) else self.replies).append(item)
        except OSError:
            pass
        except BaseException as exc:  # a decoding error fails the test that waits on us
            self.error = exc
        finally:
            self.closed.set()

    def wait_for(self, condition: Callable[[GvretClient], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.error:
                raise self.error
            with self._lock:
                if condition(self):
                    return
            time.sleep(0.005)
        raise AssertionError(
            f"timed out: {len(self.frames)} frames, replies {[hex(r.cmd) for r in self.replies]}"
        )

    def wait_frames(self, count: int, timeout: float = 10.0) -> List[RxFrame]:
        self.wait_for(lambda c: len(c.frames) >= count, timeout)
        return list(self.frames)

    def wait_reply(self, cmd: int, count: int = 1, timeout: float = 10.0) -> List[Reply]:
        self.wait_for(lambda c: sum(r.cmd == cmd for r in c.replies) >= count, timeout)
        return [r for r in self.replies if r.cmd == cmd]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
