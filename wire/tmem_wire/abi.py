"""The tmem wire ABI: frames, opcodes, statuses and payload codecs (docs/ABI.md).

Stdlib-only and sans-IO (h11 style): bytes go in, frames come out, nothing here
reads or writes a socket. Both tmemd (host) and the guest agent import it.

Exception tree::

    TmemWireError           root of everything this module raises on bad input
     +-- ProtocolError      malformed or unacceptable bytes; carries a Status:
                              PROTOCOL_ERROR  framing is broken: the stream is
                                              unusable until a new HELLO
                              INVALID         a well-framed payload holds a bad
                                              value: answer it, carry on

`FrameDecoder` only raises PROTOCOL_ERROR. The payload codecs raise
PROTOCOL_ERROR when the payload's size or structure is wrong and INVALID when a
value in it is (unknown flag bits, page shift out of range, reserved bytes set,
no common version in `negotiate`). Encoders raise ValueError on arguments that
cannot be encoded: that is a bug in the caller, not bad input from the peer.
"""

from __future__ import annotations

import collections
import functools
import struct
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar, Final, TypeAlias

__all__ = [
    "ALL_POOLS", "BATCH_HEADER_SIZE", "DESCRIPTOR_SIZE", "FLAG_REPLY", "HEADER_SIZE",
    "HELLO_SIZE", "MAGIC", "MAX_BATCH", "MAX_ERROR_TEXT", "MAX_PAGE_SHIFT",
    "MAX_PAYLOAD", "MIN_PAGE_SHIFT", "NEED_DATA", "NEW_POOL_SIZE", "POOL_GRANT_SIZE",
    "POOL_STATS_SIZE", "VERSION", "WHOLE_OBJECT",
    "Buffer", "Feature", "Flag", "Frame", "FrameDecoder", "Hello", "Key", "NeedData",
    "NewPool", "Oid", "Op", "PoolFlag", "PoolStats", "ProtocolError", "Status",
    "TmemWireError",
    "decode_batch_reply", "decode_batch_reply_into", "decode_key_batch", "decode_pool_grant", "decode_pool_stats",
    "decode_put_batch", "encode_batch_reply", "encode_frame", "encode_key_batch", "encode_key_batch_into",
    "encode_pool_grant", "encode_pool_stats", "encode_put_batch", "encode_put_batch_into", "error_text",
    "max_batch_pages", "negotiate", "pack_header_into", "page_size_mask", "reply_to",
]

MAGIC: Final = 0x4D454D54  # b"TMEM" on the wire (little-endian)
VERSION: Final = 1
HEADER_SIZE: Final = 64
MIN_PAGE_SHIFT: Final = 12  # 4 KiB
MAX_PAGE_SHIFT: Final = 21  # 2 MiB
MAX_PAYLOAD: Final = 4 * 1024 * 1024 + 4096
MAX_BATCH: Final = 1024
ALL_POOLS: Final = 0xFFFFFFFF
# FLUSH_BATCH descriptor index meaning "the whole object" (never a page index).
WHOLE_OBJECT: Final = 0xFFFFFFFFFFFFFFFF
# A non-OK reply may explain itself in at most this many bytes of UTF-8.
MAX_ERROR_TEXT: Final = 256

Oid: TypeAlias = tuple[int, int, int]
Key: TypeAlias = tuple[Oid, int]  # (oid, page index)
Buffer: TypeAlias = bytes | bytearray | memoryview

_HEADER: Final = struct.Struct("<IBBHQIIQQQQII")
assert _HEADER.size == HEADER_SIZE
_MAGIC_BYTES: Final = struct.pack("<I", MAGIC)


class Op(IntEnum):
    HELLO = 1
    NEW_POOL = 2
    DESTROY_POOL = 3
    PUT = 4
    GET = 5
    FLUSH_PAGE = 6
    FLUSH_OBJECT = 7
    PUT_BATCH = 8
    GET_BATCH = 9
    FLUSH_BATCH = 10
    STATS = 11


class Status(IntEnum):
    OK = 0
    MISS = 1
    REFUSED = 2  # no room, or over the guest's cap
    FROZEN = 3
    INVALID = 4  # bad pool id, page size mismatch, bad argument
    NOT_PERMITTED = 5
    PROTOCOL_ERROR = 6


class Flag(IntFlag):
    """Header flags; bits 2..15 are reserved and must be 0."""

    REPLY = 1
    # On replies only, to clients that negotiated Feature.DRAIN: the host asks the
    # guest to take its persistent pages back (tmemctl drain). The ABI is
    # request/reply, so the signal rides on replies (an idle agent's heartbeat).
    DRAIN = 2


FLAG_REPLY: Final = Flag.REPLY


class Feature(IntFlag):
    BATCH = 1  # PUT_BATCH, GET_BATCH, FLUSH_BATCH
    ASYNC = 2  # several requests in flight, replies in any order
    STATS = 4  # the STATS opcode
    DRAIN = 8  # replies may carry Flag.DRAIN


class PoolFlag(IntFlag):
    PERSISTENT = 1  # frontswap: the host never drops a page it accepted
    SHARED = 2  # pool named by a UUID that several guests may open
    INCLUSIVE_GETS = 4  # a GET leaves the page in an ephemeral pool


