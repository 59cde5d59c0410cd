"""Isolation between guests (issue #7, point 6), through both frontends.

A guest's identity is the socket it connected to. These tests check what that
promises: another guest's private pages cannot be read or flushed, and their
existence cannot be learned (replies are byte-identical to those before the
other guest had anything); a shared pool is joined only with authorisation,
and a refused join looks the same whether the pool exists or not; a cap is
exact; an NBD socket reaches only its own guest's export.
"""

from __future__ import annotations

import os
import uuid

import pytest

from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.nbd.client import NbdClient, NbdClientError
from tmem_host.store import OBJECT_OVERHEAD_BYTES, PERSISTENT_PAGE_OVERHEAD_BYTES
from tmem_wire.abi import (
    ALL_POOLS,
    WHOLE_OBJECT,
    Frame,
    NewPool,
    Op,
    PoolFlag,
    Status,
    encode_frame,
    encode_key_batch,
    encode_put_batch,
)

PAGE = 4096
RAW_COST = PAGE + PERSISTENT_PAGE_OVERHEAD_BYTES  # an incompressible persistent page as charged
# Keys the victim uses; the attacker guesses exactly these.
VICTIM_KEYS = [((oid, 0, 0), index) for oid in (0, 1, 7) for index in (0, 1, 5)]


def random_pages(count: int) -> list[bytes]:
    """Incompressible pages: each costs exactly RAW_COST in a persistent pool."""
    data = os.urandom(PAGE * count)
    return [data[i * PAGE:(i + 1) * PAGE] for i in range(count)]


def probe_requests() -> list[tuple[Op, int, tuple[int, int, int], int, bytes]]:
    """Every operation an attacker can aim at pool ids 0..3 and 15 and the victim's keys."""
    page = bytes(range(256)) * 16
    requests: list[tuple[Op, int, tuple[int, int, int], int, bytes]] = []
    for pool_id in (0, 1, 2, 3, 15):
        for oid, index in VICTIM_KEYS[:3]:
            requests += [(Op.GET, pool_id, oid, index, b""),
                         (Op.FLUSH_PAGE, pool_id, oid, index, b"")]
        requests += [
            (Op.FLUSH_OBJECT, pool_id, (1, 0, 0), 0, b""),
            (Op.GET_BATCH, pool_id, (0, 0, 0), 0, encode_key_batch(VICTIM_KEYS)),
            (Op.FLUSH_BATCH, pool_id, (0, 0, 0), 0,
             encode_key_batch(VICTIM_KEYS + [((7, 0, 0), WHOLE_OBJECT)])),
            (Op.PUT_BATCH, pool_id, (0, 0, 0), 0, encode_put_batch(12, VICTIM_KEYS[:1], [page])),
            (Op.PUT, pool_id, (1, 0, 0), 1, page),
            (Op.STATS, pool_id, (0, 0, 0), 0, b""),
            (Op.DESTROY_POOL, pool_id, (0, 0, 0), 0, b""),
        ]
    requests.append((Op.STATS, ALL_POOLS, (0, 0, 0), 0, b""))
    return requests


def probe(client: AbiClient) -> list[bytes]:
    """The attacker's replies, re-encoded byte for byte (request ids are fixed)."""
    replies = []
    for number, (op, pool_id, oid, index, payload) in enumerate(probe_requests()):
        request_id = client.submit(op, pool_id=pool_id, oid=oid, index=index, payload=payload)
        reply = client.reply(request_id)
        replies.append(encode_frame(Frame(
            opcode=reply.opcode, flags=reply.flags, request_id=number, status=reply.status,
            pool_id=reply.pool_id, oid=reply.oid, index=reply.index,
            payload=bytes(reply.payload))))
    return replies


