"""tmemd's ABI end to end: a real tmemd process, the real client, real sockets."""

from __future__ import annotations

import threading
import uuid

import pytest

from tmem_host.daemon.client import AbiClient, PipelinedRequest
from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_wire.abi import (
    WHOLE_OBJECT,
    Feature,
    Hello,
    Op,
    PoolFlag,
    Frame,
    Status,
    encode_frame,
    encode_key_batch,
    page_size_mask,
)
from tmem_workloads.usemem import expected_page, page_templates

TEMPLATES = page_templates(7)


def page(number: int) -> bytes:
    """Distinct 4 KiB pages of mixed content (text, binary, zero, random)."""
    return expected_page(TEMPLATES, 7, number)


def test_hello_negotiates_the_smaller_limits(tmemd: TmemdProcess) -> None:
    with AbiClient(tmemd.abi_socket("g1")) as client:
        agreed = client.hello(Hello(max_in_flight=8, max_batch_pages=16,
                                    page_sizes=page_size_mask(12)))
    assert agreed.max_in_flight == 8
    assert agreed.max_batch_pages == 16
    assert agreed.page_sizes == page_size_mask(12)
    assert agreed.features == Feature.BATCH | Feature.ASYNC | Feature.STATS


def test_every_op_end_to_end(tmemd: TmemdProcess) -> None:
    oid = (1, 2, 3)
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        pool_id, granted = client.new_pool(PoolFlag.PERSISTENT)
        assert granted == PoolFlag.PERSISTENT
        assert client.put(pool_id, oid, 0, page(0)) == Status.OK
        assert client.get(pool_id, oid, 0) == (Status.OK, page(0))
        # Persistent gets leave the page in place.
        assert client.get(pool_id, oid, 0) == (Status.OK, page(0))
        assert client.get(pool_id, oid, 1) == (Status.MISS, None)
        assert client.flush_page(pool_id, oid, 0) == Status.OK
        assert client.get(pool_id, oid, 0) == (Status.MISS, None)

        keys = [(oid, index) for index in range(40)]
        assert client.put_batch(pool_id, keys, [page(i) for i in range(40)]) == [Status.OK] * 40
        found = client.get_batch(pool_id, keys + [((9, 9, 9), 0)])
        assert found == [page(i) for i in range(40)] + [None]
        other = (4, 5, 6)
        assert client.put(pool_id, other, 7, page(99)) == Status.OK
        assert client.flush_batch(pool_id, [(oid, 3), (other, WHOLE_OBJECT)]) == [Status.OK] * 2
        assert client.get(pool_id, oid, 3) == (Status.MISS, None)
        assert client.get(pool_id, other, 7) == (Status.MISS, None)
        assert client.flush_object(pool_id, oid) == Status.OK
        assert client.get_batch(pool_id, keys) == [None] * 40

        (record,) = client.stats()
        assert record.pool_id == pool_id and record.pages == 0
        assert record.puts == 42 and record.hits == 42
        assert client.destroy_pool(pool_id) == Status.OK
        assert client.get(pool_id, oid, 0)[0] == Status.INVALID
        assert client.stats() == []


