"""The GVRET binary protocol, with no I/O (in the manner of h11).

Owns: the per-connection :class:`ClientParser` (bytes in, events out), the reply builders for
every command of the GVRET-over-TCP contract, and the frame encoders for each CAN FD dialect.
Nothing here touches a socket or a clock: callers pass bytes and times in and send what comes out.

The contract is docs/gvret.md (copied from the team's spec); section numbers below refer to it.
GVRET has no length prefix, so the parser is a byte-level state machine. It never raises on
input and never resynchronises on ``F1`` or ``E7`` inside a payload: both are legal ID and data
bytes (§1). Its work is O(bytes received) whatever the input, so garbage cannot make it slow.
"""

from __future__ import annotations

import enum
import struct
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

from .frames import FD_DLC_OF_LENGTH, Frame, is_valid_fd_length

START = 0xF1
BINARY_MODE = 0xE7

CMD_FRAME = 0x00
CMD_TIME_SYNC = 0x01
CMD_DIGITAL_INPUTS = 0x02
CMD_ANALOG_INPUTS = 0x03
CMD_SET_DIGITAL_OUT = 0x04
CMD_SETUP_BUSES = 0x05
CMD_GET_BUS_PARAMS = 0x06
CMD_DEVICE_INFO = 0x07
CMD_SINGLE_WIRE = 0x08
CMD_KEEPALIVE = 0x09
CMD_SET_SYSTEM_TYPE = 0x0A
CMD_ECHO_FRAME = 0x0B
CMD_NUM_BUSES = 0x0C
CMD_EXTENDED_BUSES = 0x0D
CMD_SET_EXTENDED_BUSES = 0x0E
CMD_FD_FRAME = 0x14
CMD_FD_SETTINGS = 0x16

EXTENDED_ID_FLAG = 0x80000000
MAX_TRANSMIT_LENGTH = 64

SETTING_LENGTHS = {
    CMD_SET_DIGITAL_OUT: 1,
    CMD_SETUP_BUSES: 8,
    CMD_SINGLE_WIRE: 1,
    CMD_SET_SYSTEM_TYPE: 1,
    CMD_SET_EXTENDED_BUSES: 12,
}
"""Commands whose fixed-size argument is consumed and only logged (§2 "Setup")."""

QUERY_COMMANDS = frozenset(
    {
        CMD_DIGITAL_INPUTS,
        CMD_ANALOG_INPUTS,
        CMD_GET_BUS_PARAMS,
        CMD_DEVICE_INFO,
        CMD_KEEPALIVE,
        CMD_NUM_BUSES,
        CMD_EXTENDED_BUSES,
        CMD_FD_SETTINGS,
    }
)
"""Commands with no argument. Two of them (03, 16) are never answered (§2)."""


# --- events -------------------------------------------------------------------------------


class BinaryMode(NamedTuple):
    """``E7`` while idle: the client wants binary frames from now on (§1)."""


class Query(NamedTuple):
    """A command without arguments; :func:`reply_for` gives its reply, if it has one."""

    cmd: int


class TimeSync(NamedTuple):
    """``F1 01``: answer with the current timestamp counter."""


class Setting(NamedTuple):
    """04, 05, 08, 0A, 0E: a request to change the device, logged but not acted on."""

    cmd: int
    payload: bytes


class Transmit(NamedTuple):
    """``F1 00`` (or ``F1 0B``, ``echo=True``): a frame the client wants sent."""

    bus: int
    can_id: int
    extended: bool
    data: bytes
    echo: bool


class BadTransmit(NamedTuple):
    """A transmit that cannot be a CAN frame; ``reason`` says why. The stream stays in step."""

    reason: str


Event = Union[BinaryMode, Query, TimeSync, Setting, Transmit, BadTransmit]


class _State(enum.Enum):
    IDLE = 0
    COMMAND = 1  # after F1: expecting the command byte
    SETTING = 2  # collecting a fixed-size argument
    TRANSMIT_HEADER = 3  # id u32, bus u8, len u8
    TRANSMIT_BODY = 4  # data[len] + one trailing byte
    AFTER_TIME_SYNC = 5  # the byte after F1 01 is swallowed unless it is F1


TRANSMIT_HEADER = struct.Struct("<IBB")
"""§2 cmd 00 request after ``F1 00``: id u32 (bit 31 = extended), bus u8, len u8."""


