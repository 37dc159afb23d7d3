"""The GVRET binary protocol, with no I/O (in the manner of h11).

Owns: :class:`Connection`, one client's protocol state (binary mode, CAN FD dialect, the client's
own view of the buses, flow control and pacing), built on the byte-level :class:`ClientParser`
(bytes in, events out); the reply builders for every command of the GVRET-over-TCP contract; and
the frame encoders for each CAN FD dialect. Nothing here touches a socket or reads a clock:
callers pass bytes and the time in and send what comes out.

The contract is docs/gvret.md (copied from the team's spec); section numbers below refer to it.
GVRET has no length prefix, so the parser is a byte-level state machine. It never raises on
input and never resynchronises on ``F1`` or ``E7`` inside a payload: both are legal ID and data
bytes (§1). Its work is O(bytes received) whatever the input, so garbage cannot make it slow.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple, Union

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
# Frozen dataclasses, not tuples: two events of different types never compare equal (as tuples,
# ``BinaryMode() == TimeSync()``), so a test or a ``match`` can never mistake one for another.


@dataclass(frozen=True)
class BinaryMode:
    """``E7`` while idle: the client wants binary frames from now on (§1)."""


@dataclass(frozen=True)
class Query:
    """A command without arguments; :func:`reply_for` gives its reply, if it has one."""

    cmd: int


@dataclass(frozen=True)
class TimeSync:
    """``F1 01``: answer with the current timestamp counter."""


@dataclass(frozen=True)
class Setting:
    """04, 05, 08, 0A, 0E: a request to change the device, with its fixed-size argument."""

    cmd: int
    payload: bytes


@dataclass(frozen=True)
class Transmit:
    """``F1 00`` (or ``F1 0B``, ``echo=True``): a frame the client wants sent."""

    bus: int
    can_id: int
    extended: bool
    data: bytes
    echo: bool


@dataclass(frozen=True)
class BadTransmit:
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


def _bus_entry(bus: BusParams) -> bytes:
    flags = (BUS_PARAMS_FLAG_ENABLED if bus.enabled else 0) | (
        BUS_PARAMS_FLAG_LISTEN_ONLY if bus.listen_only else 0
    )
    return BUS_PARAMS.pack(flags, bus.bitrate)


def reply_bus_params(bus0: BusParams, bus1: BusParams) -> bytes:
    return b"\xf1\x06" + _bus_entry(bus0) + _bus_entry(bus1)


def reply_extended_buses(bus2: BusParams) -> bytes:
    """``F1 0D``: bus 2 in the first five bytes, as one ``F1 06`` entry (SavvyCAN reads its third
    bus there, its single-wire slot); the two LIN slots after it stay ``00``. GVRET has no room
    to describe a fourth bus or more."""
    return b"\xf1\x0d" + _bus_entry(bus2) + bytes(10)


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
        return reply_extended_buses(device.bus_params(2))
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

    # A dialect keys the per-batch dict of encodings; Enum's own __hash__ is a Python call.
    # Members are singletons compared by identity, so the identity hash is the same contract.
    __hash__ = object.__hash__


CLASSIC_FRAME = struct.Struct("<2sIIB")
"""§3 cmd 00: ``F1 00``, timestamp u32 µs, ID u32 (bit 31 extended), (bus << 4 | length).
Followed by the data and one ``00``."""

CLASSIC_FRAME_WHOLE = tuple(struct.Struct(f"<2sIIB{length}sx") for length in range(9))
"""§3 cmd 00 whole, one layout per data length 0..8: :data:`CLASSIC_FRAME`, the data and the
trailing ``00`` in one ``pack`` (what nearly every frame is)."""
_PACK_CLASSIC_WHOLE = tuple(layout.pack for layout in CLASSIC_FRAME_WHOLE)

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
    pack_whole = _PACK_CLASSIC_WHOLE
    # cmd 00 is for classic frames only in the ESP32RET dialect (gvret.md §3)
    fd_as_classic = dialect is not Dialect.ESP32RET
    out: List[bytes] = []
    append = out.append
    skipped = 0
    for bus, can_id, extended, _rtr, fd, _brs, _esi, data, ts_ns, _dir, _origin in frames:
        raw_id = can_id | EXTENDED_ID_FLAG if extended else can_id
        ts = ((ts_ns - start_ns) // 1000) & 0xFFFFFFFF
        length = len(data)
        if length <= 8 and (fd_as_classic or not fd):
            append(pack_whole[length](_CLASSIC_CMD, ts, raw_id, (bus & 0x0F) << 4 | length, data))
            continue
        if dialect is Dialect.ESP32RET:
            append(FD_FRAME.pack(_FD_CMD, ts, raw_id, length, bus & 0xFF))
        elif dialect is Dialect.WIRETAP:
            dlc = FD_DLC_OF_LENGTH[length]
            append(pack_classic(_CLASSIC_CMD, ts, raw_id, (bus & 0x0F) << 4 | dlc))
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


# --- one client's connection: the protocol state (§1-§3) ---------------------------------

WINDOW_MAX = 60 * 1024
"""Frame bytes a flow-controlled client may have unacknowledged at most. What SavvyCAN reads at
once is what arrived while it was busy, and it can be busy only with bytes sent after the last
command it sent, so no read of its is larger than this (plus what was on the wire in the
moment its command crossed ours): under the 64 KB that its quadratic reader copes with
(gvret.md §3). It also covers 250 ms of a 10,000 fps bus of 8-byte frames (50 KB), so a client
that sends its keepalives on time loses nothing at one saturated bus."""

WINDOW_MIN = 4 * 1024
KEEPALIVE_LATE_S = 0.5
"""SavvyCAN asks every 250 ms while its reader thread is idle; a gap of twice that means the
reader was busy for at least one tick: it is behind, and the window shrinks."""

FLOW_CONTROL_GIVE_UP_S = 30.0
"""A flow-controlled client that sends nothing at all for this long while frames wait for room
does not send keepalives (SavvyCAN with "validate comm" turned off): flow control is stopped for
it, since nothing would ever open its window again. A SavvyCAN that does send them is never
silent this long: its reads are bounded by the window (60 KB take it about 4 s)."""

PACE_BYTES = 2048
PACE_INTERVAL_S = 0.005
"""A flow-controlled client is written at most ``PACE_BYTES`` of frames at a time,
``PACE_INTERVAL_S`` apart (400 KB/s, twice a saturated bus of 8-byte frames). SavvyCAN reads
whatever is queued at once: paced, that is one write (2 KB: 4 ms of its time), never all that
piled up while this server was held up, which would cost it seconds and start the spiral."""

HANDSHAKE_S = 1.0
"""How long after binary mode an ``auto`` client that has sent nothing telling (only ``E7`` and
``F1 0C``) is still in its handshake, its long CAN FD frames held back rather than risk the
WireTAP form reaching a SavvyCAN whose ``F1 06`` is still on the way."""

_LONG_FD = "long_fd"  # per-batch cache keys: whether any frame has more than 8 data bytes,
_ORIGINS = "origins"  # and which clients' transmits are in the batch


@dataclass(frozen=True)
class Reply:
    """Bytes to send the client ahead of any frame data (§1: a keepalive reply never waits)."""

    data: bytes


@dataclass(frozen=True)
class StreamingStarted:
    """The client entered binary mode: frames flow to it from now on (``dialect`` None while
    ``auto`` has not decided yet)."""

    dialect: Optional[Dialect]


@dataclass(frozen=True)
class DialectChosen:
    """``auto`` decided how this client gets CAN FD frames; ``reason`` says from what."""

    dialect: Dialect
    reason: str


@dataclass(frozen=True)
class FlowControlStarted:
    """The client behaves like SavvyCAN (it sent ``F1 09`` or ``F1 06``): what may wait for it is
    bounded by a window of unacknowledged bytes from now on."""


@dataclass(frozen=True)
class FlowControlStopped:
    """The client sent nothing for ``FLOW_CONTROL_GIVE_UP_S`` while its window was full."""

    silent_s: float


@dataclass(frozen=True)
class TransmitRefused:
    """A transmit this client's own bus settings forbid (the bus is off or listen-only)."""

    bus: int
    reason: str


