"""The tmem page store: clients, pools, budget, caps, weighted eviction.

Pure and synchronous: no I/O, no threads, one caller at a time. Semantics
follow Xen's tmem (xen/common/tmem.c) unless docs/STORE.md says otherwise.

Layout, chosen for a lean per-page path:

- ``Pool.objects`` maps an object id to ``{index: stored page}``; a stored page
  is a bare ``int``/``bytes`` (see :mod:`.pagecodec`) or, in a dedup pool,
  a shared :class:`DedupBlob`.
- Ephemeral pages also sit in their owner client's ``lru`` (an OrderedDict
  from ``(pool, oid, index)`` to a global tick). The global LRU is the oldest
  head among the clients' LRUs, so a put touches one LRU, not two.
- Accounting is in stored bytes: what a page really costs the host, its data
  bytes plus its metadata (the overhead constants below), so a budget bounds
  tmemd's memory. A dedup blob's data and metadata are charged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Final, TypeAlias
from uuid import UUID

from tmem_host.replies import ClientStats, JournalStats, OpCounterStats, StorePoolStats, StoreStats
from tmem_wire.abi import (
    MAX_PAGE_SHIFT,
    MIN_PAGE_SHIFT,
    WHOLE_OBJECT,
    Buffer,
    Key,
    Oid,
    PoolFlag,
    PoolStats,
    Status,
)

from .pagecodec import (
    EncodedPages, StoredPage, decode_page, decode_pages, encode_page, encode_pages, stored_data_bytes,
)
from .tier import REMOTE_PAGE_EXTRA_BYTES, PageTier, RemotePage

#: Xen's MAX_POOLS_PER_DOMAIN and MAX_GLOBAL_SHARED_POOLS.
MAX_POOLS_PER_CLIENT: Final = 16
MAX_SHARED_POOLS: Final = 16
DEFAULT_WEIGHT: Final = 100
# What the host really spends on a page beyond its data bytes, charged so that
# RSS <= budget + a fixed overhead (docs/STORE.md, tests/daemon/test_rss_bound.py).
# Measured on CPython 3.11 two ways: tracemalloc, the worst figure over stores
# of 20k..300k pages sampled every 500 pages (a dict just past a resize holds
# up to 3x slack); and tmemd's RSS, the slope between same-filled floods of an
# 8 MiB and a 40/64/96 MiB budget (malloc headers and arenas included, fixed
# costs cancel). Keys as decoded frames give them (fresh tuples of u64 ints up
# to 2^64), fill words up to 2^64. The encodings differ by < 10 bytes (a fill
# int is 36 bytes, a bytes header 33 + rounding), so one figure per kind covers
# same-filled, lz4 and raw pages. Each constant is the worst measured + ~10%.
#: Persistent page, measured 80-132 (tracemalloc), 98 (RSS): its slot in the
#: object's dict, the index int, the stored int or bytes header.
PERSISTENT_PAGE_OVERHEAD_BYTES: Final = 160
#: Ephemeral page, measured 278-340 (tracemalloc), 304-368 (RSS): the above
#: plus its LRU entry (OrderedDict node and slot, key tuple, tick int).
EPHEMERAL_PAGE_OVERHEAD_BYTES: Final = 416
#: An object (oid), charged while it holds a page; with one page per object,
#: measured 396 persistent / 456 ephemeral (tracemalloc), up to 468 / 575
#: (RSS): its dict, oid tuple and ints, its slot in the pool (and in the
#: pool's lru_oids).
OBJECT_OVERHEAD_BYTES: Final = 640
#: A dedup blob beyond its data bytes, measured 170 (tracemalloc): the
#: DedupBlob, its digest and its slot in the client's dedup table.
DEDUP_BLOB_OVERHEAD_BYTES: Final = 192


def page_overhead_bytes(persistent: bool) -> int:
    """The metadata bytes charged per page of a pool of that kind."""
    return PERSISTENT_PAGE_OVERHEAD_BYTES if persistent else EPHEMERAL_PAGE_OVERHEAD_BYTES

#: A persistent page's entry in its pool's local_lru (with a tier below): an
#: OrderedDict node and slot and the (oid, index) tuple; estimated from
#: sys.getsizeof (tuple 56, node and slots ~70), not measured like the above.
TIER_LRU_ENTRY_BYTES: Final = 160
#: An evicted ephemeral page is demoted (not dropped) only if its stored form is
#: at least this big: its RemotePage costs REMOTE_PAGE_EXTRA_BYTES more than the
#: page's metadata, so smaller pages would free little here for a round trip.
MIN_DEMOTED_EPHEMERAL_BYTES: Final = 512

#: Xen treats the all-ones UUID as "no UUID": such a shared request is private.
INVALID_UUID: Final = UUID(int=(1 << 128) - 1)

_OK: Final = Status.OK
_MISS: Final = Status.MISS
_REFUSED: Final = Status.REFUSED
_FROZEN: Final = Status.FROZEN
_INVALID: Final = Status.INVALID
_NOT_PERMITTED: Final = Status.NOT_PERMITTED

_LruKey: TypeAlias = "tuple[Pool, Oid, int]"


class DedupBlob:
    """One stored page content referenced by ``refs`` pages of one client."""

    __slots__ = ("digest", "stored", "charge_bytes", "refs")

    def __init__(self, digest: bytes, stored: StoredPage) -> None:
        self.digest = digest
        self.stored = stored
        #: Charged once for all its pages: data bytes plus the blob's metadata.
        self.charge_bytes = stored_data_bytes(stored) + DEDUP_BLOB_OVERHEAD_BYTES
        self.refs = 0


_PageValue: TypeAlias = "bytes | int | DedupBlob | RemotePage"


class OpCounters:
    """Cumulative operation counters, kept per pool and per client."""

    __slots__ = ("puts", "refusals", "gets", "hits", "flushes", "evictions")

    COUNTER_NAMES: Final = ("puts", "refusals", "gets", "hits", "flushes", "evictions")

    def __init__(self) -> None:
        self.puts = 0
        self.refusals = 0
        self.gets = 0
        self.hits = 0
        self.flushes = 0
        self.evictions = 0

    def counters(self) -> OpCounterStats:
        return {"puts": self.puts, "refusals": self.refusals, "gets": self.gets, "hits": self.hits,
                "flushes": self.flushes, "evictions": self.evictions, "misses": self.gets - self.hits}

    def add_counters(self, other: OpCounters) -> None:
        for name in self.COUNTER_NAMES:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Pool(OpCounters):
    """A tmem pool; a shared pool is one object in several clients' slots."""

    __slots__ = (
        "objects",
        "persistent",
        "shared_uuid",
        "page_shift",
        "page_size",
        "inclusive_gets",
        "exclusive_gets",
        "dedup",
        "owner",
        "members",
        "pages",
        "stored_bytes",
        "lru_oids",
        "label",
        "page_overhead",
        "remote_pages",
        "remote_bytes",
        "local_lru",
        "remote_page_cost",
    )

    def __init__(
        self,
        owner: Client,
        persistent: bool,
        page_shift: int,
        shared_uuid: UUID | None,
        inclusive_gets: bool,
        label: str = "",
        tiered: bool = False,
    ) -> None:
        super().__init__()
        #: Who made the pool, for tmemd's own use ("nbd": the NBD export's pool).
        self.label = label
        self.objects: dict[Oid, dict[int, _PageValue]] = {}
        self.persistent = persistent
        self.page_overhead = page_overhead_bytes(persistent)
        self.shared_uuid = shared_uuid
        self.page_shift = page_shift
        self.page_size = 1 << page_shift
        shared = shared_uuid is not None
        # Only private ephemeral pools have inclusive/exclusive choice (Xen:
        # persistent and shared gets never remove the page).
        self.inclusive_gets = inclusive_gets and not persistent and not shared
        self.exclusive_gets = not persistent and not shared and not inclusive_gets
        # Never dedup a shared pool: its content is visible to other clients,
        # so a dedup hit would leak the owner's private pages.
        self.dedup = owner.dedup and not shared
        # The owner is charged for the pool's pages (Xen's pool->client).
        self.owner = owner
        self.members: list[Client] = [owner]
        self.pages = 0
        #: Data + metadata of every page and object, as if no page were
        #: deduplicated (each page with a blob of its own).
        self.stored_bytes = 0
        #: Ephemeral pools: one oid tuple per object for all its LRU keys.
        #: Callers pass a fresh tuple per request (decoded from a frame);
        #: keeping each one alive in an LRU key cost ~100 bytes per page.
        self.lru_oids: dict[Oid, Oid] = {}
        #: Pages (of the above) whose data is in the tier below, and its bytes there.
        self.remote_pages = 0
        self.remote_bytes = 0
        #: With a tier below: the in-memory data pages, least recently put or got
        #: first (what demotion takes). Each entry is charged with its page.
        self.local_lru: OrderedDict[Key, None] | None = None
        if tiered and persistent and not self.dedup:
            self.local_lru = OrderedDict()
            self.page_overhead += TIER_LRU_ENTRY_BYTES
        #: What a remote page costs here: a page's metadata (not in local_lru) and
        #: its RemotePage (an ephemeral one's entry in the owner's remote_ephemeral
        #: replaces its LRU entry, which page_overhead counts).
        self.remote_page_cost = (self.page_overhead + REMOTE_PAGE_EXTRA_BYTES
                                 - (TIER_LRU_ENTRY_BYTES if self.local_lru is not None else 0))

    @property
    def shared(self) -> bool:
        return self.shared_uuid is not None

    @property
    def data_bytes(self) -> int:
        """stored_bytes without the metadata charges: the pages' data bytes."""
        per_page = self.page_overhead + (DEDUP_BLOB_OVERHEAD_BYTES if self.dedup else 0)
        return (self.stored_bytes - self.pages * per_page - len(self.objects) * OBJECT_OVERHEAD_BYTES
                - self.remote_pages * (self.remote_page_cost - self.page_overhead))