class ClientParser:
    """One connection's GVRET command parser: ``feed(bytes) -> [Event, ...]``.

    Messages may be split across reads anywhere; feeding the same bytes in any chunking yields
    the same events. A command cut short by the peer closing is simply never completed.
    """

    def __init__(self) -> None:
        self._state = _State.IDLE
        self._cmd = 0
        self._need = 0
        self._buf = bytearray()
        self._header: Tuple[int, int, int] = (0, 0, 0)

    def feed(self, data: bytes) -> List[Event]:
        events: List[Event] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            state = self._state
            if state is _State.IDLE:
                byte = view[pos]
                pos += 1
                if byte == START:
                    self._state = _State.COMMAND
                elif byte == BINARY_MODE:
                    events.append(BinaryMode())
            elif state is _State.COMMAND:
                cmd = view[pos]
                pos += 1
                self._start_command(cmd, events)
            elif state is _State.AFTER_TIME_SYNC:
                byte = view[pos]
                pos += 1
                self._state = _State.COMMAND if byte == START else _State.IDLE
            else:
                take = min(self._need - len(self._buf), end - pos)
                self._buf += view[pos : pos + take]
                pos += take
                if len(self._buf) == self._need:
                    self._complete(events)
        return events

    def _collect(self, state: _State, need: int) -> None:
        self._state = state
        self._need = need
        self._buf = bytearray()

    def _start_command(self, cmd: int, events: List[Event]) -> None:
        self._cmd = cmd
        if cmd in QUERY_COMMANDS:
            events.append(Query(cmd))
            self._state = _State.IDLE
        elif cmd == CMD_TIME_SYNC:
            events.append(TimeSync())
            self._state = _State.AFTER_TIME_SYNC
        elif cmd in (CMD_FRAME, CMD_ECHO_FRAME):
            self._collect(_State.TRANSMIT_HEADER, TRANSMIT_HEADER.size)
        elif cmd in SETTING_LENGTHS:
            self._collect(_State.SETTING, SETTING_LENGTHS[cmd])
        # Any other byte is not a command: stay in COMMAND and read the next byte as one (§1).

    def _complete(self, events: List[Event]) -> None:
        state = self._state
        if state is _State.SETTING:
            events.append(Setting(self._cmd, bytes(self._buf)))
            self._state = _State.IDLE
        elif state is _State.TRANSMIT_HEADER:
            self._header = TRANSMIT_HEADER.unpack(self._buf)
            # Even a length no CAN frame has (up to 255) says where the message ends: read it
            # all, so a client with a bad length stays in step and its payload is never parsed
            # as commands.
            self._collect(_State.TRANSMIT_BODY, self._header[2] + 1)
        else:
            events.append(self._transmit_event(bytes(self._buf[:-1])))
            self._state = _State.IDLE

    def _transmit_event(self, data: bytes) -> Event:
        raw_id, bus, length = self._header
        extended = bool(raw_id & EXTENDED_ID_FLAG)
        can_id = raw_id & ~EXTENDED_ID_FLAG
        if can_id > (0x1FFFFFFF if extended else 0x7FF):
            kind = "29" if extended else "11"
            return BadTransmit(f"ID 0x{can_id:X} does not fit {kind} bits")
        if length > MAX_TRANSMIT_LENGTH:
            return BadTransmit(f"length {length} is over {MAX_TRANSMIT_LENGTH}")
        if length > 8 and not is_valid_fd_length(length):
            return BadTransmit(f"length {length} is not a CAN FD length")
        return Transmit(bus, can_id, extended, data, self._cmd == CMD_ECHO_FRAME)


# --- replies (§2) -------------------------------------------------------------------------

REPLY_DIGITAL_INPUTS = b"\xf1\x02\x00\x00"
REPLY_DEVICE_INFO = b"\xf1\x07\x6a\x02\x20\x00\x00\x00"  # build 618, EEPROM 0x20: ESP32RET-like
REPLY_KEEPALIVE = b"\xf1\x09\xde\xad"
REPLY_EXTENDED_BUSES = b"\xf1\x0d" + bytes(15)

TIME_SYNC_REPLY = struct.Struct("<2sI")
"""§2 cmd 01 reply: ``F1 01`` + u32 µs."""

BUS_PARAMS = struct.Struct("<BI")
"""§2 cmd 06 reply, per bus: flags u8 (bit 0 enabled, bit 4 listen-only), bitrate u32."""

BUS_PARAMS_FLAG_ENABLED = 0x01
BUS_PARAMS_FLAG_LISTEN_ONLY = 0x10


class BusParams(NamedTuple):
    enabled: bool
    listen_only: bool
    bitrate: int


DISABLED_BUS = BusParams(False, False, 0)


def reply_time_sync(timestamp_us: int) -> bytes:
    return TIME_SYNC_REPLY.pack(b"\xf1\x01", timestamp_us & 0xFFFFFFFF)


def reply_bus_params(bus0: BusParams, bus1: BusParams) -> bytes:
    parts = [b"\xf1\x06"]
    for bus in (bus0, bus1):
        flags = (BUS_PARAMS_FLAG_ENABLED if bus.enabled else 0) | (
            BUS_PARAMS_FLAG_LISTEN_ONLY if bus.listen_only else 0
        )
        parts.append(BUS_PARAMS.pack(flags, bus.bitrate if bus.enabled else 0))
    return b"".join(parts)