def test_ephemeral_pool_gets_are_exclusive_unless_inclusive(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        exclusive, granted = client.new_pool(PoolFlag(0))
        assert granted == PoolFlag(0)
        inclusive, granted = client.new_pool(PoolFlag.INCLUSIVE_GETS)
        assert granted == PoolFlag.INCLUSIVE_GETS
        for pool_id in (exclusive, inclusive):
            assert client.put(pool_id, (1, 0, 0), 0, page(3)) == Status.OK
            assert client.get(pool_id, (1, 0, 0), 0) == (Status.OK, page(3))
        assert client.get(exclusive, (1, 0, 0), 0) == (Status.MISS, None)
        assert client.get(inclusive, (1, 0, 0), 0) == (Status.OK, page(3))


def test_pipelined_replies_are_matched_by_request_id(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        pool_id, _ = client.new_pool()
        puts = [PipelinedRequest(Op.PUT, pool_id, (7, 0, 0), i, page(i)) for i in range(48)]
        assert [frame.status for frame in client.pipelined(puts, depth=32)] == [Status.OK] * 48
        # All in flight at once, then collected newest first.
        request_ids = [client.submit(Op.GET, pool_id=pool_id, oid=(7, 0, 0), index=i)
                       for i in range(48)]
        client.flush()
        for index in reversed(range(48)):
            reply = client.reply(request_ids[index])
            assert (reply.status, reply.index, reply.payload) == (Status.OK, index, page(index))


def test_guests_are_isolated(tmemd: TmemdProcess) -> None:
    oid = (1, 1, 1)
    with AbiClient.open(tmemd.abi_socket("g1")) as g1, \
            AbiClient.open(tmemd.abi_socket("g2")) as g2:
        g1_pool, _ = g1.new_pool()
        assert g1.put(g1_pool, oid, 0, page(1)) == Status.OK
        # Pool ids are per guest: g2 has no pool yet, then gets the same number.
        assert g2.get(g1_pool, oid, 0)[0] == Status.INVALID
        assert g2.flush_object(g1_pool, oid) == Status.INVALID
        g2_pool, _ = g2.new_pool()
        assert g2_pool == g1_pool
        assert g2.get(g2_pool, oid, 0) == (Status.MISS, None)
        assert g2.flush_object(g2_pool, oid) == Status.OK
        assert g2.destroy_pool(g2_pool) == Status.OK
        assert [record.pool_id for record in g2.stats()] == []
        assert g1.get(g1_pool, oid, 0) == (Status.OK, page(1))
        assert [record.pages for record in g1.stats()] == [1]


def test_concurrent_guests_keep_their_own_pages(tmemd: TmemdProcess) -> None:
    errors: list[str] = []

    def worker(guest: str, worker_id: int) -> None:
        try:
            with AbiClient.open(tmemd.abi_socket(guest)) as client:
                pool_id, _ = client.new_pool()
                oid = (worker_id, 0, 0)
                for round_number in range(20):
                    base = worker_id * 1000 + round_number * 8
                    keys = [(oid, base + i) for i in range(8)]
                    client.put_batch(pool_id, keys, [page(base + i) for i in range(8)])
                    if client.get_batch(pool_id, keys) != [page(base + i) for i in range(8)]:
                        errors.append(f"{guest}/{worker_id}: wrong pages in round {round_number}")
        except Exception as exc:  # reported below with the thread's name
            errors.append(f"{guest}/{worker_id}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(guest, number))
               for number, guest in enumerate(["g1", "g2", "g1", "g2"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with tmemd.control() as control:
        clients = control.request("stats")["store"]["clients"]
    assert clients["g1"]["pages"] == clients["g2"]["pages"] == 2 * 20 * 8


def test_pools_persist_across_reconnects(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        pool_id, _ = client.new_pool()
        client.put(pool_id, (5, 5, 5), 9, page(9))
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        assert client.get(pool_id, (5, 5, 5), 9) == (Status.OK, page(9))


def test_new_connection_resyncs_on_the_first_hello(tmemd: TmemdProcess) -> None:
    with AbiClient(tmemd.abi_socket("g1")) as client:
        # The tail of a frame lost in a reconnect, then a whole PUT: both skipped.
        lost_tail = bytes(range(200)) + b"TMEM"
        stray_put = encode_frame(Frame(opcode=Op.PUT, request_id=77, pool_id=0,
                                       payload=page(0)))
        client.send_raw(lost_tail + stray_put)
        client.hello()
        pool_id, _ = client.new_pool()
        assert client.put(pool_id, (1, 0, 0), 0, page(5)) == Status.OK
        assert client.get(pool_id, (1, 0, 0), 0) == (Status.OK, page(5))
        with tmemd.control() as control:
            (connection,) = control.request("stats")["connections"]
        assert connection["discarded_bytes"] == len(lost_tail) + len(stray_put)


def test_a_later_hello_restarts_the_session_limits(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as client:
        pool_id, _ = client.new_pool()
        keys = [((1, 0, 0), i) for i in range(8)]
        assert client.put_batch(pool_id, keys, [page(i) for i in range(8)]) == [Status.OK] * 8
        client.hello(Hello(max_batch_pages=4))
        reply = client.call(Op.GET_BATCH, pool_id=pool_id, payload=encode_key_batch(keys))
        assert reply.status == Status.INVALID
        assert client.get_batch(pool_id, keys[:4]) == [page(i) for i in range(4)]
        with tmemd.control() as control:
            (connection,) = control.request("stats")["connections"]
        assert connection["resyncs"] == 1


@pytest.mark.parametrize("persistent", [False, True])
def test_shared_pools_join_only_with_a_configured_uuid(start_tmemd: StartTmemd,
                                                       persistent: bool) -> None:
    shared = uuid.UUID("6c1b1a4e-2f00-4c1d-9a55-0123456789ab")
    daemon = start_tmemd(guests=(f"g1:shared={shared}", f"g2:shared={shared}", "g3"))
    flags = PoolFlag.PERSISTENT if persistent else PoolFlag(0)
    with AbiClient.open(daemon.abi_socket("g1")) as g1, \
            AbiClient.open(daemon.abi_socket("g2")) as g2, \
            AbiClient.open(daemon.abi_socket("g3")) as g3:
        g1_pool, g1_flags = g1.new_pool(flags, shared_uuid=shared)
        g2_pool, g2_flags = g2.new_pool(flags, shared_uuid=shared)
        g3_pool, g3_flags = g3.new_pool(flags, shared_uuid=shared)
        # Xen semantics: only ephemeral pools are shared, and only for guests
        # configured with the UUID; everyone else gets a private pool.
        assert (PoolFlag.SHARED in g1_flags) == (PoolFlag.SHARED in g2_flags) == (not persistent)
        assert PoolFlag.SHARED not in g3_flags
        g1.put(g1_pool, (1, 0, 0), 0, page(4))
        expected = None if persistent else page(4)
        assert g2.get_batch(g2_pool, [((1, 0, 0), 0)]) == [expected]
        assert g3.get_batch(g3_pool, [((1, 0, 0), 0)]) == [None]
        with daemon.control() as control:
            guests = {g["name"]: g for g in control.request("guests")}
        assert guests["g1"]["shared_uuids"] == [str(shared)]
