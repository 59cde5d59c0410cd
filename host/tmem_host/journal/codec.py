"""The journal's record codec: sans-IO, bytes in, records out (docs/RELIABILITY.md).

A journal is a sequence of records, each

    crc32 u32 | magic u16 | type u8 | reserved u8 | body length u32 | body

little-endian, where the crc32 covers everything after it (the rest of the
header and the body), so a record a crash cut short (a torn tail) or a flipped
bit is detected. The crc comes first so that what it covers is one run: a PUT's
header and key are packed in one call and the page follows. Bodies:

    NEW_POOL      pool u8, page shift u8, label length u8, label (ASCII)
    PUT           pool u8, oid 3 x u64, index u64, tag u8, stored page
    FLUSH_PAGE    pool u8, oid 3 x u64, index u64
    FLUSH_OBJECT  pool u8, oid 3 x u64
    FLUSH_POOL    pool u8
    DESTROY_POOL  pool u8
    LOST          pool u8, oid 3 x u64, index u64
    REMOTE        pool u8, oid 3 x u64, index u64, version u64, remote bytes u32

LOST says tmemd dropped a page its guest did not flush (an admin flush): the
NBD export must fail reads of that slot until it is written again. Compaction
keeps LOST records of keys not written since. REMOTE says the page's data is in
the remote tier under that version (docs/REMOTE.md): the journal keeps where a
page is, never a copy of it, so a restarted tmemd reads it back from the tier.

A stored page is the store's own form (tmem_host.store.pagecodec): tag FILL and
the 8-byte fill word, or tag DATA and the lz4 block or raw page bytes, so a
replay never recompresses. Only persistent pools are journaled, so NEW_POOL
has no flags: every journaled pool is persistent and private.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

# The wire codecs' need-more-bytes sentinel, re-exported: one for every decoder.
from tmem_wire.abi import NEED_DATA as NEED_DATA
from tmem_wire.abi import Buffer, Oid, TmemWireError
from tmem_wire.abi import NeedData as NeedData

from tmem_host.journal._records import crc32
from tmem_host.store.tier import RemotePage

MAGIC: Final = 0x4A54  # "TJ" little-endian
HEADER = struct.Struct("<IHBBI")
HEADER_SIZE: Final = HEADER.size
_CRC_SIZE: Final = 4
# Far above any record tmemd writes (a 2 MiB page plus its key): a length beyond
# it is corruption, not a record to wait for.
MAX_BODY: Final = (2 << 20) + 64
MAX_LABEL: Final = 255

_POOL = struct.Struct("<B")
_NEW_POOL = struct.Struct("<BBB")
_KEY = struct.Struct("<BQQQQ")
_OBJECT = struct.Struct("<BQQQ")
_PUT = struct.Struct("<BQQQQB")
_WORD = struct.Struct("<Q")
_REMOTE = struct.Struct("<BQQQQQI")


class RecordType(IntEnum):
    NEW_POOL = 1
    PUT = 2
    FLUSH_PAGE = 3
    FLUSH_OBJECT = 4
    FLUSH_POOL = 5
    DESTROY_POOL = 6
    LOST = 7
    REMOTE = 8


class PageTag(IntEnum):
    FILL = 0  # the page is one 8-byte word repeated: the word
    DATA = 1  # an lz4 block (shorter than the page) or the raw page


class JournalError(TmemWireError, ValueError):
    """Bytes that are not a valid record (bad magic, crc, type or length)."""


@dataclass(frozen=True, slots=True)
class NewPoolRecord:
    pool_id: int
    page_shift: int
    label: str = ""


@dataclass(frozen=True, slots=True)
class PutRecord:
    pool_id: int
    oid: Oid
    index: int
    stored: int | bytes  # the store's stored form: fill word or data bytes


@dataclass(frozen=True, slots=True)
class FlushPageRecord:
    pool_id: int
    oid: Oid
    index: int


@dataclass(frozen=True, slots=True)
class FlushObjectRecord:
    pool_id: int
    oid: Oid


@dataclass(frozen=True, slots=True)
class FlushPoolRecord:
    pool_id: int


@dataclass(frozen=True, slots=True)
class DestroyPoolRecord:
    pool_id: int


@dataclass(frozen=True, slots=True)
class LostRecord:
    pool_id: int
    oid: Oid
    index: int


@dataclass(frozen=True, slots=True)
class RemoteRecord:
    pool_id: int
    oid: Oid
    index: int
    version: int
    nbytes: int


Record = (RemoteRecord | NewPoolRecord | PutRecord | FlushPageRecord | FlushObjectRecord | FlushPoolRecord
          | DestroyPoolRecord | LostRecord)


# -- encoding ------------------------------------------------------------------

# The header after its crc.
_HEADER_REST = struct.Struct("<HBBI")
# A PUT's header after its crc, then its key and tag: one pack per page.
_PUT_HEAD = struct.Struct("<HBBI" + _PUT.format.lstrip("<"))


def _frame(record_type: RecordType, *body: Buffer) -> list[Buffer]:
    length = sum(len(part) for part in body)
    rest = _HEADER_REST.pack(MAGIC, record_type, 0, length)
    crc = crc32(rest)
    for part in body:
        crc = crc32(part, crc)
    return [crc.to_bytes(_CRC_SIZE, "little"), rest, *body]


def put_record(pool_id: int, oid: Oid, index: int, stored: int | bytes | RemotePage) -> list[Buffer]:
    """The pieces of one PUT record (the hot path: no join, the caller writes them);
    for a page in the remote tier, its REMOTE record."""
    if type(stored) is RemotePage:
        return _frame(RecordType.REMOTE, _REMOTE.pack(pool_id, *oid, index, stored.version,
                                                      stored.nbytes))
    if type(stored) is int:
        data: bytes = _WORD.pack(stored)
        tag = PageTag.FILL
    else:
        assert isinstance(stored, bytes)
        data = stored
        tag = PageTag.DATA
    head = _PUT_HEAD.pack(MAGIC, RecordType.PUT, 0, _PUT.size + len(data),
                          pool_id, oid[0], oid[1], oid[2], index, tag)
    return [crc32(data, crc32(head)).to_bytes(_CRC_SIZE, "little"), head, data]


#: Bytes a PUT record adds to its stored page's data bytes.
PUT_RECORD_OVERHEAD: Final = HEADER_SIZE + _PUT.size


def encode(record: Record) -> bytes:
    """One record as bytes."""
    if isinstance(record, PutRecord):
        return b"".join(put_record(record.pool_id, record.oid, record.index, record.stored))
    if isinstance(record, RemoteRecord):
        pieces = _frame(RecordType.REMOTE, _REMOTE.pack(record.pool_id, *record.oid, record.index,
                                                        record.version, record.nbytes))
    elif isinstance(record, NewPoolRecord):
        label = record.label.encode("ascii")
        if len(label) > MAX_LABEL:
            raise ValueError(f"pool label longer than {MAX_LABEL} bytes")
        pieces = _frame(RecordType.NEW_POOL,
                        _NEW_POOL.pack(record.pool_id, record.page_shift, len(label)), label)
    elif isinstance(record, (FlushPageRecord, LostRecord)):
        kind = RecordType.FLUSH_PAGE if isinstance(record, FlushPageRecord) else RecordType.LOST
        pieces = _frame(kind, _KEY.pack(record.pool_id, *record.oid, record.index))
    elif isinstance(record, FlushObjectRecord):
        pieces = _frame(RecordType.FLUSH_OBJECT, _OBJECT.pack(record.pool_id, *record.oid))
    elif isinstance(record, FlushPoolRecord):
        pieces = _frame(RecordType.FLUSH_POOL, _POOL.pack(record.pool_id))
    else:
        pieces = _frame(RecordType.DESTROY_POOL, _POOL.pack(record.pool_id))
    return b"".join(pieces)


# -- decoding ------------------------------------------------------------------


class JournalDecoder:
    """Feed journal bytes, take records: ``feed(data)``, ``next_record()`` until
    NEED_DATA. ``consumed`` counts the bytes of the records returned so far:
    where a torn or corrupt tail starts. Anything invalid raises JournalError."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offset = 0
        self.consumed = 0

    @property
    def pending(self) -> int:
        """Bytes fed but not yet part of a returned record (a torn tail at EOF)."""
        return len(self._buffer) - self._offset

    def feed(self, data: Buffer) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_record(self) -> Record | NeedData:
        buffer = self._buffer
        start = self._offset
        if len(buffer) - start < HEADER_SIZE:
            return NEED_DATA
        crc, magic, record_type, _reserved, length = HEADER.unpack_from(buffer, start)
        if magic != MAGIC:
            raise JournalError(f"bad record magic {magic:#06x} at byte {self.consumed}")
        if length > MAX_BODY:
            raise JournalError(f"record of {length} bytes at byte {self.consumed}")
        end = start + HEADER_SIZE + length
        if len(buffer) < end:
            return NEED_DATA
        view = memoryview(buffer)
        try:
            actual = crc32(view[start + _CRC_SIZE : end])
            if actual != crc:
                raise JournalError(f"bad record crc at byte {self.consumed}")
            record = _decode_body(record_type, bytes(view[start + HEADER_SIZE : end]))
        finally:
            view.release()
        self._offset = end
        self.consumed += end - start
        return record


