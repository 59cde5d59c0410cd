"""The remote tier under the store, driven directly on this test's event loop
(no tmemd process): what one batch costs in round trips, two hosts sharing a
cluster, the ABI frontend's batches, and the journal's REMOTE records."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any
from pathlib import Path

from tmem_host.journal import codec
from tmem_host.journal.journaled import JournaledStore, journal_path
from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote import tier as tier_module
from tmem_host.remote.tier import RemoteSettings, RemoteTier, page_key
from tmem_host.store import Client
from tmem_host.store.tier import RemotePage
from tmem_wire.abi import Key, Status
from tmem_wire.frontswap import frontswap_keys

PAGE = 4096


def host(state_dir: Path, cluster: LocalCluster, budget: int, *, demote_above: float = 0.8,
         local_fraction: float = 0.9) -> tuple[JournaledStore, RemoteTier]:
    """One tmemd's store and tier."""
    store = JournaledStore(budget, state_dir=state_dir)
    tier = RemoteTier(RemoteSettings(seeds=tuple(cluster.seeds), demote_above=demote_above,
                                     local_fraction=local_fraction), store)
    return store, tier


@contextlib.asynccontextmanager
async def tiered(state_dir: Path, cluster: LocalCluster, budget: int,
                 **settings: Any) -> AsyncIterator[tuple[JournaledStore, RemoteTier]]:
    """One tmemd's store with its tier started and attached (``settings``: of
    RemoteSettings); closed, and the cluster emptied, at the end."""
    store = JournaledStore(budget, state_dir=state_dir)
    tier = RemoteTier(RemoteSettings(seeds=tuple(cluster.seeds), **settings), store)
    await tier.start()
    store.attach_tier(tier, tier.settings.local_fraction)
    try:
        yield store, tier
    finally:
        await tier.aclose()
        cluster.flushall()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


async def settle(store: JournaledStore) -> None:
    while (waiter := store.make_durable()) is not None:
        await waiter


def remote_page(client: Client, pool_id: int, key: Key) -> RemotePage | None:
    """The page's RemotePage, or None if it is in memory."""
    pool = client.pools[pool_id]
    assert pool is not None
    value = pool.objects[key[0]][key[1]]
    return value if isinstance(value, RemotePage) else None


def master_port(cluster: LocalCluster, tier: RemoteTier, client: Client, pool_id: int, key: Key) -> int:
    """The port of the master that holds this remote page (of its hash tag)."""
    guest = tier.guest(client.name)
    page = remote_page(client, pool_id, key)
    assert guest is not None and page is not None
    return cluster.master_of(page_key(guest, pool_id, *key, page.version)).port


async def demote_all(store: JournaledStore, tier: RemoteTier, client: Client, pages: int,
                     budget: int) -> None:
    """Shrink the budget until the demoter has moved all ``pages`` of the client to
    the cluster (written and acknowledged), then give ``budget`` back."""
    store.set_budget(64 << 10)
    tier.pressure()
    deadline = asyncio.get_running_loop().time() + 30
    while client.remote_pages < pages or store.make_durable() is not None:
        assert asyncio.get_running_loop().time() < deadline, "the demoter did not finish"
        await asyncio.sleep(0.001)
    store.set_budget(budget)


async def put_random_pages(store: JournaledStore, tier: RemoteTier,
                           count: int) -> tuple[Client, int, list[Key], list[bytes]]:
    """Guest g1 with a persistent pool of ``count`` random pages, put 64 at a time
    and durable: its client, the pool, the keys and the pages."""
    client = store.add_client("g1")
    await tier.register(client, uuid.uuid4(), None)
    _, pool_id, _ = store.new_pool(client, True)
    pages = [os.urandom(PAGE) for _ in range(count)]
    keys = frontswap_keys(0, range(count))
    for first in range(0, count, 64):
        assert store.put_many(client, pool_id, keys[first:first + 64], pages[first:first + 64]) == \
            [Status.OK] * 64
    await settle(store)
    return client, pool_id, keys, pages