def fill_victim(victim: AbiClient) -> dict[tuple[int, tuple[tuple[int, int, int], int]], bytes]:
    """Pools 0 (persistent), 1 (ephemeral) and 2 (ephemeral, inclusive), all keys put."""
    stored = {}
    for flags in (PoolFlag.PERSISTENT, PoolFlag(0), PoolFlag.INCLUSIVE_GETS):
        pool_id, _ = victim.new_pool(flags)
        pages = random_pages(len(VICTIM_KEYS))
        assert victim.put_batch(pool_id, VICTIM_KEYS, pages) == [Status.OK] * len(VICTIM_KEYS)
        stored.update({(pool_id, key): page for key, page in zip(VICTIM_KEYS, pages)})
    return stored


def test_another_guests_pools_are_indistinguishable_from_none(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as victim, \
            AbiClient.open(tmemd.abi_socket("g2")) as attacker:
        before = probe(attacker)
        stored = fill_victim(victim)
        after = probe(attacker)
        # Same statuses, same error texts, same (empty) STATS: nothing to learn.
        assert after == before
        statuses = {int.from_bytes(reply[16:20], "little") for reply in before}
        assert statuses == {Status.INVALID, Status.OK}  # OK: STATS of all (no) pools
        # The victim's pages survived the attacker's flushes, puts and destroys.
        for (pool_id, (oid, index)), page in stored.items():
            if pool_id == 0:  # persistent: a get keeps the page
                assert victim.get(pool_id, oid, index) == (Status.OK, page)
        assert [record.pages for record in victim.stats()] == [len(VICTIM_KEYS)] * 3


def test_the_same_pool_id_in_another_guest_is_another_pool(tmemd: TmemdProcess) -> None:
    with AbiClient.open(tmemd.abi_socket("g1")) as victim, \
            AbiClient.open(tmemd.abi_socket("g2")) as attacker:
        stored = fill_victim(victim)
        for flags in (PoolFlag.PERSISTENT, PoolFlag(0), PoolFlag.INCLUSIVE_GETS):
            attacker.new_pool(flags)  # pools 0, 1, 2: the victim's numbers
        for pool_id in (0, 1, 2):
            assert attacker.get_batch(pool_id, VICTIM_KEYS) == [None] * len(VICTIM_KEYS)
            assert attacker.flush_batch(pool_id, VICTIM_KEYS) == [Status.OK] * len(VICTIM_KEYS)
            assert attacker.flush_object(pool_id, (1, 0, 0)) == Status.OK
        (record,) = attacker.stats(1)
        assert (record.pages, record.gets, record.hits, record.flushes) == (
            0, len(VICTIM_KEYS), 0, 0)
        # The victim still has every page, and its counters saw none of this.
        assert victim.get_batch(0, VICTIM_KEYS) == [stored[(0, key)] for key in VICTIM_KEYS]
        assert victim.get_batch(2, VICTIM_KEYS) == [stored[(2, key)] for key in VICTIM_KEYS]
        assert [(r.pool_id, r.pages, r.flushes) for r in victim.stats()] == [
            (0, len(VICTIM_KEYS), 0), (1, len(VICTIM_KEYS), 0), (2, len(VICTIM_KEYS), 0)]


def test_an_unauthorised_guest_cannot_join_or_probe_a_shared_pool(
        start_tmemd: StartTmemd) -> None:
    shared = uuid.UUID("0f7c4a52-9d3e-4b61-8a0c-5e2d9b7f1a33")
    daemon = start_tmemd(guests=(f"g1:shared={shared}", f"g2:shared={shared}", "g3"))
    with AbiClient.open(daemon.abi_socket("g3")) as outsider:
        # Asked before the pool exists ...
        before = outsider.call(Op.NEW_POOL, payload=new_pool_payload(shared))
        assert outsider.destroy_pool(before.pool_id) == Status.OK
        with AbiClient.open(daemon.abi_socket("g1")) as owner, \
                AbiClient.open(daemon.abi_socket("g2")) as member:
            pool_id, granted = owner.new_pool(PoolFlag(0), shared_uuid=shared)
            assert PoolFlag.SHARED in granted
            pages = random_pages(len(VICTIM_KEYS))
            assert owner.put_batch(pool_id, VICTIM_KEYS, pages) == [Status.OK] * len(VICTIM_KEYS)
            member_pool, member_flags = member.new_pool(PoolFlag(0), shared_uuid=shared)
            assert PoolFlag.SHARED in member_flags
            assert member.get_batch(member_pool, VICTIM_KEYS) == pages
            # ... and after: the same reply, a private empty pool.
            after = outsider.call(Op.NEW_POOL, payload=new_pool_payload(shared))
            assert (after.status, after.pool_id, bytes(after.payload)) == (
                before.status, before.pool_id, bytes(before.payload))
            assert after.status == Status.OK
            assert outsider.get_batch(after.pool_id, VICTIM_KEYS) == [None] * len(VICTIM_KEYS)
            assert outsider.flush_batch(after.pool_id, VICTIM_KEYS) == [Status.OK] * len(
                VICTIM_KEYS)
            assert [r.pages for r in outsider.stats()] == [0]
            # The shared pool lost nothing to the outsider.
            assert member.get_batch(member_pool, VICTIM_KEYS) == pages


def new_pool_payload(shared: uuid.UUID) -> bytes:
    return NewPool(PoolFlag.SHARED, uuid=shared).encode()


@pytest.mark.parametrize("batched", [False, True])
def test_a_cap_is_exact_and_costs_no_one_else(start_tmemd: StartTmemd, batched: bool) -> None:
    # Room for exactly 40 incompressible pages in one object in each of 3 pools.
    cap = 40 * RAW_COST + 3 * OBJECT_OVERHEAD_BYTES + RAW_COST // 2
    daemon = start_tmemd(guests=(f"g1:cap={cap}", "g2"), budget="8M")
    with AbiClient.open(daemon.abi_socket("g1")) as capped, \
            AbiClient.open(daemon.abi_socket("g2")) as other:
        other_pool, _ = other.new_pool(PoolFlag.PERSISTENT)
        other_pages = random_pages(16)
        other_keys = [((1, 0, 0), i) for i in range(16)]
        assert other.put_batch(other_pool, other_keys, other_pages) == [Status.OK] * 16
        # Spread over several pools: the cap is the guest's, not a pool's.
        pools = [capped.new_pool(PoolFlag.PERSISTENT)[0] for _ in range(3)]
        statuses: list[Status] = []
        for number, page in enumerate(random_pages(60)):
            pool_id, key = pools[number % 3], ((2, 0, 0), number)
            if batched:
                statuses += capped.put_batch(pool_id, [key], [page])
            else:
                statuses.append(capped.put(pool_id, *key, page))
        assert statuses == [Status.OK] * 40 + [Status.REFUSED] * 20
        with daemon.control() as control:
            client = control.request("stats")["store"]["clients"]["g1"]
        assert (client["pages"], client["stored_bytes"], client["refusals"]) == (
            40, 40 * RAW_COST + 3 * OBJECT_OVERHEAD_BYTES, 20)
        assert sum(r.refusals for r in capped.stats()) == 20
        # The other guest neither lost a page nor is refused.
        assert other.get_batch(other_pool, other_keys) == other_pages
        assert other.put(other_pool, (1, 0, 0), 99, random_pages(1)[0]) == Status.OK


def test_an_nbd_socket_reaches_only_its_guests_export(tmemd: TmemdProcess) -> None:
    secret = os.urandom(64 * 1024)
    with NbdClient(tmemd.nbd_socket("g2"), "g2") as victim:
        assert victim.write(0, secret) == 0
    for export in ("g2", "g3", "../g2", "g2\x00"):
        stranger = NbdClient(tmemd.nbd_socket("g1"), export)
        try:
            with pytest.raises(NbdClientError, match="refused"):
                stranger.connect()
        finally:
            stranger.close()
    # g1's own disk (its name or the default one) holds none of g2's data.
    for export in ("g1", ""):
        with NbdClient(tmemd.nbd_socket("g1"), export) as attacker:
            assert attacker.read(0, len(secret)) == (0, bytes(len(secret)))
            assert attacker.write(0, bytes(PAGE)) == 0
    with NbdClient(tmemd.nbd_socket("g2"), "g2") as victim:
        assert victim.read(0, len(secret)) == (0, secret)