@dataclass(frozen=True)
class BusSettingsChanged:
    """``F1 05`` / ``F1 0E`` switched a bus on or off, or listen-only, for this client only."""

    bus: int
    enabled: bool
    listen_only: bool


@dataclass(frozen=True)
class BitrateRequested:
    """``F1 05`` / ``F1 0E`` asked for another bit rate on a bus: a change of the interface
    itself, for every client, which only the operator can allow."""

    bus: int
    bitrate: int
    current: int


@dataclass(frozen=True)
class SettingIgnored:
    """04, 08, 0A: device settings this server has nothing to apply to."""

    cmd: int
    payload: bytes


ConnectionEvent = Union[
    Reply,
    StreamingStarted,
    DialectChosen,
    FlowControlStarted,
    TransmitRefused,
    BusSettingsChanged,
    BitrateRequested,
    SettingIgnored,
    Transmit,
    BadTransmit,
]


class Outgoing(NamedTuple):
    """What :meth:`Connection.send_frames` lets through for one batch."""

    data: bytes
    frames: int  # frames in ``data``
    dropped: int  # frames the flow-control window left out
    fd_skipped: int  # long CAN FD frames this client's dialect cannot carry
    notices: Tuple[Union[FlowControlStopped, DialectChosen], ...] = ()
    cuts: Tuple[int, ...] = ()  # paced: offsets cutting ``data`` into whole-frame pieces

    def pieces(self) -> List[bytes]:
        """``data`` in the pieces a paced client is written one at a time."""
        bounds = [0, *self.cuts, len(self.data)]
        return [self.data[a:b] for a, b in zip(bounds, bounds[1:])]


