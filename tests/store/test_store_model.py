"""Stateful test: the store against a plain model.

Persistent pools must behave exactly like a dict (a refused put deletes the
key: the never-stale rule). Ephemeral pools may lose any page at any time, but
a hit must return the last accepted put of that key and never anything older.
Invariants check the accounting after every step. A third variant puts a tier
below the store (an in-memory one whose writes complete or fail when a rule
says: the store's side of tmem_host.remote, whose Redis side tests/remote
tests), with persistent demotion and evicted ephemeral pages demoted.
"""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tmem_host.store import (
    DEDUP_BLOB_OVERHEAD_BYTES,
    EPHEMERAL_PAGE_OVERHEAD_BYTES,
    OBJECT_OVERHEAD_BYTES,
    Client,
    Store,
    page_overhead_bytes,
)
from tmem_host.store.pagecodec import StoredPage
from tmem_host.store.store import DedupBlob, Pool
from tmem_host.store.tier import RemotePage
from tmem_wire.abi import WHOLE_OBJECT, Key, Oid, Status
from tmem_workloads.usemem import PAGE_SIZE, expected_page, page_templates

RAW_COST = PAGE_SIZE + EPHEMERAL_PAGE_OVERHEAD_BYTES  # budgets and caps in pages' worth
_TEMPLATES = page_templates(3)
# Text, binary, stamped-zero and random pages (usemem's mix), plus same-filled
# ones; sampling repeats contents, which exercises dedup.
PAGES = [expected_page(_TEMPLATES, 3, number) for number in range(8)] + [
    bytes(PAGE_SIZE),
    b"\x5a" * PAGE_SIZE,
]
OIDS: list[Oid] = [(0, 0, 1), (0, 0, 2), (1 << 63, 5, 0)]
# Per client: a persistent pool, an exclusive and an inclusive ephemeral pool,
# and its slot of the one shared pool both clients join.
POOL_KINDS = ("persistent", "exclusive", "inclusive", "shared")
SHARED_UUID = uuid.UUID(int=7)
SHARED_OWNER = -1  # the model keys shared-pool pages by this, not by client



def blob_charge(blob: DedupBlob) -> int:
    """A dedup blob's own charge: its data bytes and its metadata."""
    data = len(blob.stored) if isinstance(blob.stored, bytes) else 0
    return data + DEDUP_BLOB_OVERHEAD_BYTES


keys = st.tuples(st.sampled_from(OIDS), st.integers(0, 5))
# Pages are drawn by number: reprs of failing examples stay readable.
page_numbers = st.integers(0, len(PAGES) - 1)
clients = st.integers(0, 1)
pool_kinds = st.sampled_from(POOL_KINDS)