class Client(OpCounters):
    """A guest: its pools, limits and accounting. Build with Store.add_client."""

    __slots__ = (
        "name",
        "weight",
        "cap_bytes",
        "dedup",
        "shared_uuids",
        "frozen",
        "pools",
        "stored_bytes",
        "ephemeral_bytes",
        "lru",
        "dedup_table",
        "dedup_hits",
        "remote_pages",
        "remote_bytes",
        "demote_evicted",
        "remote_ephemeral",
    )

    def __init__(
        self,
        name: str,
        weight: int,
        cap_bytes: int | None,
        dedup: bool,
        shared_uuids: frozenset[UUID],
    ) -> None:
        super().__init__()
        self.name = name
        self.weight = weight
        self.cap_bytes = cap_bytes
        self.dedup = dedup
        self.shared_uuids = shared_uuids
        self.frozen = False
        self.pools: list[Pool | None] = [None] * MAX_POOLS_PER_CLIENT
        #: Bytes charged to this client (dedup blobs once), overhead included.
        self.stored_bytes = 0
        #: Upper bound of what evicting all its ephemeral pages would free.
        self.ephemeral_bytes = 0
        self.lru: OrderedDict[_LruKey, int] = OrderedDict()
        self.dedup_table: dict[bytes, DedupBlob] = {}
        self.dedup_hits = 0
        #: Its pages in the tier below (tmem_host.remote), and their bytes there.
        self.remote_pages = 0
        self.remote_bytes = 0
        #: Whether its evicted private ephemeral pages go to the tier (set_demote_evicted).
        self.demote_evicted = False
        #: Its ephemeral pages in the tier (not in ``lru``), least recently demoted
        #: or got first: evicted only when it has no ephemeral page in memory
        #: left (each frees just its metadata), and what persistent pages push
        #: out of a full remote quota (shed_remote_ephemeral).
        self.remote_ephemeral: OrderedDict[_LruKey, None] = OrderedDict()

    def __repr__(self) -> str:
        return f"Client({self.name!r})"

    @property
    def evictable(self) -> bool:
        """Whether it holds ephemeral pages, in memory or in the tier."""
        return bool(self.lru or self.remote_ephemeral)

    def owned_pools(self) -> list[Pool]:
        """The pools charged to this client, each once (a client may hold a
        shared pool in two slots)."""
        pools: list[Pool] = []
        for pool in self.pools:
            if pool is not None and pool.owner is self and all(pool is not p for p in pools):
                pools.append(pool)
        return pools

    # Page counts are summed over the pools on demand, keeping the put path
    # down to the byte counters that budget and cap checks need.
    @property
    def pages(self) -> int:
        return sum(pool.pages for pool in self.owned_pools())

    @property
    def raw_bytes(self) -> int:
        return sum(pool.pages * pool.page_size for pool in self.owned_pools())