NOTHING = Outgoing(b"", 0, 0, 0)

BUS_WORD_SET = 0x80000000  # the word carries the two flags below (else: just "enable")
BUS_WORD_ENABLED = 0x40000000
BUS_WORD_LISTEN_ONLY = 0x20000000
BUS_WORD_BITRATE = 0x000FFFFF
MAX_BITRATE = 1_000_000
SETUP_BUSES_WORDS = struct.Struct("<II")
"""§2 cmd 05 argument: one u32 per bus, bus 0 then bus 1 (GVRET firmware's layout: bit 31 says
bits 30 (enabled) and 29 (listen-only) are meant, the low 20 bits are the bit rate; a word of 0
switches the bus off)."""
EXTENDED_BUSES_WORDS = struct.Struct("<III")
"""§2 cmd 0E argument: bus 2 (SavvyCAN's single-wire slot) in the cmd 05 layout, then two LIN
words this server has no use for."""

_SAVVYCAN_COMMANDS = (CMD_KEEPALIVE, CMD_GET_BUS_PARAMS)
_NEUTRAL_COMMANDS = (CMD_NUM_BUSES,)  # SavvyCAN's first command: tells nothing yet


def _frame_size(frame: Frame, dialect: Dialect) -> int:
    """Bytes :func:`encode_frames` writes for ``frame`` (0 when the dialect leaves it out)."""
    length = len(frame.data)
    if dialect is Dialect.ESP32RET and frame.fd:
        return 13 + length
    if length > 8 and dialect is Dialect.CLASSIC:
        return 0
    return 12 + length