async def get_all(store: JournaledStore, client: Client, pool_id: int,
                  keys: list[Key]) -> tuple[list[Status], list[bytes]]:
    waiter = store.fetch(client, pool_id, keys)
    if waiter is not None:
        await waiter
    return store.get_many(client, pool_id, keys)


def test_a_64_page_batch_that_goes_remote_is_one_round_trip(tmp_path: Path,
                                                            redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        # No room for data and no demotion: every page goes straight to the cluster.
        store, tier = host(tmp_path, redis_cluster, 1 << 20, demote_above=10.0, local_fraction=0.0)
        await tier.start()
        store.attach_tier(tier, tier.settings.local_fraction)
        try:
            client = store.add_client("g1")
            await tier.register(client, uuid.uuid4(), None)
            _, pool_id, _ = store.new_pool(client, True)
            pages = [os.urandom(PAGE) for _ in range(256)]
            for first, expected in ((0, 1), (64, 1), (96, 2)):
                keys = frontswap_keys(0, range(first, first + 64))
                before = tier.counters["round_trips"]
                assert store.put_many(client, pool_id, keys, pages[first:first + 64]) == [Status.OK] * 64
                await settle(store)
                # Aligned, the 64 slots share one hash tag: one MSET on one master;
                # unaligned, two tags, on one or two masters.
                assert 1 <= tier.counters["round_trips"] - before <= expected
            assert client.remote_pages == 160 and client.pages == 160
            keys = frontswap_keys(0, range(0, 160))
            before = tier.counters["round_trips"]
            statuses, found = await get_all(store, client, pool_id, keys)
            assert statuses == [Status.OK] * 160 and found == pages[:160]
            assert tier.counters["round_trips"] - before <= len(redis_cluster.masters())
        finally:
            await tier.aclose()
            redis_cluster.flushall()

    run(scenario)


def test_two_hosts_share_a_cluster_by_guest_identity(tmp_path: Path,
                                                     redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        hosts = [host(tmp_path / name, redis_cluster, 256 << 10) for name in ("a", "b")]
        identities = [uuid.uuid4(), uuid.uuid4()]
        written: list[list[bytes]] = []
        try:
            for (store, tier), identity in zip(hosts, identities):
                await tier.start()
                store.attach_tier(tier, tier.settings.local_fraction)
                client = store.add_client("g1")  # the same name on both hosts
                await tier.register(client, identity, None)
                _, pool_id, _ = store.new_pool(client, True)
                pages = [os.urandom(PAGE) for _ in range(256)]
                keys = frontswap_keys(0, range(256))
                for first in range(0, 256, 64):
                    statuses = store.put_many(client, pool_id, keys[first:first + 64],
                                              pages[first:first + 64])
                    assert statuses == [Status.OK] * 64
                    await settle(store)
                written.append(pages)
            for (store, tier), identity, pages in zip(hosts, identities, written):
                client = store.client("g1")
                assert client.remote_pages > 0
                statuses, found = await get_all(store, client, 0, frontswap_keys(0, range(256)))
                assert statuses == [Status.OK] * 256 and found == pages
                names = await tier.namespace_keys(identity)
                assert len(names) == client.remote_pages
                assert all(identity.hex.encode() in name for name in names)
        finally:
            for _, tier in hosts:
                await tier.aclose()
            redis_cluster.flushall()

    run(scenario)


def test_the_journal_keeps_where_a_page_is_not_its_data(tmp_path: Path,
                                                       redis_cluster: LocalCluster) -> None:
    identity = uuid.uuid4()
    pages = [os.urandom(PAGE) for _ in range(128)]
    keys = frontswap_keys(0, range(128))

    async def first_run() -> None:
        store, tier = host(tmp_path, redis_cluster, 1 << 20, demote_above=10.0, local_fraction=0.0)
        await tier.start()
        store.attach_tier(tier, tier.settings.local_fraction)
        client = store.add_client("g1")
        await tier.register(client, identity, None)
        _, pool_id, _ = store.new_pool(client, True)
        assert store.put_many(client, pool_id, keys, pages) == [Status.OK] * 128
        await settle(store)
        await tier.aclose()  # no detach: the journal is as a kill -9 would leave it

    async def second_run() -> None:
        store, tier = host(tmp_path, redis_cluster, 1 << 20)
        await tier.start()
        store.attach_tier(tier, tier.settings.local_fraction)
        try:
            client = store.add_client("g1")
            await tier.register(client, identity, None)
            assert client.remote_pages == 128
            statuses, found = await get_all(store, client, 0, keys)
            assert statuses == [Status.OK] * 128 and found == pages
        finally:
            await tier.aclose()
            redis_cluster.flushall()

    run(first_run)
    data = journal_path(tmp_path, "g1").read_bytes()
    decoder = codec.JournalDecoder()
    decoder.feed(data)
    records = []
    while not isinstance(record := decoder.next_record(), codec.NeedData):
        records.append(record)
    assert sum(isinstance(record, codec.RemoteRecord) for record in records) == 128
    assert not any(isinstance(record, codec.PutRecord) for record in records)
    assert len(data) < 128 * 100  # keys and versions, no page data
    run(second_run)


def test_remote_limits_are_caps_and_weighted_shares_of_the_remote_budget(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        store = JournaledStore(1 << 20, state_dir=tmp_path)
        tier = RemoteTier(RemoteSettings(seeds=tuple(redis_cluster.seeds), budget_bytes=400 << 10,
                                         local_fraction=0.0, demote_above=10.0), store)
        await tier.start()
        store.attach_tier(tier, tier.settings.local_fraction)
        try:
            light = store.add_client("light", weight=100)
            heavy = store.add_client("heavy", weight=300)
            capped = store.add_client("capped", weight=100)
            for client in (light, heavy):
                await tier.register(client, uuid.uuid4(), None)
            await tier.register(capped, uuid.uuid4(), 20 << 10)
            limits = {name: tier.limit_bytes(guest) for name in ("light", "heavy", "capped")
                      if (guest := tier.guest(name)) is not None}
            assert limits == {"light": 80 << 10, "heavy": 240 << 10, "capped": 20 << 10}
            for client in (light, heavy, capped):
                _, pool_id, _ = store.new_pool(client, True)
                pages = [os.urandom(PAGE) for _ in range(128)]
                statuses = store.put_many(client, pool_id, frontswap_keys(0, range(128)), pages)
                await settle(store)
                accepted = statuses.count(Status.OK)
                limit = limits[client.name]
                assert limit is not None
                # Accepted while the next one fitted: the limit is reached, never passed.
                assert 0 < client.remote_bytes <= limit < client.remote_bytes + 4200
                assert accepted == client.remote_pages < 128
                figures = tier.guest_stats(client.name)
                assert figures is not None and figures["refused_quota"] == 128 - accepted
        finally:
            await tier.aclose()
            redis_cluster.flushall()

    run(scenario)


def test_a_read_fetches_its_hash_tag_and_the_neighbours_need_no_round_trip(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """Read-around: one swap-in reads its 64-slot group in the same MGET; the
    swap-ins of its neighbours then cost nothing, and a rewritten neighbour reads
    its new data."""
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, 1 << 20, demote_above=10.0,
                          local_fraction=0.0, read_ahead_groups=0) as (store, tier):
            client = store.add_client("g1")
            await tier.register(client, uuid.uuid4(), None)
            _, pool_id, _ = store.new_pool(client, True)
            pages = [os.urandom(PAGE) for _ in range(128)]
            keys = frontswap_keys(0, range(128))
            assert store.put_many(client, pool_id, keys, pages) == [Status.OK] * 128
            await settle(store)
            assert client.remote_pages == 128
            tier.forget_copies()  # those of the writes: the gets below read the cluster
            before = tier.counters["round_trips"]
            statuses, found = await get_all(store, client, pool_id, [keys[5]])
            assert statuses == [Status.OK] and found == [pages[5]]
            assert tier.counters["round_trips"] - before == 1
            # Its group (slots 0-63) came with it; the rewritten slot 6 does not use it.
            new = os.urandom(PAGE)
            assert store.put(client, pool_id, *keys[6], new) == Status.OK
            await settle(store)
            before = tier.counters["round_trips"]
            assert tier.stats()["read_cache_bytes"] > 60 * PAGE
            for slot in [*range(0, 5), *range(7, 64)]:
                statuses, found = await get_all(store, client, pool_id, [keys[slot]])
                assert statuses == [Status.OK] and found == [pages[slot]], slot
            assert tier.counters["round_trips"] == before
            statuses, found = await get_all(store, client, pool_id, [keys[6]])
            assert found == [new]
            figures = tier.guest_stats("g1")
            assert figures is not None and figures["prefetched"] >= 62
            # The next group was not read: its first get is a round trip.
            before = tier.counters["round_trips"]
            statuses, found = await get_all(store, client, pool_id, [keys[64]])
            assert found == [pages[64]] and tier.counters["round_trips"] - before == 1

    run(scenario)


async def read_ahead_landed(tier: RemoteTier, pages: int) -> None:
    """Wait until the tier has read ``pages`` pages ahead (a guest that takes its time)."""
    deadline = asyncio.get_running_loop().time() + 30
    while (figures := tier.guest_stats("g1")) is None or figures["read_ahead"] < pages:
        assert asyncio.get_running_loop().time() < deadline, f"read ahead: {figures}"
        await asyncio.sleep(0.001)


def test_sequential_gets_read_the_next_neighbourhoods_ahead_and_random_gets_none(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """Read-ahead: once the gets walk from one 64-slot group into the next, the
    tier reads the next two groups (with that get's own read, then one more group
    as each group is entered), so a guest swapping in in order waits for the
    cluster twice, not once per group. A page rewritten or flushed after it was
    read ahead reads its new state; gets in no order read nothing ahead."""
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, 1 << 20, demote_above=10.0,
                          local_fraction=0.0, read_ahead_groups=2) as (store, tier):
            groups = 8
            client, pool_id, keys, pages = await put_random_pages(store, tier, groups * 64)
            # Another swap area's pages: a get of one between the groups does not
            # break the stream (its groups read ahead are marked).
            other_keys, other_pages = frontswap_keys(1, range(64)), [os.urandom(PAGE) for _ in range(64)]
            assert store.put_many(client, pool_id, other_keys, other_pages) == [Status.OK] * 64
            await settle(store)
            assert client.remote_pages == groups * 64 + 64
            tier.forget_copies()  # those of the writes: the gets below read the cluster
            rewritten, flushed = 5 * 64 + 7, 5 * 64 + 9
            new = os.urandom(PAGE)
            waited = []
            for group in range(groups):
                for first in range(group * 64, group * 64 + 64, 8):  # swap readahead's 8 pages
                    batch = keys[first:first + 8]
                    waiter = store.fetch(client, pool_id, batch)
                    if waiter is not None:
                        waited.append(group)
                        await waiter
                    statuses, found = store.get_many(client, pool_id, batch)
                    expected = [new if slot == rewritten else pages[slot]
                                for slot in range(first, first + 8)]
                    if first <= flushed < first + 8:
                        assert statuses[flushed - first] == Status.MISS
                        del statuses[flushed - first], expected[flushed - first]
                    assert statuses == [Status.OK] * len(expected) and found == expected, first
                if group >= 1:
                    await read_ahead_landed(tier, 64 * (min(group + 2, groups - 1) - 1))
                if group >= 2:
                    statuses, found = await get_all(store, client, pool_id, [other_keys[group]])
                    assert found == [other_pages[group]]
                if group == 3:  # group 5 is in the read cache now: change two of its pages
                    assert store.put(client, pool_id, *keys[rewritten], new) == Status.OK
                    assert store.flush_page(client, pool_id, *keys[flushed]) == Status.OK
                    await settle(store)
            # Group 0 starts the stream, group 1 makes it sequential; in group 5 the
            # rewritten page's new copy is only in the cluster (a write keeps none).
            assert waited == [0, 1, 5]
            figures = tier.guest_stats("g1")
            assert figures is not None and figures["get_errors"] == figures["get_missing"] == 0

            # Gets that jump about (never one or two groups on from the last, nor into
            # a group read ahead) read nothing ahead.
            tier.forget_copies()
            before = figures["read_ahead"]
            for group in (6, 2, 0, 7, 4, 1):
                batch = keys[group * 64 + 16:group * 64 + 24]
                statuses, found = await get_all(store, client, pool_id, batch)
                assert found == pages[group * 64 + 16:group * 64 + 24]
            await asyncio.sleep(0.05)
            figures = tier.guest_stats("g1")
            assert figures is not None and figures["read_ahead"] == before

    run(scenario)


def test_a_get_of_a_page_being_read_ahead_joins_that_read_and_waits_only_for_its_master(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """Groups g+2 and g+3 are read ahead with g+1's own read while g+2's master is
    paused. The get of g+1 and a get of g+3 (joining its read in flight, not
    reading it again) end without waiting for the paused master; a get of g+2
    waits for it, then reads right. Every page was read once."""
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, 1 << 20, demote_above=10.0, local_fraction=0.0,
                          read_around=False, read_ahead_groups=2) as (store, tier):
            client, pool_id, keys, pages = await put_random_pages(store, tier, 16 * 64)
            tier.forget_copies()
            read_keys: Counter[bytes] = Counter()  # every page read from the cluster
            read_pages = tier._read_pages

            async def counted(tags: list[list[Any]], reads: list[Any]) -> None:
                read_keys.update(read.key for read in reads)
                await read_pages(tags, reads)

            tier._read_pages = counted  # type: ignore[method-assign]

            def port(group: int) -> int:
                return master_port(redis_cluster, tier, client, pool_id, keys[group * 64])

            g = next(g for g in range(13) if port(g + 2) not in (port(g), port(g + 1), port(g + 3)))

            def group_keys(group: int) -> list[Key]:
                return keys[group * 64:(group + 1) * 64]

            assert (await get_all(store, client, pool_id, group_keys(g)))[1] == pages[g * 64:(g + 1) * 64]
            with redis_cluster.node_by_port(port(g + 2)).client() as admin:
                admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
            own = store.fetch(client, pool_id, group_keys(g + 1))  # and g+2, g+3 ahead
            assert own is not None
            await own
            joined = store.fetch(client, pool_id, group_keys(g + 3))  # None: already here
            if joined is not None:
                await joined
            slow = store.fetch(client, pool_id, group_keys(g + 2))
            assert slow is not None and not slow.done()  # its master is still paused
            for group in (g + 1, g + 3):
                statuses, found = store.get_many(client, pool_id, group_keys(group))
                assert statuses == [Status.OK] * 64 and found == pages[group * 64:(group + 1) * 64]
            await slow
            statuses, found = store.get_many(client, pool_id, group_keys(g + 2))
            assert statuses == [Status.OK] * 64 and found == pages[(g + 2) * 64:(g + 3) * 64]
            # Groups g, g+1 and g+2 read for gets, g+3 for a get or ahead (and the
            # groups after it ahead, as the gets went on): each page once.
            assert len(read_keys) >= 4 * 64 and set(read_keys.values()) == {1}

    run(scenario)


def test_the_read_cache_keeps_its_bytes_but_never_a_copy_a_get_may_wait_for(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """Copies read back (and around) stay at least CACHE_GRACE_S, however big the
    batch; beyond that the oldest leave down to read_cache_bytes. A page whose
    write lands while a get of it (and of a page the tier must read) waits keeps
    its copy; written pages nobody waits for keep none."""
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, 1 << 20, demote_above=10.0, local_fraction=0.0,
                          read_cache_bytes=10 * (PAGE + 64)) as (store, tier):
            client = store.add_client("g1")
            await tier.register(client, uuid.uuid4(), None)
            _, pool_id, _ = store.new_pool(client, True)
            pool = client.pools[pool_id]
            assert pool is not None
            pages = [os.urandom(PAGE) for _ in range(128)]
            keys = frontswap_keys(0, range(128))

            def copies() -> list[RemotePage]:
                assert pool is not None
                return [value for obj in pool.objects.values() for value in obj.values()
                        if isinstance(value, RemotePage) and value.fetched is not None]

            assert store.put_many(client, pool_id, keys[:64], pages[:64]) == [Status.OK] * 64
            await settle(store)
            assert copies() == []  # written, nobody waiting: no copy kept
            # A put whose write is in flight, got with a remote page in one batch.
            assert store.put(client, pool_id, *keys[65], pages[65]) == Status.OK
            statuses, found = await get_all(store, client, pool_id, [keys[65], keys[10]])
            assert statuses == [Status.OK, Status.OK] and found == [pages[65], pages[10]]
            await settle(store)
            # Group 0, read around page 10, beyond the 10 pages allowed: young, kept.
            assert len(copies()) >= 64
            # Older than the grace, the oldest leave when the next batch comes.
            await asyncio.sleep(tier_module.CACHE_GRACE_S + 0.1)
            tier.forget_copies()
            statuses, found = await get_all(store, client, pool_id, [keys[3]])
            assert found == [pages[3]]
            assert tier.stats()["read_cache_bytes"] == sum(page.nbytes for page in copies())
            assert len(copies()) == 64  # one batch is never cut, whatever the bound
            await asyncio.sleep(tier_module.CACHE_GRACE_S + 0.1)
            # Again a page in flight with one to read, the cache emptied meanwhile.
            assert store.put(client, pool_id, *keys[66], pages[66]) == Status.OK
            tier.forget_copies()
            statuses, found = await get_all(store, client, pool_id, [keys[66], keys[20]])
            assert found == [pages[66], pages[20]]
            assert tier.stats()["read_cache_bytes"] == sum(page.nbytes for page in copies())
            # Every page still reads back exactly, kept or not.
            statuses, found = await get_all(store, client, pool_id, [*keys[:64], keys[65]])
            assert statuses == [Status.OK] * 65 and found == [*pages[:64], pages[65]]

    run(scenario)


def test_a_copy_a_get_waits_for_survives_a_starved_event_loop_until_the_get_takes_it(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """The fetch completes, but the get that waited for it runs late (a starved
    tmemd: over CACHE_GRACE_S), after other batches filled the read cache past its
    bytes: its copy is still there (pinned until the get takes it, PIN_MAX_S at
    most), so the get hits. Once taken, it may leave like any other copy."""
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, 1 << 20, demote_above=10.0, local_fraction=0.0,
                          read_cache_bytes=4 * (PAGE + 64), read_around=False) as (store, tier):
            client, pool_id, keys, pages = await put_random_pages(store, tier, 256)
            waited = store.fetch(client, pool_id, [keys[7]])
            assert waited is not None
            await waited
            # The get is late: the grace is over, and more than the cache's bytes came since.
            await asyncio.sleep(tier_module.CACHE_GRACE_S + 0.1)
            for first in range(64, 256, 16):
                statuses, found = await get_all(store, client, pool_id, keys[first:first + 16])
                assert found == pages[first:first + 16]
            assert tier.stats()["read_cache_bytes"] > 0
            assert store.get_many(client, pool_id, [keys[7]]) == ([Status.OK], [pages[7]])
            # Taken: now an ordinary copy, evicted once old and over the bound.
            await asyncio.sleep(tier_module.CACHE_GRACE_S + 0.1)
            await get_all(store, client, pool_id, keys[200:216])
            pool = client.pools[pool_id]
            assert pool is not None
            page = pool.objects[keys[7][0]][keys[7][1]]
            assert isinstance(page, RemotePage) and page.fetched is None

    run(scenario)


def test_a_copy_a_queued_get_holds_survives_other_batches_while_its_read_is_slow(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """One get of two pages: one whose copy is here (read before, taken, older than
    CACHE_GRACE_S) and one the tier must read, from a master that is slow (paused).
    Meanwhile other gets' batches end past the cache's bytes and forget_copies
    empties the cache: the held copy stays, so when the fetch ends both pages read
    back (a copy gone would cost the get a second read, Store.fetch's ``again``;
    before that it was a MISS, a guest's lost swap page)."""
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, 1 << 20, demote_above=10.0, local_fraction=0.0,
                          read_cache_bytes=4 * (PAGE + 64), read_around=False,
                          read_ahead_groups=0) as (store, tier):
            client, pool_id, keys, pages = await put_random_pages(store, tier, 256)

            def port(number: int) -> int:
                return master_port(redis_cluster, tier, client, pool_id, keys[number])

            assert await get_all(store, client, pool_id, [keys[7]]) == ([Status.OK], [pages[7]])
            await asyncio.sleep(tier_module.CACHE_GRACE_S + 0.1)  # taken, and old
            slow = port(100)
            others = list(itertools.islice((number for number in range(101, 256) if port(number) != slow), 16))
            assert len(others) == 16
            with redis_cluster.node_by_port(slow).client() as admin:
                admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
            waited = store.fetch(client, pool_id, [keys[7], keys[100]])
            assert waited is not None
            await asyncio.sleep(0.2)
            statuses, found = await get_all(store, client, pool_id, [keys[number] for number in others])
            assert found == [pages[number] for number in others]
            assert tier.stats()["read_cache_bytes"] > 4 * (PAGE + 64)
            tier.forget_copies()
            assert not waited.done()  # still waiting for the paused master
            await waited
            assert store.get_many(client, pool_id, [keys[7], keys[100]]) == \
                ([Status.OK, Status.OK], [pages[7], pages[100]])

    run(scenario)


def test_a_put_while_a_demotion_is_in_flight_cannot_pass_the_remote_quota(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """The demoter's batch counts against the guest's remote quota from the moment
    it is queued, not only once the cluster has it: a page put while the batch is
    on its way (the masters paused) is refused (to the guest's fallback) where it
    would have taken the guest past its quota. Once written, nothing is left
    counted twice."""
    cap = 40 * (PAGE + 64)

    async def main() -> None:
        async with tiered(tmp_path, redis_cluster, 8 << 20, read_around=False, demote_above=0.001,
                          demote_to=0.0005) as (store, tier):
            client = store.add_client("g1")
            guest = await tier.register(client, uuid.uuid4(), cap)
            _, pool_id, _ = store.new_pool(client, True)
            keys = frontswap_keys(0, range(64))
            pages = [os.urandom(PAGE) for _ in keys]
            for node in redis_cluster.masters():
                with node.client() as admin:
                    admin.execute_command("CLIENT", "PAUSE", 800, "WRITE")
            assert store.put_many(client, pool_id, keys, pages) == [Status.OK] * 64  # in memory
            tier.pressure()
            deadline = asyncio.get_running_loop().time() + 5
            while guest.demoting_bytes == 0:
                assert asyncio.get_running_loop().time() < deadline, "the demoter did not start"
                await asyncio.sleep(0.005)
            # The batch takes what the quota allows, and it is all still in flight.
            assert client.remote_bytes == 0 and cap - (PAGE + 64) < guest.demoting_bytes <= cap
            pool = client.pools[pool_id]
            assert pool is not None
            refused = tier.guest_stats("g1")["refused_quota"]  # type: ignore[index]
            assert tier.take(pool, (1 << 40, 0, 0), 0, os.urandom(PAGE)) is None
            assert tier.guest_stats("g1")["refused_quota"] == refused + 1  # type: ignore[index]
            await settle(store)
            while (waiter := tier.barrier()) is not None:
                await waiter
            assert guest.demoting_bytes == 0 and 0 < client.remote_bytes <= cap
            statuses, found = await get_all(store, client, pool_id, keys)
            assert statuses == [Status.OK] * 64 and found == pages

    asyncio.run(main())
