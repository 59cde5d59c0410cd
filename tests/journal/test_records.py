"""The C record builder (tmem_host.journal._records) makes the journal codec's
bytes, record for record: checked against codec.put_record / codec.encode and
decoded back with the codec's own decoder. Its crc32 (ISA-L's, which the codec
and save files use too) is zlib's CRC-32, checked against zlib itself."""

from __future__ import annotations

import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmem_host.journal import codec
from tmem_host.journal._records import batch_records, crc32, flush_records, object_records
from tmem_host.journal.journaled import _special_record
from tmem_host.store.store import DedupBlob
from tmem_host.store.tier import RemotePage
from tmem_wire.abi import WHOLE_OBJECT, Oid, Status

U64 = st.integers(0, 2**64 - 1)
OIDS = st.tuples(U64, U64, U64)
STORED = st.one_of(U64, st.binary(max_size=4096))  # a fill word or data bytes
REFUSALS = [Status.REFUSED, Status.FROZEN]


@given(st.binary(max_size=300_000), st.integers(0, 2**32 - 1), st.integers(0, 64))
def test_crc32_is_zlibs(data: bytes, value: int, offset: int) -> None:
    """The journal's records and save files written before ISA-L (zlib's crc32)
    must still check, and a record the other way round: the same CRC, whole,
    continued from any value, and over a memoryview that starts anywhere."""
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, value) == zlib.crc32(data, value)
    view = memoryview(data)[min(offset, len(data)):]
    assert crc32(view, value) == zlib.crc32(view, value)
    head, tail = data[:offset], data[offset:]
    assert crc32(tail, crc32(head)) == zlib.crc32(data)


def reference(pool_id: int, keys: list[tuple[Oid, int]], statuses: list[Status],
              objects: dict[Oid, dict[int, Any]]) -> tuple[bytes, int]:
    """What JournaledStore.put_many wrote before the C builder: one codec call per page."""
    pieces: list[bytes] = []
    for (oid, index), status in zip(keys, statuses):
        if status == Status.OK:
            value = objects[oid][index]
            stored = value.stored if isinstance(value, DedupBlob) else value
            pieces.append(b"".join(codec.put_record(pool_id, oid, index, stored)))
        elif status != Status.INVALID:
            pieces.append(codec.encode(codec.FlushPageRecord(pool_id, oid, index)))
    return b"".join(pieces), len(pieces)


def build(pool_id: int, keys: list[tuple[Oid, int]], statuses: list[Status],
          objects: dict[Oid, dict[int, Any]]) -> tuple[bytes, int]:
    return batch_records(pool_id, keys, statuses, objects, Status.OK, Status.INVALID,
                         _special_record(pool_id))


def decoded(blob: bytes) -> list[codec.Record]:
    decoder = codec.JournalDecoder()
    decoder.feed(blob)
    records: list[codec.Record] = []
    while not isinstance(record := decoder.next_record(), codec.NeedData):
        records.append(record)
    assert decoder.pending == 0
    return records


@settings(max_examples=200, deadline=None)
@given(pool_id=st.integers(0, 255),
       pages=st.lists(st.tuples(OIDS, U64, STORED,
                                st.sampled_from([Status.OK, Status.OK, Status.INVALID, *REFUSALS])),
                      max_size=40))
def test_a_batch_makes_the_codecs_records(pool_id: int, pages: list[tuple[Oid, int, Any, Status]]) -> None:
    objects: dict[Oid, dict[int, Any]] = {}
    for oid, index, stored, status in pages:
        if status == Status.OK:  # the store holds the last page put under a key
            objects.setdefault(oid, {})[index] = stored
    keys = [(oid, index) for oid, index, _, _ in pages]
    statuses = [status for _, _, _, status in pages]
    blob, records = build(pool_id, keys, statuses, objects)
    assert (blob, records) == reference(pool_id, keys, statuses, objects)
    assert len(decoded(blob)) == records