def reply_num_buses(count: int) -> bytes:
    return bytes((START, CMD_NUM_BUSES, max(1, count)))


class Device(NamedTuple):
    """What the replies need to know of the server."""

    bus_count: int
    bus_params: Callable[[int], BusParams]
    now_us: Callable[[], int]


def reply_for(event: Event, device: Device) -> Optional[bytes]:
    """The bytes to send for ``event``, or ``None`` when it has no reply (§2 table)."""
    if isinstance(event, TimeSync):
        return reply_time_sync(device.now_us())
    if not isinstance(event, Query):
        return None
    cmd = event.cmd
    if cmd == CMD_KEEPALIVE:
        return REPLY_KEEPALIVE
    if cmd == CMD_NUM_BUSES:
        return reply_num_buses(device.bus_count)
    if cmd == CMD_GET_BUS_PARAMS:
        return reply_bus_params(device.bus_params(0), device.bus_params(1))
    if cmd == CMD_DEVICE_INFO:
        return REPLY_DEVICE_INFO
    if cmd == CMD_EXTENDED_BUSES:
        return REPLY_EXTENDED_BUSES
    if cmd == CMD_DIGITAL_INPUTS:
        return REPLY_DIGITAL_INPUTS
    # CMD_ANALOG_INPUTS and CMD_FD_SETTINGS: SavvyCAN's parser locks up on either reply (§2).
    return None


# --- frames, server -> client (§3) --------------------------------------------------------


class Dialect(enum.Enum):
    """How CAN FD frames with more than 8 bytes reach a client (§3)."""

    WIRETAP = "wiretap"  # cmd 00, low nibble = FD DLC code
    ESP32RET = "esp32ret"  # cmd 14, byte count and whole bus byte
    CLASSIC = "classic"  # not sent at all: SavvyCAN cannot show them


CLASSIC_FRAME = struct.Struct("<2sIIB")
"""§3 cmd 00: ``F1 00``, timestamp u32 µs, ID u32 (bit 31 extended), (bus << 4 | length).
Followed by the data and one ``00``."""

FD_FRAME = struct.Struct("<2sIIBB")
"""§3 ESP32RET dialect cmd 14: ``F1 14``, timestamp u32, ID u32, length u8 (bytes), bus u8.
Followed by the data and one ``00``."""

_CLASSIC_CMD = b"\xf1\x00"
_FD_CMD = b"\xf1\x14"
_TRAILER = b"\x00"


def timestamp_us(ts_ns: int, start_ns: int) -> int:
    """The GVRET timestamp: µs since the server started, modulo 2**32 (§4)."""
    return ((ts_ns - start_ns) // 1000) & 0xFFFFFFFF


def encode_frames(
    frames: Sequence[Frame], dialect: Dialect, start_ns: int
) -> Tuple[bytes, int, int]:
    """Encode a batch for one dialect: ``(bytes, frames encoded, FD frames left out)``."""
    pack_classic = CLASSIC_FRAME.pack
    out: List[bytes] = []
    append = out.append
    skipped = 0
    for frame in frames:
        raw_id = frame.can_id | EXTENDED_ID_FLAG if frame.extended else frame.can_id
        ts = ((frame.ts_ns - start_ns) // 1000) & 0xFFFFFFFF
        data = frame.data
        length = len(data)
        if dialect is Dialect.ESP32RET and frame.fd:
            # cmd 00 is for classic frames only in this dialect (gvret.md §3)
            append(FD_FRAME.pack(_FD_CMD, ts, raw_id, length, frame.bus & 0xFF))
        elif length <= 8:
            append(pack_classic(_CLASSIC_CMD, ts, raw_id, (frame.bus & 0x0F) << 4 | length))
        elif dialect is Dialect.WIRETAP:
            dlc = FD_DLC_OF_LENGTH[length]
            append(pack_classic(_CLASSIC_CMD, ts, raw_id, (frame.bus & 0x0F) << 4 | dlc))
        elif dialect is Dialect.ESP32RET:
            append(FD_FRAME.pack(_FD_CMD, ts, raw_id, length, frame.bus & 0xFF))
        else:
            skipped += 1
            continue
        append(data)
        append(_TRAILER)
    return b"".join(out), len(frames) - skipped, skipped


def transmit_frame(event: Transmit, ts_ns: int = 0) -> Frame:
    """The :class:`Frame` a client's transmit asks for. More than 8 bytes makes it FD, with
    bit rate switching (an FD bus is brought up with a data bit rate to be used)."""
    fd = len(event.data) > 8
    return Frame(
        event.bus, event.can_id, event.extended, False, fd, fd, False, event.data, ts_ns, "tx"
    )