class Store:
    """All clients' pages within one budget of stored bytes."""

    def __init__(self, budget_bytes: int, compress: bool = True) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.compress = compress
        self.used_bytes = 0
        self.ephemeral_bytes = 0
        self._clients: dict[str, Client] = {}
        # By (label, UUID): a pool tmemd made for itself (the cached disk's, label
        # "readcache") and one a guest's agent asked for under the same UUID are
        # different pools, so no guest can put pages into what tmemd serves as
        # read from an image.
        self._shared_pools: dict[tuple[str, UUID], Pool] = {}
        self._total_weight = 0
        self._tick = itertools.count()
        # Counters of removed clients, so global totals never go backwards.
        self._retired = OpCounters()
        #: Where persistent pages that do not fit go (the remote tier), if anywhere.
        self.tier: PageTier | None = None
        # Set while a client leaves memory but keeps its pages (detach_client).
        self._keeping_remote = False
        self._local_fraction = 1.0

    def attach_tier(self, tier: PageTier, local_fraction: float = 0.9) -> None:
        """Send persistent pages that do not fit to ``tier`` (before any client).
        Persistent pages fill at most ``local_fraction`` of the budget (and of a
        client's cap): the rest is room for the metadata of the pages the tier
        holds, and for the pages being demoted."""
        if self._clients:
            raise RuntimeError("attach the tier before adding clients")
        self.tier = tier
        self._local_fraction = local_fraction

    @property
    def pages(self) -> int:
        return sum(client.pages for client in self._clients.values())

    @property
    def raw_bytes(self) -> int:
        return sum(client.raw_bytes for client in self._clients.values())

    # ----------------------------------------------------------- clients

    def add_client(
        self,
        name: str,
        weight: int = DEFAULT_WEIGHT,
        cap_bytes: int | None = None,
        dedup: bool = False,
        shared_uuids: frozenset[UUID] = frozenset(),
    ) -> Client:
        if name in self._clients:
            raise ValueError(f"client {name!r} exists")
        _check_weight(weight)
        _check_cap(cap_bytes)
        client = Client(name, weight, cap_bytes, dedup, frozenset(shared_uuids))
        self._clients[name] = client
        self._total_weight += weight
        return client

    def client(self, name: str) -> Client:
        """The client called ``name``; KeyError if there is none."""
        return self._clients[name]

    @property
    def clients(self) -> list[Client]:
        return list(self._clients.values())

    def remove_client(self, client: Client | str) -> None:
        """Leave every pool (dropping what only it used) and forget the client:
        its pages are gone for good (a layer that keeps them on disk deletes them)."""
        client = self._resolve(client)
        for pool_id, pool in enumerate(client.pools):
            if pool is not None:
                self.destroy_pool(client, pool_id)
        self._forget_client(client)

    def detach_client(self, client: Client | str) -> None:
        """Take the client out of memory at a graceful stop. Here that is
        remove_client; a layer that keeps pages on disk keeps them for the next start."""
        self.remove_client(client)

    def _forget_client(self, client: Client) -> None:
        """Drop the client's pools from memory without recording their destruction
        (their copies in the tier stay: the journal points at them)."""
        self._keeping_remote = True
        try:
            self._forget_pools(client)
        finally:
            self._keeping_remote = False
        self._retired.add_counters(client)
        self._total_weight -= client.weight
        del self._clients[client.name]

    def _forget_pools(self, client: Client) -> None:
        for pool_id, pool in enumerate(client.pools):
            if pool is not None and pool.shared_uuid is not None:
                self.destroy_pool(client, pool_id)  # other members keep a shared pool
            elif pool is not None:
                self._drop_all_pages(pool)
                client.pools[pool_id] = None

    def pool_page_shift(self, client: Client, pool_id: int) -> int | None:
        """The page shift of the client's pool, or None if it has no such pool."""
        pool = _pool_of(client, pool_id)
        return None if pool is None else pool.page_shift

    def find_pool(self, client: Client, label: str) -> int | None:
        """The id of the client's persistent pool with this label (a frontend's own
        pool, found again after a restart), or None."""
        for pool_id, pool in enumerate(client.pools):
            if pool is not None and pool.persistent and pool.label == label:
                return pool_id
        return None

    def pool_keys(self, client: Client, pool_id: int) -> Iterator[Key]:
        """The keys of every page the client's pool holds."""
        pool = _pool_of(client, pool_id)
        if pool is not None:
            for oid, obj in pool.objects.items():
                for index in obj:
                    yield oid, index

    # -- what the layers below the frontends add (journal, remote tier) --------
    # The frontends call these on any store; here they say "nothing kept on disk".

    def resumed(self, client: Client | str) -> bool:
        """Whether the client's state was restored at its start (tmemd restarted)."""
        return False

    def lost_keys(self, client: Client | str, pool_id: int) -> frozenset[Key]:
        """Keys of a restored pool that tmemd dropped without the guest flushing
        them: a frontend fails reads of them rather than serve an older copy."""
        return frozenset()

    def deferred(self, client: Client) -> contextlib.AbstractContextManager[None]:
        """A block whose durable records are written together when it ends."""
        return contextlib.nullcontext()

    def make_durable(self, *, tier: bool = True) -> asyncio.Future[None] | None:
        """Make what the replies about to be sent acknowledge survive what the
        store's durability level promises (called once per batch of requests).
        A future means: not yet, the tier's writes are in flight; send the
        replies when it completes (they then hold, whatever its outcome).
        ``tier=False``: that future has completed; only make its outcome durable."""
        return self.tier.barrier() if tier and self.tier is not None else None

    def may_fetch(self, client: Client, pool_id: int) -> bool:
        """Whether a get from this pool may need fetch() (it holds remote pages)."""
        pool = _pool_of(client, pool_id)
        return pool is not None and pool.remote_pages > 0

    def fetch(self, client: Client, pool_id: int, keys: Sequence[Key], *,
              again: bool = False) -> asyncio.Future[None] | None:
        """Before a get of ``keys``: None if every page is in memory, else a future
        that completes once the tier has read the others back (get them then).

        ``again``: the get's fetch has ended and it is about to be served. A page
        the tier failed to read then misses (its read is not repeated, or a get of
        a page the cluster lost would wait forever); a copy gone since, one that
        was local and has been demoted meanwhile, or one dropped from the read
        cache, is read again (else the get would miss a page that is there:
        EIO to the guest, as a migrated guest once saw)."""
        pool = _pool_of(client, pool_id)
        if pool is None or not pool.remote_pages or self.tier is None:
            return None
        wanted: list[tuple[Oid, int, RemotePage]] = []
        held: list[RemotePage] = []
        objects = pool.objects
        for oid, index in keys:
            obj = objects.get(oid)
            value = obj.get(index) if obj is not None else None
            if type(value) is RemotePage:
                if value.pending is not None or value.fetched is not None:
                    held.append(value)
                elif not (again and value.read_failed):
                    wanted.append((oid, index, value))
        return self.tier.fetch(pool, wanted, held) if wanted else None

    async def read_back(self, client: Client, pool_id: int, keys: Sequence[Key]) -> None:
        """fetch() and wait, again until nothing is left to read: then (before the
        caller yields to the event loop) every page of ``keys`` the tier could
        read has its copy here."""
        waiter = self.fetch(client, pool_id, keys)
        while waiter is not None:
            await waiter
            waiter = self.fetch(client, pool_id, keys, again=True)

    # -- the tier's side: demotion, and writes that failed ------------------------

    def demotion_candidates(self, client: Client, max_pages: int) -> list[tuple[Pool, Oid, int, bytes]]:
        """Up to ``max_pages`` of the client's least recently used in-memory data
        pages (put or got longest ago) in its private persistent pools. Fill-word
        pages cost no data bytes and stay."""
        found: list[tuple[Pool, Oid, int, bytes]] = []
        for pool in client.owned_pools():
            if pool.local_lru is None:
                continue
            objects = pool.objects
            for oid, index in pool.local_lru:
                value = objects[oid][index]
                assert type(value) is bytes
                found.append((pool, oid, index, value))
                if len(found) == max_pages:
                    return found
        return found

    def demote(self, pool: Pool, oid: Oid, index: int, expected: bytes, page: RemotePage) -> bool:
        """The tier holds a copy of this page now: keep only ``page`` in memory, if
        the page is still ``expected`` (else a put or flush came first: False, and
        the tier deletes its copy)."""
        obj = pool.objects.get(oid)
        if obj is None or obj.get(index) is not expected:
            return False
        self._drop_page(pool, obj, oid, index)
        self._charge_remote(pool, pool.owner, oid, index, page)
        return True

    def strand(self, pool: Pool, oid: Oid, index: int, page: RemotePage) -> StoredPage | None:
        """The tier could not take a page it was given (its write failed): keep it
        in memory instead, without a budget check (its put was acknowledged); an
        ephemeral page is dropped instead. Returns the stored form kept, or None
        if the page had been replaced or dropped."""
        obj = pool.objects.get(oid)
        stored = page.pending
        if obj is None or obj.get(index) is not page or stored is None:
            return None
        if not pool.persistent:
            # A demoted ephemeral page was evicted: it may vanish, and it does.
            self._drop_page(pool, obj, oid, index)
            return None
        self._replace_with_local(pool, obj, oid, index, stored)
        # Beyond the budget or a cap now: ephemeral pages give way, as to any put.
        self._evict_to_cap(pool.owner)
        self._evict_to_budget()
        return stored

    def _replace_with_local(self, pool: Pool, obj: dict[int, _PageValue], oid: Oid, index: int,
                            stored: StoredPage) -> None:
        """A RemotePage's data back in memory, charged (no budget check: callers decide)."""
        self._drop_page(pool, obj, oid, index)
        cost = pool.page_overhead + stored_data_bytes(stored)
        self._charge(pool, pool.owner, oid, index, stored, cost, cost)

    def durability_stats(self, client: Client | str) -> JournalStats | None:
        """The client's journal figures, if the store keeps one."""
        return None

    def set_budget(self, budget_bytes: int) -> None:
        """Change the budget; ephemeral pages are evicted down to it."""
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._evict_to_budget()

    def _evict_to_budget(self) -> None:
        while self.used_bytes > self.budget_bytes:
            victim = self._pick_victim(None, 0)
            if victim is None:
                break  # only persistent pages left: kept, further puts refused
            self._evict_oldest(victim)

    def set_weight(self, client: Client | str, weight: int) -> None:
        client = self._resolve(client)
        _check_weight(weight)
        self._total_weight += weight - client.weight
        client.weight = weight

    def set_cap(self, client: Client | str, cap_bytes: int | None) -> None:
        """Change a client's cap; its ephemeral pages are evicted down to it."""
        client = self._resolve(client)
        _check_cap(cap_bytes)
        client.cap_bytes = cap_bytes
        self._evict_to_cap(client)

    def set_demote_evicted(self, client: Client | str, demote: bool) -> None:
        """Whether the client's evicted private ephemeral pages go to the tier below
        (as ephemeral pages there: a later get may still miss) instead of being
        dropped. ValueError without a tier."""
        if demote and self.tier is None:
            raise ValueError("no tier to demote ephemeral pages to")
        self._resolve(client).demote_evicted = demote

    def shed_remote_ephemeral(self, client: Client | str, nbytes: int | None = None) -> int:
        """Drop the client's oldest ephemeral pages in the tier until their remote
        bytes freed reach ``nbytes`` (None: all of them); returns the bytes freed.
        Persistent pages come first in a full remote quota, and a drain takes a
        guest out of the tier."""
        client = self._resolve(client)
        freed = 0
        while client.remote_ephemeral and (nbytes is None or freed < nbytes):
            freed += self._evict_oldest_remote(client)
        return freed

    def freeze(self, client: Client | str) -> None:
        self._resolve(client).frozen = True

    def thaw(self, client: Client | str) -> None:
        self._resolve(client).frozen = False

    def flush_client(self, client: Client | str) -> int:
        """Drop every page charged to the client; return how many."""
        client = self._resolve(client)
        flushed = 0
        for pool in client.owned_pools():
            count = self._drop_all_pages(pool)
            pool.flushes += count
            flushed += count
        client.flushes += flushed
        return flushed

    # ------------------------------------------------------------- pools

    def new_pool(
        self,
        client: Client,
        persistent: bool,
        page_shift: int = MIN_PAGE_SHIFT,
        shared_uuid: UUID | None = None,
        inclusive_gets: bool = False,
        label: str = "",
    ) -> tuple[Status, int, bool]:
        """Create (or join) a pool: (status, local pool id or -1, shared?).

        A shared request is honoured only for an ephemeral pool whose UUID the
        client is authorised for; otherwise the pool is private, as in Xen.
        ``label`` tags a pool for its creator inside tmemd (the NBD export finds
        its pool again after a restart by it); a shared pool is joined only by
        requests with its label (the guests' ABI requests have none).
        """
        if not MIN_PAGE_SHIFT <= page_shift <= MAX_PAGE_SHIFT:
            return _INVALID, -1, False
        try:
            pool_id = client.pools.index(None)
        except ValueError:
            return _NOT_PERMITTED, -1, False
        if (
            shared_uuid is not None
            and shared_uuid != INVALID_UUID
            and not persistent
            and shared_uuid in client.shared_uuids
        ):
            existing = self._shared_pools.get((label, shared_uuid))
            if existing is not None and existing.page_shift == page_shift:
                existing.members.append(client)
                client.pools[pool_id] = existing
                return _OK, pool_id, True
            if existing is None:
                if len(self._shared_pools) >= MAX_SHARED_POOLS:
                    return _NOT_PERMITTED, -1, False
                pool = Pool(client, persistent, page_shift, shared_uuid, inclusive_gets, label)
                self._shared_pools[(label, shared_uuid)] = pool
                client.pools[pool_id] = pool
                return _OK, pool_id, True
            # Same UUID, other page size: cannot be the same pool; private.
        client.pools[pool_id] = Pool(client, persistent, page_shift, None, inclusive_gets, label,
                                     tiered=self.tier is not None)
        return _OK, pool_id, False

    def restore_pool(self, client: Client, pool_id: int, page_shift: int, label: str = "") -> Pool:
        """Recreate a private persistent pool under the id it had before a restart
        (tmemd's journal replay); ValueError if that id is taken or invalid."""
        if not MIN_PAGE_SHIFT <= page_shift <= MAX_PAGE_SHIFT:
            raise ValueError(f"page shift {page_shift} out of range")
        if not 0 <= pool_id < MAX_POOLS_PER_CLIENT or client.pools[pool_id] is not None:
            raise ValueError(f"pool id {pool_id} of {client.name!r} is invalid or taken")
        pool = Pool(client, True, page_shift, None, False, label, tiered=self.tier is not None)
        client.pools[pool_id] = pool
        return pool

    def restore_page(self, client: Client, pool_id: int, oid: Oid, index: int,
                     stored: StoredPage) -> None:
        """Put a page back in the stored form a journal kept: no recompression and
        no budget or cap check (it was accepted before the restart; persistent
        pages are never evicted, so they are charged even above a lowered budget)."""
        pool = self._restore_slot(client, pool_id, oid, index)
        owner = pool.owner
        value: _PageValue = stored
        charged = logical = pool.page_overhead + stored_data_bytes(stored)
        if pool.dedup:
            digest = hashlib.blake2b(decode_page(stored, pool.page_size), digest_size=16).digest()
            blob = owner.dedup_table.get(digest)
            if blob is None:
                blob = owner.dedup_table[digest] = DedupBlob(digest, stored)
            blob.refs += 1
            value = blob
            logical = pool.page_overhead + blob.charge_bytes
            charged = logical if blob.refs == 1 else pool.page_overhead
        self._charge(pool, owner, oid, index, value, charged, logical)

    def promote(self, pool: Pool, oid: Oid, index: int, page: RemotePage) -> bool:
        """Bring a page the tier read back (``page.fetched``) home into memory, if it
        fits the local share; its copy in the tier is then released. False if the
        page changed meanwhile, was not read back, or does not fit."""
        obj = pool.objects.get(oid)
        stored = page.fetched
        if obj is None or obj.get(index) is not page or stored is None:
            return False
        # The remote page's own charge is freed by the swap: count it as room.
        cost = pool.page_overhead + stored_data_bytes(stored)
        if self._beyond_local_share(pool.owner, cost - pool.remote_page_cost):
            return False
        self._replace_with_local(pool, obj, oid, index, stored)
        return True

    def _restore_slot(self, client: Client, pool_id: int, oid: Oid, index: int) -> Pool:
        """A replayed page's pool (ValueError if there is none), its key emptied."""
        pool = _pool_of(client, pool_id)
        if pool is None:
            raise ValueError(f"no pool {pool_id} of {client.name!r}")
        obj = pool.objects.get(oid)
        if obj is not None and index in obj:
            self._drop_page(pool, obj, oid, index)
        return pool

    def restore_remote_page(self, client: Client, pool_id: int, oid: Oid, index: int,
                            version: int, nbytes: int) -> None:
        """Put back a page the journal says the tier holds (no data here; charged
        like restore_page). Without a tier its gets miss: lost, never zeros."""
        pool = self._restore_slot(client, pool_id, oid, index)
        page = RemotePage(version, nbytes)
        self._charge_remote(pool, pool.owner, oid, index, page)
        if self.tier is not None:
            self.tier.restored(page)

    @staticmethod
    def stored_pages(pool: Pool) -> Iterator[tuple[Oid, int, StoredPage | RemotePage]]:
        """Every page of a pool as (oid, index, stored form), dedup blobs unwrapped;
        a page in the tier below is its RemotePage."""
        for oid, obj in pool.objects.items():
            for index, value in obj.items():
                yield oid, index, stored_form(value)

    def destroy_pool(self, client: Client, pool_id: int) -> Status:
        """Free the client's pool slot; a shared pool dies with its last member."""
        pool = _pool_of(client, pool_id)
        if pool is None:
            return _INVALID
        if pool.shared_uuid is not None:
            pool.members.remove(client)
            if pool.members:
                client.pools[pool_id] = None
                if pool.owner is client and client not in pool.members:
                    self._reassign_owner(pool, pool.members[0])
                return _OK
            del self._shared_pools[(pool.label, pool.shared_uuid)]
        self._drop_all_pages(pool)  # in its slot still: the tier names its pages by it
        client.pools[pool_id] = None
        return _OK

    def flush_pool(self, client: Client, pool_id: int) -> Status:
        """Drop every page of a pool, keeping the pool."""
        pool = _pool_of(client, pool_id)
        if pool is None:
            return _INVALID
        count = self._drop_all_pages(pool)
        pool.flushes += count
        client.flushes += count
        return _OK

    # ------------------------------------------------------------- pages

    def put(self, client: Client, pool_id: int, oid: Oid, index: int, data: Buffer) -> Status:
        pool = _pool_of(client, pool_id)
        if pool is None or len(data) != pool.page_size:
            return _INVALID
        client.puts += 1
        pool.puts += 1
        if client.frozen:
            status = self._refuse_put(pool, oid, index, _FROZEN)
        else:
            status = self._put_page(pool, oid, index, data)
        if status is not _OK:
            client.refusals += 1
            pool.refusals += 1
        return status

    def put_many(
        self,
        client: Client,
        pool_id: int,
        keys: Sequence[Key],
        pages: Sequence[Buffer],
        encoded: EncodedPages | None = None,
    ) -> list[Status]:
        """Put ``pages[i]`` at ``keys[i]`` (oid, index); one status per page.
        Pages may be views into a batch payload: the store keeps none of them.
        ``encoded``: the pages' stored forms made ahead (PageEncoder), used if
        they were made for this pool's page size and the store's compression and
        the pool keeps pages by their own key (not dedup); else ignored."""
        if len(keys) != len(pages):
            raise ValueError("keys and pages differ in length")
        pool = _pool_of(client, pool_id)
        if pool is None:
            return [_INVALID] * len(keys)
        page_size = pool.page_size
        forms: Iterable[StoredPage | None] = itertools.repeat(None)
        if (encoded is not None and encoded.page_size == page_size and encoded.compress == self.compress
                and not pool.dedup and len(encoded.forms) == len(keys)):
            forms = encoded.forms
        put_page = self._refuse_frozen_put if client.frozen else self._put_page
        statuses: list[Status] = []
        append = statuses.append
        refused = 0
        invalid = 0
        for (oid, index), data, stored in zip(keys, pages, forms):
            if len(data) != page_size:
                append(_INVALID)
                invalid += 1
                continue
            status = put_page(pool, oid, index, data, stored)
            if status is not _OK:
                refused += 1
            append(status)
        valid = len(keys) - invalid
        client.puts += valid
        pool.puts += valid
        client.refusals += refused
        pool.refusals += refused
        return statuses

    def encodes_batches(self, client: Client, pool_id: int) -> bool:
        """Whether put_many would take the pool's pages encoded ahead (EncodedPages):
        the pool exists and keeps pages by their own key (not dedup)."""
        pool = _pool_of(client, pool_id)
        return pool is not None and not pool.dedup

    def encode_batch(self, client: Client, pool_id: int, pages: Buffer, page_size: int) -> EncodedPages | None:
        """The stored forms of ``pages`` (whole pages of ``page_size``, contiguous)
        for put_many, made now in one C call; None for a pool that would not take
        them (see encodes_batches)."""
        if not self.encodes_batches(client, pool_id):
            return None
        return EncodedPages(page_size, self.compress, encode_pages(pages, page_size, self.compress))

    def get(self, client: Client, pool_id: int, oid: Oid, index: int) -> tuple[Status, bytes | None]:
        pool = _pool_of(client, pool_id)
        if pool is None:
            return _INVALID, None
        client.gets += 1
        pool.gets += 1
        data = self._get_page(pool, oid, index)
        if data is None:
            return _MISS, None
        client.hits += 1
        pool.hits += 1
        return _OK, data

    def get_many(
        self, client: Client, pool_id: int, keys: Sequence[Key]
    ) -> tuple[list[Status], list[bytes]]:
        """Get each key: statuses, and the data of the hits in key order."""
        pool = _pool_of(client, pool_id)
        if pool is None:
            return [_INVALID] * len(keys), []
        statuses: list[Status] = []
        forms: list[StoredPage] = []
        get_form = self._get_form
        for oid, index in keys:
            form = get_form(pool, oid, index)
            if form is None:
                statuses.append(_MISS)
            else:
                statuses.append(_OK)
                forms.append(form)
        found = decode_pages(forms, pool.page_size)  # one C call for the batch
        client.gets += len(keys)
        pool.gets += len(keys)
        client.hits += len(found)
        pool.hits += len(found)
        return statuses, found

    def flush_page(self, client: Client, pool_id: int, oid: Oid, index: int) -> Status:
        """Drop one page; OK whether or not it was there (as Xen)."""
        pool = _pool_of(client, pool_id)
        if pool is None:
            return _INVALID
        obj = pool.objects.get(oid)
        if obj is not None and index in obj:
            self._drop_page(pool, obj, oid, index)
            pool.flushes += 1
            client.flushes += 1
        return _OK

    def flush_many(self, client: Client, pool_id: int, keys: Sequence[Key]) -> list[Status]:
        """Flush each key; index WHOLE_OBJECT flushes the whole object (ABI)."""
        pool = _pool_of(client, pool_id)
        if pool is None:
            return [_INVALID] * len(keys)
        objects = pool.objects
        flushed = 0
        for oid, index in keys:
            obj = objects.get(oid)
            if obj is None:
                continue
            if index == WHOLE_OBJECT:
                flushed += len(obj)
                for each_index in list(obj):
                    self._drop_page(pool, obj, oid, each_index)
            elif index in obj:
                self._drop_page(pool, obj, oid, index)
                flushed += 1
        pool.flushes += flushed
        client.flushes += flushed
        return [_OK] * len(keys)

    def flush_object(self, client: Client, pool_id: int, oid: Oid) -> Status:
        """Drop every page of one object; OK whether or not it existed."""
        pool = _pool_of(client, pool_id)
        if pool is None:
            return _INVALID
        return self.flush_many(client, pool_id, [(oid, WHOLE_OBJECT)])[0]

    # ------------------------------------------------------------- stats

    def pool_stats(self, client: Client, pool_id: int | None = None) -> list[PoolStats]:
        """The client's pool records (one pool, or all when ``pool_id`` is None)."""
        if pool_id is None:
            slots = list(enumerate(client.pools))
        else:
            pool = _pool_of(client, pool_id)
            slots = [(pool_id, pool)]
        return [
            PoolStats(
                pool_id=each_id,
                flags=_pool_flags(pool),
                page_shift=pool.page_shift,
                pages=pool.pages,
                raw_bytes=pool.pages * pool.page_size,
                stored_bytes=pool.stored_bytes,
                puts=pool.puts,
                gets=pool.gets,
                hits=pool.hits,
                flushes=pool.flushes,
                refusals=pool.refusals,
                evictions=pool.evictions,
            )
            for each_id, pool in slots
            if pool is not None
        ]

    def stats(self) -> StoreStats:
        """Global, per-client and per-pool figures; JSON-serialisable."""
        totals = OpCounters()
        totals.add_counters(self._retired)
        clients: dict[str, ClientStats] = {}
        for client in self._clients.values():
            totals.add_counters(client)
            clients[client.name] = self._client_stats(client)
        return {
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "free_bytes": max(0, self.budget_bytes - self.used_bytes),
            "compress": self.compress,
            "overhead_bytes": {
                "persistent_page": PERSISTENT_PAGE_OVERHEAD_BYTES,
                "ephemeral_page": EPHEMERAL_PAGE_OVERHEAD_BYTES,
                "object": OBJECT_OVERHEAD_BYTES,
                "dedup_blob": DEDUP_BLOB_OVERHEAD_BYTES,
            },
            "pages": self.pages,
            "raw_bytes": self.raw_bytes,
            "stored_bytes": self.used_bytes,
            "ephemeral_bytes": self.ephemeral_bytes,
            "remote_pages": sum(client.remote_pages for client in self._clients.values()),
            "remote_bytes": sum(client.remote_bytes for client in self._clients.values()),
            "shared_pools": len(self._shared_pools),
            **totals.counters(),
            "clients": clients,
        }

    def _client_stats(self, client: Client) -> ClientStats:
        share = (
            self.budget_bytes * client.weight // self._total_weight if self._total_weight else 0
        )
        pools = []
        for pool_id, pool in enumerate(client.pools):
            if pool is not None:
                pools.append(_pool_stats(pool_id, pool, client))
        return {
            "weight": client.weight,
            "cap_bytes": client.cap_bytes,
            "share_bytes": share,
            "dedup": client.dedup,
            "frozen": client.frozen,
            "pages": client.pages,
            "raw_bytes": client.raw_bytes,
            "stored_bytes": client.stored_bytes,
            "ephemeral_bytes": client.ephemeral_bytes,
            "remote_pages": client.remote_pages,
            "remote_bytes": client.remote_bytes,
            "dedup_blobs": len(client.dedup_table),
            "dedup_hits": client.dedup_hits,
            **client.counters(),
            "pools": pools,
        }

    # ---------------------------------------------------------- internals

    def _resolve(self, client: Client | str) -> Client:
        if isinstance(client, str):
            return self._clients[client]
        if self._clients.get(client.name) is not client:
            raise KeyError(client.name)
        return client

    def _put_page(self, pool: Pool, oid: Oid, index: int, data: Buffer,
                  stored: StoredPage | None = None) -> Status:
        """``stored``: ``data``'s stored form if it was made ahead (never for dedup)."""
        objects = pool.objects
        obj = objects.get(oid)
        if obj is not None and index in obj:
            # Drop the old copy first: if the new one is refused, a later get
            # must miss rather than return stale data (Xen's failed dup put).
            self._drop_page(pool, obj, oid, index)
        if pool.dedup:
            return self._put_dedup_page(pool, oid, index, data)
        owner = pool.owner
        if stored is None:
            stored = encode_page(data, pool.page_size, self.compress)
        cost = pool.page_overhead + (len(stored) if type(stored) is bytes else 0)
        if pool.local_lru is not None and type(stored) is bytes and self._beyond_local_share(owner, cost):
            return self._put_remote(pool, owner, oid, index, stored)
        if not self._room_for_page(pool, owner, oid, cost):
            if self.tier is not None and pool.persistent:
                return self._put_remote(pool, owner, oid, index, stored)
            return _REFUSED
        self._charge(pool, owner, oid, index, stored, cost, cost)
        return _OK

    def _beyond_local_share(self, owner: Client, cost: int) -> bool:
        """With a tier: whether a persistent data page of ``cost`` would take
        persistent use (what eviction cannot free) past the local fraction."""
        limit = self.budget_bytes * self._local_fraction
        if self.used_bytes - self.ephemeral_bytes + cost > limit:
            return True
        cap = owner.cap_bytes
        return cap is not None and owner.stored_bytes - owner.ephemeral_bytes + cost > cap * self._local_fraction

    def _put_remote(self, pool: Pool, owner: Client, oid: Oid, index: int,
                    stored: StoredPage) -> Status:
        """A persistent page with no room in memory: to the tier, if it takes it
        and the page's metadata fits here."""
        assert self.tier is not None
        if not self._room_for_page(pool, owner, oid, pool.remote_page_cost):
            self.tier.pressure()
            return _REFUSED
        page = self.tier.take(pool, oid, index, stored)
        if page is None:
            return _REFUSED
        self._charge_remote(pool, owner, oid, index, page)
        return _OK

    def _charge_remote(self, pool: Pool, owner: Client, oid: Oid, index: int,
                       page: RemotePage) -> None:
        cost = pool.remote_page_cost
        self._charge(pool, owner, oid, index, page, cost, cost)
        pool.remote_pages += 1
        pool.remote_bytes += page.nbytes
        owner.remote_pages += 1
        owner.remote_bytes += page.nbytes

    def _room_for_page(self, pool: Pool, owner: Client, oid: Oid, cost: int) -> bool:
        """Make room for a page costing ``cost`` plus, if its object is new, the
        object's; False (nothing evicted) if it cannot fit."""
        need = cost if oid in pool.objects else cost + OBJECT_OVERHEAD_BYTES
        cap = owner.cap_bytes
        while self.used_bytes + need > self.budget_bytes or (
            cap is not None and owner.stored_bytes + need > cap
        ):
            if not self._make_room(owner, need):
                return False
            # Making room may have evicted the page's whole object: then the
            # put creates it again and must pay for it too.
            need = cost if oid in pool.objects else cost + OBJECT_OVERHEAD_BYTES
        return True

    def _put_dedup_page(self, pool: Pool, oid: Oid, index: int, data: Buffer) -> Status:
        owner = pool.owner
        digest = hashlib.blake2b(data, digest_size=16).digest()
        blob = owner.dedup_table.get(digest)
        if blob is None:
            blob = DedupBlob(digest, encode_page(data, pool.page_size, self.compress))
            charged = pool.page_overhead + blob.charge_bytes
        else:
            charged = pool.page_overhead
        # Pin the blob so that making room cannot free it under us.
        blob.refs += 1
        if not self._room_for_page(pool, owner, oid, charged):
            # If eviction took every other page of the blob, its bytes are
            # still charged: the last unref frees them.
            freed = self._unref_blob(owner, blob)
            owner.stored_bytes -= freed
            self.used_bytes -= freed
            return _REFUSED
        if blob.refs == 1:
            owner.dedup_table[digest] = blob
        else:
            owner.dedup_hits += 1
        self._charge(pool, owner, oid, index, blob, charged, pool.page_overhead + blob.charge_bytes)
        return _OK

    def _unref_blob(self, owner: Client, blob: DedupBlob) -> int:
        """Drop one reference; return the bytes freed (its charge, on the last)."""
        blob.refs -= 1
        if blob.refs:
            return 0
        if owner.dedup_table.get(blob.digest) is blob:
            del owner.dedup_table[blob.digest]
            return blob.charge_bytes
        return 0  # a pinned blob that was never entered: nothing was charged

    def _charge(self, pool: Pool, owner: Client, oid: Oid, index: int, value: _PageValue,
                charged: int, logical: int) -> None:
        """Enter a page (creating its object) and charge it."""
        obj = pool.objects.get(oid)
        if obj is None:
            obj = pool.objects[oid] = {}
            charged += OBJECT_OVERHEAD_BYTES
            logical += OBJECT_OVERHEAD_BYTES
        obj[index] = value
        if pool.local_lru is not None and type(value) is bytes:
            pool.local_lru[(oid, index)] = None
        pool.pages += 1
        pool.stored_bytes += logical
        owner.stored_bytes += charged
        self.used_bytes += charged
        if not pool.persistent:
            key = (pool, pool.lru_oids.setdefault(oid, oid), index)
            if type(value) is RemotePage:
                owner.remote_ephemeral[key] = None
            else:
                owner.lru[key] = next(self._tick)
            owner.ephemeral_bytes += logical
            self.ephemeral_bytes += logical

    def _drop_page(self, pool: Pool, obj: dict[int, _PageValue], oid: Oid, index: int) -> None:
        """Remove a present page and undo its accounting."""
        stored = obj.pop(index)
        owner = pool.owner
        if type(stored) is bytes:
            freed = logical = pool.page_overhead + len(stored)
            if pool.local_lru is not None:
                del pool.local_lru[(oid, index)]
        elif type(stored) is int:
            freed = logical = pool.page_overhead
        elif type(stored) is DedupBlob:
            logical = pool.page_overhead + stored.charge_bytes
            freed = pool.page_overhead + self._unref_blob(owner, stored)
        else:
            assert isinstance(stored, RemotePage)
            freed = logical = pool.remote_page_cost
            pool.remote_pages -= 1
            pool.remote_bytes -= stored.nbytes
            owner.remote_pages -= 1
            owner.remote_bytes -= stored.nbytes
            if self.tier is not None:
                # Only a persistent page's journal can point at its copy after a stop.
                self.tier.release(pool, oid, index, stored,
                                  keep=self._keeping_remote and pool.persistent)
        if not obj:
            del pool.objects[oid]
            if not pool.persistent:
                del pool.lru_oids[oid]
            freed += OBJECT_OVERHEAD_BYTES
            logical += OBJECT_OVERHEAD_BYTES
        pool.pages -= 1
        pool.stored_bytes -= logical
        owner.stored_bytes -= freed
        self.used_bytes -= freed
        if not pool.persistent:
            if type(stored) is RemotePage:
                del owner.remote_ephemeral[(pool, oid, index)]
            else:
                del owner.lru[(pool, oid, index)]
            owner.ephemeral_bytes -= logical
            self.ephemeral_bytes -= logical

    def _drop_all_pages(self, pool: Pool) -> int:
        count = pool.pages
        objects = pool.objects
        for oid in list(objects):
            obj = objects[oid]
            for index in list(obj):
                self._drop_page(pool, obj, oid, index)
        return count

    def _refuse_put(self, pool: Pool, oid: Oid, index: int, status: Status) -> Status:
        obj = pool.objects.get(oid)
        if obj is not None and index in obj:
            self._drop_page(pool, obj, oid, index)  # never leave a stale copy
        return status

    def _refuse_frozen_put(self, pool: Pool, oid: Oid, index: int, data: Buffer,
                           stored: StoredPage | None = None) -> Status:
        return self._refuse_put(pool, oid, index, _FROZEN)

    def _get_page(self, pool: Pool, oid: Oid, index: int) -> bytes | None:
        form = self._get_form(pool, oid, index)
        return None if form is None else decode_page(form, pool.page_size)

    def _get_form(self, pool: Pool, oid: Oid, index: int) -> StoredPage | None:
        """A get of one page, its stored form (None: a miss): the LRUs, an
        exclusive get's drop and the tier are told as for the page itself."""
        obj = pool.objects.get(oid)
        if obj is None:
            return None
        stored = obj.get(index)
        if stored is None:
            return None
        if type(stored) is bytes or type(stored) is int:
            data = stored
        elif type(stored) is DedupBlob:
            data = stored.stored
        else:
            assert type(stored) is RemotePage
            # In flight to the tier, or read back by fetch(); else not here: a miss.
            copy = stored.pending if stored.pending is not None else stored.fetched
            if copy is None:
                return None
            data = copy
            if self.tier is not None:
                self.tier.consumed(pool, oid, index, stored)
        if pool.persistent:
            local_lru = pool.local_lru
            if local_lru is not None and type(stored) is bytes:
                local_lru.move_to_end((oid, index))
        elif pool.exclusive_gets:
            self._drop_page(pool, obj, oid, index)
        elif type(stored) is RemotePage:
            pool.owner.remote_ephemeral.move_to_end((pool, oid, index))
        else:
            lru = pool.owner.lru
            key = (pool, oid, index)
            lru.move_to_end(key)
            lru[key] = next(self._tick)
        return data

    def _make_room(self, owner: Client, cost: int) -> bool:
        """Evict ephemeral pages until ``cost`` more bytes fit; False if they cannot."""
        cap = owner.cap_bytes
        if cap is not None and owner.stored_bytes + cost > cap:
            # A client at its cap makes room from its own ephemeral pages only.
            if owner.stored_bytes - owner.ephemeral_bytes + cost > cap:
                return False
            while owner.stored_bytes + cost > cap:
                if not owner.evictable:
                    return False
                self._evict_oldest(owner)
        if self.used_bytes + cost > self.budget_bytes:
            if self.used_bytes - self.ephemeral_bytes + cost > self.budget_bytes:
                return False
            while self.used_bytes + cost > self.budget_bytes:
                victim = self._pick_victim(owner, cost)
                if victim is None:
                    return False
                self._evict_oldest(victim)
        return True

    def _pick_victim(self, putter: Client | None, cost: int) -> Client | None:
        """Whose oldest ephemeral page goes next (weighted fair shares).

        As Xen's tmem_evict: a putter that this put takes over its weighted
        share of the budget evicts its own pages. Beyond Xen, otherwise the
        client furthest over its share loses pages, so a client within its
        share keeps it; if no client with ephemeral pages is over its share,
        the global LRU decides.
        """
        total_weight = self._total_weight
        budget = self.budget_bytes
        if (
            putter is not None
            and putter.evictable
            and (putter.stored_bytes + cost) * total_weight > budget * putter.weight
        ):
            return putter
        worst: Client | None = None
        worst_ratio = -1.0
        oldest: Client | None = None
        oldest_tick = math.inf
        for client in self._clients.values():
            if not client.evictable:
                continue
            if client.stored_bytes * total_weight > budget * client.weight:
                ratio = client.stored_bytes / client.weight if client.weight else math.inf
                if ratio > worst_ratio:
                    worst, worst_ratio = client, ratio
            # Only the metadata of remote pages left: the last to give.
            tick = next(iter(client.lru.values())) if client.lru else math.inf
            if tick < oldest_tick or oldest is None:
                oldest, oldest_tick = client, tick
        return worst if worst is not None else oldest

    def _evict_oldest(self, victim: Client) -> None:
        if not victim.lru:  # only remote pages left: drop the oldest one's metadata
            self._evict_oldest_remote(victim)
            return
        pool, oid, index = next(iter(victim.lru))
        obj = pool.objects[oid]
        value = obj[index]
        self._drop_page(pool, obj, oid, index)
        pool.evictions += 1
        victim.evictions += 1
        if (victim.demote_evicted and type(value) is bytes and pool.shared_uuid is None
                and len(value) >= MIN_DEMOTED_EPHEMERAL_BYTES and self.tier is not None):
            # Demoted instead of dropped: its metadata stays (charged, in
            # remote_ephemeral), its data goes to the tier if the tier takes it. Each
            # demotion frees at least MIN_DEMOTED_EPHEMERAL_BYTES - REMOTE_PAGE_EXTRA_BYTES
            # bytes and empties lru by one, so making room still ends.
            page = self.tier.take(pool, oid, index, value)
            if page is not None:
                self._charge_remote(pool, victim, oid, index, page)

    def _evict_oldest_remote(self, client: Client) -> int:
        """Drop the client's least recently demoted or got ephemeral page in the tier;
        returns its bytes there."""
        pool, oid, index = next(iter(client.remote_ephemeral))
        obj = pool.objects[oid]
        page = obj[index]
        assert type(page) is RemotePage
        self._drop_page(pool, obj, oid, index)
        pool.evictions += 1
        client.evictions += 1
        return page.nbytes

    def _reassign_owner(self, pool: Pool, new_owner: Client) -> None:
        """Charge a shared pool to another member (Xen's shared_pool_reassign)."""
        old_owner = pool.owner
        # Shared pools never dedup, so logical bytes are the charged bytes.
        for client, sign in ((old_owner, -1), (new_owner, 1)):
            client.stored_bytes += sign * pool.stored_bytes
            client.ephemeral_bytes += sign * pool.stored_bytes
        moved = [(key, tick) for key, tick in old_owner.lru.items() if key[0] is pool]
        for key, _ in moved:
            del old_owner.lru[key]
        # Keep the new owner's LRU in tick order: merge, not append.
        merged = sorted(itertools.chain(new_owner.lru.items(), moved), key=itemgetter(1))
        new_owner.lru = OrderedDict(merged)
        pool.owner = new_owner
        self._evict_to_cap(new_owner)  # the inherited pages may not fit its cap

    def _evict_to_cap(self, client: Client) -> None:
        cap = client.cap_bytes
        if cap is not None:
            while client.stored_bytes > cap and client.evictable:
                self._evict_oldest(client)