class StoreAgainstModel(RuleBasedStateMachine):
    compress = True

    def make_store(self) -> Store:
        return Store(10 * RAW_COST, compress=self.compress)

    def __init__(self) -> None:
        super().__init__()
        self.store = self.make_store()
        authorised = frozenset({SHARED_UUID})
        self.clients: list[Client] = [
            self.store.add_client("plain", shared_uuids=authorised),
            self.store.add_client("dedup", weight=50, dedup=True, shared_uuids=authorised),
        ]
        self.pool_ids: list[dict[str, int]] = []
        for client in self.clients:
            ids = {}
            for kind in POOL_KINDS:
                status, pool_id, shared = self.store.new_pool(
                    client,
                    kind == "persistent",
                    shared_uuid=SHARED_UUID if kind == "shared" else None,
                    inclusive_gets=kind == "inclusive",
                )
                assert status is Status.OK and shared is (kind == "shared")
                ids[kind] = pool_id
            self.pool_ids.append(ids)
        # (client, pool kind, key) -> page: exact for persistent pools, the
        # last accepted put for ephemeral ones.
        self.model: dict[tuple[int, str, Key], bytes] = {}

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _entry(who: int, kind: str, key: Key) -> tuple[int, str, Key]:
        return (SHARED_OWNER if kind == "shared" else who, kind, key)

    def _record_put(self, who: int, kind: str, key: Key, page: bytes, status: Status) -> None:
        client = self.clients[who]
        assert status is (Status.FROZEN if client.frozen else status)
        if status is Status.OK:
            self.model[self._entry(who, kind, key)] = page
        else:
            assert status in (Status.REFUSED, Status.FROZEN)
            self.model.pop(self._entry(who, kind, key), None)

    def _check_get(self, who: int, kind: str, key: Key, status: Status, data: bytes | None) -> None:
        entry = self._entry(who, kind, key)
        expected = self.model.get(entry)
        if kind == "persistent":
            assert (status, data) == ((Status.OK, expected) if expected else (Status.MISS, None))
            return
        if status is Status.OK:
            assert expected is not None and data == expected  # never stale
            if kind == "exclusive":
                del self.model[entry]
        else:
            assert (status, data) == (Status.MISS, None)
            self.model.pop(entry, None)  # evicted

    def _forget(self, who: int, kind: str, oid: Oid | None) -> None:
        """Drop the model's pages of one pool (of one object, if ``oid``)."""
        owner = self._entry(who, kind, ((0, 0, 0), 0))[0]
        for entry in [e for e in self.model if e[:2] == (owner, kind)]:
            if oid is None or entry[2][0] == oid:
                del self.model[entry]

    # -------------------------------------------------------------- rules

    @rule(who=clients, kind=pool_kinds, key=keys, number=page_numbers)
    def put(self, who: int, kind: str, key: Key, number: int) -> None:
        page = PAGES[number]
        status = self.store.put(self.clients[who], self.pool_ids[who][kind], key[0], key[1], page)
        self._record_put(who, kind, key, page, status)

    @rule(
        who=clients,
        kind=pool_kinds,
        batch=st.lists(st.tuples(keys, page_numbers), min_size=1, max_size=6),
    )
    def put_many(self, who: int, kind: str, batch: list[tuple[Key, int]]) -> None:
        statuses = self.store.put_many(
            self.clients[who], self.pool_ids[who][kind],
            [key for key, _ in batch], [PAGES[number] for _, number in batch],
        )
        assert len(statuses) == len(batch)
        for (key, number), status in zip(batch, statuses):
            self._record_put(who, kind, key, PAGES[number], status)

    @rule(who=clients, kind=pool_kinds, key=keys)
    def get(self, who: int, kind: str, key: Key) -> None:
        status, data = self.store.get(self.clients[who], self.pool_ids[who][kind], *key)
        self._check_get(who, kind, key, status, data)

    @rule(who=clients, kind=pool_kinds, batch=st.lists(keys, min_size=1, max_size=6, unique=True))
    def get_many(self, who: int, kind: str, batch: list[Key]) -> None:
        statuses, found = self.store.get_many(self.clients[who], self.pool_ids[who][kind], batch)
        hits = iter(found)
        for key, status in zip(batch, statuses):
            self._check_get(who, kind, key, status, next(hits) if status is Status.OK else None)
        assert next(hits, None) is None

    @rule(who=clients, kind=pool_kinds, key=keys)
    def flush_page(self, who: int, kind: str, key: Key) -> None:
        assert self.store.flush_page(self.clients[who], self.pool_ids[who][kind], *key) is Status.OK
        self.model.pop(self._entry(who, kind, key), None)

    @rule(who=clients, kind=pool_kinds, oid=st.sampled_from(OIDS), batch=st.booleans())
    def flush_object(self, who: int, kind: str, oid: Oid, batch: bool) -> None:
        client, pool_id = self.clients[who], self.pool_ids[who][kind]
        if batch:
            assert self.store.flush_many(client, pool_id, [(oid, WHOLE_OBJECT)]) == [Status.OK]
        else:
            assert self.store.flush_object(client, pool_id, oid) is Status.OK
        self._forget(who, kind, oid)

    @rule(who=clients)
    def flush_client(self, who: int) -> None:
        client = self.clients[who]
        shared_pool = client.pools[self.pool_ids[who]["shared"]]
        assert shared_pool is not None
        owns_shared = shared_pool.owner is client
        self.store.flush_client(client)
        for kind in POOL_KINDS:
            if kind != "shared" or owns_shared:
                self._forget(who, kind, None)

    @rule(who=clients)
    def rejoin_shared_pool(self, who: int) -> None:
        """Leave the shared pool and join it again; the last to leave kills it."""
        client = self.clients[who]
        pool_id = self.pool_ids[who]["shared"]
        pool = client.pools[pool_id]
        assert pool is not None
        last_member = pool.members == [client]
        assert self.store.destroy_pool(client, pool_id) is Status.OK
        if last_member:
            self._forget(who, "shared", None)
        else:
            assert pool.owner is not client
        status, new_id, shared = self.store.new_pool(client, False, shared_uuid=SHARED_UUID)
        assert (status, new_id, shared) == (Status.OK, pool_id, True)
        assert (client.pools[new_id] is pool) is not last_member

    @rule(pages_worth=st.integers(0, 16))
    def set_budget(self, pages_worth: int) -> None:
        self.store.set_budget(pages_worth * RAW_COST)

    @rule(who=clients, pages_worth=st.none() | st.integers(0, 8))
    def set_cap(self, who: int, pages_worth: int | None) -> None:
        self.store.set_cap(self.clients[who], None if pages_worth is None else pages_worth * RAW_COST)

    @rule(who=clients, weight=st.integers(0, 300))
    def set_weight(self, who: int, weight: int) -> None:
        self.store.set_weight(self.clients[who], weight)

    @precondition(lambda self: not any(client.frozen for client in self.clients))
    @rule(who=clients)
    def freeze(self, who: int) -> None:
        self.store.freeze(self.clients[who])

    @rule(who=clients)
    def thaw(self, who: int) -> None:
        self.store.thaw(self.clients[who])

    # --------------------------------------------------------- invariants

    @invariant()
    def accounting_adds_up(self) -> None:
        store = self.store
        total_used = 0
        for client in self.clients:
            pool_pages = 0
            charged = 0
            blobs: dict[int, DedupBlob] = {}
            remote_ephemeral = 0
            for pool in client.owned_pools():
                pool_pages += pool.pages
                page_overhead = pool.page_overhead
                if pool.local_lru is None:
                    assert page_overhead == page_overhead_bytes(pool.persistent)
                logical = len(pool.objects) * OBJECT_OVERHEAD_BYTES
                charged += logical
                for obj in pool.objects.values():
                    assert obj, "an empty object must be dropped"
                    for stored in obj.values():
                        if isinstance(stored, DedupBlob):
                            blobs[id(stored)] = stored
                            logical += page_overhead + blob_charge(stored)
                            charged += page_overhead
                        elif isinstance(stored, RemotePage):
                            logical += pool.remote_page_cost
                            charged += pool.remote_page_cost
                            remote_ephemeral += not pool.persistent
                        else:
                            size = len(stored) if isinstance(stored, bytes) else 0
                            logical += page_overhead + size
                            charged += page_overhead + size
                assert logical == pool.stored_bytes
                assert pool.lru_oids.keys() == (set() if pool.persistent else pool.objects.keys())
                assert pool.pages == sum(len(obj) for obj in pool.objects.values())
            charged += sum(blob_charge(blob) for blob in blobs.values())
            assert client.stored_bytes == charged
            assert {blob.digest for blob in blobs.values()} == set(client.dedup_table)
            lru_pages = sum(
                pool.pages for pool in client.owned_pools() if not pool.persistent
            )
            assert len(client.lru) == lru_pages - remote_ephemeral
            assert len(client.remote_ephemeral) == remote_ephemeral
            ticks = list(client.lru.values())
            assert ticks == sorted(ticks), "LRU order and ages disagree"
            if client.cap_bytes is not None and client.stored_bytes > client.cap_bytes:
                assert not client.evictable, \
                    "over its cap while holding ephemeral pages"
            total_used += client.stored_bytes
        assert store.used_bytes == total_used
        if store.used_bytes > store.budget_bytes:
            assert not any(client.evictable for client in self.clients)

    @invariant()
    def persistent_pages_match_the_model(self) -> None:
        for who, client in enumerate(self.clients):
            pool = client.pools[self.pool_ids[who]["persistent"]]
            assert pool is not None
            expected = sum(1 for entry in self.model if entry[:2] == (who, "persistent"))
            assert pool.pages == expected


