"""The NBD protocol, server side: a sans-IO codec (stdlib only).

Two layers, in the h11/wsproto style (bytes in with ``receive_data``, events out
with ``next_event``, bytes for the peer from ``send``):

* ``TransmissionDecoder`` and ``encode_simple_reply``: the transmission phase
  alone (requests in, simple replies out). The guest agent serves the Linux
  kernel's NBD device with it, where the kernel skips the handshake.
* ``NbdServerConnection``: the fixed newstyle handshake (NBD_OPT_GO/INFO with
  NBD_INFO_* replies, EXPORT_NAME, LIST, ABORT, anything else left to the
  application to refuse), then the transmission phase above.

Structured replies are not implemented: a server answers
NBD_OPT_STRUCTURED_REPLY with NBD_REP_ERR_UNSUP and uses simple replies only.
Anything malformed raises ``NbdProtocolError`` and nothing else; after it the
connection must be dropped. Reference: doc/proto.md of NetworkBlockDevice/nbd.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Final

# One "need more bytes" sentinel for every codec in tmem_wire.
from tmem_wire.abi import NEED_DATA, NeedData, TmemWireError

__all__ = [
    "NBDMAGIC", "IHAVEOPT", "OPTION_REPLY_MAGIC", "REQUEST_MAGIC", "SIMPLE_REPLY_MAGIC",
    "HandshakeFlag", "ClientFlag", "TransmissionFlag", "Option", "ReplyType", "InfoType",
    "Command", "CommandFlag", "Error", "NbdProtocolError", "NEED_DATA", "NeedData", "PAUSED", "Paused",
    "REQUEST_HEADER", "SIMPLE_REPLY_HEADER", "check_request_header", "MAX_OPTION_DATA", "DEFAULT_MAX_PAYLOAD",
    "ClientFlags", "ExportNameOption", "InfoOption", "ListOption", "AbortOption",
    "OtherOption", "MalformedOption", "Request", "ConnectionClosed",
    "Greeting", "ExportChosen", "ExportInfo", "ExportList", "OptionReply", "OptionError",
    "SimpleReply", "encode_simple_reply", "pack_simple_reply_into",
    "ClientEvent", "ServerEvent", "Phase", "TransmissionDecoder", "NbdServerConnection",
]

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

# Option data is names (at most 4096 bytes) plus a list of 16-bit info
# requests; anything far beyond that is a client trying to make us buffer.
MAX_OPTION_DATA: Final = 4 + 4096 + 2 + 2 * 0xFFFF
DEFAULT_MAX_PAYLOAD: Final = 32 * 1024 * 1024

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY_HEADER = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
REQUEST_HEADER = struct.Struct(">IHHQQI")
SIMPLE_REPLY_HEADER = struct.Struct(">IIQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
ZERO_PAD = bytes(124)


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class ReplyType(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9


class InfoType(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Error(enum.IntEnum):
    """The error values of a reply (a fixed subset of errno)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class NbdProtocolError(TmemWireError):
    """The peer broke the protocol; the only exception the codec raises on input."""


class Paused:
    """The type of PAUSED: an option awaits the server's reply; what follows depends on it."""

    _instance: ClassVar[Paused | None] = None

    def __new__(cls) -> Paused:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "PAUSED"


PAUSED: Final = Paused()


# ---- events from the client -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientFlags:
    flags: ClientFlag


@dataclass(frozen=True, slots=True)
class ExportNameOption:
    """NBD_OPT_EXPORT_NAME: answer ``ExportChosen`` or drop the connection."""

    name: str


@dataclass(frozen=True, slots=True)
class InfoOption:
    """NBD_OPT_INFO or NBD_OPT_GO: answer ``ExportInfo`` or ``OptionError``."""

    option: Option
    name: str
    requested: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ListOption:
    """NBD_OPT_LIST: answer ``ExportList``."""


@dataclass(frozen=True, slots=True)
class AbortOption:
    """NBD_OPT_ABORT: answer ``OptionReply(ReplyType.ACK)``; the session ends."""


@dataclass(frozen=True, slots=True)
class OtherOption:
    """Any option this codec does not parse: answer ``OptionError`` (usually ERR_UNSUP)."""

    option: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MalformedOption:
    """A known option with inconsistent data: answer ``OptionError(ERR_INVALID)``."""

    option: int
    reason: str


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission request; ``data`` is the payload of a WRITE, else empty."""

    command: int
    flags: int
    handle: int
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed cleanly: EOF at a message boundary, NBD_OPT_ABORT or NBD_CMD_DISC."""


ClientEvent = (
    ClientFlags | ExportNameOption | InfoOption | ListOption | AbortOption | OtherOption
    | MalformedOption | Request | ConnectionClosed
)