def stored_form(value: _PageValue) -> StoredPage | RemotePage:
    """What a pool holds for a page, as the journal and a save file keep it: a
    dedup blob's stored form, else the value itself."""
    return value.stored if isinstance(value, DedupBlob) else value


def _pool_of(client: Client, pool_id: int) -> Pool | None:
    if 0 <= pool_id < MAX_POOLS_PER_CLIENT:
        return client.pools[pool_id]
    return None


def _pool_stats(pool_id: int, pool: Pool, viewer: Client) -> StorePoolStats:
    return {
        "pool_id": pool_id,
        "persistent": pool.persistent,
        "shared": pool.shared,
        "shared_uuid": str(pool.shared_uuid) if pool.shared_uuid is not None else None,
        "owner": pool.owner is viewer,
        "page_shift": pool.page_shift,
        "inclusive_gets": pool.inclusive_gets,
        "dedup": pool.dedup,
        "label": pool.label,
        "objects": len(pool.objects),
        "pages": pool.pages,
        "raw_bytes": pool.pages * pool.page_size,
        "stored_bytes": pool.stored_bytes,
        "remote_pages": pool.remote_pages,
        "remote_bytes": pool.remote_bytes,
        **pool.counters(),
    }


def _pool_flags(pool: Pool) -> PoolFlag:
    flags = PoolFlag(0)
    if pool.persistent:
        flags |= PoolFlag.PERSISTENT
    if pool.shared:
        flags |= PoolFlag.SHARED
    if pool.inclusive_gets:
        flags |= PoolFlag.INCLUSIVE_GETS
    return flags


def _check_weight(weight: int) -> None:
    if weight < 0:
        raise ValueError("weight must be >= 0")


def _check_cap(cap_bytes: int | None) -> None:
    if cap_bytes is not None and cap_bytes < 0:
        raise ValueError("cap_bytes must be >= 0 or None")
