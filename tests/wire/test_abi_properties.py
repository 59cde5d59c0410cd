"""Property tests of tmem_wire.abi: arbitrary valid frames and payloads round-trip
however they are chunked; arbitrary or mutated bytes only ever yield frames (that
re-encode to exactly the bytes consumed) or ProtocolError.

Profiles: tests/wire/conftest.py (TMEM_WIRE_PROFILE=wire-thorough for long runs)."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from tmem_wire import abi
from tmem_wire.abi import (
    NEED_DATA, Feature, Frame, FrameDecoder, Hello, NewPool, Op, PoolFlag, PoolStats,
    ProtocolError, Status,
)

PROFILE = settings.get_profile(os.environ.get("TMEM_WIRE_PROFILE", "wire-fast"))

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
oids = st.tuples(u64, u64, u64)
keys = st.tuples(oids, u64)
# Big pages make examples slow without exercising anything new: 4..16 KiB.
page_shifts = st.integers(abi.MIN_PAGE_SHIFT, abi.MIN_PAGE_SHIFT + 2)
statuses = st.sampled_from(Status)
pool_flags = st.integers(0, 7).map(PoolFlag)


def page_list(page_shift: int, count: int) -> st.SearchStrategy[list[bytes]]:
    """Pages from seeds: hypothesis-built 4 KiB binaries would be needlessly slow."""
    size = 1 << page_shift
    return st.lists(u32, min_size=count, max_size=count).map(
        lambda seeds: [random.Random(seed).randbytes(size) for seed in seeds])


def pages(page_shift: int) -> st.SearchStrategy[bytes]:
    return page_list(page_shift, 1).map(lambda one: one[0])


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    low = draw(st.integers(1, 0xFFFF))
    return Hello(
        min_version=low,
        max_version=draw(st.integers(low, 0xFFFF)),
        features=Feature(draw(u32)),
        max_batch_pages=draw(st.integers(0, abi.MAX_BATCH)),
        page_sizes=draw(st.integers(1, 2**10 - 1)) << abi.MIN_PAGE_SHIFT,
        max_in_flight=draw(st.integers(1, 2**32 - 1)),
        max_frame=draw(st.integers(abi.HEADER_SIZE + 4096, abi.HEADER_SIZE + abi.MAX_PAYLOAD)),
    )


@st.composite
def new_pools(draw: st.DrawFn) -> NewPool:
    flags = draw(pool_flags)
    shared_uuid = uuid.UUID(int=draw(st.integers(1, 2**128 - 1))) if PoolFlag.SHARED in flags else None
    return NewPool(flags, draw(st.integers(abi.MIN_PAGE_SHIFT, abi.MAX_PAGE_SHIFT)), shared_uuid)


pool_stats = st.builds(
    PoolStats, st.integers(0, abi.ALL_POOLS - 1), pool_flags,
    st.integers(abi.MIN_PAGE_SHIFT, abi.MAX_PAGE_SHIFT), *[u64] * 9)


@st.composite
def put_batches(draw: st.DrawFn) -> tuple[int, list[abi.Key], list[bytes]]:
    shift = draw(page_shifts)
    batch_keys = draw(st.lists(keys, min_size=1, max_size=6))
    return shift, batch_keys, draw(page_list(shift, len(batch_keys)))


@st.composite
def get_batch_replies(draw: st.DrawFn) -> tuple[int, list[Status], list[bytes]]:
    shift = draw(page_shifts)
    entries = draw(st.lists(statuses, min_size=1, max_size=12))
    return shift, entries, draw(page_list(shift, entries.count(Status.OK)))


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    """Any valid frame: a request of any opcode, or an OK or error reply to one."""
    opcode = draw(st.sampled_from(Op))
    request_id, pool_id, oid, index = draw(u64), draw(u32), draw(oids), draw(u64)
    if draw(st.booleans()):  # a request
        payload = b""
        if opcode in (Op.HELLO, Op.NEW_POOL):
            pool_id, oid, index = 0, (0, 0, 0), 0
            payload = (draw(hellos()) if opcode == Op.HELLO else draw(new_pools())).encode()
        elif opcode == Op.PUT:
            payload = draw(pages(draw(page_shifts)))
        elif opcode == Op.FLUSH_OBJECT:
            index = 0
        elif opcode not in (Op.GET, Op.FLUSH_PAGE):
            oid, index = (0, 0, 0), 0
            if opcode == Op.PUT_BATCH:
                payload = abi.encode_put_batch(*draw(put_batches()))
            elif opcode in (Op.GET_BATCH, Op.FLUSH_BATCH):
                payload = abi.encode_key_batch(draw(st.lists(keys, min_size=1, max_size=20)))
        return Frame(opcode, request_id, 0, pool_id, oid, index, payload)
    status = draw(statuses)
    if status != Status.OK:
        text = draw(st.text(max_size=40)).encode()[: abi.MAX_ERROR_TEXT]
        return Frame(opcode, request_id, status, pool_id, oid, index, text, abi.Flag.REPLY)
    payload = b""
    if opcode == Op.HELLO:
        payload = draw(hellos()).encode()
    elif opcode == Op.NEW_POOL:
        payload = abi.encode_pool_grant(draw(pool_flags))
    elif opcode == Op.GET:
        payload = draw(pages(draw(page_shifts)))
    elif opcode in (Op.PUT_BATCH, Op.FLUSH_BATCH):
        payload = abi.encode_batch_reply(draw(st.lists(statuses, min_size=1, max_size=20)))
    elif opcode == Op.GET_BATCH:
        shift, entries, got = draw(get_batch_replies())
        payload = abi.encode_batch_reply(entries, got, page_shift=shift)
    elif opcode == Op.STATS:
        payload = abi.encode_pool_stats(draw(st.lists(pool_stats, max_size=4)))
    return Frame(opcode, request_id, 0, pool_id, oid, index, payload, abi.Flag.REPLY)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(cut % (len(data) + 1) for cut in cuts)})
    return [data[start:end] for start, end in zip(bounds, bounds[1:])]


def decode_chunks(chunks: list[bytes]) -> tuple[list[Frame], int]:
    """Frames decoded and bytes consumed by them, until the end or a ProtocolError.
    Every frame must re-encode to exactly the bytes it was decoded from."""
    decoder = FrameDecoder()
    stream = b"".join(chunks)
    decoded: list[Frame] = []
    consumed = 0
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not NEED_DATA:
                assert isinstance(frame, Frame)
                encoded = abi.encode_frame(frame)
                assert stream[consumed : consumed + len(encoded)] == encoded
                consumed += len(encoded)
                decoded.append(frame)
    except ProtocolError as error:
        assert error.status == Status.PROTOCOL_ERROR
    return decoded, consumed


@PROFILE
@given(st.lists(frames(), min_size=1, max_size=5), st.lists(st.integers(0, 2**20), max_size=8))
def test_valid_frames_round_trip_however_chunked(
    sent: list[Frame], cuts: list[int]
) -> None:
    stream = b"".join(abi.encode_frame(frame) for frame in sent)
    decoded, consumed = decode_chunks(chunked(stream, cuts))
    assert decoded == sent and consumed == len(stream)


@PROFILE
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=4))
def test_arbitrary_bytes_yield_frames_or_protocol_error(
    data: bytes, cuts: list[int]
) -> None:
    decode_chunks(chunked(data, cuts))


@PROFILE
@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_a_valid_header_prefix(tail: bytes) -> None:
    # Random bytes rarely start with the magic; this steers them past it.
    decode_chunks([b"TMEM\x01" + tail])


@PROFILE
@given(
    st.lists(frames(), min_size=1, max_size=3),
    st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 2**20), st.lists(st.integers(0, 2**20), max_size=4),
)
def test_mutated_frames_yield_frames_or_protocol_error(
    sent: list[Frame], mutations: list[tuple[int, int]], cut: int, cuts: list[int]
) -> None:
    stream = bytearray(b"".join(abi.encode_frame(frame) for frame in sent))
    for position, value in mutations:
        stream[position % len(stream)] = value
    truncated = bytes(stream[: len(stream) - cut % 70])  # sometimes lose the tail
    decode_chunks(chunked(truncated, cuts))


@PROFILE
@given(st.sampled_from(range(abi.HEADER_SIZE)), st.integers(1, 255))
def test_a_single_corrupted_header_byte_is_caught_or_harmless(position: int, xor: int) -> None:
    frame = Frame(Op.PUT, 1, pool_id=2, oid=(3, 4, 5), index=6, payload=bytes(4096))
    data = bytearray(abi.encode_frame(frame))
    data[position] ^= xor
    decoded, _consumed = decode_chunks([bytes(data)])
    # Only fields that take any value may change unnoticed.
    harmless = range(8, 16), range(20, 56)
    if any(position in field for field in harmless):
        assert len(decoded) == 1
    else:
        assert decoded == []


@PROFILE
@given(st.binary(max_size=300).filter(lambda junk: b"TMEM" not in junk), hellos(),
       st.lists(frames(), max_size=3), st.lists(st.integers(0, 2**20), max_size=6))
def test_resync_finds_the_hello_after_any_junk(
    junk: bytes, hello: Hello, after: list[Frame], cuts: list[int]
) -> None:
    sent = [Frame(Op.HELLO, 9, payload=hello.encode()), *after]
    stream = junk + b"".join(abi.encode_frame(frame) for frame in sent)
    decoder = FrameDecoder(resync=True)
    decoded: list[Frame] = []
    for chunk in chunked(stream, cuts):
        decoder.feed(chunk)
        while isinstance(frame := decoder.next_frame(), Frame):
            decoded.append(frame)
    assert decoded == sent and decoder.discarded == len(junk)


# --------------------------------------------------------------------------- payloads

PAYLOAD_DECODERS: dict[str, Callable[[bytes], object]] = {
    "hello": Hello.decode,
    "new_pool": NewPool.decode,
    "pool_grant": abi.decode_pool_grant,
    "put_batch": abi.decode_put_batch,
    "key_batch": abi.decode_key_batch,
    "batch_reply": abi.decode_batch_reply,
    "get_batch_reply": lambda payload: abi.decode_batch_reply(payload, 12),
    "pool_stats": abi.decode_pool_stats,
    "pool_stats_record": PoolStats.decode,
}


@PROFILE
@given(st.sampled_from(sorted(PAYLOAD_DECODERS)), st.binary(max_size=300))
def test_payload_decoders_raise_only_protocol_error(name: str, payload: bytes) -> None:
    try:
        PAYLOAD_DECODERS[name](payload)
    except ProtocolError as error:
        assert error.status in (Status.PROTOCOL_ERROR, Status.INVALID)


@PROFILE
@given(hellos())
def test_hello_round_trips(hello: Hello) -> None:
    assert Hello.decode(hello.encode()) == hello


@PROFILE
@given(new_pools())
def test_new_pool_round_trips(new_pool: NewPool) -> None:
    assert NewPool.decode(new_pool.encode()) == new_pool


@PROFILE
@given(st.lists(pool_stats, max_size=5))
def test_pool_stats_round_trip(records: list[PoolStats]) -> None:
    assert abi.decode_pool_stats(abi.encode_pool_stats(records)) == records


@PROFILE
@given(put_batches())
def test_put_batch_round_trips(batch: tuple[int, list[abi.Key], list[bytes]]) -> None:
    shift, keys, views = abi.decode_put_batch(abi.encode_put_batch(*batch))
    assert (shift, keys, [bytes(view) for view in views]) == batch


@PROFILE
@given(st.lists(keys, min_size=1, max_size=abi.MAX_BATCH))
def test_key_batch_round_trips(batch_keys: list[abi.Key]) -> None:
    assert abi.decode_key_batch(abi.encode_key_batch(batch_keys)) == batch_keys


@PROFILE
@given(get_batch_replies(), st.lists(statuses, min_size=1, max_size=40))
def test_batch_replies_round_trip(
    get_reply: tuple[int, list[Status], list[bytes]], plain: list[Status]
) -> None:
    shift, entries, got = get_reply
    encoded = abi.encode_batch_reply(entries, got, page_shift=shift)
    assert abi.decode_batch_reply(encoded, shift) == (entries, got)
    assert abi.decode_batch_reply(abi.encode_batch_reply(plain)) == (plain, [])


@PROFILE
@given(hellos(), hellos())
def test_negotiate_is_within_both_sides(client: Hello, server: Hello) -> None:
    try:
        agreed = abi.negotiate(client, server)
    except ProtocolError as error:
        assert error.status == Status.INVALID
        max_frame = min(client.max_frame, server.max_frame)
        fitting = sum(1 << shift for shift in range(12, 22) if 64 + (1 << shift) <= max_frame)
        assert (max(client.min_version, server.min_version)
                > min(client.max_version, server.max_version)
                or not client.page_sizes & server.page_sizes & fitting)
        return
    assert agreed.problem() is None
    assert agreed.min_version == agreed.max_version
    for side in (client, server):
        assert side.min_version <= agreed.max_version <= side.max_version
        assert agreed.features & ~side.features == 0
        assert agreed.page_sizes & ~side.page_sizes == 0
        assert agreed.max_batch_pages <= side.max_batch_pages
        assert agreed.max_in_flight <= side.max_in_flight
        assert agreed.max_frame <= side.max_frame
    assert (Feature.BATCH in agreed.features) == (agreed.max_batch_pages > 0)
    assert Feature.ASYNC in agreed.features or agreed.max_in_flight == 1
    assert abi.HEADER_SIZE + (1 << (agreed.page_sizes.bit_length() - 1)) <= agreed.max_frame
    # The reply is a fixed point: both sides accept it as it is.
    assert abi.negotiate(agreed, server) == agreed == abi.negotiate(client, agreed)