# ---- events from the server -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's opening: NBDMAGIC, IHAVEOPT, handshake flags."""

    flags: HandshakeFlag = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """The answer to NBD_OPT_EXPORT_NAME; enters the transmission phase."""

    size: int
    transmission_flags: TransmissionFlag


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """The answer to NBD_OPT_INFO/GO: NBD_REP_INFO replies, then ACK.

    NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE are always sent (a server may send
    block sizes unasked); NAME and DESCRIPTION only when the client asked.
    After GO the connection is in the transmission phase.
    """

    name: str
    size: int
    transmission_flags: TransmissionFlag
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_payload: int = DEFAULT_MAX_PAYLOAD
    description: str = ""


@dataclass(frozen=True, slots=True)
class ExportList:
    """The answer to NBD_OPT_LIST: one NBD_REP_SERVER per name, then ACK."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class OptionReply:
    """A raw final reply to the pending option (ACK to NBD_OPT_ABORT, say)."""

    reply_type: ReplyType
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class OptionError:
    """An error reply (``ReplyType.ERR_*``) to the pending option, with a message."""

    reply_type: ReplyType
    message: str = ""


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """A simple reply; ``data`` only for a successful READ."""

    handle: int
    error: int = Error.OK
    data: bytes | bytearray | memoryview = b""


ServerEvent = (
    Greeting | ExportChosen | ExportInfo | ExportList | OptionReply | OptionError | SimpleReply
)


# ---- transmission phase alone -----------------------------------------------------


def encode_simple_reply(handle: int, error: int = Error.OK,
                        data: bytes | bytearray | memoryview = b"") -> bytes:
    """A simple reply: header, then ``data`` (a READ's payload) if any."""
    header = SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, handle)
    return header + bytes(data) if data else header


def pack_simple_reply_into(buffer: bytearray | memoryview, offset: int, handle: int,
                           error: int = Error.OK) -> None:
    """Write a simple reply header into a preallocated buffer (16 bytes at offset)."""
    SIMPLE_REPLY_HEADER.pack_into(buffer, offset, SIMPLE_REPLY_MAGIC, error, handle)


def check_request_header(header: tuple[int, ...], max_payload: int) -> tuple[int, int, int, int, int]:
    """(flags, command, handle, offset, length) of an unpacked REQUEST_HEADER.

    Raises NbdProtocolError for a bad magic or a WRITE payload beyond
    ``max_payload``. For servers that read the header and then the payload
    straight into their own buffers (no copy through a decoder)."""
    magic, flags, command, handle, offset, length = header
    if magic != REQUEST_MAGIC:
        raise NbdProtocolError(f"bad request magic {magic:#010x}")
    if command == Command.WRITE and length > max_payload:
        raise NbdProtocolError(f"write payload of {length} bytes exceeds {max_payload}")
    return flags, command, handle, offset, length


class _ByteQueue:
    """Received bytes with a read position; compacted lazily so parsing stays linear."""

    __slots__ = ("_buffer", "_position", "eof")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._position = 0
        self.eof = False

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof and data:
            raise NbdProtocolError("data received after end of stream")
        if not data:
            self.eof = True
            return
        if self._position and self._position * 2 >= len(self._buffer):
            del self._buffer[: self._position]
            self._position = 0
        self._buffer += data

    def __len__(self) -> int:
        return len(self._buffer) - self._position

    def peek_unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack_from(self._buffer, self._position)

    def skip(self, count: int) -> None:
        self._position += count

    def take(self, count: int) -> bytes:
        start = self._position
        self._position += count
        return bytes(self._buffer[start : start + count])


class TransmissionDecoder:
    """Decodes transmission-phase requests; usable without any handshake.

    ``max_payload`` bounds a WRITE's payload (the advertised maximum): a longer
    one is a protocol error rather than a reason to buffer without limit.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._queue = _ByteQueue()
        self._disconnected = False

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means the client closed its side."""
        if self._disconnected:
            return  # nothing may follow NBD_CMD_DISC; what does is ignored
        self._queue.append(data)

    def next_event(self) -> Request | ConnectionClosed | NeedData:
        if self._disconnected:
            return ConnectionClosed()
        queue = self._queue
        if len(queue) < REQUEST_HEADER.size:
            return _end_or_need(queue)
        flags, command, handle, offset, length = check_request_header(
            queue.peek_unpack(REQUEST_HEADER), self.max_payload
        )
        payload_length = length if command == Command.WRITE else 0
        if len(queue) < REQUEST_HEADER.size + payload_length:
            return _end_or_need(queue)
        queue.skip(REQUEST_HEADER.size)
        data = queue.take(payload_length) if payload_length else b""
        if command == Command.DISC:
            self._disconnected = True
        return Request(command, flags, handle, offset, length, data)

    @property
    def disconnected(self) -> bool:
        """True once NBD_CMD_DISC was decoded."""
        return self._disconnected


