"""The journal record codec: every record round-trips however the bytes arrive; a
torn tail is NEED_DATA (pending bytes), a flipped bit or a bad header a JournalError."""

from __future__ import annotations

import struct
import zlib

import pytest

from tmem_host.journal import codec
from tmem_host.journal.codec import (
    NEED_DATA, DestroyPoolRecord, FlushObjectRecord, FlushPageRecord, FlushPoolRecord,
    JournalDecoder, JournalError, LostRecord, NewPoolRecord, PutRecord, Record,
)

OID = (0x0102030405060708, 0, 0xFFFFFFFFFFFFFFFF)
RECORDS: list[Record] = [
    NewPoolRecord(0, 12, "nbd"),
    NewPoolRecord(15, 21),
    PutRecord(0, OID, 7, b"\x01" * 4096),  # a raw page
    PutRecord(3, (1, 2, 3), 2**64 - 1, b"lz4 block bytes"),
    PutRecord(0, OID, 8, 0x0123456789ABCDEF),  # a same-filled page: its word
    PutRecord(0, OID, 9, 0),
    FlushPageRecord(0, OID, 7),
    FlushObjectRecord(3, (1, 2, 3)),
    FlushPoolRecord(0),
    DestroyPoolRecord(15),
    LostRecord(2, OID, 12),
]
STREAM = b"".join(codec.encode(record) for record in RECORDS)


def decode(data: bytes, chunk_sizes: list[int] | None = None) -> tuple[list[Record], JournalDecoder]:
    decoder = JournalDecoder()
    records: list[Record] = []
    position = 0
    for size in chunk_sizes or [len(data)]:
        decoder.feed(data[position : position + size])
        position += size
        while (record := decoder.next_record()) is not NEED_DATA:
            assert not isinstance(record, codec.NeedData)
            records.append(record)
    return records, decoder


def test_whole_stream_round_trips() -> None:
    records, decoder = decode(STREAM)
    assert records == RECORDS
    assert decoder.consumed == len(STREAM) and decoder.pending == 0


def test_byte_at_a_time_gives_the_same_records() -> None:
    records, decoder = decode(STREAM, [1] * len(STREAM))
    assert records == RECORDS and decoder.consumed == len(STREAM)


@pytest.mark.parametrize("split", [1, 11, 12, 13, 100, 4100])
def test_split_anywhere_gives_the_same_records(split: int) -> None:
    records, _ = decode(STREAM, [split, len(STREAM) - split])
    assert records == RECORDS


def test_the_header_is_as_documented() -> None:
    data = codec.encode(FlushPoolRecord(5))
    crc, magic, kind, reserved, length = struct.unpack_from("<IHBBI", data)
    assert (magic, kind, reserved, length) == (0x4A54, 5, 0, 1) and data[12:] == b"\x05"
    assert crc == zlib.crc32(data[4:])


def test_put_record_pieces_are_the_encoding() -> None:
    pieces = codec.put_record(0, OID, 7, b"page")
    assert b"".join(pieces) == codec.encode(PutRecord(0, OID, 7, b"page"))


@pytest.mark.parametrize("cut", [1, 5, 12, 20, 50])
def test_a_torn_tail_is_pending_not_a_record(cut: int) -> None:
    whole = codec.encode(RECORDS[0]) + codec.encode(RECORDS[2])
    records, decoder = decode(whole[:-cut])
    assert records == [RECORDS[0]]
    assert decoder.consumed == len(codec.encode(RECORDS[0]))
    assert decoder.pending == len(whole) - cut - decoder.consumed


@pytest.mark.parametrize("position", [0, 2, 4, 6, 8, 9, 12, 40, 100])
def test_a_flipped_bit_never_yields_a_record(position: int) -> None:
    damaged = bytearray(codec.encode(RECORDS[2]))
    damaged[position] ^= 0x10
    try:
        records, decoder = decode(bytes(damaged))
    except JournalError:
        return
    # A longer length field makes the record look torn: pending, cut off on replay.
    assert records == [] and decoder.consumed == 0 and decoder.pending == len(damaged)
    assert position in (8, 9)


def test_records_before_the_damage_are_returned_and_counted() -> None:
    first = codec.encode(RECORDS[1])
    damaged = bytearray(codec.encode(RECORDS[2]))
    damaged[-1] ^= 1
    decoder = JournalDecoder()
    decoder.feed(first + bytes(damaged))
    assert decoder.next_record() == RECORDS[1]
    with pytest.raises(JournalError, match="crc"):
        decoder.next_record()
    assert decoder.consumed == len(first)


def _with_body(kind: int, body: bytes) -> bytes:
    rest = struct.pack("<HBBI", codec.MAGIC, kind, 0, len(body)) + body
    return struct.pack("<I", zlib.crc32(rest)) + rest


@pytest.mark.parametrize("data, message", [
    (_with_body(99, b"\x00"), "unknown record type"),
    (_with_body(codec.RecordType.FLUSH_POOL, b"\x00\x00"), "expected 1"),
    (_with_body(codec.RecordType.PUT, struct.pack("<BQQQQB", 0, 1, 2, 3, 4, 0) + b"\x00" * 7),
     "fill-word"),
    (_with_body(codec.RecordType.PUT, struct.pack("<BQQQQB", 0, 1, 2, 3, 4, 9)), "page tag"),
    (_with_body(codec.RecordType.NEW_POOL, b"\x00\x0c\x05ab"), "label length"),
    (_with_body(codec.RecordType.PUT, b"\x00"), "malformed PUT"),
    (struct.pack("<IHBBI", 0, codec.MAGIC, 2, 0, codec.MAX_BODY + 1), "record of"),
])
def test_well_checksummed_but_invalid_records_are_errors(data: bytes, message: str) -> None:
    with pytest.raises(JournalError, match=message):
        decode(data)
