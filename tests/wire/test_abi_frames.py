"""tmem_wire.abi framing: every opcode round-trips, however the bytes arrive, and
every malformed header or payload length is a PROTOCOL_ERROR that sticks."""

from __future__ import annotations

import struct
import uuid

import pytest

from tmem_wire import abi
from tmem_wire.abi import (
    NEED_DATA, Feature, Frame, FrameDecoder, Hello, NewPool, Op, PoolFlag, PoolStats,
    ProtocolError, Status, TmemWireError,
)

# The header layout as docs/ABI.md states it, written out independently of abi.py.
HEADER = struct.Struct("<IBBHQIIQQQQII")
PAGE = bytes(range(256)) * 16
OID = (0x0102030405060708, 0, 0xFFFFFFFFFFFFFFFF)


def raw_header(
    *, magic: int = abi.MAGIC, version: int = 1, opcode: int = Op.GET, flags: int = 0,
    request_id: int = 7, status: int = 0, pool_id: int = 1, oid: tuple[int, int, int] = OID,
    index: int = 3, length: int = 0, reserved: int = 0,
) -> bytes:
    return HEADER.pack(magic, version, opcode, flags, request_id, status, pool_id, *oid,
                       index, length, reserved)


def decode_all(data: bytes, chunk_sizes: list[int] | None = None) -> list[Frame]:
    """Feed `data` in chunks of the given sizes (whole if None), draining after each."""
    decoder = FrameDecoder()
    frames: list[Frame] = []
    position = 0
    for size in chunk_sizes or [len(data)]:
        decoder.feed(data[position : position + size])
        position += size
        while (frame := decoder.next_frame()) is not NEED_DATA:
            assert isinstance(frame, Frame)
            frames.append(frame)
    assert position == len(data)
    assert decoder.pending_bytes == 0
    return frames


def reply(request: Frame, status: Status = Status.OK, payload: bytes = b"") -> Frame:
    return abi.reply_to(request, status, payload)


KEYS = [((1, 2, 3), 0), ((1, 2, 3), 1), (OID, abi.WHOLE_OBJECT)]
STATS_RECORD = PoolStats(5, PoolFlag.PERSISTENT, 12, 10, 40960, 9000, 11, 4, 3, 1, 0, 0)
HELLO_REQUEST = Frame(Op.HELLO, 1, payload=Hello().encode())
NEW_POOL_REQUEST = Frame(
    Op.NEW_POOL, 2, payload=NewPool(PoolFlag.SHARED, 13, uuid.UUID(int=42)).encode()
)
PUT_REQUEST = Frame(Op.PUT, 4, pool_id=5, oid=OID, index=9, payload=PAGE)
GET_REQUEST = Frame(Op.GET, 5, pool_id=5, oid=OID, index=9)
GET_BATCH_REQUEST = Frame(Op.GET_BATCH, 9, pool_id=5, payload=abi.encode_key_batch(KEYS))

# One request and at least one reply of every opcode.
SAMPLE_FRAMES = [
    HELLO_REQUEST,
    reply(HELLO_REQUEST, payload=Hello(features=Feature.BATCH, max_in_flight=1).encode()),
    reply(HELLO_REQUEST, Status.INVALID, b"no common version"),
    NEW_POOL_REQUEST,
    abi.reply_to(NEW_POOL_REQUEST, Status.OK, abi.encode_pool_grant(PoolFlag(0)), pool_id=6),
    Frame(Op.DESTROY_POOL, 3, pool_id=6),
    reply(Frame(Op.DESTROY_POOL, 3, pool_id=6)),
    PUT_REQUEST,
    reply(PUT_REQUEST, Status.REFUSED),
    GET_REQUEST,
    reply(GET_REQUEST, payload=PAGE),
    reply(GET_REQUEST, Status.MISS),
    Frame(Op.FLUSH_PAGE, 6, pool_id=5, oid=OID, index=9),
    reply(Frame(Op.FLUSH_PAGE, 6, pool_id=5, oid=OID, index=9), Status.MISS),
    Frame(Op.FLUSH_OBJECT, 7, pool_id=5, oid=OID),
    reply(Frame(Op.FLUSH_OBJECT, 7, pool_id=5, oid=OID), Status.FROZEN),
    Frame(Op.PUT_BATCH, 8, pool_id=5, payload=abi.encode_put_batch(12, KEYS, [PAGE] * 3)),
    reply(Frame(Op.PUT_BATCH, 8), payload=abi.encode_batch_reply(
        [Status.OK, Status.REFUSED, Status.INVALID])),
    GET_BATCH_REQUEST,
    reply(GET_BATCH_REQUEST, payload=abi.encode_batch_reply(
        [Status.OK, Status.MISS, Status.OK], [PAGE, PAGE[::-1]], page_shift=12)),
    Frame(Op.FLUSH_BATCH, 10, pool_id=5, payload=abi.encode_key_batch(KEYS)),
    reply(Frame(Op.FLUSH_BATCH, 10), payload=abi.encode_batch_reply([Status.OK] * 3)),
    Frame(Op.STATS, 11, pool_id=abi.ALL_POOLS),
    reply(Frame(Op.STATS, 11), payload=abi.encode_pool_stats([STATS_RECORD] * 2)),
    reply(Frame(Op.STATS, 12), payload=abi.encode_pool_stats([])),
    reply(Frame(Op.GET, 13), Status.PROTOCOL_ERROR, "bad magic".encode()),
]