_KNOWN_FEATURES: Final = int(Feature.BATCH | Feature.ASYNC | Feature.STATS | Feature.DRAIN)
_KNOWN_POOL_FLAGS: Final = int(PoolFlag.PERSISTENT | PoolFlag.SHARED | PoolFlag.INCLUSIVE_GETS)
_STATUS_VALUES: Final = frozenset(int(status) for status in Status)
_MAX_STATUS: Final = max(Status)  # statuses are dense from 0
# Status by wire value: indexing a tuple is ~10x cheaper than Status(value).
_STATUS_BY_VALUE: Final = tuple(sorted(Status))
_REPLY_BIT: Final = int(Flag.REPLY)
_DRAIN_BIT: Final = int(Flag.DRAIN)


class TmemWireError(Exception):
    """Root of the errors the project's sans-IO codecs raise on bad input:

    TmemWireError
     +-- ProtocolError           tmem_wire.abi: a malformed frame or payload
     +-- NbdProtocolError        tmem_wire.nbd: the NBD peer broke the protocol
     +-- JournalError            tmem_host.journal.codec: bytes that are not a record
    """


class ProtocolError(TmemWireError):
    """Malformed input; `status` is what the receiver answers (see module doc)."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status.name}: {self.message}"


def _framing(message: str) -> ProtocolError:
    return ProtocolError(Status.PROTOCOL_ERROR, message)


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(Status.INVALID, message)


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


# --------------------------------------------------------------------------- frames


@dataclass(slots=True)
class Frame:
    opcode: int
    request_id: int
    status: int = 0
    pool_id: int = 0
    oid: Oid = (0, 0, 0)
    index: int = 0
    payload: Buffer = b""
    flags: int = 0
    version: int = VERSION

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & _REPLY_BIT)


def pack_header_into(
    buffer: bytearray | memoryview,
    offset: int,
    *,
    opcode: int,
    flags: int,
    request_id: int,
    status: int,
    pool_id: int,
    oid: Oid,
    index: int,
    payload_length: int,
    version: int = VERSION,
) -> None:
    """Write a 64-byte header at buffer[offset:] (senders with preallocated buffers)."""
    if not 0 <= payload_length <= MAX_PAYLOAD:
        raise ValueError(f"payload of {payload_length} bytes exceeds {MAX_PAYLOAD}")
    try:
        _HEADER.pack_into(
            buffer, offset, MAGIC, version, opcode, flags, request_id, status,
            pool_id, oid[0], oid[1], oid[2], index, payload_length, 0,
        )
    except struct.error as error:
        raise ValueError(f"header field out of range: {error}") from None


def encode_frame(frame: Frame) -> bytes:
    length = _nbytes(frame.payload)
    header = bytearray(HEADER_SIZE)
    pack_header_into(
        header, 0, opcode=frame.opcode, flags=frame.flags, request_id=frame.request_id,
        status=frame.status, pool_id=frame.pool_id, oid=frame.oid, index=frame.index,
        payload_length=length, version=frame.version,
    )
    return b"".join((header, frame.payload))


def reply_to(
    request: Frame, status: Status, payload: Buffer = b"", pool_id: int | None = None
) -> Frame:
    """The reply frame to `request`: same opcode, id, pool, oid and index."""
    return Frame(
        opcode=request.opcode, request_id=request.request_id, status=int(status),
        pool_id=request.pool_id if pool_id is None else pool_id, oid=request.oid,
        index=request.index, payload=payload, flags=_REPLY_BIT, version=request.version,
    )


def error_text(frame: Frame) -> str:
    """The diagnostic a non-OK reply may carry ("" when it carries none)."""
    if frame.status == Status.OK:
        return ""
    return bytes(frame.payload).decode("utf-8", errors="replace")


class NeedData:
    """The type of NEED_DATA: the decoder needs more bytes before the next frame."""

    _instance: ClassVar[NeedData | None] = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# Request fields an opcode does not use must be zero (bit 0: pool_id, 1: oid, 2: index).
_POOL, _OID, _INDEX = 1, 2, 4
_UNUSED_REQUEST_FIELDS: Final[dict[int, int]] = {
    Op.HELLO: _POOL | _OID | _INDEX,
    Op.NEW_POOL: _POOL | _OID | _INDEX,
    Op.DESTROY_POOL: _OID | _INDEX,
    Op.PUT: 0,
    Op.GET: 0,
    Op.FLUSH_PAGE: 0,
    Op.FLUSH_OBJECT: _INDEX,
    Op.PUT_BATCH: _OID | _INDEX,
    Op.GET_BATCH: _OID | _INDEX,
    Op.FLUSH_BATCH: _OID | _INDEX,
    Op.STATS: _OID | _INDEX,
}


def _is_page_size(length: int) -> bool:
    return (1 << MIN_PAGE_SHIFT) <= length <= (1 << MAX_PAGE_SHIFT) and not length & (length - 1)


# Payload shapes per opcode (lengths >= 0 are exact sizes). The header check
# settles all but the batch shapes, which need the payload bytes.
_PAGE: Final = -1  # one page: a power of two in 4 KiB..2 MiB
_RECORDS: Final = -2  # whole STATS records
_PAGE_BATCH: Final = -3
_KEY_BATCH: Final = -4
_REPLY_BATCH: Final = -5  # statuses only
_REPLY_PAGE_BATCH: Final = -6  # statuses, then the OK entries' pages


def _check_header(header: tuple[int, ...], max_payload: int) -> int:
    """Checks of an unpacked header that need no payload bytes; raises PROTOCOL_ERROR.

    Returns the batch shape still to check against the payload, or 0.
    """
    magic, version, opcode, flags, _, status, pool_id, oid0, oid1, oid2, index, length, reserved = (
        header
    )
    if magic != MAGIC:
        raise _framing(f"bad magic {magic:#010x}")
    if version != VERSION:
        raise _framing(f"unsupported version {version}")
    if not 0 < opcode < len(_REQUEST_SHAPES):
        raise _framing(f"unknown opcode {opcode}")
    if flags & ~(_REPLY_BIT | _DRAIN_BIT):
        raise _framing(f"reserved flag bits set: {flags:#06x}")
    if flags == _DRAIN_BIT:
        raise _framing("DRAIN flag on a request")
    if reserved:
        raise _framing("reserved header field is not 0")
    if length > max_payload:
        raise _framing(f"payload of {length} bytes exceeds the limit of {max_payload}")
    if status > _MAX_STATUS:
        raise _framing(f"unknown status {status}")
    if flags & _REPLY_BIT:
        if status:
            if length > MAX_ERROR_TEXT:
                raise _framing(f"error reply with a {length}-byte payload")
            return 0
        shape = _REPLY_SHAPES[opcode]
    else:
        if status:
            raise _framing("request with a nonzero status")
        unused = _UNUSED_REQUEST_FIELDS[opcode]
        if unused and (
            (unused & _POOL and pool_id) or (unused & _OID and (oid0 or oid1 or oid2))
            or (unused & _INDEX and index)
        ):
            raise _framing(f"{Op(opcode).name} request sets a field it does not use")
        shape = _REQUEST_SHAPES[opcode]
    if shape >= 0:
        if length != shape:
            raise _framing(f"{Op(opcode).name} payload must be {shape} bytes, not {length}")
        return 0
    if shape == _PAGE:
        if not _is_page_size(length):
            raise _framing(f"{length} bytes is not a page size")
        return 0
    if shape == _RECORDS:
        if length % POOL_STATS_SIZE:
            raise _framing(f"STATS reply of {length} bytes is not whole records")
        return 0
    if length < BATCH_HEADER_SIZE:
        raise _framing(f"{Op(opcode).name} payload shorter than its batch header")
    return shape


def _check_batch(shape: int, payload: bytes) -> None:
    """Structural checks of a batch payload (shape from _check_header)."""
    if shape == _PAGE_BATCH:
        _parse_batch_header(payload, with_pages=True)
    elif shape == _KEY_BATCH:
        _parse_batch_header(payload, with_pages=False)
    else:
        _parse_batch_reply(payload, pages=shape == _REPLY_PAGE_BATCH)


class FrameDecoder:
    """Incremental frame decoder.

    feed() any number of bytes, then call next_frame() until it returns NEED_DATA.
    Payloads come out as bytes (the decoder's buffer is reused). After it raised
    ProtocolError the decoder is broken for good: every later call raises the same
    error; start a new one (with resync=True) for the next session.

    max_payload may be lowered after HELLO to the negotiated max_frame - HEADER_SIZE.
    parse_ahead() decodes the whole frames received so far at once (a receiver
    that starts work on them early); next_frame() still returns each in its turn,
    and raises an error met on the way only after the frames before it.
    With resync=True the decoder first discards bytes until a valid HELLO frame
    header (request or reply) starts: a session always opens with HELLO, and this
    lets a receiver find it after reconnects lost bytes mid-frame.
    """

    _COMPACT_AT: Final = 1 << 20

    def __init__(self, *, max_payload: int = MAX_PAYLOAD, resync: bool = False) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be within 0..{MAX_PAYLOAD}")
        self.max_payload = max_payload
        self.discarded = 0  # bytes skipped while resynchronising
        self._hunting = resync
        self._buffer = bytearray()
        self._offset = 0
        self._header: tuple[int, ...] | None = None
        self._shape = 0  # the pending header's batch shape, from _check_header
        self._error: ProtocolError | None = None
        # parse_ahead()'s frames, not yet returned, and the error that stopped it.
        self._ahead: collections.deque[Frame] = collections.deque()
        self._error_ahead: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet decoded into a frame (partial frame at EOF)."""
        return len(self._buffer) - self._offset

    @property
    def frames_ahead(self) -> int:
        """Frames parse_ahead() decoded that next_frame() has not returned yet."""
        return len(self._ahead)

    def parse_ahead(self) -> list[Frame]:
        """Decode every whole frame received so far; returns them (next_frame()
        returns each again in its turn). It stops after a HELLO: the frames behind
        one are checked against the max_payload that HELLO negotiates."""
        parsed: list[Frame] = []
        while self._error is None and self._error_ahead is None:
            if self._ahead and self._ahead[-1].opcode == Op.HELLO:
                break
            try:
                frame = self._next_frame()
            except ProtocolError as error:
                self._error_ahead = error
                break
            if frame is NEED_DATA:
                break
            assert isinstance(frame, Frame)
            self._ahead.append(frame)
            parsed.append(frame)
        return parsed

    def feed(self, data: Buffer) -> None:
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_frame(self) -> Frame | NeedData:
        if self._error is not None:
            raise self._error
        if self._ahead:
            return self._ahead.popleft()
        if self._error_ahead is not None:
            self._error = self._error_ahead
            raise self._error
        try:
            return self._next_frame()
        except ProtocolError as error:
            self._error = error
            raise

    def _next_frame(self) -> Frame | NeedData:
        buffer = self._buffer
        if self._header is None:
            if self._hunting and not self._hunt():
                return NEED_DATA
            if len(buffer) - self._offset < HEADER_SIZE:
                self._compact()
                return NEED_DATA
            header = _HEADER.unpack_from(buffer, self._offset)
            self._shape = _check_header(header, self.max_payload)
            self._offset += HEADER_SIZE
            self._header = header
        header = self._header
        length = header[11]
        start = self._offset
        if len(buffer) - start < length:
            return NEED_DATA
        if length:
            with memoryview(buffer) as view:
                payload = bytes(view[start : start + length])
        else:
            payload = b""
        self._offset = start + length
        self._header = None
        _, version, opcode, flags, request_id, status, pool_id, o0, o1, o2, index, _, _ = header
        if self._shape:
            _check_batch(self._shape, payload)
        self._compact()
        return Frame(
            opcode=opcode, request_id=request_id, status=status, pool_id=pool_id,
            oid=(o0, o1, o2), index=index, payload=payload, flags=flags, version=version,
        )

    def _hunt(self) -> bool:
        """Skip to the next valid HELLO header; False when more bytes are needed."""
        buffer = self._buffer
        while True:
            found = buffer.find(_MAGIC_BYTES, self._offset)
            if found < 0:
                # Keep a tail that may be the start of a split magic.
                keep_from = max(self._offset, len(buffer) - (len(_MAGIC_BYTES) - 1))
                self.discarded += keep_from - self._offset
                self._offset = keep_from
                self._compact()
                return False
            self.discarded += found - self._offset
            self._offset = found
            if len(buffer) - found < HEADER_SIZE:
                self._compact()
                return False
            header = _HEADER.unpack_from(buffer, found)
            if header[2] == Op.HELLO:
                try:
                    _check_header(header, self.max_payload)
                except ProtocolError:
                    pass
                else:
                    self._hunting = False
                    return True
            self._offset += 1
            self.discarded += 1

    def _compact(self) -> None:
        # Consumed bytes are dropped only when everything is consumed or the dead
        # prefix is large, so that per-frame cost stays O(frame), not O(buffer).
        if self._offset == len(self._buffer):
            self._buffer.clear()
            self._offset = 0
        elif self._offset >= self._COMPACT_AT:
            del self._buffer[: self._offset]
            self._offset = 0


# --------------------------------------------------------------------------- HELLO

_HELLO: Final = struct.Struct("<HHIIIIIQ")
HELLO_SIZE: Final = _HELLO.size  # 32
_PAGE_SIZE_BITS: Final = sum(1 << shift for shift in range(MIN_PAGE_SHIFT, MAX_PAGE_SHIFT + 1))
_MIN_FRAME: Final = HEADER_SIZE + (1 << MIN_PAGE_SHIFT)


def page_size_mask(*page_shifts: int) -> int:
    """The HELLO page-size mask for these page shifts (bit n = 2**n-byte pages)."""
    mask = 0
    for shift in page_shifts:
        if not MIN_PAGE_SHIFT <= shift <= MAX_PAGE_SHIFT:
            raise ValueError(f"page shift {shift} outside {MIN_PAGE_SHIFT}..{MAX_PAGE_SHIFT}")
        mask |= 1 << shift
    return mask


@dataclass(frozen=True, slots=True)
class Hello:
    """HELLO payload. A request offers ranges and limits; the reply holds the
    negotiated values (min_version == max_version == the session's version)."""

    min_version: int = VERSION
    max_version: int = VERSION
    features: Feature = Feature.BATCH | Feature.ASYNC | Feature.STATS
    max_batch_pages: int = MAX_BATCH
    page_sizes: int = _PAGE_SIZE_BITS  # bit n set: 2**n-byte pages supported
    max_in_flight: int = 64
    max_frame: int = HEADER_SIZE + MAX_PAYLOAD

    def problem(self) -> str | None:
        """What makes these values invalid on the wire, or None."""
        if not 1 <= self.min_version <= self.max_version <= 0xFFFF:
            return f"bad version range {self.min_version}..{self.max_version}"
        if not 0 <= int(self.features) <= 0xFFFFFFFF:
            return "features do not fit 32 bits"
        if not 0 <= self.max_batch_pages <= MAX_BATCH:
            return f"max_batch_pages {self.max_batch_pages} outside 0..{MAX_BATCH}"
        if not self.page_sizes or self.page_sizes & ~_PAGE_SIZE_BITS:
            return f"bad page size mask {self.page_sizes:#x}"
        if not 1 <= self.max_in_flight <= 0xFFFFFFFF:
            return f"max_in_flight {self.max_in_flight} outside 1..2**32-1"
        if not _MIN_FRAME <= self.max_frame <= HEADER_SIZE + MAX_PAYLOAD:
            return f"max_frame {self.max_frame} outside {_MIN_FRAME}..{HEADER_SIZE + MAX_PAYLOAD}"
        return None

    def encode(self) -> bytes:
        if (problem := self.problem()) is not None:
            raise ValueError(problem)
        return _HELLO.pack(
            self.min_version, self.max_version, int(self.features), self.max_batch_pages,
            self.page_sizes, self.max_in_flight, self.max_frame, 0,
        )

    @classmethod
    def decode(cls, payload: Buffer) -> Hello:
        if _nbytes(payload) != HELLO_SIZE:
            raise _framing(f"HELLO payload must be {HELLO_SIZE} bytes")
        low, high, features, batch, sizes, in_flight, max_frame, reserved = _HELLO.unpack(payload)
        if reserved:
            raise _invalid("HELLO reserved field is not 0")
        # Unknown feature bits are kept: a newer client may offer them, negotiate drops them.
        hello = cls(low, high, Feature(features), batch, sizes, in_flight, max_frame)
        if (problem := hello.problem()) is not None:
            raise _invalid(problem)
        return hello


def negotiate(client: Hello, server: Hello) -> Hello:
    """The HELLO reply a server with limits `server` sends to `client`.

    Raises ProtocolError(INVALID) when there is no common version, or no common
    page size of which one page fits the smaller max_frame.
    """
    version = min(client.max_version, server.max_version)
    if version < max(client.min_version, server.min_version):
        raise _invalid(
            f"no common version: client {client.min_version}..{client.max_version}, "
            f"server {server.min_version}..{server.max_version}"
        )
    max_frame = min(client.max_frame, server.max_frame)
    # A page size is usable only if a PUT of one such page fits the frame limit.
    fitting = sum(
        1 << shift for shift in range(MIN_PAGE_SHIFT, MAX_PAGE_SHIFT + 1)
        if HEADER_SIZE + (1 << shift) <= max_frame
    )
    page_sizes = client.page_sizes & server.page_sizes & fitting
    if not page_sizes:
        raise _invalid("no common page size that fits the frame limit")
    features = Feature(int(client.features) & int(server.features) & _KNOWN_FEATURES)
    batch = min(client.max_batch_pages, server.max_batch_pages)
    if not batch:
        features &= ~Feature.BATCH
    if Feature.BATCH not in features:
        batch = 0
    in_flight = min(client.max_in_flight, server.max_in_flight)
    if Feature.ASYNC not in features:
        in_flight = 1
    return Hello(version, version, features, batch, page_sizes, in_flight, max_frame)


def max_batch_pages(page_shift: int, max_frame: int = HEADER_SIZE + MAX_PAYLOAD) -> int:
    """The most pages of 2**page_shift bytes one PUT_BATCH frame of max_frame can carry."""
    room = max_frame - HEADER_SIZE - BATCH_HEADER_SIZE
    return max(0, min(MAX_BATCH, room // ((1 << page_shift) + DESCRIPTOR_SIZE)))


# --------------------------------------------------------------------------- NEW_POOL

_NEW_POOL: Final = struct.Struct("<IB3x16s")
NEW_POOL_SIZE: Final = _NEW_POOL.size  # 24
_POOL_GRANT: Final = struct.Struct("<I")
POOL_GRANT_SIZE: Final = _POOL_GRANT.size  # 4
_ZERO_UUID: Final = bytes(16)


@dataclass(frozen=True, slots=True)
class NewPool:
    """NEW_POOL request payload; `uuid` is set iff PoolFlag.SHARED is."""

    flags: PoolFlag
    page_shift: int = MIN_PAGE_SHIFT
    uuid: uuid.UUID | None = None

    def problem(self) -> str | None:
        """What makes these values invalid on the wire, or None."""
        if (problem := _pool_problem(int(self.flags), self.page_shift)) is not None:
            return problem
        if (PoolFlag.SHARED in self.flags) != (self.uuid is not None and self.uuid.int != 0):
            return "a SHARED pool needs a nonzero uuid, a private one none"
        return None

    def encode(self) -> bytes:
        if (problem := self.problem()) is not None:
            raise ValueError(problem)
        uuid_bytes = self.uuid.bytes if self.uuid is not None else _ZERO_UUID
        return _NEW_POOL.pack(int(self.flags), self.page_shift, uuid_bytes)

    @classmethod
    def decode(cls, payload: Buffer) -> NewPool:
        if _nbytes(payload) != NEW_POOL_SIZE:
            raise _framing(f"NEW_POOL payload must be {NEW_POOL_SIZE} bytes")
        flags, page_shift, uuid_bytes = _NEW_POOL.unpack(payload)
        _check_reserved(payload, 5, 8, "NEW_POOL reserved bytes")
        if uuid_bytes == _ZERO_UUID:
            new_pool = cls(PoolFlag(flags), page_shift)
        else:
            new_pool = cls(PoolFlag(flags), page_shift, uuid.UUID(bytes=uuid_bytes))
        if (problem := new_pool.problem()) is not None:
            raise _invalid(problem)
        return new_pool


def _pool_problem(flags: int, page_shift: int) -> str | None:
    if not 0 <= flags <= _KNOWN_POOL_FLAGS or flags & ~_KNOWN_POOL_FLAGS:
        return f"unknown pool flags {flags:#x}"
    if not MIN_PAGE_SHIFT <= page_shift <= MAX_PAGE_SHIFT:
        return f"page shift {page_shift} outside {MIN_PAGE_SHIFT}..{MAX_PAGE_SHIFT}"
    return None


def encode_pool_grant(flags: PoolFlag) -> bytes:
    """NEW_POOL OK reply payload: the pool flags actually granted."""
    if (problem := _pool_problem(int(flags), MIN_PAGE_SHIFT)) is not None:
        raise ValueError(problem)
    return _POOL_GRANT.pack(int(flags))


def decode_pool_grant(payload: Buffer) -> PoolFlag:
    if _nbytes(payload) != POOL_GRANT_SIZE:
        raise _framing(f"NEW_POOL reply payload must be {POOL_GRANT_SIZE} bytes")
    (flags,) = _POOL_GRANT.unpack(payload)
    if (problem := _pool_problem(flags, MIN_PAGE_SHIFT)) is not None:
        raise _invalid(problem)
    return PoolFlag(flags)


# --------------------------------------------------------------------------- batches

# Batch header: u32 count, u8 page_shift (0 when no pages follow), 3 reserved bytes.
_BATCH_HEADER: Final = struct.Struct("<IB3x")
BATCH_HEADER_SIZE: Final = _BATCH_HEADER.size  # 8
_DESCRIPTOR: Final = struct.Struct("<QQQQ")  # oid[0], oid[1], oid[2], index
DESCRIPTOR_SIZE: Final = _DESCRIPTOR.size  # 32


def _pad8(length: int) -> int:
    return (length + 7) & ~7


def _parse_batch_header(payload: Buffer, *, with_pages: bool) -> tuple[int, int]:
    """(count, page_shift) of a batch request; checks its exact length (PROTOCOL_ERROR)."""
    length = _nbytes(payload)
    if length < BATCH_HEADER_SIZE:
        raise _framing("batch payload shorter than its header")
    count, page_shift = _BATCH_HEADER.unpack_from(payload)
    if not 1 <= count <= MAX_BATCH:
        raise _framing(f"batch count {count} outside 1..{MAX_BATCH}")
    page_size = 0
    if with_pages:
        if not MIN_PAGE_SHIFT <= page_shift <= MAX_PAGE_SHIFT:
            raise _framing(f"batch page shift {page_shift} out of range")
        page_size = 1 << page_shift
    elif page_shift:
        raise _framing("key batch with a nonzero page shift")
    expected = BATCH_HEADER_SIZE + count * (DESCRIPTOR_SIZE + page_size)
    if length != expected:
        raise _framing(f"batch of {count} entries must be {expected} bytes, not {length}")
    return count, page_shift


def _check_reserved(payload: Buffer, start: int, end: int, what: str) -> None:
    if any(memoryview(payload).cast("B")[start:end]):
        raise _invalid(f"{what} are not 0")


def _encode_keys(out: bytearray, keys: Sequence[Key]) -> None:
    offset = len(out)
    out.extend(bytes(DESCRIPTOR_SIZE * len(keys)))
    _pack_keys_into(out, offset, keys)


def _pack_keys_into(buffer: bytearray | memoryview, offset: int, keys: Sequence[Key]) -> int:
    """Descriptors at buffer[offset:]; returns the offset after them."""
    pack = _DESCRIPTOR.pack_into
    try:
        for (o0, o1, o2), index in keys:
            pack(buffer, offset, o0, o1, o2, index)
            offset += DESCRIPTOR_SIZE
    except struct.error as error:
        raise ValueError(f"batch key out of range: {error}") from None
    return offset


@functools.lru_cache(maxsize=64)
def _words(count: int) -> struct.Struct:
    """`count` little-endian u64s: one unpack for a whole descriptor block."""
    return struct.Struct(f"<{count}Q")


def _decode_keys(payload: Buffer, count: int) -> list[Key]:
    # One unpack, then C-level zips: no per-descriptor Python loop.
    words = _words(4 * count).unpack_from(payload, BATCH_HEADER_SIZE)
    return list(zip(zip(words[0::4], words[1::4], words[2::4]), words[3::4]))


def _check_count(count: int) -> None:
    if not 1 <= count <= MAX_BATCH:
        raise ValueError(f"a batch holds 1..{MAX_BATCH} entries, not {count}")


def _check_page_shift(page_shift: int) -> None:
    if not MIN_PAGE_SHIFT <= page_shift <= MAX_PAGE_SHIFT:
        raise ValueError(f"page shift {page_shift} out of range")


def _check_pages(head_length: int, pages: Sequence[Buffer], page_shift: int, what: str) -> int:
    """The payload length of `head_length` bytes then the pages; every page must
    be 2^page_shift bytes and the whole within MAX_PAYLOAD."""
    page_size = 1 << page_shift
    for page in pages:
        if _nbytes(page) != page_size:
            raise ValueError(f"page of {_nbytes(page)} bytes in a {what} of {page_size}-byte pages")
    length = head_length + len(pages) * page_size
    if length > MAX_PAYLOAD:
        raise ValueError(f"{what} of {length} bytes exceeds {MAX_PAYLOAD}")
    return length


def _join_pages(head: Buffer, pages: Sequence[Buffer], page_shift: int, what: str) -> bytes:
    """`head` then the pages, in one allocation (growing a buffer page by page
    costs more than tmemd's whole put)."""
    _check_pages(_nbytes(head), pages, page_shift, what)
    return b"".join((head, *pages))


def _check_put_batch(page_shift: int, keys: Sequence[Key], pages: Sequence[Buffer]) -> None:
    _check_count(len(keys))
    if len(pages) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(pages)} pages")
    _check_page_shift(page_shift)


def encode_put_batch(page_shift: int, keys: Sequence[Key], pages: Sequence[Buffer]) -> bytes:
    """PUT_BATCH request payload: header, descriptors, then the pages in key order."""
    _check_put_batch(page_shift, keys, pages)
    head = bytearray(_BATCH_HEADER.pack(len(keys), page_shift))
    _encode_keys(head, keys)
    return _join_pages(head, pages, page_shift, "batch")


def encode_put_batch_into(
    buffer: bytearray | memoryview, offset: int, page_shift: int, keys: Sequence[Key], pages: Sequence[Buffer]
) -> int:
    """encode_put_batch written at buffer[offset:] (a sender's preallocated frame
    buffer: no payload object, one copy of each page); returns the payload length."""
    _check_put_batch(page_shift, keys, pages)
    head_length = BATCH_HEADER_SIZE + len(keys) * DESCRIPTOR_SIZE
    length = _check_pages(head_length, pages, page_shift, "batch")
    if offset + length > len(buffer):
        raise ValueError(f"batch of {length} bytes does not fit the buffer")
    _BATCH_HEADER.pack_into(buffer, offset, len(keys), page_shift)
    position = _pack_keys_into(buffer, offset + BATCH_HEADER_SIZE, keys)
    page_size = 1 << page_shift
    for page in pages:
        buffer[position : position + page_size] = page
        position += page_size
    return length


def put_batch_pages(payload: Buffer) -> tuple[int, memoryview]:
    """(page_shift, the pages as one read-only view) of a PUT_BATCH payload the
    decoder accepted: its pages follow the descriptors back to back."""
    count, page_shift = _parse_batch_header(payload, with_pages=True)
    start = BATCH_HEADER_SIZE + count * DESCRIPTOR_SIZE
    view = memoryview(payload).cast("B").toreadonly()
    return page_shift, view[start : start + (count << page_shift)]


def decode_put_batch(payload: Buffer) -> tuple[int, list[Key], list[memoryview]]:
    """(page_shift, keys, pages) of a PUT_BATCH request payload. The pages are
    read-only views into `payload` (no copies): keep what outlives it as bytes."""
    page_shift, region = put_batch_pages(payload)
    _check_reserved(payload, 5, 8, "batch header reserved bytes")
    page_size = 1 << page_shift
    pages = [region[offset : offset + page_size] for offset in range(0, len(region), page_size)]
    return page_shift, _decode_keys(payload, len(pages)), pages


def encode_key_batch(keys: Sequence[Key]) -> bytes:
    """GET_BATCH / FLUSH_BATCH request payload (index WHOLE_OBJECT: flush the object)."""
    _check_count(len(keys))
    out = bytearray(_BATCH_HEADER.pack(len(keys), 0))
    _encode_keys(out, keys)
    return bytes(out)


def encode_key_batch_into(buffer: bytearray | memoryview, offset: int, keys: Sequence[Key]) -> int:
    """encode_key_batch written at buffer[offset:]; returns the payload length."""
    _check_count(len(keys))
    length = BATCH_HEADER_SIZE + len(keys) * DESCRIPTOR_SIZE
    if offset + length > len(buffer):
        raise ValueError(f"key batch of {length} bytes does not fit the buffer")
    _BATCH_HEADER.pack_into(buffer, offset, len(keys), 0)
    _pack_keys_into(buffer, offset + BATCH_HEADER_SIZE, keys)
    return length


def decode_key_batch(payload: Buffer) -> list[Key]:
    count, _ = _parse_batch_header(payload, with_pages=False)
    _check_reserved(payload, 5, 8, "batch header reserved bytes")
    return _decode_keys(payload, count)


def _parse_batch_reply(payload: Buffer, *, pages: bool) -> tuple[int, int, int]:
    """(count, page_shift, page_count) of a batch reply; checks its exact length."""
    length = _nbytes(payload)
    if length < BATCH_HEADER_SIZE:
        raise _framing("batch reply shorter than its header")
    count, page_shift = _BATCH_HEADER.unpack_from(payload)
    if not 1 <= count <= MAX_BATCH:
        raise _framing(f"batch reply count {count} outside 1..{MAX_BATCH}")
    statuses_end = BATCH_HEADER_SIZE + _pad8(count)
    if length < statuses_end:
        raise _framing("batch reply shorter than its statuses")
    page_count = 0
    if pages:
        if not MIN_PAGE_SHIFT <= page_shift <= MAX_PAGE_SHIFT:
            raise _framing(f"GET_BATCH reply page shift {page_shift} out of range")
        page_count = bytes(memoryview(payload)[BATCH_HEADER_SIZE : BATCH_HEADER_SIZE + count]).count(0)
        expected = statuses_end + (page_count << page_shift)
    else:
        if page_shift:
            raise _framing("batch reply without pages has a nonzero page shift")
        expected = statuses_end
    if length != expected:
        raise _framing(f"batch reply must be {expected} bytes, not {length}")
    return count, page_shift, page_count


def encode_batch_reply(
    statuses: Sequence[Status], pages: Sequence[Buffer] = (), *, page_shift: int = 0
) -> bytes:
    """Batch reply payload. GET_BATCH replies pass page_shift and one page per OK
    status, in order; PUT_BATCH/FLUSH_BATCH replies pass neither."""
    count = len(statuses)
    _check_count(count)
    if page_shift:
        _check_page_shift(page_shift)
    # Status is an IntEnum: bytes() takes its members as they are.
    head = _BATCH_HEADER.pack(count, page_shift) + bytes(statuses) + bytes(_pad8(count) - count)
    if not page_shift:
        if pages:
            raise ValueError("pages in a batch reply need a page_shift")
        return head
    ok_count = head.count(0, BATCH_HEADER_SIZE, BATCH_HEADER_SIZE + count)
    if len(pages) != ok_count:
        raise ValueError(f"{ok_count} OK statuses but {len(pages)} pages")
    return _join_pages(head, pages, page_shift, "batch reply")


def decode_batch_reply(
    payload: Buffer, page_shift: int | None = None
) -> tuple[list[Status], list[bytes]]:
    """(statuses, pages) of a batch reply. For a GET_BATCH reply pass the pool's
    page_shift (the reply must carry the same); pages hold the OK entries' pages."""
    raw_statuses, reply_shift, statuses_end, page_count = _check_batch_reply(payload, page_shift)
    data = bytes(payload)
    page_size = 1 << reply_shift
    pages = [
        data[offset : offset + page_size]
        for offset in range(statuses_end, statuses_end + page_count * page_size, page_size)
    ]
    return list(map(_STATUS_BY_VALUE.__getitem__, raw_statuses)), pages


def decode_batch_reply_into(payload: Buffer, page_shift: int, into: Sequence[memoryview]) -> list[bool]:
    """A GET_BATCH reply's pages copied straight into `into` (one view per key
    asked, in order): no intermediate copies. One hit flag per key."""
    raw_statuses, _, position, _ = _check_batch_reply(payload, page_shift)
    if len(raw_statuses) != len(into):
        raise _invalid(f"GET_BATCH reply for {len(raw_statuses)} keys, {len(into)} asked")
    page_size = 1 << page_shift
    found: list[bool] = []
    with memoryview(payload) as source:
        for status, target in zip(raw_statuses, into):
            if status == Status.OK:
                target[:] = source[position : position + page_size]
                position += page_size
                found.append(True)
            else:
                found.append(False)
    return found


def _check_batch_reply(payload: Buffer, page_shift: int | None) -> tuple[bytes, int, int, int]:
    """(raw statuses, page shift, end of statuses, page count) of a valid batch reply."""
    count, reply_shift, page_count = _parse_batch_reply(payload, pages=page_shift is not None)
    if page_shift is not None and reply_shift != page_shift:
        raise _invalid(f"GET_BATCH reply has page shift {reply_shift}, expected {page_shift}")
    _check_reserved(payload, 5, 8, "batch header reserved bytes")
    statuses_end = BATCH_HEADER_SIZE + _pad8(count)
    _check_reserved(payload, BATCH_HEADER_SIZE + count, statuses_end, "status padding bytes")
    with memoryview(payload) as view:
        raw_statuses = bytes(view[BATCH_HEADER_SIZE : BATCH_HEADER_SIZE + count])
    if not set(raw_statuses) <= _STATUS_VALUES:
        raise _invalid("unknown status in batch reply")
    return raw_statuses, reply_shift, statuses_end, page_count


# --------------------------------------------------------------------------- STATS

_POOL_STATS: Final = struct.Struct("<12Q")
POOL_STATS_SIZE: Final = _POOL_STATS.size  # 96


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One pool's record in a STATS reply (all counters since the pool was created)."""

    pool_id: int
    flags: PoolFlag
    page_shift: int
    pages: int  # pages stored now
    raw_bytes: int  # their uncompressed size
    stored_bytes: int  # what they cost the host after compression
    puts: int
    gets: int
    hits: int
    flushes: int
    refusals: int
    evictions: int

    def problem(self) -> str | None:
        """What makes these values invalid on the wire, or None (counters: u64)."""
        if not 0 <= self.pool_id < ALL_POOLS:
            return f"pool id {self.pool_id} out of range"
        return _pool_problem(int(self.flags), self.page_shift)

    def encode(self) -> bytes:
        if (problem := self.problem()) is not None:
            raise ValueError(problem)
        try:
            return _POOL_STATS.pack(
                self.pool_id, int(self.flags), self.page_shift, self.pages, self.raw_bytes,
                self.stored_bytes, self.puts, self.gets, self.hits, self.flushes,
                self.refusals, self.evictions,
            )
        except struct.error as error:
            raise ValueError(f"pool stats counter out of range: {error}") from None

    @classmethod
    def decode(cls, record: Buffer) -> PoolStats:
        if _nbytes(record) != POOL_STATS_SIZE:
            raise _framing(f"a pool stats record is {POOL_STATS_SIZE} bytes")
        pool_id, flags, page_shift, *counters = _POOL_STATS.unpack(record)
        stats = cls(pool_id, PoolFlag(flags), page_shift, *counters)
        if (problem := stats.problem()) is not None:
            raise _invalid(problem)
        return stats


def encode_pool_stats(records: Iterable[PoolStats]) -> bytes:
    """STATS OK reply payload: the records back to back (none: empty payload)."""
    return b"".join(record.encode() for record in records)


def decode_pool_stats(payload: Buffer) -> list[PoolStats]:
    view = memoryview(payload).cast("B")
    if len(view) % POOL_STATS_SIZE:
        raise _framing(f"STATS reply of {len(view)} bytes is not whole records")
    return [
        PoolStats.decode(view[offset : offset + POOL_STATS_SIZE])
        for offset in range(0, len(view), POOL_STATS_SIZE)
    ]


# Indexed by opcode; entry 0 is a placeholder (opcode 0 is not valid).
_REQUEST_SHAPES: Final[tuple[int, ...]] = (
    0, HELLO_SIZE, NEW_POOL_SIZE, 0, _PAGE, 0, 0, 0, _PAGE_BATCH, _KEY_BATCH, _KEY_BATCH, 0,
)
_REPLY_SHAPES: Final[tuple[int, ...]] = (
    0, HELLO_SIZE, POOL_GRANT_SIZE, 0, 0, _PAGE, 0, 0, _REPLY_BATCH, _REPLY_PAGE_BATCH,
    _REPLY_BATCH, _RECORDS,
)
assert len(_REQUEST_SHAPES) == len(_REPLY_SHAPES) == max(Op) + 1