class Connection:
    """One GVRET client's protocol state, with no I/O: bytes and the time in, events and bytes
    out (in the manner of h11's ``Connection``).

    ``receive_data(bytes, now, undelivered)`` parses what the client sent and returns what to do
    about it: :class:`Reply` bytes to send first, transmits to route, refusals and setting
    changes to log. ``send_frames(frames, now)`` returns the bytes of a batch of bus frames this
    client gets, in its dialect and its view of the buses, within its flow-control window.

    What it owns: binary mode (the streaming gate), the CAN FD dialect (fixed, or chosen in
    ``auto`` from what the client sent, the same however TCP split it), the client's own view of
    the buses (off, listen-only: §2 "Setup"), and for SavvyCAN-like clients the window of bytes
    sent but not yet acknowledged by a command from the client (§3 "Keep each client's backlog
    small"). Not thread-safe: its owner serialises calls.
    """

    def __init__(
        self,
        device: Device,
        *,
        start_ns: int = 0,
        dialect: Optional[Dialect] = None,
        flow_control: bool = True,
        origin: int = 0,
        now: float = 0.0,
    ) -> None:
        self.device = device
        self.start_ns = start_ns
        self.fixed_dialect = dialect
        self.dialect: Optional[Dialect] = dialect
        self.origin = origin
        self.streaming = False
        self.flow_control_allowed = flow_control
        self.flow_controlled = False
        self.window = WINDOW_MAX
        self.frames_sent = 0
        self.frames_dropped = 0
        self.fd_skipped = 0
        self._parser = ClientParser()
        self._views: Dict[int, Tuple[bool, bool]] = {}  # bus -> (enabled, listen_only)
        self._off: FrozenSet[int] = frozenset()  # the buses it switched off
        self._own_device = Device(device.bus_count, self.bus_view, device.now_us)
        self._binary_at = now
        self._telling_command = False  # a command other than 0C: not in SavvyCAN's handshake
        self._sent = 0  # frame bytes let through since flow control started
        self._acked = 0  # of those, the bytes a command from the client has acknowledged
        self._last_command_at = now
        self._keepalives = 0
        self._last_keepalive_at = now
        self._chosen: Optional[DialectChosen] = None  # chosen while sending, not yet told

    # --- client -> server -----------------------------------------------------------------

    def receive_data(self, data: bytes, now: float, undelivered: int = 0) -> List[ConnectionEvent]:
        """Events for what the client sent. ``undelivered``: of the frame bytes let through so
        far, how many have not reached the client's host yet (still queued in this process or
        in the kernel's send queue); only they are not acknowledged by a command now."""
        events: List[ConnectionEvent] = []
        go_binary = False
        for event in self._parser.feed(data):
            if isinstance(event, BinaryMode):
                go_binary = True
                continue
            self._acknowledge(now, undelivered)
            if isinstance(event, (Query, TimeSync)):
                self._command(event.cmd if isinstance(event, Query) else CMD_TIME_SYNC, now, events)
                reply = reply_for(event, self._own_device)
                if reply is not None:
                    events.append(Reply(reply))
            elif isinstance(event, Setting):
                self._command(event.cmd, now, events)
                events.extend(self._setting(event))
            elif isinstance(event, Transmit):
                self._command(CMD_FRAME, now, events)
                events.append(self._check_transmit(event))
            else:
                self._command(CMD_FRAME, now, events)
                events.append(event)
        # Streaming starts after the whole read is handled: what came with E7 (SavvyCAN sends
        # E7 and F1 06 in one write) counts before any frame goes out.
        if go_binary and not self.streaming:
            self.streaming = True
            self._binary_at = now
            events.append(StreamingStarted(self.dialect))
        return events

    def _acknowledge(self, now: float, undelivered: int) -> None:
        self._last_command_at = now
        if self.flow_controlled:
            self._acked = max(self._acked, self._sent - max(undelivered, 0))

    def _command(self, cmd: int, now: float, events: List[ConnectionEvent]) -> None:
        if cmd in _SAVVYCAN_COMMANDS:
            if self.dialect is None:
                self.dialect = Dialect.CLASSIC
                events.append(DialectChosen(Dialect.CLASSIC, f"it sent F1 {cmd:02X}"))
            if self.flow_control_allowed and not self.flow_controlled:
                self.flow_controlled = True
                self._sent = self._acked = 0
                events.append(FlowControlStarted())
            if cmd == CMD_KEEPALIVE:
                self._keepalive(now)
        elif cmd not in _NEUTRAL_COMMANDS:
            self._telling_command = True

    def _keepalive(self, now: float) -> None:
        self._keepalives += 1
        # The gap from the handshake's keepalive to the first periodic one says nothing
        # (SavvyCAN starts its 250 ms timer 5 s after connecting).
        if self._keepalives >= 3:
            if now - self._last_keepalive_at > KEEPALIVE_LATE_S:
                self.window = max(WINDOW_MIN, self.window // 4)
            else:
                self.window = min(WINDOW_MAX, self.window * 2)
        self._last_keepalive_at = now

    def _check_transmit(self, event: Transmit) -> Union[Transmit, TransmitRefused]:
        view = self._views.get(event.bus)
        if event.echo or view is None:
            return event
        enabled, listen_only = view
        if not enabled:
            return TransmitRefused(event.bus, f"bus {event.bus} is switched off by this client")
        if listen_only:
            return TransmitRefused(event.bus, f"bus {event.bus} is listen-only for this client")
        return event

    def _setting(self, event: Setting) -> List[ConnectionEvent]:
        if event.cmd == CMD_SETUP_BUSES:
            words = enumerate(SETUP_BUSES_WORDS.unpack(event.payload))
        elif event.cmd == CMD_SET_EXTENDED_BUSES:
            words = enumerate(EXTENDED_BUSES_WORDS.unpack(event.payload)[:1], start=2)
        else:
            return [SettingIgnored(event.cmd, event.payload)]
        events: List[ConnectionEvent] = []
        for bus, word in words:
            events.extend(self._bus_word(bus, word))
        return events

    def _bus_word(self, bus: int, word: int) -> List[ConnectionEvent]:
        actual = self.device.bus_params(bus)
        if not actual.enabled:
            return []  # a bus this server does not have: nothing to switch
        old = self._views.get(bus, (True, False))
        if word == 0:
            wanted = (False, old[1])
        elif word & BUS_WORD_SET:
            wanted = (bool(word & BUS_WORD_ENABLED), bool(word & BUS_WORD_LISTEN_ONLY))
        else:
            wanted = (True, old[1])
        events: List[ConnectionEvent] = []
        if wanted != old:
            if wanted == (True, False):
                del self._views[bus]
            else:
                self._views[bus] = wanted
            self._off = frozenset(bus for bus, (enabled, _) in self._views.items() if not enabled)
            view = self.bus_view(bus)
            events.append(BusSettingsChanged(bus, view.enabled, view.listen_only))
        bitrate = min(word & BUS_WORD_BITRATE, MAX_BITRATE)
        if bitrate and bitrate != actual.bitrate:
            events.append(BitrateRequested(bus, bitrate, actual.bitrate))
        return events

    def bus_view(self, bus: int) -> BusParams:
        """Bus ``bus`` as this client sees it: the server's, with its own off / listen-only."""
        actual = self.device.bus_params(bus)
        view = self._views.get(bus)
        if view is None or not actual.enabled:
            return actual
        return BusParams(view[0], actual.listen_only or view[1], actual.bitrate)

    # --- server -> client -----------------------------------------------------------------

    def send_frames(
        self, frames: Sequence[Frame], now: float, shared: Optional[Dict[object, object]] = None
    ) -> Outgoing:
        """This client's share of a batch. ``shared``: one dict per batch, handed to every
        client, so that each dialect's encoding is made once for all who see every bus."""
        if not self.streaming or not frames:
            return NOTHING
        if shared is None:
            shared = {}
        dialect = self._dialect_for(frames, now, shared)
        origins = shared.get(_ORIGINS)
        if origins is None:
            origins = shared[_ORIGINS] = {frame.origin for frame in frames if frame.origin}
        # The transmitting client is not sent its own frame back (server.md §2), and a bus it
        # switched off is not sent at all.
        off = self._off
        own = self.origin in origins  # type: ignore[operator]
        selected = frames
        if own or (off and any(frame.bus in off for frame in frames)):
            origin = self.origin if own else -1
            selected = [f for f in frames if f.bus not in off and f.origin != origin]
        if selected is frames:
            encoded = shared.get(dialect)
            if encoded is None:
                encoded = shared[dialect] = encode_frames(frames, dialect, self.start_ns)
        else:
            encoded = encode_frames(selected, dialect, self.start_ns)
        data, count, skipped = encoded  # type: ignore[misc]
        self.fd_skipped += skipped
        dropped = 0
        notices: Tuple[Union[FlowControlStopped, DialectChosen], ...] = ()
        if self._chosen is not None:
            notices, self._chosen = (self._chosen,), None
        cuts: Tuple[int, ...] = ()
        if self.flow_controlled:
            room = self.window - (self._sent - self._acked)
            if len(data) > room and now - self._last_command_at > FLOW_CONTROL_GIVE_UP_S:
                self.flow_controlled = False
                notices += (FlowControlStopped(now - self._last_command_at),)
            else:
                if len(data) > room:
                    data, kept = self._fit(selected, dialect, room)
                    dropped = count - kept
                    count = kept
                if len(data) > PACE_BYTES:
                    cuts = self._cuts(selected, dialect, len(data))
                self._sent += len(data)
        self.frames_sent += count
        self.frames_dropped += dropped
        return Outgoing(data, count, dropped, skipped, notices, cuts)

    @staticmethod
    def _cuts(frames: Sequence[Frame], dialect: Dialect, total: int) -> Tuple[int, ...]:
        """Where to cut the first ``total`` bytes of ``frames``' encoding into pieces of at most
        ``PACE_BYTES`` (or one frame, if larger), at frame boundaries."""
        cuts: List[int] = []
        offset = piece = 0
        for frame in frames:
            size = _frame_size(frame, dialect)
            if offset + size > total:
                break
            if piece and piece + size > PACE_BYTES:
                cuts.append(offset)
                piece = 0
            offset += size
            piece += size
        return tuple(cuts)

    @property
    def paced(self) -> bool:
        """Whether frame data goes out in pieces, ``PACE_INTERVAL_S`` apart."""
        return self.flow_controlled

    def _fit(self, frames: Sequence[Frame], dialect: Dialect, room: int) -> Tuple[bytes, int]:
        """The longest first part of ``frames`` whose encoding fits in ``room`` bytes: frames
        are dropped whole, newest first, so what the client gets stays in order."""
        size = end = 0
        while end < len(frames):
            size += _frame_size(frames[end], dialect)
            if size > room:
                break
            end += 1
        if end == 0:
            return b"", 0
        data, count, _ = encode_frames(frames[:end], dialect, self.start_ns)
        return data, count

    def _dialect_for(
        self, frames: Sequence[Frame], now: float, shared: Dict[object, object]
    ) -> Dialect:
        if self.dialect is not None:
            return self.dialect
        long_fd = shared.get(_LONG_FD)
        if long_fd is None:
            long_fd = False
            for frame in frames:
                if len(frame.data) > 8:
                    long_fd = True
                    break
            shared[_LONG_FD] = long_fd
        if not long_fd:
            return Dialect.CLASSIC  # every frame has at most 8 bytes: the same in every dialect
        if self._telling_command or now - self._binary_at >= HANDSHAKE_S:
            self.dialect = Dialect.WIRETAP
            self._chosen = DialectChosen(
                Dialect.WIRETAP,
                "it sent other commands first, not F1 09 or F1 06"
                if self._telling_command
                else f"it sent no F1 09 or F1 06 within {HANDSHAKE_S:g} s",
            )
            return Dialect.WIRETAP
        # Still in what may be SavvyCAN's handshake split by TCP (E7 E7 F1 0C | F1 06 ...):
        # hold long FD frames back, as the classic dialect would, rather than guess.
        return Dialect.CLASSIC

    @property
    def unacknowledged(self) -> int:
        """Frame bytes let through that no command from the client has acknowledged yet."""
        return self._sent - self._acked if self.flow_controlled else 0
