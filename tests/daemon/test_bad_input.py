"""Bad input from one guest: answered with an error status when the frame parses,
the connection closed (reason logged) when it does not; tmemd and the other
guests carry on either way."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest

from tmem_host.daemon.client import AbiClient, TmemdClosedConnection
from tmem_host.daemon.process import TmemdProcess
from tmem_host.fuzz import CleanGuest
from tmem_host.store import MAX_POOLS_PER_CLIENT
from tmem_wire.abi import (
    HEADER_SIZE,
    MAGIC,
    Flag,
    Frame,
    Hello,
    NewPool,
    Op,
    PoolFlag,
    Status,
    encode_frame,
    encode_key_batch,
    encode_put_batch,
    error_text,
    page_size_mask,
)
from tmem_workloads.mutation import OFFSET_LENGTH, OFFSET_OPCODE

PAGE = bytes(range(256)) * 16


def assert_daemon_serves_others(tmemd: TmemdProcess) -> None:
    """tmemd is alive and another guest still stores and gets back pages exactly."""
    assert tmemd.alive()
    clean = CleanGuest(tmemd.abi_socket("g2"), random.Random(5))
    try:
        for _ in range(3):
            assert clean.check() is None
    finally:
        clean.client.close()


def raw(opcode: int, *, request_id: int = 9, pool_id: int = 0, payload: bytes = b"",
        index: int = 0) -> bytes:
    return encode_frame(Frame(opcode=opcode, request_id=request_id, pool_id=pool_id,
                              payload=payload, index=index))


def assert_closed_with_reason(tmemd: TmemdProcess, client: AbiClient, bad: bytes,
                              reason: str) -> None:
    client.send_raw(bad)
    with pytest.raises(TmemdClosedConnection):
        for _ in range(10):  # replies to frames before the bad bytes come first
            client.receive()
    log = tmemd.log_text()
    assert "closing connection: undecodable input" in log
    assert reason in log
    assert_daemon_serves_others(tmemd)


@pytest.fixture
def g1(tmemd: TmemdProcess) -> Iterator[AbiClient]:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        client.new_pool(PoolFlag.PERSISTENT)  # pool 0
        yield client


def test_oversized_frame_closes_the_connection(tmemd: TmemdProcess) -> None:
    with AbiClient(tmemd.abi_socket("g1")) as client:
        client.hello(Hello(max_frame=HEADER_SIZE + 8192))
        header = bytearray(raw(Op.PUT, payload=PAGE)[:HEADER_SIZE])
        struct.pack_into("<I", header, OFFSET_LENGTH, 16384)
        assert_closed_with_reason(tmemd, client, bytes(header), "exceeds the limit of 8192")


def test_malformed_header_closes_the_connection(tmemd: TmemdProcess, g1: AbiClient) -> None:
    bad = bytearray(raw(Op.GET))
    struct.pack_into("<I", bad, 0, MAGIC ^ 0xFF)
    assert_closed_with_reason(tmemd, g1, bytes(bad), "bad magic")


def test_unknown_opcode_closes_the_connection(tmemd: TmemdProcess, g1: AbiClient) -> None:
    bad = bytearray(raw(Op.GET))
    bad[OFFSET_OPCODE] = 200
    assert_closed_with_reason(tmemd, g1, bytes(bad), "unknown opcode 200")


def test_reply_frames_from_a_guest_close_the_connection(tmemd: TmemdProcess,
                                                        g1: AbiClient) -> None:
    reply = encode_frame(Frame(opcode=Op.GET, request_id=1, flags=int(Flag.REPLY),
                               payload=PAGE))
    assert_closed_with_reason(tmemd, g1, reply, "the guest sent a reply frame")


@pytest.mark.parametrize("op", [Op.GET, Op.FLUSH_PAGE, Op.FLUSH_OBJECT, Op.DESTROY_POOL,
                                Op.PUT])
def test_bad_pool_ids_are_answered_invalid(tmemd: TmemdProcess, g1: AbiClient, op: Op) -> None:
    payload = PAGE if op == Op.PUT else b""
    index = 0 if op in (Op.FLUSH_OBJECT, Op.DESTROY_POOL) else 1
    for pool_id in (1, 15, 16, 0xFFFFFFF0):
        reply = g1.call(op, pool_id=pool_id, index=index, payload=payload)
        assert reply.status == Status.INVALID
    assert g1.put(0, (0, 0, 0), 1, PAGE) == Status.OK
    assert_daemon_serves_others(tmemd)


@pytest.mark.parametrize("op", [Op.GET_BATCH, Op.FLUSH_BATCH, Op.PUT_BATCH, Op.STATS])
def test_bad_pool_ids_in_batches_and_stats_are_answered_invalid(
        tmemd: TmemdProcess, g1: AbiClient, op: Op) -> None:
    keys = [((1, 0, 0), 0)]
    payload = {Op.GET_BATCH: encode_key_batch(keys), Op.FLUSH_BATCH: encode_key_batch(keys),
               Op.PUT_BATCH: encode_put_batch(12, keys, [PAGE]), Op.STATS: b""}[op]
    reply = g1.call(op, pool_id=7, payload=payload)
    assert (reply.status, error_text(reply)) == (Status.INVALID, "no pool 7")
    assert_daemon_serves_others(tmemd)


def test_page_size_mismatches_are_answered_invalid(tmemd: TmemdProcess, g1: AbiClient) -> None:
    assert g1.put(0, (1, 0, 0), 0, PAGE * 2) == Status.INVALID
    keys = [((1, 0, 0), 0)]
    reply = g1.call(Op.PUT_BATCH, pool_id=0, payload=encode_put_batch(13, keys, [PAGE * 2]))
    assert reply.status == Status.INVALID
    assert "2^13-byte pages for a pool of 2^12-byte pages" in error_text(reply)
    assert g1.get(0, (1, 0, 0), 0) == (Status.MISS, None)
    assert_daemon_serves_others(tmemd)


def test_pool_page_size_must_be_negotiated(tmemd: TmemdProcess) -> None:
    with AbiClient(tmemd.abi_socket("g1")) as client:
        client.hello(Hello(page_sizes=page_size_mask(12)))
        reply = client.call(Op.NEW_POOL, payload=NewPool(PoolFlag(0), page_shift=13).encode())
        assert (reply.status, error_text(reply)) == (Status.INVALID,
                                                     "page shift 13 not negotiated")
    assert_daemon_serves_others(tmemd)


def test_too_many_pools_are_refused(tmemd: TmemdProcess, g1: AbiClient) -> None:
    for _ in range(MAX_POOLS_PER_CLIENT - 1):
        g1.new_pool()
    reply = g1.call(Op.NEW_POOL, payload=NewPool(PoolFlag(0)).encode())
    assert (reply.status, error_text(reply)) == (Status.NOT_PERMITTED, "no free pool slot")
    assert g1.destroy_pool(3) == Status.OK
    assert g1.new_pool()[0] == 3
    assert_daemon_serves_others(tmemd)


def test_too_many_requests_in_flight_are_refused(tmemd: TmemdProcess) -> None:
    with AbiClient(tmemd.abi_socket("g1")) as client:
        assert client.hello(Hello(max_in_flight=4)).max_in_flight == 4
        pool_id, _ = client.new_pool()
        ids = [client.submit(Op.GET, pool_id=pool_id, oid=(1, 0, 0), index=i) for i in range(12)]
        client.flush()  # one write: tmemd sees all 12 before answering any
        statuses = [client.reply(request_id).status for request_id in ids]
        assert statuses[:4] == [Status.MISS] * 4
        assert statuses[4:] == [Status.INVALID] * 8
        assert client.get(pool_id, (1, 0, 0), 0) == (Status.MISS, None)
    assert_daemon_serves_others(tmemd)


def test_batches_over_the_negotiated_size_are_refused(tmemd: TmemdProcess) -> None:
    with AbiClient(tmemd.abi_socket("g1")) as client:
        client.hello(Hello(max_batch_pages=8))
        pool_id, _ = client.new_pool()
        keys = [((1, 0, 0), i) for i in range(9)]
        reply = client.call(Op.PUT_BATCH, pool_id=pool_id,
                            payload=encode_put_batch(12, keys, [PAGE] * 9))
        assert (reply.status, error_text(reply)) == (
            Status.INVALID, "batch of 9 exceeds the negotiated 8")
        assert client.put_batch(pool_id, keys[:8], [PAGE] * 8) == [Status.OK] * 8
    assert_daemon_serves_others(tmemd)


def test_bad_payload_values_are_answered_with_the_codec_status(tmemd: TmemdProcess,
                                                               g1: AbiClient) -> None:
    bad_pool = bytearray(NewPool(PoolFlag(0)).encode())
    bad_pool[6] = 1  # a reserved byte
    reply = g1.call(Op.NEW_POOL, payload=bytes(bad_pool))
    assert reply.status == Status.INVALID
    bad_hello = bytearray(Hello().encode())
    bad_hello[-1] = 1  # the reserved field
    reply = g1.call(Op.HELLO, payload=bytes(bad_hello))
    assert reply.status == Status.INVALID
    # The session goes on with what was negotiated before.
    assert g1.put(0, (1, 0, 0), 0, PAGE) == Status.OK
    assert_daemon_serves_others(tmemd)


def test_requests_before_hello_are_discarded_as_resync(tmemd: TmemdProcess) -> None:
    with AbiClient(tmemd.abi_socket("g1")) as client:
        client.send_raw(raw(Op.NEW_POOL, request_id=5, payload=NewPool(PoolFlag(0)).encode()))
        client.hello()
        # The early NEW_POOL was never served: this is pool 0, and no reply has id 5.
        assert client.new_pool()[0] == 0
        assert client.stats()[0].pool_id == 0 and len(client.stats()) == 1
    assert_daemon_serves_others(tmemd)


def test_garbage_flood_closes_only_that_connection(tmemd: TmemdProcess, g1: AbiClient) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as other:
        assert_closed_with_reason(tmemd, g1, raw(Op.GET)[:8] + bytes(4096) * 16, "bad magic")
        # The same guest's other connection is untouched.
        assert other.put(0, (2, 0, 0), 0, PAGE) == Status.OK
        assert other.get(0, (2, 0, 0), 0) == (Status.OK, PAGE)


def test_requests_after_a_failed_hello_get_protocol_error(tmemd: TmemdProcess) -> None:
    with AbiClient(tmemd.abi_socket("g1")) as client:
        bad_hello = bytearray(Hello().encode())
        bad_hello[-1] = 1
        assert client.call(Op.HELLO, payload=bytes(bad_hello)).status == Status.INVALID
        reply = client.call(Op.NEW_POOL, payload=NewPool(PoolFlag(0)).encode())
        assert (reply.status, error_text(reply)) == (Status.PROTOCOL_ERROR, "HELLO first")
        client.hello()  # the connection was kept
        assert client.new_pool()[0] == 0
    assert_daemon_serves_others(tmemd)