def test_samples_cover_every_opcode_as_request_and_reply() -> None:
    assert {f.opcode for f in SAMPLE_FRAMES if not f.is_reply} == set(Op)
    assert {f.opcode for f in SAMPLE_FRAMES if f.is_reply} == set(Op)


@pytest.mark.parametrize("frame", SAMPLE_FRAMES, ids=lambda f: f"{Op(f.opcode).name}"
                         f"{'-reply' if f.is_reply else ''}-{Status(f.status).name}")
def test_every_opcode_round_trips(frame: Frame) -> None:
    encoded = abi.encode_frame(frame)
    assert len(encoded) == abi.HEADER_SIZE + len(frame.payload)
    assert encoded[:4] == b"TMEM"
    assert decode_all(encoded) == [frame]


def test_header_bytes_follow_the_documented_layout() -> None:
    encoded = abi.encode_frame(PUT_REQUEST)
    assert HEADER.unpack_from(encoded) == (
        0x4D454D54, 1, Op.PUT, 0, 4, 0, 5, *OID, 9, 4096, 0)
    assert encoded[abi.HEADER_SIZE :] == PAGE


def test_pack_header_into_matches_encode_frame() -> None:
    buffer = bytearray(10 + abi.HEADER_SIZE)
    abi.pack_header_into(buffer, 10, opcode=Op.PUT, flags=0, request_id=4, status=0, pool_id=5,
                         oid=OID, index=9, payload_length=len(PAGE))
    assert bytes(buffer[10:]) == abi.encode_frame(PUT_REQUEST)[: abi.HEADER_SIZE]


def test_reply_to_echoes_the_request() -> None:
    answer = abi.reply_to(PUT_REQUEST, Status.FROZEN)
    assert answer.is_reply and not PUT_REQUEST.is_reply
    assert (answer.opcode, answer.request_id, answer.pool_id, answer.oid, answer.index) == (
        Op.PUT, 4, 5, OID, 9)
    assert answer.status == Status.FROZEN and answer.payload == b""
    assert abi.reply_to(NEW_POOL_REQUEST, Status.OK, pool_id=77).pool_id == 77


def test_error_text() -> None:
    assert abi.error_text(SAMPLE_FRAMES[2]) == "no common version"
    assert abi.error_text(reply(GET_REQUEST, payload=PAGE)) == ""


STREAM = b"".join(abi.encode_frame(frame) for frame in SAMPLE_FRAMES)


def test_all_frames_in_one_feed() -> None:
    assert decode_all(STREAM) == SAMPLE_FRAMES


def test_byte_at_a_time() -> None:
    assert decode_all(STREAM, [1] * len(STREAM)) == SAMPLE_FRAMES


@pytest.mark.parametrize("frame", [HELLO_REQUEST, PUT_REQUEST, SAMPLE_FRAMES[-3]],
                         ids=["hello", "put", "stats-reply"])
def test_split_at_every_offset(frame: Frame) -> None:
    # Two frames back to back, split in two at every offset.
    data = abi.encode_frame(frame) + abi.encode_frame(GET_REQUEST)
    for split in range(len(data) + 1):
        assert decode_all(data, [split, len(data) - split]) == [frame, GET_REQUEST], split