def _decode_body(record_type: int, body: bytes) -> Record:
    try:
        kind = RecordType(record_type)
    except ValueError:
        raise JournalError(f"unknown record type {record_type}") from None
    try:
        if kind is RecordType.PUT:
            pool_id, oid0, oid1, oid2, index, tag = _PUT.unpack_from(body)
            data = body[_PUT.size :]
            if tag == PageTag.FILL:
                if len(data) != _WORD.size:
                    raise JournalError("fill-word PUT record of the wrong length")
                stored: int | bytes = _WORD.unpack(data)[0]
            elif tag == PageTag.DATA:
                stored = data
            else:
                raise JournalError(f"unknown page tag {tag}")
            return PutRecord(pool_id, (oid0, oid1, oid2), index, stored)
        if kind is RecordType.NEW_POOL:
            pool_id, page_shift, label_length = _NEW_POOL.unpack_from(body)
            label = body[_NEW_POOL.size :]
            if len(label) != label_length:
                raise JournalError("NEW_POOL label length disagrees with the record")
            return NewPoolRecord(pool_id, page_shift, label.decode("ascii"))
        if kind is RecordType.FLUSH_PAGE or kind is RecordType.LOST:
            _exact(body, _KEY)
            pool_id, oid0, oid1, oid2, index = _KEY.unpack(body)
            key_record = FlushPageRecord if kind is RecordType.FLUSH_PAGE else LostRecord
            return key_record(pool_id, (oid0, oid1, oid2), index)
        if kind is RecordType.REMOTE:
            _exact(body, _REMOTE)
            pool_id, oid0, oid1, oid2, index, version, nbytes = _REMOTE.unpack(body)
            return RemoteRecord(pool_id, (oid0, oid1, oid2), index, version, nbytes)
        if kind is RecordType.FLUSH_OBJECT:
            _exact(body, _OBJECT)
            pool_id, oid0, oid1, oid2 = _OBJECT.unpack(body)
            return FlushObjectRecord(pool_id, (oid0, oid1, oid2))
        _exact(body, _POOL)
        (pool_id,) = _POOL.unpack(body)
        return FlushPoolRecord(pool_id) if kind is RecordType.FLUSH_POOL else DestroyPoolRecord(pool_id)
    except (struct.error, UnicodeDecodeError) as exc:
        raise JournalError(f"malformed {kind.name} record: {exc}") from None


def _exact(body: bytes, layout: struct.Struct) -> None:
    if len(body) != layout.size:
        raise JournalError(f"record body of {len(body)} bytes, expected {layout.size}")
