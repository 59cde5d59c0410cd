"""tmem_wire.abi payload codecs: HELLO and its negotiation, NEW_POOL, batches, STATS.
Wrong sizes are PROTOCOL_ERROR, wrong values INVALID, unencodable arguments ValueError."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable

import pytest

from tmem_wire import abi
from tmem_wire.abi import Feature, Hello, NewPool, PoolFlag, PoolStats, ProtocolError, Status

PAGE = bytes(range(256)) * 16
KEYS = [((1, 2, 3), 0), ((2**64 - 1, 0, 7), 2**63), ((0, 0, 0), abi.WHOLE_OBJECT)]
HELLO_LAYOUT = struct.Struct("<HHIIIIIQ")


def raises_status(status: Status, call: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call()
    assert caught.value.status == status, caught.value
    return caught.value


# --------------------------------------------------------------------------- HELLO


def test_hello_layout_and_round_trip() -> None:
    hello = Hello(1, 3, Feature.BATCH | Feature.STATS, 256, abi.page_size_mask(12, 21), 8, 65600)
    encoded = hello.encode()
    assert encoded == HELLO_LAYOUT.pack(1, 3, 5, 256, (1 << 12) | (1 << 21), 8, 65600, 0)
    assert Hello.decode(encoded) == hello


def test_hello_keeps_unknown_feature_bits_for_negotiation() -> None:
    offered = HELLO_LAYOUT.pack(1, 2, 0x80000007, 16, 1 << 12, 4, 8192, 0)
    client = Hello.decode(offered)
    assert int(client.features) == 0x80000007
    agreed = abi.negotiate(client, Hello())
    assert agreed == Hello(1, 1, Feature.BATCH | Feature.ASYNC | Feature.STATS, 16, 1 << 12, 4,
                           8192)


@pytest.mark.parametrize(("fields", "status"), [
    ((1, 1, 0, 0, 1 << 12, 1, 8192, 1), Status.INVALID),  # reserved set
    ((0, 1, 0, 0, 1 << 12, 1, 8192, 0), Status.INVALID),  # version 0
    ((2, 1, 0, 0, 1 << 12, 1, 8192, 0), Status.INVALID),  # min > max
    ((1, 1, 0, 1025, 1 << 12, 1, 8192, 0), Status.INVALID),  # batch too large
    ((1, 1, 0, 0, 0, 1, 8192, 0), Status.INVALID),  # no page size
    ((1, 1, 0, 0, 1 << 11, 1, 8192, 0), Status.INVALID),  # 2 KiB pages
    ((1, 1, 0, 0, 1 << 22, 1, 8192, 0), Status.INVALID),  # 4 MiB pages
    ((1, 1, 0, 0, 1 << 12, 0, 8192, 0), Status.INVALID),  # no request in flight
    ((1, 1, 0, 0, 1 << 12, 1, 4159, 0), Status.INVALID),  # frame smaller than a page
    ((1, 1, 0, 0, 1 << 12, 1, abi.HEADER_SIZE + abi.MAX_PAYLOAD + 1, 0), Status.INVALID),
])
def test_hello_rejects_bad_values(fields: tuple[int, ...], status: Status) -> None:
    raises_status(status, lambda: Hello.decode(HELLO_LAYOUT.pack(*fields)))


@pytest.mark.parametrize("length", [0, 31, 33])
def test_hello_rejects_wrong_size(length: int) -> None:
    raises_status(Status.PROTOCOL_ERROR, lambda: Hello.decode(Hello().encode().ljust(33)[:length]))


def test_negotiate_takes_the_intersection() -> None:
    client = Hello(1, 4, Feature.BATCH | Feature.ASYNC, 512, abi.page_size_mask(12, 13, 21), 128,
                   1 << 20)
    server = Hello(1, 1, Feature.BATCH | Feature.ASYNC | Feature.STATS, 1024,
                   abi.page_size_mask(12, 21), 32, abi.HEADER_SIZE + abi.MAX_PAYLOAD)
    # 13 is the client's only, 21 does not fit the client's 1 MiB frames.
    assert abi.negotiate(client, server) == Hello(
        1, 1, Feature.BATCH | Feature.ASYNC, 512, abi.page_size_mask(12), 32, 1 << 20)


def test_negotiate_without_batch_or_async() -> None:
    no_batch = abi.negotiate(Hello(features=Feature.ASYNC | Feature.BATCH, max_batch_pages=0),
                             Hello())
    assert no_batch.features == Feature.ASYNC and no_batch.max_batch_pages == 0
    serial = abi.negotiate(Hello(features=Feature.BATCH, max_in_flight=50), Hello())
    assert serial.max_in_flight == 1 and serial.max_batch_pages == abi.MAX_BATCH


def test_negotiate_failures_are_invalid() -> None:
    raises_status(Status.INVALID, lambda: abi.negotiate(Hello(2, 3), Hello(1, 1)))
    raises_status(Status.INVALID, lambda: abi.negotiate(
        Hello(page_sizes=abi.page_size_mask(13)), Hello(page_sizes=abi.page_size_mask(12))))
    # 2 MiB pages cannot travel in 1 MiB frames.
    raises_status(Status.INVALID, lambda: abi.negotiate(
        Hello(page_sizes=abi.page_size_mask(21)), Hello(max_frame=1 << 20)))


def test_negotiate_drops_page_sizes_that_do_not_fit_a_frame() -> None:
    agreed = abi.negotiate(Hello(max_frame=abi.HEADER_SIZE + 8192), Hello())
    assert agreed.page_sizes == abi.page_size_mask(12, 13)


def test_page_size_mask_rejects_bad_shifts() -> None:
    assert abi.page_size_mask() == 0
    with pytest.raises(ValueError):
        abi.page_size_mask(22)


def test_max_batch_pages_fits_max_payload() -> None:
    for shift in range(abi.MIN_PAGE_SHIFT, abi.MAX_PAGE_SHIFT + 1):
        count = abi.max_batch_pages(shift)
        assert 1 <= count <= abi.MAX_BATCH
        keys = [((0, 0, 0), index) for index in range(count + 1)]
        pages = [bytes(1 << shift)] * (count + 1)
        assert len(abi.encode_put_batch(shift, keys[:count], pages[:count])) <= abi.MAX_PAYLOAD
        if count < abi.MAX_BATCH:
            with pytest.raises(ValueError):
                abi.encode_put_batch(shift, keys, pages)
    assert abi.max_batch_pages(12) == 1017
    assert abi.max_batch_pages(12, max_frame=abi.HEADER_SIZE + 8 + 10 * 4128) == 10


# --------------------------------------------------------------------------- NEW_POOL


def test_new_pool_layout_and_round_trip() -> None:
    shared = NewPool(PoolFlag.SHARED | PoolFlag.INCLUSIVE_GETS, 21, uuid.UUID(int=0xABC))
    encoded = shared.encode()
    assert encoded == struct.pack("<IB3x16s", 6, 21, uuid.UUID(int=0xABC).bytes)
    assert NewPool.decode(encoded) == shared
    private = NewPool(PoolFlag.PERSISTENT)
    assert NewPool.decode(private.encode()) == private
    assert private.page_shift == 12 and private.uuid is None


@pytest.mark.parametrize("payload", [
    struct.pack("<IB3x16s", 8, 12, bytes(16)),  # unknown flag
    struct.pack("<IB3x16s", 0, 11, bytes(16)),  # page shift low
    struct.pack("<IB3x16s", 0, 22, bytes(16)),  # page shift high
    struct.pack("<IB3x16s", 2, 12, bytes(16)),  # SHARED without uuid
    struct.pack("<IB3x16s", 0, 12, b"\1" * 16),  # uuid without SHARED
    struct.pack("<IBBxx16s", 0, 12, 1, bytes(16)),  # reserved byte
])
def test_new_pool_rejects_bad_values(payload: bytes) -> None:
    raises_status(Status.INVALID, lambda: NewPool.decode(payload))


def test_new_pool_size_and_encoding_errors() -> None:
    raises_status(Status.PROTOCOL_ERROR, lambda: NewPool.decode(bytes(23)))
    for bad in (NewPool(PoolFlag.SHARED), NewPool(PoolFlag(0), 12, uuid.UUID(int=1)),
                NewPool(PoolFlag(0), 22), NewPool(PoolFlag(16))):
        with pytest.raises(ValueError):
            bad.encode()


def test_pool_grant() -> None:
    granted = PoolFlag.PERSISTENT | PoolFlag.INCLUSIVE_GETS
    assert abi.encode_pool_grant(granted) == b"\5\0\0\0"
    assert abi.decode_pool_grant(abi.encode_pool_grant(granted)) == granted
    raises_status(Status.INVALID, lambda: abi.decode_pool_grant(b"\x10\0\0\0"))
    raises_status(Status.PROTOCOL_ERROR, lambda: abi.decode_pool_grant(b"\0" * 8))


# --------------------------------------------------------------------------- batches


def test_put_batch_layout_and_round_trip() -> None:
    pages = [PAGE, PAGE[::-1], bytes(4096)]
    encoded = abi.encode_put_batch(12, KEYS, pages)
    assert encoded[:8] == struct.pack("<IB3x", 3, 12)
    assert encoded[8:40] == struct.pack("<4Q", 1, 2, 3, 0)
    assert encoded[8 + 3 * 32 :] == b"".join(pages)
    shift, keys, views = abi.decode_put_batch(encoded)
    assert (shift, keys, [bytes(view) for view in views]) == (12, KEYS, pages)
    assert [bytes(view) for view in abi.decode_put_batch(memoryview(encoded))[2]] == pages


def test_key_batch_layout_and_round_trip() -> None:
    encoded = abi.encode_key_batch(KEYS)
    assert len(encoded) == 8 + 3 * 32 and encoded[:8] == struct.pack("<IB3x", 3, 0)
    assert encoded[-8:] == b"\xff" * 8  # WHOLE_OBJECT
    assert abi.decode_key_batch(encoded) == KEYS


def test_batch_reply_layout_and_round_trip() -> None:
    statuses = [Status.OK, Status.MISS, Status.OK, Status.INVALID]
    pages = [PAGE, PAGE[::-1]]
    encoded = abi.encode_batch_reply(statuses, pages, page_shift=12)
    assert encoded[:16] == struct.pack("<IB3x", 4, 12) + bytes([0, 1, 0, 4]) + bytes(4)
    assert encoded[16:] == PAGE + PAGE[::-1]
    assert abi.decode_batch_reply(encoded, 12) == (statuses, pages)
    no_pages = abi.encode_batch_reply(statuses)
    assert len(no_pages) == 16
    assert abi.decode_batch_reply(no_pages) == (statuses, [])
    nine = abi.encode_batch_reply([Status.REFUSED] * 9)
    assert len(nine) == 8 + 16 and abi.decode_batch_reply(nine)[0] == [Status.REFUSED] * 9


def test_batch_value_errors_are_invalid() -> None:
    put = bytearray(abi.encode_put_batch(12, KEYS[:1], [PAGE]))
    put[6] = 1
    raises_status(Status.INVALID, lambda: abi.decode_put_batch(bytes(put)))
    keys = bytearray(abi.encode_key_batch(KEYS))
    keys[7] = 1
    raises_status(Status.INVALID, lambda: abi.decode_key_batch(bytes(keys)))
    get_reply = abi.encode_batch_reply([Status.MISS], page_shift=13)
    raises_status(Status.INVALID, lambda: abi.decode_batch_reply(get_reply, 12))
    unknown_status = bytearray(abi.encode_batch_reply([Status.OK]))
    unknown_status[8] = 7
    raises_status(Status.INVALID, lambda: abi.decode_batch_reply(bytes(unknown_status)))
    padding = bytearray(abi.encode_batch_reply([Status.OK]))
    padding[15] = 1
    raises_status(Status.INVALID, lambda: abi.decode_batch_reply(bytes(padding)))


def test_batch_structure_errors_are_protocol_errors() -> None:
    put = abi.encode_put_batch(12, KEYS[:1], [PAGE])
    for bad in (put[:-1], put + b"\0", b"", put[:7]):
        raises_status(Status.PROTOCOL_ERROR, lambda: abi.decode_put_batch(bad))
    keys = abi.encode_key_batch(KEYS)
    for bad in (keys[:-1], struct.pack("<IB3x", 0, 0), put):
        raises_status(Status.PROTOCOL_ERROR, lambda: abi.decode_key_batch(bad))
    with_pages = abi.encode_batch_reply([Status.OK], [PAGE], page_shift=12)
    raises_status(Status.PROTOCOL_ERROR, lambda: abi.decode_batch_reply(with_pages))
    raises_status(Status.PROTOCOL_ERROR, lambda: abi.decode_batch_reply(with_pages[:-1], 12))
    raises_status(Status.PROTOCOL_ERROR, lambda: abi.decode_batch_reply(
        abi.encode_batch_reply([Status.OK]), 12))


@pytest.mark.parametrize("call", [
    lambda: abi.encode_put_batch(12, [], []),
    lambda: abi.encode_put_batch(12, KEYS, [PAGE]),
    lambda: abi.encode_put_batch(12, KEYS[:1], [PAGE[:100]]),
    lambda: abi.encode_put_batch(11, KEYS[:1], [PAGE[:2048]]),
    lambda: abi.encode_put_batch(12, [((2**64, 0, 0), 0)], [PAGE]),
    lambda: abi.encode_key_batch([((0, 0, 0), -1)]),
    lambda: abi.encode_key_batch(KEYS[:1] * (abi.MAX_BATCH + 1)),
    lambda: abi.encode_batch_reply([]),
    lambda: abi.encode_batch_reply([Status.OK], [PAGE]),
    lambda: abi.encode_batch_reply([Status.OK, Status.MISS], [PAGE, PAGE], page_shift=12),
    lambda: abi.encode_batch_reply([Status.OK], [PAGE], page_shift=13),
], ids=["empty", "page-count", "short-page", "small-shift", "oid-range", "index-range",
        "too-many", "empty-reply", "pages-without-shift", "page-for-miss", "page-size"])
def test_batch_encoders_reject_bad_arguments(call: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError):
        call()


# --------------------------------------------------------------------------- STATS

RECORD = PoolStats(3, PoolFlag.PERSISTENT | PoolFlag.SHARED, 12, 100, 409600, 120000, 150, 60,
                   50, 40, 2, 7)


def test_pool_stats_layout_and_round_trip() -> None:
    encoded = RECORD.encode()
    assert encoded == struct.pack("<12Q", 3, 3, 12, 100, 409600, 120000, 150, 60, 50, 40, 2, 7)
    assert PoolStats.decode(encoded) == RECORD
    other = PoolStats(4, PoolFlag(0), 21, *range(9))
    assert abi.decode_pool_stats(abi.encode_pool_stats([RECORD, other])) == [RECORD, other]
    assert abi.decode_pool_stats(b"") == []


def test_pool_stats_errors() -> None:
    encoded = RECORD.encode()
    raises_status(Status.PROTOCOL_ERROR, lambda: abi.decode_pool_stats(encoded + b"\0"))
    raises_status(Status.PROTOCOL_ERROR, lambda: PoolStats.decode(encoded[:-1]))
    for field, value in ((0, abi.ALL_POOLS), (1, 8), (2, 11), (2, 22)):
        fields = list(struct.unpack("<12Q", encoded))
        fields[field] = value
        raises_status(Status.INVALID, lambda: PoolStats.decode(struct.pack("<12Q", *fields)))
    with pytest.raises(ValueError):
        PoolStats(-1, PoolFlag(0), 12, *range(9)).encode()