def decode_parsing_ahead(data: bytes, chunk_sizes: list[int]) -> tuple[list[Frame], list[Frame]]:
    """As decode_all, but parse_ahead() after every feed, and next_frame() only for
    every other chunk: (the frames parse_ahead returned, those next_frame did)."""
    decoder = FrameDecoder()
    ahead: list[Frame] = []
    frames: list[Frame] = []
    position = 0
    for number, size in enumerate(chunk_sizes):
        decoder.feed(data[position : position + size])
        position += size
        ahead += decoder.parse_ahead()
        if number % 2:
            while (frame := decoder.next_frame()) is not NEED_DATA:
                assert isinstance(frame, Frame)
                frames.append(frame)
    while (frame := decoder.next_frame()) is not NEED_DATA:
        assert isinstance(frame, Frame)
        frames.append(frame)
    return ahead, frames


@pytest.mark.parametrize("chunking", ["whole", "byte-at-a-time", "split-in-three"])
def test_parse_ahead_returns_each_frame_once_and_next_frame_still_returns_all(chunking: str) -> None:
    data = b"".join(abi.encode_frame(frame) for frame in SAMPLE_FRAMES if frame.opcode != Op.HELLO)
    expected = [frame for frame in SAMPLE_FRAMES if frame.opcode != Op.HELLO]
    sizes = {"whole": [len(data)], "byte-at-a-time": [1] * len(data),
             "split-in-three": [len(data) // 3, len(data) // 3, len(data) - 2 * (len(data) // 3)]}[chunking]
    ahead, frames = decode_parsing_ahead(data, sizes)
    assert frames == expected
    assert ahead == expected  # each parsed ahead exactly once, in order


def test_parse_ahead_stops_after_a_hello() -> None:
    decoder = FrameDecoder()
    decoder.feed(abi.encode_frame(GET_REQUEST) + abi.encode_frame(HELLO_REQUEST) + abi.encode_frame(PUT_REQUEST))
    assert decoder.parse_ahead() == [GET_REQUEST, HELLO_REQUEST]
    assert decoder.parse_ahead() == []  # not past the HELLO before it is taken
    assert decoder.next_frame() == GET_REQUEST and decoder.next_frame() == HELLO_REQUEST
    decoder.max_payload = abi.HEADER_SIZE  # what the HELLO negotiated: the PUT no longer fits
    with pytest.raises(ProtocolError):
        decoder.parse_ahead() or decoder.next_frame()


def test_memoryview_feed_and_payload() -> None:
    frame = Frame(Op.PUT, 1, pool_id=1, payload=memoryview(PAGE))
    data = abi.encode_frame(frame)
    decoder = FrameDecoder()
    decoder.feed(memoryview(data))
    decoded = decoder.next_frame()
    assert isinstance(decoded, Frame) and decoded.payload == PAGE


def test_a_reply_may_carry_the_drain_flag() -> None:
    decoder = FrameDecoder()
    decoder.feed(raw_header(opcode=Op.STATS, flags=int(abi.Flag.REPLY | abi.Flag.DRAIN), oid=(0, 0, 0), index=0))
    frame = decoder.next_frame()
    assert isinstance(frame, abi.Frame) and frame.is_reply and frame.flags & abi.Flag.DRAIN


def test_drain_feature_is_granted_only_when_both_sides_offer_it() -> None:
    both = abi.Hello(features=abi.Feature.BATCH | abi.Feature.DRAIN)
    assert abi.Feature.DRAIN in abi.negotiate(both, both).features
    assert abi.Feature.DRAIN not in abi.negotiate(abi.Hello(), both).features


def test_partial_frame_stays_pending() -> None:
    decoder = FrameDecoder()
    data = abi.encode_frame(PUT_REQUEST)
    decoder.feed(data[:100])
    assert decoder.next_frame() is NEED_DATA
    assert decoder.pending_bytes == 100 - abi.HEADER_SIZE


# --------------------------------------------------------------------------- malformed

MALFORMED = {
    "bad magic": raw_header(magic=0x4D454D55),
    "version 0": raw_header(version=0),
    "version 2": raw_header(version=2),
    "DRAIN flag on a request": raw_header(flags=int(abi.Flag.DRAIN)),
    "reserved flag bit": raw_header(flags=4),
    "reserved high flag bit": raw_header(flags=0x8000),
    "reserved field": raw_header(reserved=1),
    "opcode 0": raw_header(opcode=0),
    "opcode 12": raw_header(opcode=12),
    "opcode 255": raw_header(opcode=255),
    "oversized payload": raw_header(opcode=Op.PUT, length=abi.MAX_PAYLOAD + 1),
    "huge payload": raw_header(opcode=Op.PUT, length=0xFFFFFFFF),
    "request with status": raw_header(status=Status.MISS),
    "unknown status": raw_header(flags=1, status=7),
    "HELLO request with pool": raw_header(opcode=Op.HELLO, oid=(0, 0, 0), index=0,
                                          length=abi.HELLO_SIZE),
    "DESTROY_POOL with oid": raw_header(opcode=Op.DESTROY_POOL, index=0),
    "FLUSH_OBJECT with index": raw_header(opcode=Op.FLUSH_OBJECT),
    "STATS with oid": raw_header(opcode=Op.STATS, index=0),
    "HELLO short": raw_header(opcode=Op.HELLO, pool_id=0, oid=(0, 0, 0), index=0, length=31),
    "HELLO reply long": raw_header(opcode=Op.HELLO, flags=1, length=33),
    "NEW_POOL empty": raw_header(opcode=Op.NEW_POOL, pool_id=0, oid=(0, 0, 0), index=0),
    "NEW_POOL reply long": raw_header(opcode=Op.NEW_POOL, flags=1, length=8),
    "DESTROY_POOL payload": raw_header(opcode=Op.DESTROY_POOL, oid=(0, 0, 0), index=0, length=1),
    "GET request payload": raw_header(length=4096),
    "GET reply not a page": raw_header(flags=1, length=4097),
    "PUT empty": raw_header(opcode=Op.PUT),
    "PUT 2 KiB": raw_header(opcode=Op.PUT, length=2048),
    "PUT 6000 bytes": raw_header(opcode=Op.PUT, length=6000),
    "PUT 4 MiB page": raw_header(opcode=Op.PUT, length=4 << 20),
    "PUT reply payload": raw_header(opcode=Op.PUT, flags=1, length=8),
    "FLUSH_PAGE payload": raw_header(opcode=Op.FLUSH_PAGE, length=8),
    "STATS reply partial record": raw_header(opcode=Op.STATS, flags=1, length=95),
    "error reply too long": raw_header(flags=1, status=Status.INVALID,
                                       length=abi.MAX_ERROR_TEXT + 1),
    "PUT_BATCH shorter than header": raw_header(opcode=Op.PUT_BATCH, oid=(0, 0, 0), index=0,
                                                length=7),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_header_is_a_protocol_error_before_the_payload(data: bytes) -> None:
    # No payload bytes are fed: the header alone must be rejected.
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.status == Status.PROTOCOL_ERROR
    assert isinstance(caught.value, TmemWireError)


def batch_frame(opcode: Op, payload: bytes, *, is_reply: bool = False) -> bytes:
    return raw_header(opcode=opcode, flags=int(is_reply), oid=(0, 0, 0), index=0,
                      length=len(payload)) + payload


def batch_header(count: int, page_shift: int = 0) -> bytes:
    return struct.pack("<IB3x", count, page_shift)


DESCRIPTOR = struct.pack("<4Q", 1, 2, 3, 4)
MALFORMED_BATCHES = {
    "PUT_BATCH count 0": batch_frame(Op.PUT_BATCH, batch_header(0, 12)),
    "PUT_BATCH count 1025": batch_frame(
        Op.PUT_BATCH, batch_header(1025, 12) + DESCRIPTOR * 1025 + bytes(1025 * 4096)[:8]),
    "PUT_BATCH page shift 11": batch_frame(
        Op.PUT_BATCH, batch_header(1, 11) + DESCRIPTOR + bytes(2048)),
    "PUT_BATCH page shift 22": batch_frame(Op.PUT_BATCH, batch_header(1, 22) + DESCRIPTOR),
    "PUT_BATCH missing a page": batch_frame(
        Op.PUT_BATCH, batch_header(2, 12) + DESCRIPTOR * 2 + PAGE),
    "PUT_BATCH extra bytes": batch_frame(
        Op.PUT_BATCH, batch_header(1, 12) + DESCRIPTOR + PAGE + b"\0"),
    "GET_BATCH with page shift": batch_frame(Op.GET_BATCH, batch_header(1, 12) + DESCRIPTOR),
    "GET_BATCH short": batch_frame(Op.GET_BATCH, batch_header(2) + DESCRIPTOR),
    "FLUSH_BATCH long": batch_frame(Op.FLUSH_BATCH, batch_header(1) + DESCRIPTOR * 2),
    "PUT_BATCH reply with page shift": batch_frame(
        Op.PUT_BATCH, batch_header(1, 12) + bytes(8), is_reply=True),
    "FLUSH_BATCH reply unpadded": batch_frame(
        Op.FLUSH_BATCH, batch_header(3) + bytes(3), is_reply=True),
    "GET_BATCH reply without page shift": batch_frame(
        Op.GET_BATCH, batch_header(1) + bytes(8), is_reply=True),
    "GET_BATCH reply missing page": batch_frame(
        Op.GET_BATCH, batch_header(2, 12) + bytes([0, 0]) + bytes(6) + PAGE, is_reply=True),
    "GET_BATCH reply page for a miss": batch_frame(
        Op.GET_BATCH, batch_header(1, 12) + bytes([1]) + bytes(7) + PAGE, is_reply=True),
    "GET_BATCH reply count 0": batch_frame(Op.GET_BATCH, batch_header(0, 12), is_reply=True),
}


@pytest.mark.parametrize("data", MALFORMED_BATCHES.values(), ids=MALFORMED_BATCHES.keys())
def test_inconsistent_batch_is_a_protocol_error(data: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError) as caught:
        decoder.next_frame()
    assert caught.value.status == Status.PROTOCOL_ERROR


def test_max_payload_limit_is_configurable() -> None:
    decoder = FrameDecoder(max_payload=4096)
    decoder.feed(abi.encode_frame(PUT_REQUEST))
    assert decoder.next_frame() == PUT_REQUEST
    decoder.feed(raw_header(opcode=Op.PUT, length=8192))
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.next_frame()
    with pytest.raises(ValueError):
        FrameDecoder(max_payload=abi.MAX_PAYLOAD + 1)


@pytest.mark.parametrize("parsed_ahead", [False, True], ids=["in-turn", "parsed-ahead"])
def test_decoder_stays_broken_after_an_error(parsed_ahead: bool) -> None:
    decoder = FrameDecoder()
    decoder.feed(abi.encode_frame(GET_REQUEST) + MALFORMED["bad magic"])
    if parsed_ahead:  # the error met on the way is raised in its turn, after the GET
        assert decoder.parse_ahead() == [GET_REQUEST]
        assert decoder.parse_ahead() == []
    assert decoder.next_frame() == GET_REQUEST
    with pytest.raises(ProtocolError) as first:
        decoder.next_frame()
    with pytest.raises(ProtocolError) as again:
        decoder.next_frame()
    assert again.value is first.value
    with pytest.raises(ProtocolError) as on_feed:
        decoder.feed(abi.encode_frame(GET_REQUEST))
    assert on_feed.value is first.value


def test_resync_skips_to_the_next_hello() -> None:
    put = abi.encode_frame(PUT_REQUEST)
    # A session's tail cut mid-frame, a whole non-HELLO frame, a fake magic, then HELLO.
    junk = put[30:] + abi.encode_frame(GET_REQUEST) + b"TMEM" + bytes(70)
    stream = junk + abi.encode_frame(HELLO_REQUEST) + put
    for chunk in (len(stream), 1, 5):
        decoder = FrameDecoder(resync=True)
        frames: list[Frame | abi.NeedData] = []
        for position in range(0, len(stream), chunk):
            decoder.feed(stream[position : position + chunk])
            while (frame := decoder.next_frame()) is not NEED_DATA:
                frames.append(frame)
        assert frames == [HELLO_REQUEST, PUT_REQUEST], chunk
        assert decoder.discarded == len(junk)


def test_resync_finds_a_hello_reply() -> None:
    hello_reply = SAMPLE_FRAMES[1]
    decoder = FrameDecoder(resync=True)
    decoder.feed(bytes(range(200)) + abi.encode_frame(hello_reply))
    assert decoder.next_frame() == hello_reply


def test_resync_keeps_a_split_magic() -> None:
    decoder = FrameDecoder(resync=True)
    hello = abi.encode_frame(HELLO_REQUEST)
    decoder.feed(b"xyz" + hello[:3])
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(hello[3:])
    assert decoder.next_frame() == HELLO_REQUEST
    assert decoder.discarded == 3


@pytest.mark.parametrize("frame", [
    Frame(Op.PUT, 1, payload=bytes(abi.MAX_PAYLOAD + 1)),
    Frame(Op.GET, -1),
    Frame(Op.GET, 1, oid=(2**64, 0, 0)),
    Frame(Op.GET, 1, pool_id=2**32),
])
def test_encode_frame_rejects_unencodable_fields(frame: Frame) -> None:
    with pytest.raises(ValueError):
        abi.encode_frame(frame)
