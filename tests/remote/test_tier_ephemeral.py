"""Ephemeral pages demoted to the cluster instead of dropped (a guest's
``remote-ephemeral``), against the real 3+3 cluster: they come back exactly or
miss, never stale; persistent pages push them out of a full remote quota; the
cluster may expire or evict them; a full cluster refuses pages at once without
counting as unreachable."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

from tmem_host.journal.journaled import JournaledStore
from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.tier import RemoteTier
from tmem_host.store import Client
from tmem_host.store.tier import RemotePage
from tmem_wire.abi import Key, Status

from .test_tier_store import PAGE, get_all, run, settle, tiered

# Ephemeral pages of 4 KiB random data through a 512 KiB budget: about 110 fit
# (half of that for each of two guests).
BUDGET = 512 << 10
PAGES = 200


def ephemeral_keys(count: int) -> list[Key]:
    return [((7, 0, n >> 4), n & 15) for n in range(count)]


async def guest(store: JournaledStore, tier: RemoteTier, name: str, *, demote: bool = True,
          cap: int | None = None) -> Client:
    client = store.add_client(name)
    await tier.register(client, uuid.uuid4(), cap)
    store.set_demote_evicted(client, demote)
    return client


async def fill(store: JournaledStore, client: Client, pool_id: int,
               pages: list[bytes]) -> None:
    keys = ephemeral_keys(len(pages))
    for first in range(0, len(pages), 16):  # batches, so demotions interleave with puts
        assert store.put_many(client, pool_id, keys[first:first + 16],
                              pages[first:first + 16]) == [Status.OK] * len(pages[first:first + 16])
        await settle(store)


async def filled_guest(store: JournaledStore, tier: RemoteTier) -> tuple[Client, int, list[bytes]]:
    """A demoting guest "g" with an ephemeral pool of PAGES random pages put."""
    client = await guest(store, tier, "g")
    _, pool_id, _ = store.new_pool(client, False)
    pages = [os.urandom(PAGE) for _ in range(PAGES)]
    await fill(store, client, pool_id, pages)
    return client, pool_id, pages


def hits(statuses: list[Status], found: list[bytes], pages: list[bytes]) -> int:
    """Pages that came back; every one exactly (a miss is allowed, wrong data never).
    ``found`` holds the hits' data in key order."""
    assert set(statuses) <= {Status.OK, Status.MISS}
    assert found == [page for page, status in zip(pages, statuses) if status == Status.OK]
    return len(found)


def test_evicted_ephemeral_pages_go_to_the_cluster_and_come_back(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, BUDGET) as (store, tier):
            demoting = await guest(store, tier, "demoting")
            dropping = await guest(store, tier, "dropping", demote=False)
            pages = [os.urandom(PAGE) for _ in range(PAGES)]
            found_by: dict[str, int] = {}
            for client in (demoting, dropping):
                _, pool_id, _ = store.new_pool(client, False)
                await fill(store, client, pool_id, pages)
                if client is demoting:
                    assert len(client.remote_ephemeral) == client.remote_pages > PAGES // 3
                keys = ephemeral_keys(PAGES)
                before = tier.counters["round_trips"]
                # Exclusive gets (the pool's default): a hit takes the page out.
                statuses, found = await get_all(store, client, pool_id, keys)
                found_by[client.name] = hits(statuses, found, pages)
                if client is demoting:
                    # One fetch for all of them: a round trip per master, not per page
                    # (and the deletes of the copies got, in the next one).
                    assert tier.counters["round_trips"] - before <= len(redis_cluster.masters())
                    assert client.remote_pages == 0
                store.flush_pool(client, pool_id)
            # The budget holds about a quarter of the pages: dropping loses the rest.
            assert found_by["demoting"] == PAGES
            assert found_by["dropping"] < PAGES * 2 // 3
            figures = tier.guest_stats("demoting")
            assert figures is not None and figures["ephemeral_demoted"] >= PAGES // 3
            assert figures["get_errors"] == figures["get_missing"] == 0

    run(scenario)


def test_ephemeral_keys_expire_and_persistent_ones_do_not(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, BUDGET) as (store, tier):
            client = await guest(store, tier, "g")
            _, ephemeral_id, _ = store.new_pool(client, False)
            _, persistent_id, _ = store.new_pool(client, True)
            await fill(store, client, ephemeral_id, [os.urandom(PAGE) for _ in range(PAGES)])
            store.put_many(client, persistent_id, ephemeral_keys(PAGES),
                           [os.urandom(PAGE) for _ in range(PAGES)])
            await settle(store)
            assert len(client.remote_ephemeral) > 0 and client.remote_pages > len(client.remote_ephemeral)
            guest_remote = tier.guest("g")
            assert guest_remote is not None
            keys = await tier.namespace_keys(guest_remote.uuid)
            assert len(keys) == client.remote_pages  # no orphan, no copy missing
            ttls = []
            for key in keys:
                with redis_cluster.master_of(key).client() as connection:
                    ttls.append(connection.pttl(key))
            expiring = [ttl for ttl in ttls if ttl > 0]
            assert len(expiring) == len(client.remote_ephemeral)
            assert all(ttl <= tier.settings.ephemeral_ttl_s * 1000 for ttl in expiring)
            assert ttls.count(-1) == client.remote_pages - len(client.remote_ephemeral)

    run(scenario)