class StoreAgainstModelUncompressed(StoreAgainstModel):
    compress = False


class MemoryTier:
    """A PageTier in a dict: takes every page, its writes complete or fail when the
    state machine says, reads are answered at once."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop
        self.copies: dict[int, StoredPage] = {}  # by version
        self.in_flight: list[tuple[Pool, Oid, int, RemotePage]] = []
        self.version = 0

    def _new_page(self, stored: StoredPage) -> RemotePage:
        self.version += 1
        return RemotePage(self.version, len(stored) if isinstance(stored, bytes) else 8, pending=stored)

    def take(self, pool: Pool, oid: Oid, index: int, stored: StoredPage) -> RemotePage | None:
        page = self._new_page(stored)
        self.in_flight.append((pool, oid, index, page))
        return page

    def release(self, pool: Pool, oid: Oid, index: int, page: RemotePage, *, keep: bool) -> None:
        assert not keep
        self.copies.pop(page.version, None)
        page.pending = page.fetched = None

    def fetch(self, pool: Pool, pages: list[tuple[Oid, int, RemotePage]],
              held: list[RemotePage]) -> asyncio.Future[None]:
        for _, _, page in pages:
            page.fetched = self.copies.get(page.version)
            page.read_failed = page.fetched is None
        done: asyncio.Future[None] = self.loop.create_future()
        done.set_result(None)
        return done

    def barrier(self) -> asyncio.Future[None] | None:
        return None

    def pressure(self) -> None:
        pass

    def consumed(self, pool: Pool, oid: Oid, index: int, page: RemotePage) -> None:
        pass  # this tier keeps every copy until the next fetch: nothing to unpin

    def restored(self, page: RemotePage) -> None:
        raise AssertionError("no journal here")

    def complete(self, fail: bool) -> None:
        """Every write in flight lands (or fails: the store keeps persistent pages)."""
        in_flight, self.in_flight = self.in_flight, []
        for pool, oid, index, page in in_flight:
            if page.pending is None:
                continue  # released while in flight: the real tier deletes it as it lands
            if fail:
                self.store.strand(pool, oid, index, page)
            else:
                self.copies[page.version] = page.pending
            page.pending = None

    def demote(self, client: Client) -> None:
        """What the demoter does, written at once."""
        for pool, oid, index, stored in self.store.demotion_candidates(client, 2):
            page = self._new_page(stored)
            page.pending = None
            self.copies[page.version] = stored
            assert self.store.demote(pool, oid, index, stored, page)


class FetchingStore(Store):
    """Gets read remote pages back first, as the frontends do (Store.fetch)."""

    def get(self, client: Client, pool_id: int, oid: Oid, index: int) -> tuple[Status, bytes | None]:
        self.fetch(client, pool_id, [(oid, index)])
        return super().get(client, pool_id, oid, index)

    def get_many(self, client: Client, pool_id: int, keys: list[Key]) -> tuple[list[Status], list[bytes]]:  # type: ignore[override]
        self.fetch(client, pool_id, keys)
        return super().get_many(client, pool_id, keys)


class StoreWithTierAgainstModel(StoreAgainstModel):
    compress = False  # whole pages: big enough to demote (MIN_DEMOTED_EPHEMERAL_BYTES)

    def make_store(self) -> Store:
        store = FetchingStore(10 * RAW_COST, compress=self.compress)
        self.loop = asyncio.new_event_loop()
        self.tier = MemoryTier(store, self.loop)
        store.attach_tier(self.tier, 0.5)
        return store

    def __init__(self) -> None:
        super().__init__()
        for client in self.clients:
            self.store.set_demote_evicted(client, True)

    def teardown(self) -> None:
        self.loop.close()

    @rule(fail=st.booleans())
    def complete_writes(self, fail: bool) -> None:
        self.tier.complete(fail)

    @rule(who=clients)
    def demote(self, who: int) -> None:
        self.tier.demote(self.clients[who])

    @rule(who=clients, pages=st.integers(1, 4))
    def shed_remote_ephemeral(self, who: int, pages: int) -> None:
        self.store.shed_remote_ephemeral(self.clients[who], pages * PAGE_SIZE)

    @rule(who=clients, kind=st.sampled_from(("exclusive", "inclusive")), key=keys)
    def lose_remote_copy(self, who: int, kind: str, key: Key) -> None:
        """The cluster expired or evicted an ephemeral page: its get misses."""
        pool = self.clients[who].pools[self.pool_ids[who][kind]]
        assert pool is not None
        value = pool.objects.get(key[0], {}).get(key[1])
        if isinstance(value, RemotePage):
            self.tier.copies.pop(value.version, None)

    @invariant()
    def remote_pages_are_counted(self) -> None:
        for client in self.clients:
            remote = [value for pool in client.owned_pools() for obj in pool.objects.values()
                      for value in obj.values() if isinstance(value, RemotePage)]
            assert client.remote_pages == len(remote)
            assert client.remote_bytes == sum(page.nbytes for page in remote)


_SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreAgainstModel = StoreAgainstModel.TestCase
TestStoreAgainstModel.settings = _SETTINGS
TestStoreAgainstModelUncompressed = StoreAgainstModelUncompressed.TestCase
TestStoreAgainstModelUncompressed.settings = _SETTINGS
TestStoreWithTierAgainstModel = StoreWithTierAgainstModel.TestCase
TestStoreWithTierAgainstModel.settings = _SETTINGS
