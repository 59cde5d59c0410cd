"""Semantics of tmem_host.store.Store, case by case (Xen tmem is the reference)."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable

import pytest

from tmem_host.store import (
    INVALID_UUID,
    MAX_POOLS_PER_CLIENT,
    MAX_SHARED_POOLS,
    DEDUP_BLOB_OVERHEAD_BYTES,
    OBJECT_OVERHEAD_BYTES,
    PERSISTENT_PAGE_OVERHEAD_BYTES,
    Client,
    Store,
    page_overhead_bytes,
)
from tmem_wire.abi import WHOLE_OBJECT, Oid, PoolFlag, Status

PAGE = 4096
OBJECT = OBJECT_OVERHEAD_BYTES
BLOB = DEDUP_BLOB_OVERHEAD_BYTES


def raw_page_cost(persistent: bool) -> int:
    """What the store charges for an incompressible page (stored raw)."""
    return PAGE + page_overhead_bytes(persistent)


def cost(pages: int, persistent: bool, objects: int = 1) -> int:
    """The charge for ``pages`` incompressible pages in ``objects`` objects."""
    return pages * raw_page_cost(persistent) + objects * OBJECT


P_PAGE = raw_page_cost(True)
E_PAGE = raw_page_cost(False)
OID: Oid = (1, 2, 3)
SHARED = uuid.UUID("0123456789abcdef0123456789abcdef")
BIG = 1 << 30


def random_page(seed: int, size: int = PAGE) -> bytes:
    return random.Random(seed).randbytes(size)


def text_page(seed: int, size: int = PAGE) -> bytes:
    """Words: lz4 shrinks it. Bigger pages repeat the 4 KiB text (quick to make)."""
    rng = random.Random(seed)
    words = [b"tmem", b"frontswap", b"cleancache", b"pool", b"guest", b"page", b"evict"]
    return (b" ".join(rng.choice(words) for _ in range(PAGE // 3))[:PAGE]) * (size // PAGE)


def binary_page(seed: int, size: int = PAGE) -> bytes:
    """Mostly small bytes with some noise: lz4 shrinks it a little."""
    rng = random.Random(seed)
    base = bytes(rng.choice((0, 0, 0, 1, 2, 255, rng.randrange(256))) for _ in range(PAGE))
    return base * (size // PAGE)


PAGE_KINDS: dict[str, Callable[[int], bytes]] = {
    "zero": lambda size: bytes(size),
    "fill-byte": lambda size: b"\xa5" * size,
    "fill-word": lambda size: bytes(range(1, 9)) * (size // 8),
    "fill-but-last-byte": lambda size: b"\x11" * (size - 1) + b"\x12",
    "fill-but-first-byte": lambda size: b"\x12" + b"\x11" * (size - 1),
    "text": lambda size: text_page(7, size),
    "binary": lambda size: binary_page(7, size),
    "random": lambda size: random_page(7, size),
}
SAME_FILLED = {"zero", "fill-byte", "fill-word"}


def new_store(budget: int = BIG, compress: bool = True) -> tuple[Store, Client]:
    store = Store(budget, compress=compress)
    return store, store.add_client("g1")


def new_pool(store: Store, client: Client, persistent: bool, **options: object) -> int:
    status, pool_id, _shared = store.new_pool(client, persistent, **options)  # type: ignore[arg-type]
    assert status is Status.OK
    return pool_id


def page_present(store: Store, client: Client, pool_id: int, index: int, oid: Oid = OID) -> bool:
    """Whether a page is there, judged without a get (gets may be exclusive)."""
    pool = client.pools[pool_id]
    assert pool is not None
    return index in pool.objects.get(oid, {})


# ----------------------------------------------------------------- storage


@pytest.mark.parametrize("kind", sorted(PAGE_KINDS))
@pytest.mark.parametrize("compress", [True, False], ids=["lz4", "raw"])
@pytest.mark.parametrize("page_shift", [12, 16, 21])
def test_every_page_kind_round_trips_byte_exact(kind: str, compress: bool, page_shift: int) -> None:
    size = 1 << page_shift
    data = PAGE_KINDS[kind](size)
    store, client = new_store(compress=compress)
    pool_id = new_pool(store, client, persistent=True, page_shift=page_shift)
    assert store.put(client, pool_id, OID, 5, data) is Status.OK
    status, got = store.get(client, pool_id, OID, 5)
    assert status is Status.OK and got == data
    metadata = PERSISTENT_PAGE_OVERHEAD_BYTES + OBJECT
    if kind in SAME_FILLED:
        assert store.used_bytes == metadata  # just the fill word
    elif kind == "random" or not compress:
        assert store.used_bytes == size + metadata  # stored raw
    else:
        assert store.used_bytes < size + metadata  # lz4 shrank it
    assert store.raw_bytes == size and store.pages == 1


@pytest.mark.parametrize("compress", [True, False], ids=["lz4", "raw"])
@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_pages_given_as_views_are_stored_as_copies(compress: bool, dedup: bool) -> None:
    """tmemd hands put_many views into a batch payload; the store must keep none."""
    kinds = sorted(PAGE_KINDS)
    pages = [PAGE_KINDS[kind](PAGE) for kind in kinds]
    payload = bytearray(b"\0" * 8 + b"".join(pages))  # pages at an offset, as in a batch
    views = [memoryview(payload)[8 + n * PAGE : 8 + (n + 1) * PAGE] for n in range(len(pages))]
    keys = [(OID, index) for index in range(len(pages))]
    stores = []
    for given in (views, pages):
        store = Store(BIG, compress=compress)
        client = store.add_client("g1", dedup=dedup)
        pool_id = new_pool(store, client, persistent=True)
        assert store.put_many(client, pool_id, keys, given) == [Status.OK] * len(pages)
        payload[:] = bytes(len(payload))  # the payload buffer is reused for the next read
        statuses, got = store.get_many(client, pool_id, keys)
        assert statuses == [Status.OK] * len(pages) and got == pages
        stores.append(store)
    by_views, by_bytes = stores
    assert by_views.stats() == by_bytes.stats()  # same stored forms, same accounting


# ---------------------------------------------------------------- get kinds


@pytest.mark.parametrize(
    ("persistent", "shared", "inclusive", "second_get"),
    [
        (True, False, False, Status.OK),  # persistent: non-destructive
        (True, False, True, Status.OK),
        (False, False, False, Status.MISS),  # private ephemeral: exclusive
        (False, False, True, Status.OK),  # ... unless inclusive gets were asked for
        (False, True, False, Status.OK),  # shared ephemeral: non-destructive
    ],
    ids=["persistent", "persistent-inclusive", "exclusive", "inclusive", "shared"],
)
def test_get_destructiveness(
    persistent: bool, shared: bool, inclusive: bool, second_get: Status
) -> None:
    store = Store(BIG)
    client = store.add_client("g1", shared_uuids=frozenset({SHARED}))
    status, pool_id, granted_shared = store.new_pool(
        client, persistent, shared_uuid=SHARED if shared else None, inclusive_gets=inclusive
    )
    assert status is Status.OK and granted_shared is shared
    data = text_page(1)
    store.put(client, pool_id, OID, 0, data)
    assert store.get(client, pool_id, OID, 0) == (Status.OK, data)
    assert store.get(client, pool_id, OID, 0)[0] is second_get
    [record] = store.pool_stats(client, pool_id)
    assert (PoolFlag.INCLUSIVE_GETS in record.flags) is (inclusive and not persistent)
    assert record.gets == 2 and record.hits == (2 if second_get is Status.OK else 1)


def test_shared_pool_pages_are_seen_by_every_member() -> None:
    store = Store(BIG)
    one = store.add_client("g1", shared_uuids=frozenset({SHARED}))
    two = store.add_client("g2", shared_uuids=frozenset({SHARED}))
    new_pool(store, two, persistent=False)  # so that g2's local id differs
    _, id_one, shared_one = store.new_pool(one, False, shared_uuid=SHARED)
    _, id_two, shared_two = store.new_pool(two, False, shared_uuid=SHARED)
    assert shared_one and shared_two and (id_one, id_two) == (0, 1)
    store.put(one, id_one, OID, 0, text_page(2))
    assert store.get(two, id_two, OID, 0) == (Status.OK, text_page(2))
    assert store.get(one, id_one, OID, 0) == (Status.OK, text_page(2))
    assert store.stats()["shared_pools"] == 1


def test_a_shared_pool_is_joined_only_by_requests_of_its_label() -> None:
    # tmemd's cached disks share a pool under a label; a guest's agent naming the
    # same UUID over the ABI (no label) gets a pool of its own, so it can never
    # put a page where a cached disk reads what it takes for the image's.
    store = Store(BIG)
    disk = store.add_client("d1", shared_uuids=frozenset({SHARED}))
    agent = store.add_client("g2", shared_uuids=frozenset({SHARED}))
    _, disk_pool, disk_shared = store.new_pool(disk, False, shared_uuid=SHARED, label="readcache")
    _, agent_pool, agent_shared = store.new_pool(agent, False, shared_uuid=SHARED)
    assert disk_shared and agent_shared
    assert store.put(agent, agent_pool, OID, 0, text_page(9)) == Status.OK
    assert store.get(disk, disk_pool, OID, 0)[0] == Status.MISS
    _, joined, joined_shared = store.new_pool(agent, False, shared_uuid=SHARED, label="readcache")
    store.put(disk, disk_pool, OID, 1, text_page(3))
    assert joined_shared and store.get(agent, joined, OID, 1) == (Status.OK, text_page(3))
    assert store.stats()["shared_pools"] == 2


# ----------------------------------------------------------- never stale


def refuse_by_budget(store: Store, client: Client) -> None:
    store.set_budget(store.used_bytes)


def refuse_by_cap(store: Store, client: Client) -> None:
    store.set_cap(client, client.stored_bytes)


def refuse_by_freeze(store: Store, client: Client) -> None:
    store.freeze(client)


@pytest.mark.parametrize(
    ("refuse", "expected"),
    [
        (refuse_by_budget, Status.REFUSED),
        (refuse_by_cap, Status.REFUSED),
        (refuse_by_freeze, Status.FROZEN),
    ],
    ids=["budget", "cap", "frozen"],
)
@pytest.mark.parametrize("batch", [False, True], ids=["put", "put_many"])
def test_refused_overwrite_flushes_the_old_copy(
    refuse: Callable[[Store, Client], None], expected: Status, batch: bool
) -> None:
    store, client = new_store()
    pool_id = new_pool(store, client, persistent=True)
    store.put(client, pool_id, OID, 0, text_page(1))  # compresses well ...
    refuse(store, client)
    bigger = random_page(1)  # ... its replacement does not: it cannot fit
    if batch:
        assert store.put_many(client, pool_id, [(OID, 0)], [bigger]) == [expected]
    else:
        assert store.put(client, pool_id, OID, 0, bigger) is expected
    assert store.get(client, pool_id, OID, 0) == (Status.MISS, None)
    assert store.used_bytes == 0 and client.stored_bytes == 0
    [record] = store.pool_stats(client, pool_id)
    assert record.refusals == 1 and record.puts == 2


def test_accepted_overwrite_replaces_the_data() -> None:
    store, client = new_store()
    pool_id = new_pool(store, client, persistent=True)
    store.put(client, pool_id, OID, 0, random_page(1))
    assert store.put(client, pool_id, OID, 0, text_page(1)) is Status.OK
    assert store.get(client, pool_id, OID, 0) == (Status.OK, text_page(1))
    assert store.pages == 1 and store.used_bytes < cost(1, persistent=True)


# ----------------------------------------------------------------- eviction


def fill(store: Store, client: Client, pool_id: int, count: int, first: int = 0) -> list[Status]:
    """Put ``count`` incompressible pages of object OID at indexes first.. (see cost)."""
    return [
        store.put(client, pool_id, OID, index, random_page(index))
        for index in range(first, first + count)
    ]


def test_global_lru_evicts_oldest_and_a_hit_refreshes() -> None:
    store, client = new_store(budget=cost(4, persistent=False))
    pool_id = new_pool(store, client, persistent=False, inclusive_gets=True)
    fill(store, client, pool_id, 4)
    assert store.get(client, pool_id, OID, 0)[0] is Status.OK  # 0 becomes the youngest
    fill(store, client, pool_id, 2, first=4)
    present = [index for index in range(6) if page_present(store, client, pool_id, index)]
    assert present == [0, 3, 4, 5]
    [record] = store.pool_stats(client, pool_id)
    assert record.evictions == 2 and store.used_bytes == cost(4, persistent=False)


def test_heavy_client_loses_its_own_pages_light_client_keeps_its_share() -> None:
    store = Store(cost(10, persistent=False, objects=2))
    light = store.add_client("light")
    heavy = store.add_client("heavy")
    light_pool = new_pool(store, light, persistent=False)
    heavy_pool = new_pool(store, heavy, persistent=False)
    assert fill(store, light, light_pool, 3) == [Status.OK] * 3  # older than heavy's
    assert fill(store, heavy, heavy_pool, 30) == [Status.OK] * 30
    # The global LRU alone would have evicted light's (older) pages.
    assert all(page_present(store, light, light_pool, index) for index in range(3))
    assert light.evictions == 0 and heavy.evictions == 23
    heavy_present = [i for i in range(30) if page_present(store, heavy, heavy_pool, i)]
    assert heavy_present == list(range(23, 30))  # its oldest went first


def test_putter_within_its_share_takes_from_the_client_most_over_its_share() -> None:
    store = Store(cost(9, persistent=False, objects=3))  # three equal weights: a share is 3 pages
    old, greedy, late = (store.add_client(name) for name in ("old", "greedy", "late"))
    pools = {client.name: new_pool(store, client, persistent=False) for client in (old, greedy, late)}
    fill(store, old, pools["old"], 2)  # the oldest pages, but within its share
    fill(store, greedy, pools["greedy"], 7)
    fill(store, late, pools["late"], 4)
    assert (old.evictions, greedy.evictions, late.evictions) == (0, 3, 1)
    assert [i for i in range(7) if page_present(store, greedy, pools["greedy"], i)] == [3, 4, 5, 6]
    assert [i for i in range(4) if page_present(store, late, pools["late"], i)] == [1, 2, 3]
    assert old.stored_bytes == cost(2, persistent=False)


def test_client_over_its_weighted_share_shrinks_to_it() -> None:
    # Four objects' worth of slack, so that small's share holds its one object.
    store = Store(cost(12, persistent=False, objects=4))
    small = store.add_client("small", weight=100)  # share: 3 pages
    big = store.add_client("big", weight=300)  # share: 9 pages
    small_pool = new_pool(store, small, persistent=False)
    big_pool = new_pool(store, big, persistent=False)
    fill(store, small, small_pool, 8)
    fill(store, big, big_pool, 20)
    assert store.stats()["clients"]["small"]["share_bytes"] == cost(3, persistent=False)
    assert small.stored_bytes == cost(3, persistent=False)
    assert big.stored_bytes == cost(9, persistent=False)
    assert [i for i in range(8) if page_present(store, small, small_pool, i)] == [5, 6, 7]


def test_persistent_pages_are_never_evicted() -> None:
    store, client = new_store(budget=cost(4, persistent=True))
    other = store.add_client("g2")
    persistent = new_pool(store, client, persistent=True)
    ephemeral = new_pool(store, other, persistent=False)
    fill(store, other, ephemeral, 2, first=100)
    # Persistent puts push the ephemeral pages out, then are refused.
    assert fill(store, client, persistent, 6) == [Status.OK] * 4 + [Status.REFUSED] * 2
    assert other.evictions == 2 and store.pages == 4
    assert fill(store, other, ephemeral, 1, first=200) == [Status.REFUSED]
    for index in range(4):
        assert store.get(client, persistent, OID, index) == (Status.OK, random_page(index))


# --------------------------------------------------------------------- caps


def test_cap_refuses_persistent_puts_and_spares_other_clients() -> None:
    store = Store(BIG)
    capped = store.add_client("capped", cap_bytes=cost(3, persistent=True))
    free = store.add_client("free")
    capped_pool = new_pool(store, capped, persistent=True)
    free_pool = new_pool(store, free, persistent=True)
    assert fill(store, capped, capped_pool, 4) == [Status.OK] * 3 + [Status.REFUSED]
    assert fill(store, free, free_pool, 10) == [Status.OK] * 10
    assert capped.refusals == 1 and capped.stored_bytes == cost(3, persistent=True)


def test_cap_makes_room_from_the_clients_own_ephemeral_pages() -> None:
    store = Store(BIG)
    cap = cost(1, persistent=False) + cost(2, persistent=True)  # 3 ephemeral pages fit too
    capped = store.add_client("capped", cap_bytes=cap)
    ephemeral = new_pool(store, capped, persistent=False)
    persistent = new_pool(store, capped, persistent=True)
    assert fill(store, capped, ephemeral, 3) == [Status.OK] * 3
    assert fill(store, capped, persistent, 2) == [Status.OK] * 2
    assert capped.evictions == 2 and capped.stored_bytes == cap
    store.set_cap(capped, cost(1, persistent=True))  # evicts the last ephemeral page only
    assert capped.evictions == 3 and capped.stored_bytes == cost(2, persistent=True)
    assert fill(store, capped, persistent, 1, first=9) == [Status.REFUSED]
    store.set_cap(capped, None)
    assert fill(store, capped, persistent, 1, first=9) == [Status.OK]


# ------------------------------------------------------------- freeze/thaw


def test_frozen_client_refuses_puts_but_serves_gets_and_flushes() -> None:
    store, client = new_store()
    pool_id = new_pool(store, client, persistent=True)
    fill(store, client, pool_id, 2)
    store.freeze("g1")
    assert fill(store, client, pool_id, 1, first=7) == [Status.FROZEN]
    assert store.put_many(client, pool_id, [(OID, 8)], [random_page(8)]) == [Status.FROZEN]
    assert store.get(client, pool_id, OID, 0) == (Status.OK, random_page(0))
    assert store.flush_page(client, pool_id, OID, 1) is Status.OK
    assert store.pages == 1 and store.stats()["clients"]["g1"]["frozen"]
    store.thaw("g1")
    assert fill(store, client, pool_id, 1, first=7) == [Status.OK]


# ------------------------------------------------------------- validation


@pytest.mark.parametrize("page_shift", [11, 22, 0, -1])
def test_new_pool_rejects_page_shift_out_of_range(page_shift: int) -> None:
    store, client = new_store()
    assert store.new_pool(client, True, page_shift=page_shift) == (Status.INVALID, -1, False)


@pytest.mark.parametrize("size", [PAGE, 2 * PAGE, 16 * PAGE])
def test_put_of_the_wrong_page_size_is_invalid(size: int) -> None:
    store, client = new_store()
    pool_id = new_pool(store, client, persistent=True, page_shift=13)
    expected = Status.OK if size == 2 * PAGE else Status.INVALID
    assert store.put(client, pool_id, OID, 0, bytes(size)) is expected
    statuses = store.put_many(client, pool_id, [(OID, 1), (OID, 2)], [bytes(size), bytes(2 * PAGE)])
    assert statuses == [expected, Status.OK]


@pytest.mark.parametrize("pool_id", [-1, 1, MAX_POOLS_PER_CLIENT, 1 << 32])
def test_unknown_pool_id_is_invalid_for_every_operation(pool_id: int) -> None:
    store, client = new_store()
    new_pool(store, client, persistent=True)  # pool 0 exists, the others do not
    keys = [(OID, 0), (OID, 1)]
    assert store.put(client, pool_id, OID, 0, bytes(PAGE)) is Status.INVALID
    assert store.get(client, pool_id, OID, 0) == (Status.INVALID, None)
    assert store.flush_page(client, pool_id, OID, 0) is Status.INVALID
    assert store.flush_object(client, pool_id, OID) is Status.INVALID
    assert store.destroy_pool(client, pool_id) is Status.INVALID
    assert store.flush_pool(client, pool_id) is Status.INVALID
    assert store.put_many(client, pool_id, keys, [bytes(PAGE)] * 2) == [Status.INVALID] * 2
    assert store.get_many(client, pool_id, keys) == ([Status.INVALID] * 2, [])
    assert store.flush_many(client, pool_id, keys) == [Status.INVALID] * 2
    assert store.pool_stats(client, pool_id) == []


def test_too_many_pools_then_a_freed_slot_is_reused() -> None:
    store, client = new_store()
    ids = [new_pool(store, client, persistent=index % 2 == 0) for index in range(MAX_POOLS_PER_CLIENT)]
    assert ids == list(range(MAX_POOLS_PER_CLIENT))
    assert store.new_pool(client, False) == (Status.NOT_PERMITTED, -1, False)
    assert store.destroy_pool(client, 5) is Status.OK
    assert store.destroy_pool(client, 5) is Status.INVALID
    assert store.new_pool(client, True) == (Status.OK, 5, False)


# ------------------------------------------------------------ shared pools

OTHER = uuid.UUID(int=42)


@pytest.mark.parametrize(
    ("authorised", "persistent", "requested", "granted"),
    [
        ({SHARED}, False, SHARED, True),
        (set(), False, SHARED, False),  # not authorised: private
        ({OTHER}, False, SHARED, False),  # authorised for another UUID
        ({SHARED}, True, SHARED, False),  # persistent pools are never shared
        ({INVALID_UUID}, False, INVALID_UUID, False),  # Xen's "no UUID"
        ({SHARED}, False, None, False),
    ],
    ids=["authorised", "unauthorised", "other-uuid", "persistent", "invalid-uuid", "no-uuid"],
)
def test_shared_pool_authorisation(
    authorised: set[uuid.UUID], persistent: bool, requested: uuid.UUID | None, granted: bool
) -> None:
    store = Store(BIG)
    owner = store.add_client("owner", shared_uuids=frozenset(authorised))
    status, pool_id, shared = store.new_pool(owner, persistent, shared_uuid=requested)
    assert (status, pool_id, shared) == (Status.OK, 0, granted)
    # A private pool made instead is really private: an authorised client
    # asking for the same UUID gets a new, empty pool.
    store.put(owner, pool_id, OID, 0, text_page(3))
    peer = store.add_client("peer", shared_uuids=frozenset({SHARED, INVALID_UUID}))
    _, peer_pool, _ = store.new_pool(peer, persistent, shared_uuid=requested)
    expected = (Status.OK, text_page(3)) if granted else (Status.MISS, None)
    assert store.get(peer, peer_pool, OID, 0) == expected


def test_shared_pool_with_another_page_size_is_private() -> None:
    store = Store(BIG)
    one = store.add_client("g1", shared_uuids=frozenset({SHARED}))
    two = store.add_client("g2", shared_uuids=frozenset({SHARED}))
    assert store.new_pool(one, False, shared_uuid=SHARED)[2] is True
    assert store.new_pool(two, False, page_shift=13, shared_uuid=SHARED) == (Status.OK, 0, False)


def test_shared_pool_survives_its_owner_and_dies_with_its_last_member() -> None:
    store = Store(BIG)
    one = store.add_client("g1", shared_uuids=frozenset({SHARED}))
    two = store.add_client("g2", shared_uuids=frozenset({SHARED}))
    _, id_one, _ = store.new_pool(one, False, shared_uuid=SHARED)
    _, id_two, _ = store.new_pool(two, False, shared_uuid=SHARED)
    private = new_pool(store, two, persistent=False)
    fill(store, one, id_one, 3)
    fill(store, two, private, 1, first=100)  # younger than the shared pages
    assert one.stored_bytes == cost(3, False) and two.stored_bytes == cost(1, False)
    store.remove_client(one)  # the owner leaves: g2 is charged from now on
    assert two.stored_bytes == store.used_bytes == cost(4, persistent=False, objects=2)
    assert store.get(two, id_two, OID, 2) == (Status.OK, random_page(2))
    fill(store, two, id_two, 1, first=3)
    # The moved pages join g2's LRU by age: the two oldest shared pages go.
    store.set_budget(cost(3, persistent=False, objects=2))
    assert [i for i in range(4) if page_present(store, two, id_two, i)] == [2, 3]
    assert page_present(store, two, private, 100)
    assert store.destroy_pool(two, id_two) is Status.OK
    assert store.destroy_pool(two, private) is Status.OK
    assert store.used_bytes == 0 and store.stats()["shared_pools"] == 0
    _, again, _ = store.new_pool(two, False, shared_uuid=SHARED)
    assert store.get(two, again, OID, 2) == (Status.MISS, None)


def test_new_owner_of_a_shared_pool_is_held_to_its_cap() -> None:
    store = Store(BIG)
    one = store.add_client("g1", shared_uuids=frozenset({SHARED}))
    two = store.add_client("g2", cap_bytes=cost(1, False), shared_uuids=frozenset({SHARED}))
    _, id_one, _ = store.new_pool(one, False, shared_uuid=SHARED)
    _, id_two, _ = store.new_pool(two, False, shared_uuid=SHARED)
    fill(store, one, id_one, 3)
    assert store.destroy_pool(one, id_one) is Status.OK
    assert two.stored_bytes == store.used_bytes == cost(1, False) and two.evictions == 2
    assert [i for i in range(3) if page_present(store, two, id_two, i)] == [2]


def test_shared_pool_count_is_bounded() -> None:
    store = Store(BIG)
    uuids = [uuid.UUID(int=number + 1) for number in range(MAX_SHARED_POOLS + 1)]
    clients = [store.add_client(f"g{n}", shared_uuids=frozenset(uuids)) for n in range(2)]
    for number, pool_uuid in enumerate(uuids[:MAX_SHARED_POOLS]):
        assert store.new_pool(clients[number % 2], False, shared_uuid=pool_uuid)[2] is True
    assert store.new_pool(clients[0], False, shared_uuid=uuids[-1]) == (
        Status.NOT_PERMITTED, -1, False,
    )


# -------------------------------------------------------------------- dedup


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no-dedup"])
def test_dedup_stores_identical_content_once_per_client(dedup: bool) -> None:
    store = Store(BIG)
    client = store.add_client("g1", dedup=dedup)
    first = new_pool(store, client, persistent=True)
    second = new_pool(store, client, persistent=False)
    data = random_page(5)
    for index in range(3):
        store.put(client, first, OID, index, data)
    store.put(client, second, OID, 0, data)
    # The ephemeral page's data is the persistent pages' blob (one table per client).
    if dedup:
        expected = PAGE + BLOB + 3 * page_overhead_bytes(True) + page_overhead_bytes(False) + 2 * OBJECT
    else:
        expected = cost(3, persistent=True) + cost(1, persistent=False)
    assert client.stored_bytes == store.used_bytes == expected
    assert store.stats()["clients"]["g1"]["dedup_hits"] == (3 if dedup else 0)
    assert store.get(client, second, OID, 0) == (Status.OK, data)  # exclusive get
    for index in range(3):
        assert store.get(client, first, OID, index) == (Status.OK, data)
    store.put(client, first, OID, 1, text_page(5))  # overwrite drops one reference
    assert store.get(client, first, OID, 1) == (Status.OK, text_page(5))
    store.flush_object(client, first, OID)
    assert store.used_bytes == 0 and client.dedup_table == {}


def test_dedup_never_crosses_clients_or_shared_pools() -> None:
    store = Store(BIG)
    one = store.add_client("g1", dedup=True, shared_uuids=frozenset({SHARED}))
    two = store.add_client("g2", dedup=True, shared_uuids=frozenset({SHARED}))
    data = random_page(6)
    for client in (one, two):
        store.put(client, new_pool(store, client, persistent=True), OID, 0, data)
    assert one.stored_bytes == two.stored_bytes == cost(1, persistent=True) + BLOB
    _, shared_pool, shared = store.new_pool(one, False, shared_uuid=SHARED)
    assert shared
    store.put(one, shared_pool, OID, 0, data)  # same content, but a shared pool
    assert one.stored_bytes == cost(1, True) + BLOB + cost(1, False) and one.dedup_hits == 0


def test_dedup_accounting_under_refusal_and_overwrite() -> None:
    store = Store(2 * (P_PAGE + BLOB) + OBJECT)
    client = store.add_client("g1", dedup=True)
    pool_id = new_pool(store, client, persistent=True)
    one, other = random_page(9), random_page(10)
    assert store.put(client, pool_id, OID, 0, one) is Status.OK
    assert store.put(client, pool_id, OID, 1, one) is Status.OK  # only the overhead
    assert store.put(client, pool_id, OID, 2, other) is Status.REFUSED
    one_blob = P_PAGE + BLOB + OBJECT + PERSISTENT_PAGE_OVERHEAD_BYTES
    assert store.used_bytes == client.stored_bytes == one_blob
    assert len(client.dedup_table) == 1
    # Overwriting drops index 0's reference first, which makes just enough room.
    assert store.put(client, pool_id, OID, 0, other) is Status.OK
    assert store.used_bytes == store.budget_bytes and len(client.dedup_table) == 2
    assert store.get(client, pool_id, OID, 0) == (Status.OK, other)
    assert store.get(client, pool_id, OID, 1) == (Status.OK, one)


# --------------------------------------------------------- accounting to 0


def flush_each_page(store: Store, client: Client, pool_ids: list[int]) -> None:
    for pool_id in pool_ids:
        for index in range(6):
            assert store.flush_page(client, pool_id, OID, index) is Status.OK
        store.flush_page(client, pool_id, (9, 9, 9), 0)


def flush_objects(store: Store, client: Client, pool_ids: list[int]) -> None:
    for pool_id in pool_ids:
        for oid in (OID, (9, 9, 9)):
            assert store.flush_object(client, pool_id, oid) is Status.OK


def flush_batches(store: Store, client: Client, pool_ids: list[int]) -> None:
    for pool_id in pool_ids:
        keys = [(OID, index) for index in range(6)] + [((9, 9, 9), WHOLE_OBJECT)]
        assert store.flush_many(client, pool_id, keys) == [Status.OK] * 7


def flush_pools(store: Store, client: Client, pool_ids: list[int]) -> None:
    for pool_id in pool_ids:
        assert store.flush_pool(client, pool_id) is Status.OK


def flush_whole_client(store: Store, client: Client, pool_ids: list[int]) -> None:
    assert store.flush_client("g1") == 14


def destroy_pools(store: Store, client: Client, pool_ids: list[int]) -> None:
    for pool_id in pool_ids:
        assert store.destroy_pool(client, pool_id) is Status.OK


def remove_the_client(store: Store, client: Client, pool_ids: list[int]) -> None:
    store.remove_client(client)
    assert store.clients == []


@pytest.mark.parametrize(
    "flush",
    [flush_each_page, flush_objects, flush_batches, flush_pools, flush_whole_client,
     destroy_pools, remove_the_client],
)
@pytest.mark.parametrize("dedup", [False, True], ids=["no-dedup", "dedup"])
def test_accounting_returns_to_zero(
    flush: Callable[[Store, Client, list[int]], None], dedup: bool
) -> None:
    store = Store(BIG)
    client = store.add_client("g1", dedup=dedup)
    pool_ids = [new_pool(store, client, persistent=p) for p in (True, False)]
    kinds = sorted(PAGE_KINDS)
    for pool_id in pool_ids:
        for index in range(6):
            store.put(client, pool_id, OID, index, PAGE_KINDS[kinds[index]](PAGE))
        store.put(client, pool_id, (9, 9, 9), 0, text_page(0))
    assert store.pages == 14 and store.used_bytes > 0
    flush(store, client, pool_ids)
    assert (store.pages, store.raw_bytes, store.used_bytes, store.ephemeral_bytes) == (0, 0, 0, 0)
    assert (client.pages, client.stored_bytes, client.ephemeral_bytes) == (0, 0, 0)
    assert client.dedup_table == {} and not client.lru
    for record in store.pool_stats(client):
        assert (record.pages, record.raw_bytes, record.stored_bytes) == (0, 0, 0)


def test_exclusive_gets_return_accounting_to_zero() -> None:
    store, client = new_store()
    pool_id = new_pool(store, client, persistent=False)
    keys = [(OID, index) for index in range(8)]
    pages = [text_page(index) for index in range(8)]
    assert store.put_many(client, pool_id, keys, pages) == [Status.OK] * 8
    assert store.get_many(client, pool_id, keys) == ([Status.OK] * 8, pages)
    assert store.used_bytes == 0 and not client.lru


# ------------------------------------------------------------------ budget


def test_budget_changes_evict_ephemeral_keep_persistent() -> None:
    store, client = new_store(budget=cost(4, True) + cost(6, False))
    persistent = new_pool(store, client, persistent=True)
    ephemeral = new_pool(store, client, persistent=False)
    fill(store, client, persistent, 4)
    fill(store, client, ephemeral, 4, first=10)
    store.set_budget(cost(4, True) + cost(2, False))
    assert store.used_bytes == store.budget_bytes and client.evictions == 2
    store.set_budget(cost(2, True))  # below the persistent pages: all kept
    assert store.used_bytes == cost(4, True) and client.evictions == 4
    assert fill(store, client, persistent, 1, first=50) == [Status.REFUSED]
    assert fill(store, client, ephemeral, 1, first=50) == [Status.REFUSED]
    for index in range(4):
        assert store.get(client, persistent, OID, index) == (Status.OK, random_page(index))
    store.set_budget(cost(5, True))
    assert fill(store, client, persistent, 1, first=50) == [Status.OK]


def test_weight_change_moves_the_shares() -> None:
    store = Store(cost(8, persistent=False, objects=2))
    one = store.add_client("g1")
    two = store.add_client("g2")
    pools = {client.name: new_pool(store, client, persistent=False) for client in (one, two)}
    fill(store, one, pools["g1"], 4)
    fill(store, two, pools["g2"], 4)
    store.set_weight("g2", 300)  # g1's share drops to 2 pages
    fill(store, two, pools["g2"], 2, first=4)
    assert one.stored_bytes == cost(2, False) and two.stored_bytes == cost(6, False)


# ----------------------------------------------------------- batches, stats


def test_batches_match_single_operations() -> None:
    store, client = new_store(budget=cost(3, persistent=True))
    pool_id = new_pool(store, client, persistent=True)
    keys = [(OID, index) for index in range(4)]
    pages = [random_page(index) for index in range(4)]
    assert store.put_many(client, pool_id, keys, pages) == [Status.OK] * 3 + [Status.REFUSED]
    statuses, found = store.get_many(client, pool_id, [(OID, 3), (OID, 1), ((7, 7, 7), 0)])
    assert statuses == [Status.MISS, Status.OK, Status.MISS] and found == [pages[1]]
    with pytest.raises(ValueError):
        store.put_many(client, pool_id, keys, pages[:2])
    [record] = store.pool_stats(client)
    assert (record.puts, record.refusals, record.gets, record.hits) == (4, 1, 3, 1)


def test_stats_are_json_and_add_up() -> None:
    # g2's share (a third) is just its 2 pages; g1 (3 persistent, 2 shared
    # ephemeral pages) is over its two thirds.
    budget = 6 * E_PAGE + 3 * OBJECT
    store = Store(budget)
    one = store.add_client("g1", cap_bytes=BIG, shared_uuids=frozenset({SHARED}))
    two = store.add_client("g2", weight=50)
    persistent = new_pool(store, one, persistent=True)
    _, shared_pool, _ = store.new_pool(one, False, shared_uuid=SHARED)
    ephemeral = new_pool(store, two, persistent=False)
    fill(store, one, persistent, 3)
    fill(store, one, shared_pool, 2)
    fill(store, two, ephemeral, 4)
    store.get(two, ephemeral, OID, 3)
    store.get(two, ephemeral, OID, 0)
    store.flush_page(one, persistent, OID, 2)
    store.remove_client(two)
    stats = json.loads(json.dumps(store.stats()))
    assert stats["puts"] == 9 and stats["gets"] == 2 and stats["hits"] == 1
    assert stats["misses"] == 1 and stats["flushes"] == 1 and stats["refusals"] == 0
    # g2 (share: 2 pages) took one shared page from g1 (over its share of
    # two thirds), then evicted its own.
    assert stats["evictions"] == 3 and stats["pages"] == 3
    g1 = stats["clients"]["g1"]
    assert list(stats["clients"]) == ["g1"] and g1["cap_bytes"] == BIG
    g1_bytes = cost(2, persistent=True) + cost(1, persistent=False)
    assert g1["pages"] == 3 and g1["stored_bytes"] == stats["used_bytes"] == g1_bytes
    assert g1["evictions"] == 1 and g1["share_bytes"] == budget
    assert [pool["pool_id"] for pool in g1["pools"]] == [0, 1]
    assert g1["pools"][1]["shared"] and g1["pools"][1]["shared_uuid"] == str(SHARED)
    records = store.pool_stats(one)
    assert [(r.pool_id, r.pages, r.raw_bytes, r.flushes, r.evictions) for r in records] == [
        (0, 2, 2 * PAGE, 1, 0), (1, 1, PAGE, 0, 1),
    ]
    assert records[1].flags == PoolFlag.SHARED


def test_client_administration_errors() -> None:
    store, client = new_store()
    assert store.client("g1") is client and store.clients == [client]
    with pytest.raises(ValueError):
        store.add_client("g1")
    with pytest.raises(KeyError):
        store.client("nobody")
    with pytest.raises(KeyError):
        store.freeze("nobody")
    with pytest.raises(ValueError):
        store.set_weight(client, -1)
    with pytest.raises(ValueError):
        store.set_budget(-1)
    store.remove_client(client)
    with pytest.raises(KeyError):
        store.thaw(client)  # a removed client is gone, even by object