def test_a_put_or_flush_after_a_demotion_never_reads_the_old_copy(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, BUDGET) as (store, tier):
            client, pool_id, pages = await filled_guest(store, tier)
            keys = ephemeral_keys(PAGES)
            pool = client.pools[pool_id]
            assert pool is not None
            remote = [key for key in keys if type(pool.objects[key[0]][key[1]]) is RemotePage]
            assert len(remote) > 20
            rewritten, flushed = remote[:10], remote[10:20]
            new = {key: os.urandom(PAGE) for key in rewritten}
            # Before the old copies' deletes went out, and again after.
            assert store.put_many(client, pool_id, rewritten, [new[key] for key in rewritten]) \
                == [Status.OK] * 10
            assert store.flush_many(client, pool_id, flushed) == [Status.OK] * 10
            statuses, found = await get_all(store, client, pool_id, rewritten + flushed)
            for key, status, data in zip(rewritten, statuses, found):
                assert status == Status.MISS or data == new[key]
            assert statuses[10:] == [Status.MISS] * 10
            await settle(store)
            await until_deleted(tier, client)
            statuses, found = await get_all(store, client, pool_id, rewritten + flushed)
            for key, status, data in zip(rewritten, statuses, found):
                assert status == Status.MISS or data == new[key]
            assert statuses[10:] == [Status.MISS] * 10

    run(scenario)


async def until_deleted(tier: RemoteTier, client: Client) -> None:
    """Until the cluster holds exactly the client's remote pages (the old copies deleted)."""
    guest_remote = tier.guest(client.name)
    assert guest_remote is not None
    for _ in range(100):
        if len(await tier.namespace_keys(guest_remote.uuid)) == client.remote_pages:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("old copies still in the cluster")


def test_persistent_pages_push_ephemeral_ones_out_of_a_full_quota(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, BUDGET) as (store, tier):
            # Room in the cluster for about 60 pages, which ephemeral ones fill.
            client = await guest(store, tier, "g", cap=60 * (PAGE + 64))
            _, ephemeral_id, _ = store.new_pool(client, False)
            _, persistent_id, _ = store.new_pool(client, True)
            await fill(store, client, ephemeral_id, [os.urandom(PAGE) for _ in range(PAGES)])
            shed_before = len(client.remote_ephemeral)
            assert shed_before > 40
            persistent = [os.urandom(PAGE) for _ in range(120)]
            statuses = store.put_many(client, persistent_id, ephemeral_keys(120), persistent)
            await settle(store)
            # Room made by dropping ephemeral pages from the cluster: none refused.
            assert statuses == [Status.OK] * 120
            figures = tier.guest_stats("g")
            assert figures is not None and figures["ephemeral_shed"] > 0
            assert len(client.remote_ephemeral) < shed_before
            assert client.remote_bytes <= 60 * (PAGE + 64)
            got_statuses, got = await get_all(store, client, persistent_id, ephemeral_keys(120))
            assert got_statuses == [Status.OK] * 120 and got == persistent

    run(scenario)


def test_an_ephemeral_page_the_cluster_lost_is_a_miss(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, BUDGET) as (store, tier):
            client, pool_id, pages = await filled_guest(store, tier)
            remote = len(client.remote_ephemeral)
            redis_cluster.flushall()  # as an expiry or the cluster's eviction would
            tier.forget_copies()  # and no copy of the writes is left in memory
            statuses, found = await get_all(store, client, pool_id, ephemeral_keys(PAGES))
            assert hits(statuses, found, pages) == PAGES - remote
            figures = tier.guest_stats("g")
            assert figures is not None and figures["ephemeral_missing"] == remote
            assert figures["get_missing"] == 0

    run(scenario)


def test_a_full_cluster_refuses_pages_at_once_and_stays_reachable(
        tmp_path: Path, breakable_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        async with tiered(tmp_path, breakable_cluster, BUDGET) as (store, tier):
            client = await guest(store, tier, "g")
            _, ephemeral_id, _ = store.new_pool(client, False)
            _, persistent_id, _ = store.new_pool(client, True)
            breakable_cluster.config_set("maxmemory", "1")  # every write is OOM now
            try:
                pages = [os.urandom(PAGE) for _ in range(PAGES)]
                await fill(store, client, ephemeral_id, pages)
                statuses = store.put_many(client, persistent_id, ephemeral_keys(PAGES), pages)
                await settle(store)
                assert tier.reachable and tier.counters["became_unreachable"] == 0
                assert tier.counters["refused_full"] > 0
                figures = tier.guest_stats("g")
                assert figures is not None
                # Nothing is in the cluster: ephemeral pages were dropped, persistent
                # ones refused (to the guest's disk) or kept in memory (stranded).
                assert client.remote_pages == 0
                assert figures["refused_full"] + figures["stranded"] > 0
                ok_keys = [key for key, status in zip(ephemeral_keys(PAGES), statuses) if status == Status.OK]
                got_statuses, got = await get_all(store, client, persistent_id, ok_keys)
                assert got_statuses == [Status.OK] * len(ok_keys)
                assert got == [page for page, status in zip(pages, statuses) if status == Status.OK]
            finally:
                breakable_cluster.config_set("maxmemory", "0")

    run(scenario)