def _end_or_need(queue: _ByteQueue) -> ConnectionClosed | NeedData:
    if not queue.eof:
        return NEED_DATA
    if len(queue):
        raise NbdProtocolError("connection closed in the middle of a message")
    return ConnectionClosed()


# ---- handshake + transmission -----------------------------------------------------


class Phase(enum.Enum):
    GREETING = "greeting"  # the server has not sent its greeting yet
    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class NbdServerConnection:
    """The server side of one NBD connection, handshake included.

    Start with ``send(Greeting())``. Every option event must be answered with
    one ``send`` before the next event is produced (``next_event`` returns
    ``PAUSED`` meanwhile), because the answer decides how later bytes parse.
    """

    def __init__(self, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.phase = Phase.GREETING
        self.handshake_flags = HandshakeFlag(0)
        self.client_flags = ClientFlag(0)
        self._queue = _ByteQueue()
        self._pending: ExportNameOption | InfoOption | ListOption | AbortOption | OtherOption \
            | MalformedOption | None = None
        self._transmission = TransmissionDecoder(max_payload=max_payload)

    # -- input --

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed received bytes; ``b""`` means the client closed its side."""
        if self.phase is Phase.TRANSMISSION:
            self._transmission.receive_data(data)
        elif self.phase is not Phase.CLOSED:
            self._queue.append(data)

    def next_event(self) -> ClientEvent | NeedData | Paused:
        if self.phase is Phase.TRANSMISSION:
            event = self._transmission.next_event()
            if isinstance(event, ConnectionClosed):
                self.phase = Phase.CLOSED
            return event
        if self.phase is Phase.CLOSED:
            return ConnectionClosed()
        if self._pending is not None:
            return PAUSED
        if self.phase is Phase.CLIENT_FLAGS:
            return self._next_client_flags()
        if self.phase is Phase.OPTIONS:
            return self._next_option()
        # Before the greeting the client has nothing to say.
        if len(self._queue):
            raise NbdProtocolError("client spoke before the server's greeting")
        return _end_or_need(self._queue)

    def _next_client_flags(self) -> ClientFlags | ConnectionClosed | NeedData:
        if len(self._queue) < CLIENT_FLAGS.size:
            return self._closed_if(_end_or_need(self._queue))
        (raw,) = self._queue.peek_unpack(CLIENT_FLAGS)
        self._queue.skip(CLIENT_FLAGS.size)
        allowed = int(self.handshake_flags)  # a client flag must match an advertised one
        if raw & ~allowed:
            raise NbdProtocolError(f"client flags {raw:#x} outside advertised {allowed:#x}")
        self.client_flags = ClientFlag(raw)
        self.phase = Phase.OPTIONS
        return ClientFlags(self.client_flags)

    def _next_option(self) -> ClientEvent | NeedData | Paused:
        if len(self._queue) < OPTION_HEADER.size:
            return self._closed_if(_end_or_need(self._queue))
        magic, option, length = self._queue.peek_unpack(OPTION_HEADER)
        if magic != IHAVEOPT:
            raise NbdProtocolError(f"bad option magic {magic:#018x}")
        if length > MAX_OPTION_DATA:
            raise NbdProtocolError(f"option data of {length} bytes exceeds {MAX_OPTION_DATA}")
        if len(self._queue) < OPTION_HEADER.size + length:
            return self._closed_if(_end_or_need(self._queue))
        self._queue.skip(OPTION_HEADER.size)
        data = self._queue.take(length)
        event = _parse_option(option, data)
        self._pending = event
        return event

    def _closed_if(self, event: ConnectionClosed | NeedData) -> ConnectionClosed | NeedData:
        if isinstance(event, ConnectionClosed):
            self.phase = Phase.CLOSED
        return event

    # -- output --

    def send(self, event: ServerEvent) -> bytes:
        """Encode a server event; raises ``ValueError`` if it does not fit the state."""
        if isinstance(event, SimpleReply):
            if self.phase is not Phase.TRANSMISSION:
                raise ValueError("simple replies belong to the transmission phase")
            return encode_simple_reply(event.handle, event.error, event.data)
        if isinstance(event, Greeting):
            if self.phase is not Phase.GREETING:
                raise ValueError("the greeting is sent once, first")
            self.handshake_flags = event.flags
            self.phase = Phase.CLIENT_FLAGS
            return GREETING.pack(NBDMAGIC, IHAVEOPT, int(event.flags))
        pending = self._pending
        if pending is None:
            raise ValueError(f"{type(event).__name__} answers no pending option")
        if isinstance(event, ExportChosen):
            if not isinstance(pending, ExportNameOption):
                raise ValueError("ExportChosen answers NBD_OPT_EXPORT_NAME only")
            reply = EXPORT_NAME_REPLY.pack(event.size, int(event.transmission_flags))
            if not self.client_flags & ClientFlag.NO_ZEROES:
                reply += ZERO_PAD
            self._enter_transmission()
            return reply
        if isinstance(pending, ExportNameOption):
            raise ValueError("NBD_OPT_EXPORT_NAME has no option reply: send ExportChosen or close")
        option = _option_number(pending)
        if isinstance(event, ExportInfo):
            if not isinstance(pending, InfoOption):
                raise ValueError("ExportInfo answers NBD_OPT_INFO/GO only")
            reply = _encode_export_info(option, pending.requested, event)
            self._pending = None
            if pending.option is Option.GO:
                self._enter_transmission()
            return reply
        if isinstance(event, ExportList):
            if not isinstance(pending, ListOption):
                raise ValueError("ExportList answers NBD_OPT_LIST only")
            self._pending = None
            return b"".join(
                _option_reply(option, ReplyType.SERVER, U32.pack(len(encoded)) + encoded)
                for encoded in (name.encode() for name in event.names)
            ) + _option_reply(option, ReplyType.ACK)
        if isinstance(event, OptionError):
            if not event.reply_type & _REP_ERR:
                raise ValueError(f"{event.reply_type!r} is not an error reply")
            self._pending = None
            return _option_reply(option, event.reply_type, event.message.encode())
        # OptionReply
        self._pending = None
        if isinstance(pending, AbortOption):
            self.phase = Phase.CLOSED
        return _option_reply(option, event.reply_type, event.data)

    def _enter_transmission(self) -> None:
        self._pending = None
        self.phase = Phase.TRANSMISSION
        # Bytes the client pipelined after its final option belong to transmission.
        leftover = self._queue.take(len(self._queue))
        if leftover:
            self._transmission.receive_data(leftover)
        if self._queue.eof:
            self._transmission.receive_data(b"")


def _option_number(event: ExportNameOption | InfoOption | ListOption | AbortOption
                   | OtherOption | MalformedOption) -> int:
    if isinstance(event, InfoOption):
        return event.option
    if isinstance(event, (OtherOption, MalformedOption)):
        return event.option
    if isinstance(event, ListOption):
        return Option.LIST
    if isinstance(event, AbortOption):
        return Option.ABORT
    return Option.EXPORT_NAME


def _decode_name(raw: bytes) -> str:
    # Names are UTF-8; a name that is not simply matches no export.
    return raw.decode("utf-8", "surrogateescape")


def _parse_option(option: int, data: bytes) -> ExportNameOption | InfoOption | ListOption \
        | AbortOption | OtherOption | MalformedOption:
    if option == Option.EXPORT_NAME:
        return ExportNameOption(_decode_name(data))
    if option == Option.ABORT:
        return AbortOption()
    if option == Option.LIST:
        if data:
            return MalformedOption(option, "NBD_OPT_LIST carries no data")
        return ListOption()
    if option in (Option.INFO, Option.GO):
        if len(data) < 6:
            return MalformedOption(option, "INFO/GO data shorter than 6 bytes")
        (name_length,) = U32.unpack_from(data, 0)
        if 4 + name_length + 2 > len(data):
            return MalformedOption(option, "export name overruns the option data")
        (count,) = U16.unpack_from(data, 4 + name_length)
        if 4 + name_length + 2 + 2 * count != len(data):
            return MalformedOption(option, "info request count disagrees with the option length")
        requested = struct.unpack_from(f">{count}H", data, 4 + name_length + 2)
        name = _decode_name(data[4 : 4 + name_length])
        return InfoOption(Option(option), name, tuple(requested))
    return OtherOption(option, data)


def _option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def _encode_export_info(option: int, requested: Iterable[int], info: ExportInfo) -> bytes:
    wanted = set(requested)
    parts = [
        _option_reply(option, ReplyType.INFO,
                      INFO_EXPORT.pack(InfoType.EXPORT, info.size, int(info.transmission_flags))),
        _option_reply(option, ReplyType.INFO,
                      INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, info.minimum_block,
                                           info.preferred_block, info.maximum_payload)),
    ]
    if InfoType.NAME in wanted:
        parts.append(_option_reply(option, ReplyType.INFO,
                                   U16.pack(InfoType.NAME) + info.name.encode("utf-8", "surrogateescape")))
    if InfoType.DESCRIPTION in wanted and info.description:
        parts.append(_option_reply(option, ReplyType.INFO,
                                   U16.pack(InfoType.DESCRIPTION) + info.description.encode()))
    parts.append(_option_reply(option, ReplyType.ACK))
    return b"".join(parts)
