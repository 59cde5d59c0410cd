"""One owner per guest namespace (docs/REMOTE.md, "Ownership and fencing"), on a
real cluster: a second tmemd leaves a guest another host owns alone unless it
takes it over; after a takeover the old owner's writes and deletes are refused
by the cluster itself (FENCED), whatever their timing: its pages stay in its
memory, the new owner's keys survive, and a restart of the old owner does not
claim the guest back."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import cast

import redis

from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.tier import FENCE_BUCKETS, GuestRemote, RemoteTier, page_key
from tmem_host.store import Client
from tmem_host.store.tier import RemotePage
from tmem_wire.abi import Status
from tmem_wire.frontswap import frontswap_keys

from .test_tier_store import PAGE, get_all, run, settle, tiered


def remote_keys(client: Client, tier: RemoteTier, pool_id: int) -> dict[tuple[object, int], bytes]:
    """The cluster key of every remote page of the pool, by its (oid, index)."""
    guest = tier.guest(client.name)
    assert guest is not None
    pool = client.pools[pool_id]
    assert pool is not None
    return {(oid, index): page_key(guest, pool_id, oid, index, value.version)
            for oid, obj in pool.objects.items() for index, value in obj.items()
            if isinstance(value, RemotePage)}


def epoch_of(guest: GuestRemote) -> int:
    """The guest's epoch on its tier (0: not its owner)."""
    return guest.epoch or 0


def fenced(guest: GuestRemote) -> bool:
    return guest.fenced


def exists(cluster: LocalCluster, key: bytes) -> bool:
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    try:
        return bool(client.exists(key))
    finally:
        client.close()


def test_a_taken_over_guest_is_fenced_on_its_old_host_whatever_it_does(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    identity = uuid.uuid4()
    pages = [os.urandom(PAGE) for _ in range(256)]
    keys = frontswap_keys(0, range(256))

    async def scenario() -> None:
        # No room in memory: every page goes to the cluster at once.
        settings = {"demote_above": 10.0, "local_fraction": 0.0}
        async with tiered(tmp_path / "a", redis_cluster, 1 << 20, host_id="a", **settings) as (store_a, tier_a), \
                tiered(tmp_path / "b", redis_cluster, 64 << 20, host_id="b", **settings) as (store_b, tier_b):
            old = store_a.add_client("g1")
            guest_a = await tier_a.register(old, identity, None)
            assert guest_a.epoch is not None and not guest_a.fenced
            _, pool_id, _ = store_a.new_pool(old, True)
            assert store_a.put_many(old, pool_id, keys[:128], pages[:128]) == [Status.OK] * 128
            await settle(store_a)
            assert old.remote_pages == 128
            written = remote_keys(old, tier_a, pool_id)

            # Host b configures the same guest: host a owns it, so b leaves it alone.
            new = store_b.add_client("g1")
            guest_b = await tier_b.register(new, identity, None)
            assert guest_b.epoch is None and guest_b.fenced
            _, new_pool, _ = store_b.new_pool(new, True)
            # No room in b's memory and not b's to write: refused (the fallback disk).
            assert store_b.put_many(new, new_pool, keys[:1], pages[:1]) == [Status.REFUSED]
            assert new.remote_pages == 0 and guest_b.counters["refused_unowned"] == 1
            assert (await tier_a.claim(guest_a)) and guest_a.epoch is not None  # a keeps it

            # A handoff: b takes the guest over with a higher epoch.
            assert await tier_b.claim(guest_b, take_over=True)
            assert epoch_of(guest_b) > epoch_of(guest_a)

            # Host a, unaware: a put goes to the cluster and is refused there (FENCED):
            # the page stays in a's memory, acknowledged, never lost.
            assert store_a.put_many(old, pool_id, keys[128:192], pages[128:192]) == [Status.OK] * 64
            await settle(store_a)
            assert fenced(guest_a) and epoch_of(guest_a) == 0
            assert old.remote_pages == 128 and guest_a.counters["stranded"] == 64
            statuses, found = await get_all(store_a, old, pool_id, keys[128:192])
            assert statuses == [Status.OK] * 64 and found == pages[128:192]
            # Its flushes delete nothing in the cluster: b may reference those keys.
            assert store_a.flush_many(old, pool_id, keys[:64]) == [Status.OK] * 64
            await settle(store_a)
            assert all(exists(redis_cluster, written[key]) for key in keys[:64])
            # And its next puts stay out of the cluster (the fallback disk, for a guest).
            before = guest_a.counters["refused_unowned"]
            store_a.put_many(old, pool_id, keys[192:256], pages[192:256])
            assert guest_a.counters["refused_unowned"] > before

            # b owns the namespace: its pages go to the cluster under its epoch.
            assert store_b.put_many(new, new_pool, keys[1:65], pages[1:65]) == [Status.OK] * 64
            await settle(store_b)
            assert new.remote_pages == 64 and not fenced(guest_b)

            # A restart of a (a new tier, the same host id) leaves the guest to b.
            restarted = RemoteTier(tier_a.settings, store_a)
            await restarted.start()
            try:
                again = GuestRemote("g1", identity, None, 1)
                assert not await restarted.claim(again) and again.fenced
            finally:
                await restarted.aclose()

    run(scenario)


def test_every_bucket_has_a_fence_and_a_claim_sets_them_all(tmp_path: Path,
                                                           redis_cluster: LocalCluster) -> None:
    async def scenario() -> None:
        async with tiered(tmp_path, redis_cluster, 1 << 20, host_id="a") as (store, tier):
            client = store.add_client("g1")
            guest = await tier.register(client, uuid.uuid4(), None)
            node = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
            try:
                fences = {int(node.get(guest.fence_key(bucket)) or 0) for bucket in range(FENCE_BUCKETS)}
                owner = cast(dict[bytes, bytes], node.hgetall(guest.owner_key))
            finally:
                node.close()
            assert fences == {guest.epoch}
            assert owner[b"host"] == b"a" and int(owner[b"epoch"]) == guest.epoch
            # The buckets spread over every master (3 here).
            masters = {redis_cluster.master_of(guest.fence_key(bucket)).port
                       for bucket in range(FENCE_BUCKETS)}
            assert len(masters) == 3

    run(scenario)