def test_dedup_blobs_and_remote_pages_go_through_the_codec() -> None:
    oid = (1, 2, 3)
    objects: dict[Oid, dict[int, Any]] = {oid: {
        0: DedupBlob(b"d" * 16, b"shared lz4 block"), 1: DedupBlob(b"e" * 16, 0xABCD),
        2: RemotePage(version=77, nbytes=1234), 3: b"own page", 4: 5}}
    keys = [(oid, index) for index in range(5)] + [(oid, 9)]
    statuses = [Status.OK] * 5 + [Status.REFUSED]
    blob, records = build(4, keys, statuses, objects)
    assert (blob, records) == reference(4, keys, statuses, objects)
    assert decoded(blob) == [
        codec.PutRecord(4, oid, 0, b"shared lz4 block"), codec.PutRecord(4, oid, 1, 0xABCD),
        codec.RemoteRecord(4, oid, 2, 77, 1234), codec.PutRecord(4, oid, 3, b"own page"),
        codec.PutRecord(4, oid, 4, 5), codec.FlushPageRecord(4, oid, 9)]


def test_an_object_makes_one_put_per_page() -> None:
    oid = (7, 0, 2**64 - 1)
    pages: dict[int, Any] = {index: (bytes([index]) * 100 if index % 3 else index) for index in range(50)}
    pages[60] = RemotePage(version=3, nbytes=99)
    expected = b"".join(b"".join(codec.put_record(5, oid, index, value)) for index, value in pages.items())
    assert object_records(5, oid, pages, _special_record(5), 0, 1000) == (expected, len(pages), None)
    for limit in (1, 7, 51):  # in pieces of at most `limit` records, resumed where the last stopped
        blobs: list[bytes] = []
        position: int | None = 0
        while position is not None:
            blob, records, position = object_records(5, oid, pages, _special_record(5), position, limit)
            assert 0 < records <= limit
            blobs.append(blob)
        assert b"".join(blobs) == expected and len(blobs) == -(-len(pages) // limit)
    assert object_records(5, oid, {}, _special_record(5), 0, 10) == (b"", 0, None)
    with pytest.raises(ValueError):
        object_records(5, oid, pages, _special_record(5), 0, 0)


@settings(max_examples=200, deadline=None)
@given(pool_id=st.integers(0, 255),
       keys=st.lists(st.tuples(OIDS, st.one_of(U64, st.just(WHOLE_OBJECT))), max_size=40))
def test_flushes_make_the_codecs_records(pool_id: int, keys: list[tuple[Oid, int]]) -> None:
    # What JournaledStore.flush_many wrote before: one codec call per key.
    expected = b"".join(codec.encode(codec.FlushObjectRecord(pool_id, oid) if index == WHOLE_OBJECT
                                     else codec.FlushPageRecord(pool_id, oid, index))
                        for oid, index in keys)
    assert flush_records(pool_id, keys) == (expected, len(keys))
    assert [type(record) for record in decoded(expected)] == [
        codec.FlushObjectRecord if index == WHOLE_OBJECT else codec.FlushPageRecord for _, index in keys]


@pytest.mark.parametrize(("keys", "error"), [
    ([((1, 2), 0)], TypeError),  # not a 3-part oid
    ([((1, 2, 3),)], TypeError),  # not an (oid, index) pair
    ([((1, 2, 3), -1)], OverflowError),
    ([((1, 2, 3), 2**64)], OverflowError),
    (None, TypeError),
])
def test_what_is_not_a_flush_is_an_error(keys: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        flush_records(0, keys)
    with pytest.raises(ValueError):
        flush_records(-1, [])


@pytest.mark.parametrize(("keys", "statuses", "objects", "error"), [
    ([((1, 2, 3), 0)], [Status.OK], {}, KeyError),  # put OK but not in the pool
    ([((1, 2), 0)], [Status.REFUSED], {}, TypeError),  # not a 3-part oid
    ([((1, 2, -1), 0)], [Status.REFUSED], {}, OverflowError),
    ([((1, 2, 3), 0)], [], {}, ValueError),  # lengths differ
])
def test_what_is_not_a_batch_is_an_error(keys: Any, statuses: Any, objects: Any,
                                         error: type[Exception]) -> None:
    with pytest.raises(error):
        build(0, keys, statuses, objects)
    with pytest.raises(ValueError):
        batch_records(256, [], [], {}, Status.OK, Status.INVALID, _special_record(0))
