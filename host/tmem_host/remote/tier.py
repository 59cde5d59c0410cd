"""The remote tier: persistent pages that do not fit in tmemd's memory, kept in a
Redis Cluster (RAMster's idea on an existing distributed engine; docs/REMOTE.md).

The store (pure) keeps such a page as a RemotePage and calls ``take``,
``release`` and ``fetch``; this module does the I/O on tmemd's event loop with
redis-py's asyncio client:

- **Layout.** A page's key is ``tmem:{GUEST:BUCKET}:POOL:OBJ:GROUP:SUB:VERSION``.
  The hash tag (in braces) is one of the guest's FENCE_BUCKETS buckets, chosen
  by the page's neighbourhood (pool, ``oid[0] >> 4``, ``oid[1]``, ``oid[2]``,
  ``index >> 2``), so for frontswap's swizzle (slot & 15 in the oid, slot >> 4 in
  the index) 64 consecutive swap slots share a slot of the cluster: a batch of 64
  aligned slots is one command on one node. The versions make every write a new
  key: a delete of an old copy can never hit a newer one, however the two reorder.
- **Ownership.** One tmemd owns a guest's namespace at a time: each bucket's
  ``fence`` key holds the owner's epoch, and every write and delete is a Redis
  function (FUNCTION_LIBRARY) that checks it in the same slot, atomically. A
  tmemd claims a guest with a new epoch (a counter in the guest's ``owner`` key)
  on every bucket; from then on the previous owner's writes and deletes fail with
  FENCED, whatever their timing, and it stops using the tier for that guest.
- **Values** carry a header: magic, tag, version and an XXH3-128 digest of
  the key, the version and the data (``_values.c``), so a wrong, damaged or
  older value is a miss (EIO to the guest), never data.
- **Batches.** Writes taken during one pass of the event loop go out together:
  grouped by hash tag (MSET / MGET / DEL per tag), the tags grouped by master,
  one pipeline per master, all masters at once; with ``replicas`` a WAIT ends
  each master's pipeline on the same connection.
- **Reads.** A get's read also reads its neighbourhood (read-around) and, once the
  guest's gets walk its pages in order, the next neighbourhoods (read-ahead). A
  page is read once at a time: a get of a page being read waits for that read.
  A get wakes when the masters holding its own pages have answered.
- **Failures.** MOVED/ASK, CLUSTERDOWN, refused or timed-out connections refresh
  the slot map and retry until ``wait_s``; then the cluster is unreachable:
  writes in flight go back to memory (Store.strand: acknowledged pages are never
  lost), new puts are refused (they go to the guest's fallback disk), reads of
  remote pages miss. A probe every second brings the tier back.

Structured: every task is the tier's; ``aclose`` cancels and joins them all.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
import zlib
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from uuid import UUID

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from tmem_host.remote._values import decode_value as _decode_value_v2
from tmem_host.remote._values import encode_value as encode_value
from tmem_host.replies import RemoteGuestStats, RemoteStats
from tmem_host.store import Client, Pool, Store
from tmem_host.store.pagecodec import StoredPage
from tmem_host.store.tier import RemotePage
from tmem_host.waiting import all_done
from tmem_wire.abi import Oid

log = logging.getLogger("tmemd.remote")

#: Values: magic, tag (0 fill word, 1 data), 3 reserved, version, digest.
VALUE_HEADER: Final = struct.Struct("<4sB3xQ16s")
# TMR2 (written; _values.c has its digest) and TMR1 (still read; docs/REMOTE.md).
VALUE_MAGIC: Final = b"TMR2"
VALUE_MAGIC_V1: Final = b"TMR1"
_FILL = struct.Struct("<Q")
#: Eviction policies that never evict a key without a TTL (tmemd sets none).
SAFE_POLICIES: Final = frozenset({"noeviction", "volatile-lru", "volatile-lfu",
                                  "volatile-random", "volatile-ttl"})
#: Histogram buckets of round trips, in microseconds (upper bounds; the last is open).
RTT_BUCKETS_US: Final = (100, 200, 500, 1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000)
# Data bytes a take() may hold in memory while their writes are in flight.
DEFAULT_INFLIGHT_BYTES: Final = 32 << 20
# Replies after which the slot map is refreshed and the command retried (redis-py
# parses the error code into the class and drops it from the message).
_REDIRECTIONS: Final = (MovedError, AskError)
_RETRIED: Final = (*_REDIRECTIONS, TryAgainError, ClusterDownError, MasterDownError,
                   BusyLoadingError, ReadOnlyError)
# A master out of memory (OOM: maxmemory with noeviction) fails writes at once,
# not retried, and new pages are refused for FULL_BACKOFF_S (they go to the disk).
FULL_BACKOFF_S: Final = 1.0
# A copy read back for a get stays at least this long, unless the read cache is
# past CACHE_HARD_FACTOR times its bytes: the get runs once the event loop gets to
# it after the batch.
CACHE_GRACE_S: Final = 1.0
CACHE_HARD_FACTOR: Final = 4
# A copy read back for a get that waits for it (not one read around) stays until
# that get took it (Store -> consumed), however late the event loop runs it (a
# starved tmemd: CI saw a swap-in miss its page, a SIGBUS in the guest), or at
# most this long: a get that never comes (its connection closed) pins nothing for good.
PIN_MAX_S: Final = 10.0


# A guest's key prefix: b"tmem:{", its UUID in 32 hex digits, b":" (GuestRemote.prefix).
_GUEST_PREFIX_LENGTH: Final = 6 + 32 + 1
# Read-ahead marks a guest may leave behind (neighbourhoods read ahead that no
# get reached) before they are all forgotten.
MAX_AHEAD_MARKS: Final = 1024
# A guest's keys spread over this many hash tags (cluster slots), each with its
# own fence key: enough to balance a guest over the masters, few enough to claim
# in one round trip per master.
FENCE_BUCKETS: Final = 64
# The Redis functions every write and delete goes through (loaded on every master
# at start, and again on a master that lacks them). KEYS[1] is the bucket's fence
# key; ARGV[1] the caller's epoch. Deletes and claims may run when a master is out
# of memory (they free it, or are tiny); writes may not.
FUNCTION_LIBRARY: Final = """#!lua name=tmem
local function fenced(keys, args)
  local owner = redis.call('GET', keys[1])
  if owner ~= args[1] then
    return redis.error_reply('FENCED owner epoch ' .. tostring(owner))
  end
end
redis.register_function('tmem_set', function(keys, args)
  local refusal = fenced(keys, args)
  if refusal then return refusal end
  local ttl = tonumber(args[2])
  for i = 2, #keys do
    if ttl > 0 then
      redis.call('SET', keys[i], args[i + 1], 'PX', ttl)
    else
      redis.call('SET', keys[i], args[i + 1])
    end
  end
  return #keys - 1
end)
redis.register_function{function_name='tmem_del', flags={'allow-oom'}, callback=function(keys, args)
  local refusal = fenced(keys, args)
  if refusal then return refusal end
  local deleted = 0
  for i = 2, #keys do deleted = deleted + redis.call('DEL', keys[i]) end
  return deleted
end}
redis.register_function{function_name='tmem_claim', flags={'allow-oom'}, callback=function(keys, args)
  local owner = tonumber(redis.call('GET', keys[1]) or '0')
  if owner > tonumber(args[1]) then
    return redis.error_reply('FENCED owner epoch ' .. owner)
  end
  redis.call('SET', keys[1], args[1])
  return 1
end}
redis.register_function{function_name='tmem_owner', flags={'allow-oom'}, callback=function(keys, args)
  local epoch = tonumber(redis.call('HGET', keys[1], 'epoch') or '0')
  if epoch > tonumber(args[1]) then
    return redis.error_reply('FENCED owner epoch ' .. epoch)
  end
  redis.call('HSET', keys[1], 'epoch', args[1], 'host', args[2])
  return 1
end}
"""


class RemoteError(Exception):
    """The remote tier cannot start: the cluster is unreachable or unsafe."""


class NotOwnerError(RemoteError):
    """Another tmemd owns the guest's namespace (docs/REMOTE.md, "Ownership and fencing")."""

#: The owner record's host while a guest is handed off: nobody's until the
#: destination takes it over (or its source reclaims it).
HANDOFF_PREFIX: Final = "handoff-from:"


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    #: Cluster seed nodes, "host:port".
    seeds: tuple[tuple[str, int], ...]
    #: Replicas each write must reach before it is acknowledged (WAIT).
    replicas: int = 0
    #: How long a batch retries before the cluster counts as unreachable.
    wait_s: float = 10.0
    #: Remote bytes all guests together may use (None: no limit but the cluster's).
    budget_bytes: int | None = None
    #: Persistent pages fill at most this fraction of the budget (or a cap) before
    #: puts go straight to the cluster; the rest is for remote pages' metadata.
    local_fraction: float = 0.9
    #: Demote cold pages while local use is above this fraction of the budget or a cap,
    demote_above: float = 0.8
    #: ... down to this fraction.
    demote_to: float = 0.7
    inflight_bytes: int = DEFAULT_INFLIGHT_BYTES
    #: Pages per demotion batch.
    demote_batch: int = 256
    #: Copies of remote pages kept in memory (RemotePage.fetched) for the gets that
    #: follow: those read back, those read around them, those just written that a
    #: waiting get counts on. The oldest go beyond this, but none younger than
    #: CACHE_GRACE_S (the get that waited for it may not have run yet) below
    #: CACHE_HARD_FACTOR times this.
    read_cache_bytes: int = 16 << 20
    #: Read-around: a read also fetches the other remote pages of its hash tag (the
    #: same MGET: no extra round trip), for the swap-ins of neighbouring slots.
    read_around: bool = True
    #: Read-ahead: once a guest's gets walk from one 64-page neighbourhood (page_key's
    #: GROUP) into the next, the tier keeps this many neighbourhoods past the one
    #: being read on their way (0: never), so a sequential swap-in finds them here.
    read_ahead_groups: int = 2
    #: TTL of demoted ephemeral pages' keys: a volatile-* policy may evict them,
    #: and copies a crash orphaned expire.
    ephemeral_ttl_s: float = 3600.0
    #: This tmemd's name in the guests' owner records: a restart resumes the guests
    #: it owned, and leaves those another host has claimed since.
    host_id: str = ""


def parse_seeds(spec: str) -> tuple[tuple[str, int], ...]:
    """``host:port[,host:port...]``: the cluster nodes to start from; ValueError if malformed."""
    seeds: list[tuple[str, int]] = []
    for part in spec.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad cluster node {part.strip()!r} (expected host:port)")
        seeds.append((host, int(port)))
    return tuple(seeds)


@dataclass(eq=False)
class GuestRemote:
    """One guest's namespace, limits and figures in the tier."""

    name: str
    uuid: UUID
    cap_bytes: int | None
    weight: int
    counters: Counter[str] = field(default_factory=Counter)
    rtt_us: Counter[str] = field(default_factory=Counter)

    # The epoch this tmemd owns the guest's namespace with; None: it does not own
    # it (not claimed yet, the cluster unreachable, or claimed by another tmemd).
    epoch: int | None = None
    # Another tmemd claimed the guest: this one never writes or deletes its keys again.
    fenced: bool = False
    # The claim waits for the cluster (the prober tries again).
    claim_pending: bool = False
    # Demotions queued or in flight: in the guest's remote quota before demote()
    # charges them (puts that come meanwhile must not pass the quota).
    demoting_bytes: int = 0
    # Read-ahead: the object (pool id, oid[0] >> 4, oid[1], oid[2]) its last get
    # of a remote page was in and its neighbourhood (index >> 2), and the
    # neighbourhoods read ahead that no get has reached yet.
    stream: tuple[int, int, int, int] | None = None
    stream_group: int = 0
    ahead_marks: set[tuple[tuple[int, int, int, int], int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.prefix = f"tmem:{{{self.uuid.hex}:".encode()
        self.owner_key = self.prefix + b"owner}"

    def fence_key(self, bucket: int) -> bytes:
        return b"%b%02x}:fence" % (self.prefix, bucket)


@dataclass(slots=True)
class _Write:
    guest: GuestRemote
    pool: Pool
    oid: Oid
    index: int
    page: RemotePage
    key: bytes
    value: bytes
    # A demotion: the in-memory copy to replace once written (None: a take()).
    expected: bytes | None = None


class _Waiter:
    """One get's wait for the reads of its pages: done when the last one has ended
    (each when its own master answered), whatever else their batches read."""

    __slots__ = ("future", "left")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.left = 0

    def read_ended(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(None)


@dataclass(slots=True)
class _Read:
    guest: GuestRemote
    pool: Pool
    page: RemotePage
    key: bytes
    # The gets that wait for this read (None: none, a prefetch).
    waiters: list[_Waiter] | None = None
    # Read around a wanted page, not asked for (its copy waits in the read cache);
    # a get of the page while it is queued or in flight waits for it instead of
    # reading the page again, and makes it its own (no longer a prefetch).
    prefetch: bool = False
    # Read ahead of a sequential stream of gets (counted apart from read around).
    ahead: bool = False


def page_key(guest: GuestRemote, pool_id: int, oid: Oid, index: int, version: int) -> bytes:
    """The page's key (see the module docstring for the hash tag)."""
    return (_neighbourhood_key(guest, pool_id, oid[0] >> 4, oid[1], oid[2], index >> 2)
            + b"%x:%x" % (((oid[0] & 15) << 2) | (index & 3), version))


def _neighbourhood_key(guest: GuestRemote, pool_id: int, high: int, oid1: int, oid2: int,
                       group: int) -> bytes:
    """What the keys of one neighbourhood's pages start with: its hash tag and
    POOL:OBJ:GROUP (a read-ahead makes it once for the group's pages)."""
    neighbourhood = b"%d:%x.%x.%x:%x" % (pool_id, high, oid1, oid2, group)
    return b"%b%02x}:%b:" % (guest.prefix, zlib.crc32(neighbourhood) % FENCE_BUCKETS, neighbourhood)


def decode_value(key: bytes, version: int, value: bytes | None) -> StoredPage | None:
    """The stored form in ``value``, or None unless it is exactly this key's
    copy of this version (missing, damaged, another key's or an older one).
    Values are written as TMR2 (``encode_value``, in C); TMR1 values, written
    before, are still read: the cluster keeps pages across tmemd's upgrades."""
    if value is not None and value.startswith(VALUE_MAGIC_V1):
        return _decode_value_v1(key, version, value)
    return _decode_value_v2(key, version, value)


def _decode_value_v1(key: bytes, version: int, value: bytes) -> StoredPage | None:
    """TMR1: the same header, a BLAKE2b-128 digest keyed with the key."""
    if len(value) < VALUE_HEADER.size:
        return None
    magic, tag, found_version, digest = VALUE_HEADER.unpack_from(value)
    data = value[VALUE_HEADER.size:]
    if found_version != version or tag not in (0, 1) or value[5:8] != b"\0\0\0":
        return None
    hasher = hashlib.blake2b(key, digest_size=16)
    hasher.update(_FILL.pack(version))
    hasher.update(bytes((tag,)))
    hasher.update(data)
    if digest != hasher.digest():
        return None
    if tag == 0:
        if len(data) != _FILL.size:
            return None
        fill: int = _FILL.unpack(data)[0]
        return fill
    return data


def _group_of(pool_id: int, oid: Oid, index: int) -> tuple[tuple[int, int, int, int], int]:
    """The page's neighbourhood (page_key's POOL:OBJ:GROUP): its object (pool id,
    oid[0] >> 4, oid[1], oid[2]) and its group in it (index >> 2)."""
    return (pool_id, oid[0] >> 4, oid[1], oid[2]), index >> 2


def is_page_key(key: bytes) -> bool:
    """Whether a key of a guest's namespace is a page's (not a fence or the owner record)."""
    return not (key.endswith(b"}:fence") or key.endswith(b":owner}"))


def _tag_of(key: bytes) -> bytes:
    return key[: key.index(b"}") + 1]


def _bucket_of(key: bytes) -> int:
    """The bucket of a page or fence key: the two hex digits before its tag's brace."""
    end = key.index(b"}")
    return int(key[end - 2:end], 16)


def _route_key(command: list[Any]) -> bytes:
    """The key that decides a command's slot (a function call's first key)."""
    key: bytes = command[3] if command[0] == "FCALL" else command[1]
    return key


def _call_keys(command: list[Any]) -> list[bytes]:
    """The page keys of a tmem_set / tmem_del call (after its fence key)."""
    return command[4:3 + command[2]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fenced(reply: object) -> bool:
    return isinstance(reply, ResponseError) and str(reply).startswith("FENCED")


def _function_missing(reply: object) -> bool:
    return isinstance(reply, ResponseError) and "function not found" in str(reply).lower()


def _rtt_bucket(micros: float) -> str:
    for bound in RTT_BUCKETS_US:
        if micros <= bound:
            return f"<={bound}"
    return f">{RTT_BUCKETS_US[-1]}"


class RemoteTier:
    """The PageTier of a Redis Cluster. Build it, ``await start()`` (connects and
    checks the cluster), attach it to the store before any guest, register each
    guest, ``await aclose()`` at the end."""

    def __init__(self, settings: RemoteSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._cluster: RedisCluster | None = None
        # One connection per master for writes (WAIT counts its own writes) and one for reads.
        self._writers: dict[str, aioredis.Redis] = {}
        self._readers: dict[str, aioredis.Redis] = {}
        self._guests: dict[str, GuestRemote] = {}
        self._pool_ids: dict[int, int] = {}
        self._next_version = time.time_ns()
        self.reachable = True
        self._outbox: list[_Write] = []
        self._deletes: list[bytes] = []
        self._reads: list[_Read] = []
        # The queued and in-flight reads, by page: each page is read once at a time.
        self._reading: dict[RemotePage, _Read] = {}
        self._inflight_bytes = 0
        # The read cache (settings.read_cache_bytes), oldest first, and its bytes:
        # each page keeps its .fetched copy while it is here (a RemotePage is one
        # version: a copy is never stale, a put or flush replaces the page itself).
        self._cached: OrderedDict[RemotePage, float] = OrderedDict()  # page -> when cached
        # Pages with a copy that the gets waiting for the queued reads count on: cached
        # afresh when the reads end (see fetch).
        self._held: list[RemotePage] = []
        # Those of the queued and in-flight reads, counted: a write that lands for
        # one keeps its copy (cached) instead of dropping it.
        self._holding: Counter[RemotePage] = Counter()
        self._cached_bytes = 0
        # Copies gets wait for, until they take them (or PIN_MAX_S): page -> when pinned.
        self._pinned: dict[RemotePage, float] = {}
        # Until then (monotonic) a master said OOM: new pages are refused.
        self._full_until = 0.0
        # Completes when the outbox's batch is written (or its pages back in memory).
        self._outbox_done: asyncio.Future[None] | None = None
        # Those of the batches being written.
        self._batches_in_flight: set[asyncio.Future[None]] = set()
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._demote_wakeup = asyncio.Event()
        self.total_bytes = 0
        self.counters: Counter[str] = Counter()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Connect, learn the slot map and check every master's eviction policy:
        RemoteError (one line) if the cluster is unreachable or could evict
        persistent pages."""
        host, port = self.settings.seeds[0]
        startup = [ClusterNode(h, p) for h, p in self.settings.seeds]
        try:
            self._cluster = RedisCluster(startup_nodes=startup, socket_timeout=2.0,
                                         socket_connect_timeout=2.0, protocol=2)
            await self._cluster.initialize()
            masters = self._cluster.get_primaries()
            for node in masters:
                reply = await self._cluster.execute_command(
                    "CONFIG", "GET", "maxmemory-policy", target_nodes=node)
                policy = _config_value(reply, "maxmemory-policy")
                if policy not in SAFE_POLICIES:
                    raise RemoteError(
                        f"the cluster node {node.host}:{node.port} has maxmemory-policy {policy}, "
                        "which may evict tmemd's persistent pages: set noeviction (or a volatile-* "
                        "policy) on every node")
                await self._cluster.execute_command("FUNCTION", "LOAD", "REPLACE", FUNCTION_LIBRARY,
                                                    target_nodes=node)
        except RemoteError:
            await self._close_clients()
            raise
        except (RedisError, RedisClusterException, OSError) as error:
            await self._close_clients()
            raise RemoteError(f"cannot reach the Redis Cluster at {host}:{port}: {error}") from None
        self._spawn(self._demoter())
        self._spawn(self._prober())
        log.info("remote tier up", extra={"masters": len(masters), "replicas": self.settings.replicas})

    async def aclose(self) -> None:
        """Finish writes in flight (their pages stay in memory if they fail), stop
        every task, close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._demote_wakeup.set()
        if self._outbox or self._deletes or self._reads:
            await self._flush()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_clients()

    async def _close_clients(self) -> None:
        clients = [*self._writers.values(), *self._readers.values()]
        self._writers.clear()
        self._readers.clear()
        for client in clients:
            await client.aclose()
        if self._cluster is not None:
            await self._cluster.aclose()
            self._cluster = None

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("remote tier task failed", exc_info=task.exception())

    # -- guests ------------------------------------------------------------------

    async def register(self, client: Client, uuid: UUID, cap_bytes: int | None, *,
                       take_over: bool = False) -> GuestRemote:
        """Name the guest's pages by ``uuid`` (not by host, so another tmemd can
        take the guest over), limit its remote bytes to ``cap_bytes`` and claim
        its namespace (see ``claim``)."""
        guest = self._guests.get(client.name)
        if guest is None or guest.uuid != uuid:
            guest = GuestRemote(client.name, uuid, cap_bytes, client.weight)
            self._guests[client.name] = guest
        guest.cap_bytes = cap_bytes
        await self.claim(guest, take_over=take_over)
        return guest

    async def claim(self, guest: GuestRemote, *, take_over: bool = False,
                    reclaim: bool = False) -> bool:
        """Own the guest's namespace: a new epoch from its owner key's counter, the
        owner record (epoch, host id), then every bucket's fence. A namespace whose
        owner record names another host is left to it unless ``take_over`` (a
        restore): configuring one guest on two hosts never disturbs the one that
        serves it. One this host handed off (``relinquish``) is taken back only
        with ``reclaim`` (tmemctl remote-claim: the handoff was abandoned). False
        if not claimed: the guest's pages stay out of the tier (refused: the
        fallback disk); an unreachable cluster is tried again by the prober."""
        guest.claim_pending = False
        cluster = self._cluster
        if cluster is None or not self.reachable:
            guest.claim_pending = True
            return False
        mine = self.settings.host_id
        try:
            record = await self.owner_record(guest)
            host = record.get("host", "")
            if host not in ("", mine) and not take_over and not (reclaim and host == HANDOFF_PREFIX + mine):
                self._lose_ownership(guest, f"owned by {host!r} (epoch {record.get('epoch')})")
                return False
        except (RedisError, RedisClusterException, OSError) as error:
            log.warning("cannot claim a guest in the cluster yet",
                        extra={"guest": guest.name, "error": str(error)})
            guest.claim_pending = True
            return False
        epoch = await self._fence_all(guest, mine)
        if epoch is None:
            return False
        guest.epoch = epoch
        log.info("guest claimed in the cluster", extra={"guest": guest.name, "epoch": epoch,
                                                        "host_id": mine})
        return True

    async def relinquish(self, guest: GuestRemote) -> int:
        """Hand the guest's namespace off: fence it with a new epoch that no tmemd
        holds (the owner record says HANDOFF_PREFIX + this host), so that from the
        moment this returns nothing writes or deletes the guest's keys, this tmemd's
        writes in flight included (refused by the cluster: their pages stay in
        memory), until a restore elsewhere takes the guest over. Returns the epoch;
        NotOwnerError if this tmemd does not own the guest, RemoteError if the
        cluster cannot be reached."""
        if guest.epoch is None:
            raise NotOwnerError(f"guest {guest.name!r} is not this tmemd's in the cluster")
        guest.epoch = None  # nothing more is sent for it; then what was sent lands
        while (written := self.barrier()) is not None:
            await written
        epoch = await self._fence_all(guest, HANDOFF_PREFIX + self.settings.host_id)
        if epoch is None:
            raise RemoteError(f"guest {guest.name!r} could not be handed off: the cluster did not "
                              "take the new fences")
        self._lose_ownership(guest, f"handed off at epoch {epoch}")
        return epoch

    async def owner_record(self, guest: GuestRemote) -> dict[str, str]:
        """The guest's owner record: ``epochs`` (the counter), ``epoch``, ``host``."""
        assert self._cluster is not None
        reply = await self._cluster.hgetall(guest.owner_key)
        return {_text(field): _text(value) for field, value in reply.items()}

    async def _fence_all(self, guest: GuestRemote, owner: str) -> int | None:
        """A new epoch, recorded for ``owner`` and set on every bucket's fence;
        None if the cluster failed or a higher epoch won (then ``guest.fenced``)."""
        assert self._cluster is not None
        try:
            epoch = int(await self._cluster.hincrby(guest.owner_key, "epochs", 1))
        except (RedisError, RedisClusterException, OSError) as error:
            log.warning("cannot fence a guest in the cluster yet",
                        extra={"guest": guest.name, "error": str(error)})
            guest.claim_pending = True
            return None
        guest.fenced = False
        guest.epoch = None
        for commands in ([["FCALL", "tmem_owner", 1, guest.owner_key, epoch, owner]],
                         [["FCALL", "tmem_claim", 1, guest.fence_key(bucket), epoch]
                          for bucket in range(FENCE_BUCKETS)]):
            failed = await self._run(commands, self._writers, wait_replicas=self.settings.replicas)
            if guest.fenced:  # a higher epoch claimed it meanwhile
                return None
            if failed:
                guest.claim_pending = True
                return None
        return epoch

    def guest(self, name: str) -> GuestRemote | None:
        return self._guests.get(name)

    def limit_bytes(self, guest: GuestRemote) -> int | None:
        """The guest's remote limit: its cap, and its weighted share of the remote
        budget. Hard limits: remote pages are persistent and never evicted, so a
        guest over its share could never be made to give room back."""
        limit = guest.cap_bytes
        budget = self.settings.budget_bytes
        if budget is not None:
            weights = sum(other.weight for other in self._guests.values()) or 1
            share = budget * guest.weight // weights
            limit = share if limit is None else min(limit, share)
        return limit

    # -- the store's PageTier -------------------------------------------------------

    def take(self, pool: Pool, oid: Oid, index: int, stored: StoredPage) -> RemotePage | None:
        guest = self._guests.get(pool.owner.name)
        if guest is None or self._closed:
            return None
        persistent = pool.persistent
        if guest.epoch is None:  # not (or no longer) this tmemd's to write
            guest.counters["refused_unowned"] += 1
            return None
        if not self.reachable:
            guest.counters["refused_unreachable"] += 1
            return None
        if self._full_until > time.monotonic():
            guest.counters["refused_full"] += 1
            return None
        value_bytes = VALUE_HEADER.size + (len(stored) if type(stored) is bytes else _FILL.size)
        if not self._room_in_quota(pool.owner, guest, value_bytes, persistent):
            guest.counters["refused_quota"] += 1
            return None
        if self._inflight_bytes + value_bytes > self.settings.inflight_bytes:
            guest.counters["refused_inflight"] += 1
            return None
        version = self._version()
        key = page_key(guest, self._pool_id(pool), oid, index, version)
        page = RemotePage(version, value_bytes, pending=stored)
        self._queue_write(_Write(guest, pool, oid, index, page, key,
                                 encode_value(key, version, stored)))
        if persistent:
            guest.counters["puts"] += 1
            self._demote_wakeup.set()  # memory is short: make room for the next puts
        else:
            guest.counters["ephemeral_demoted"] += 1
        return page

    def _room_in_quota(self, client: Client, guest: GuestRemote, nbytes: int,
                       persistent: bool) -> bool:
        """Whether ``nbytes`` more fit the guest's remote limit; a persistent page
        pushes the guest's ephemeral pages out of the tier to fit."""
        limit = self.limit_bytes(guest)
        if limit is None:
            return True
        over = client.remote_bytes + guest.demoting_bytes + nbytes - limit
        if over > 0 and persistent and client.remote_ephemeral:
            guest.counters["ephemeral_shed"] += len(client.remote_ephemeral)
            self.store.shed_remote_ephemeral(client, over)
            guest.counters["ephemeral_shed"] -= len(client.remote_ephemeral)
            over = client.remote_bytes + guest.demoting_bytes + nbytes - limit
        return over <= 0

    def release(self, pool: Pool, oid: Oid, index: int, page: RemotePage, *, keep: bool) -> None:
        guest = self._guests.get(pool.owner.name)
        self.total_bytes -= page.nbytes
        self._pinned.pop(page, None)
        if page in self._cached:
            del self._cached[page]
            self._cached_bytes -= page.nbytes
        if guest is None or keep:
            return
        # A write still in flight is deleted once it lands (see _complete_write).
        # Not the owner: the key may be the new owner's page now; never deleted.
        if page.pending is None and guest.epoch is not None:
            self._deletes.append(page_key(guest, self._pool_id(pool), oid, index, page.version))
            self._schedule_flush()
        page.pending = None
        page.fetched = None

    def fetch(self, pool: Pool, pages: list[tuple[Oid, int, RemotePage]],
              held: list[RemotePage] | None = None) -> asyncio.Future[None]:
        guest = self._guests.get(pool.owner.name)
        if guest is None or not self.reachable or self._closed:
            if guest is not None:
                guest.counters["get_unreachable"] += len(pages)
            for _, _, page in pages:
                page.read_failed = True
            missed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            missed.set_result(None)  # they miss: EIO to the guest, never wrong data
            return missed
        pool_id = self._pool_id(pool)
        waiter = _Waiter()
        for oid, index, page in pages:
            read = self._reading.get(page)
            if read is None:
                read = self._queue_read(_Read(guest, pool, page,
                                              page_key(guest, pool_id, oid, index, page.version)))
            read.prefetch = False  # a get waits for it: pinned when it lands, a failure misses
            if read.waiters is None:
                read.waiters = []
            read.waiters.append(waiter)
            waiter.left += 1
        if held:
            # Pinned until the get takes them; held (never evicted, a write that lands
            # keeps its copy) until the next batch ends, then cached afresh.
            now = time.monotonic()
            for page in held:
                self._pinned[page] = now
            self._held.extend(held)
            self._holding.update(held)
            self._schedule_flush()
        if self.settings.read_around:
            for stream, group in {_group_of(pool_id, oid, index) for oid, index, _ in pages}:
                self._queue_group(guest, pool, *stream, group)
        if pages:
            oid, index, _ = pages[0]
            self._follow(guest, pool, pool_id, oid, index)
        if not waiter.left:
            waiter.future.set_result(None)
        return waiter.future

    def _queue_read(self, read: _Read) -> _Read:
        self._reads.append(read)
        self._reading[read.page] = read
        self._schedule_flush()
        return read

    def _queue_group(self, guest: GuestRemote, pool: Pool, pool_id: int, high: int, oid1: int,
                     oid2: int, group: int, *, ahead: bool = False) -> None:
        """Queue as prefetches the remote pages of one neighbourhood (see page_key:
        oids differing in their low 4 bits, indexes in their low 2) that have no
        copy here and are not being read."""
        objects = pool.objects
        base: bytes | None = None
        for low in range(16):
            oid = ((high << 4) | low, oid1, oid2)
            obj = objects.get(oid)
            if obj is None:
                continue
            for index in range(group << 2, (group << 2) + 4):
                value = obj.get(index)
                if (type(value) is RemotePage and value.pending is None
                        and value.fetched is None and value not in self._reading):
                    if base is None:
                        base = _neighbourhood_key(guest, pool_id, high, oid1, oid2, group)
                    key = base + b"%x:%x" % ((low << 2) | (index & 3), value.version)
                    self._queue_read(_Read(guest, pool, value, key, prefetch=True, ahead=ahead))

    def _follow(self, guest: GuestRemote, pool: Pool, pool_id: int, oid: Oid, index: int) -> None:
        """Read-ahead (Linux's swap and file readahead, by neighbourhood). A get of a
        remote page in the neighbourhood one or two after the last one's, or in a
        neighbourhood read ahead (marked, as Linux marks a page PG_readahead, so a
        stream survives other gets between its own), makes the stream sequential:
        the next ``read_ahead_groups`` neighbourhoods not yet marked are queued and
        marked. Any other get reads nothing ahead: random gets cost no extra reads.
        Prefetches are checked like any read, and a put or flush meanwhile replaces
        the page (and its copy)."""
        window = self.settings.read_ahead_groups
        if window <= 0:
            return
        stream, group = _group_of(pool_id, oid, index)
        if group == guest.stream_group and stream == guest.stream:
            return  # the neighbourhood's first get did this (its mark is gone)
        marks = guest.ahead_marks
        sequential = (stream, group) in marks or (
            stream == guest.stream and 0 < group - guest.stream_group <= 2)
        marks.discard((stream, group))
        guest.stream, guest.stream_group = stream, group
        if not sequential:
            return
        if len(marks) > MAX_AHEAD_MARKS:  # streams the guest left: marks are only hints
            marks.clear()
        for ahead_group in range(group + 1, group + window + 1):
            if (stream, ahead_group) not in marks:
                marks.add((stream, ahead_group))
                self._queue_group(guest, pool, *stream, ahead_group, ahead=True)

    def _cache(self, pages: Sequence[RemotePage], now: float | None = None) -> None:
        """Keep (or keep afresh) these pages' copies in the read cache; the oldest
        leave beyond its bytes, if they have been there CACHE_GRACE_S (or the cache
        is past its hard bound), never these nor others cached at ``now`` (one
        batch's, cached as its masters answer: default, the present)."""
        cache = self._cached
        now = time.monotonic() if now is None else now
        for page in pages:
            if page.fetched is None:
                continue
            if page in cache:
                cache.move_to_end(page)
            else:
                self._cached_bytes += page.nbytes
            cache[page] = now
        bound = self.settings.read_cache_bytes
        scanned = 0
        while self._cached_bytes > bound and cache and scanned < len(cache):
            old, since = cache.popitem(last=False)
            if since == now or (now - since < CACHE_GRACE_S
                                and self._cached_bytes <= bound * CACHE_HARD_FACTOR):
                # This batch's (moved to the end, all cached at `now`), or young: back
                # in its place, the oldest.
                cache[old] = since
                cache.move_to_end(old, last=False)
                break
            if self._waited_for(old, now):
                cache[old] = since  # to the end
                scanned += 1
                continue
            self._pinned.pop(old, None)
            old.fetched = None
            self._cached_bytes -= old.nbytes

    def _waited_for(self, page: RemotePage, now: float) -> bool:
        """Whether a get still counts on this page's copy: one whose fetch (of other
        pages) is queued or in flight holds it, however long that read takes (a get
        served after its fetch never reads a page again: a copy gone is a MISS, EIO
        to the guest), or one that the fetch has woken has not taken it yet."""
        if page in self._holding:
            return True
        pin = self._pinned.get(page)
        return pin is not None and now - pin < PIN_MAX_S

    def forget_copies(self) -> int:
        """Empty the read cache now, grace or not (the next gets read the cluster),
        but for the copies gets still wait for; returns the bytes freed."""
        freed = 0
        now = time.monotonic()
        for page in list(self._cached):
            if not self._waited_for(page, now):
                del self._cached[page]
                page.fetched = None
                freed += page.nbytes
        self._cached_bytes -= freed
        return freed

    def consumed(self, pool: Pool, oid: Oid, index: int, page: RemotePage) -> None:
        self._pinned.pop(page, None)
        if self.settings.read_ahead_groups > 0 and self.reachable and not self._closed:
            guest = self._guests.get(pool.owner.name)
            if guest is not None:
                self._follow(guest, pool, self._pool_id(pool), oid, index)

    def barrier(self) -> asyncio.Future[None] | None:
        waits = list(self._batches_in_flight)
        if self._outbox:
            if self._outbox_done is None:
                self._outbox_done = asyncio.get_running_loop().create_future()
            waits.append(self._outbox_done)
        if not waits:
            return None
        return all_done(waits)

    def pressure(self) -> None:
        self._demote_wakeup.set()

    def restored(self, page: RemotePage) -> None:
        self.total_bytes += page.nbytes
        if page.version >= self._next_version:
            self._next_version = page.version + 1

    # -- internals -----------------------------------------------------------------

    def _version(self) -> int:
        self._next_version = max(self._next_version + 1, time.time_ns())
        return self._next_version

    def _pool_id(self, pool: Pool) -> int:
        pool_id = self._pool_ids.get(id(pool))
        if pool_id is None or pool.owner.pools[pool_id] is not pool:
            pool_id = pool.owner.pools.index(pool)
            self._pool_ids[id(pool)] = pool_id
        return pool_id

    def _queue_write(self, write: _Write) -> None:
        self._outbox.append(write)
        self._inflight_bytes += len(write.value)
        self.total_bytes += write.page.nbytes
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Everything queued during this pass of the event loop goes out as one batch.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._flush_scheduled = False
        self._spawn(self._flush())

    async def _flush(self) -> None:
        cached_at = time.monotonic()  # the batch's copies count as cached together
        writes, self._outbox = self._outbox, []
        deletes, self._deletes = self._deletes, []
        reads, self._reads = self._reads, []
        held, self._held = self._held, []
        written = self._outbox_done
        self._outbox_done = None
        if writes:
            if written is None:
                written = asyncio.get_running_loop().create_future()
            self._batches_in_flight.add(written)
        try:
            await asyncio.gather(self._write_batch(writes, deletes),
                                 self._read_batch(reads, cached_at))
        finally:
            self._cache(held, cached_at)  # (pages read were cached as their master answered)
            self._holding.subtract(held)
            self._holding += Counter()  # drops the pages no read holds any more
            if written is not None:
                self._batches_in_flight.discard(written)
                if not written.done():
                    written.set_result(None)

    async def _write_batch(self, writes: list[_Write], deletes: list[bytes]) -> None:
        if not writes and not deletes:
            return
        # One tmem_set per (hash tag, TTL) and one tmem_del per hash tag, each checked
        # against the bucket's fence with the guest's epoch (see FUNCTION_LIBRARY).
        ttl_ms = max(1, int(self.settings.ephemeral_ttl_s * 1000))
        sets: dict[tuple[bytes, int], tuple[GuestRemote, list[bytes], list[bytes]]] = {}
        unowned: set[bytes] = set()
        for write in writes:
            if write.guest.epoch is None:  # fenced since it was taken
                unowned.add(write.key)
                continue
            group = sets.setdefault((_tag_of(write.key), 0 if write.pool.persistent else ttl_ms),
                                    (write.guest, [], []))
            group[1].append(write.key)
            group[2].append(write.value)
        dels: dict[bytes, tuple[GuestRemote, list[bytes]]] = {}
        for key in deletes:
            guest = self._guest_of(key)
            if guest is not None and guest.epoch is not None:
                dels.setdefault(_tag_of(key), (guest, []))[1].append(key)
        commands = [["FCALL", "tmem_set", len(keys) + 1, guest.fence_key(_bucket_of(tag)), *keys,
                     guest.epoch, ttl, *values]
                    for (tag, ttl), (guest, keys, values) in sets.items()]
        commands += [["FCALL", "tmem_del", len(keys) + 1, guest.fence_key(_bucket_of(tag)), *keys,
                      guest.epoch] for tag, (guest, keys) in dels.items()]
        try:
            failed = await self._run(commands, self._writers, wait_replicas=self.settings.replicas)
        except Exception:  # a bug must not lose acknowledged pages: they stay in memory
            log.exception("remote write batch failed")
            failed = commands
        failed_keys = {key for command in failed if command[1] == "tmem_set"
                       for key in _call_keys(command)} | unowned
        lost_deletes = sum(len(_call_keys(command)) for command in failed if command[1] == "tmem_del")
        if lost_deletes:
            # Orphans: unreachable copies of pages already gone. Their versions make
            # them harmless; they cost the cluster memory until `tmemctl remote forget`.
            self.counters["orphaned_deletes"] += lost_deletes
        for write in writes:
            self._inflight_bytes -= len(write.value)
            self._complete_write(write, write.key not in failed_keys)
        self._cache([write.page for write in writes])  # those a waiting get holds

    def _complete_write(self, write: _Write, ok: bool) -> None:
        page, pool = write.page, write.pool
        if write.expected is not None:  # a demotion
            write.guest.demoting_bytes -= page.nbytes
            if ok and self.store.demote(pool, write.oid, write.index, write.expected, page):
                write.guest.counters["demoted"] += 1
                return
            self.total_bytes -= page.nbytes
            if ok:  # a put or flush came first: the copy just written is garbage
                self._deletes.append(write.key)
                self._schedule_flush()
            return
        if ok:
            if page.pending is None:  # dropped while in flight
                self._deletes.append(write.key)
                self._schedule_flush()
            if page in self._holding:  # a get waits on a fetch with it: its copy stays
                page.fetched = page.pending
            page.pending = None
            return
        # Acknowledged to the guest, never written: it stays in memory instead
        # (an ephemeral page is dropped).
        if self.store.strand(pool, write.oid, write.index, page) is not None:
            write.guest.counters["stranded"] += 1
        page.pending = None

    async def _read_batch(self, reads: list[_Read], cached_at: float) -> None:
        # A hash tag's reads are one MGET, its master looked up once.
        by_tag: dict[bytes, list[_Read]] = defaultdict(list)
        for read in reads:
            by_tag[_tag_of(read.key)].append(read)
        by_node: dict[str | None, list[list[_Read]]] = defaultdict(list)
        for tag, tag_reads in by_tag.items():
            by_node[self._node_for(tag)].append(tag_reads)
        await asyncio.gather(*(self._read_node(tags, cached_at) for tags in by_node.values()))

    async def _read_node(self, tags: list[list[_Read]], cached_at: float) -> None:
        """One master's share of a batch (its tags' reads): the gets waiting for
        these reads wake when this master has answered, not the slowest one."""
        reads = [read for tag_reads in tags for read in tag_reads]
        try:
            await self._read_pages(tags, reads)
        finally:
            self._cache([read.page for read in reads], cached_at)
            # Read (or failed): a get from now on finds the copy, or reads again.
            for read in reads:
                if self._reading.get(read.page) is read:
                    del self._reading[read.page]
                if read.waiters is not None:
                    for waiter in read.waiters:
                        waiter.read_ended()

    async def _read_pages(self, tags: list[list[_Read]], reads: list[_Read]) -> None:
        """An MGET per tag's reads (``reads``: all of them)."""
        commands = [["MGET", *[read.key for read in tag_reads]] for tag_reads in tags]
        by_key: dict[bytes, bytes | None] = {}
        failed = await self._run(commands, self._readers, results=by_key)
        unread = {key for command in failed for key in command[1:]}
        if unread:
            log.warning("remote reads failed", extra={"pages": len(unread)})
        for read in reads:
            counters = read.guest.counters
            if read.key in unread:
                counters["get_unreachable"] += not read.prefetch
                read.page.read_failed |= not read.prefetch
                continue
            value = by_key.get(read.key)
            stored = decode_value(read.key, read.page.version, value)
            if read.prefetch:
                # Not asked for: a failure is counted when a get asks (and fails) itself.
                if stored is not None:
                    counters["read_ahead" if read.ahead else "prefetched"] += 1
                    read.page.fetched = stored
                    read.page.read_failed = False
                continue
            read.page.read_failed = stored is None
            if stored is None:
                # An ephemeral page's key may expire or be evicted: a plain miss.
                counters["get_errors" if value is not None else
                         "get_missing" if read.pool.persistent else "ephemeral_missing"] += 1
                if value is not None:
                    log.error("remote page failed its check: the guest's read fails",
                              extra={"guest": read.guest.name, "key": read.key.decode()})
                continue
            counters["gets"] += 1
            read.page.fetched = stored
            self._pinned[read.page] = time.monotonic()  # until the get takes it

    async def _run(self, commands: list[list[Any]], connections: dict[str, aioredis.Redis], *,
                   wait_replicas: int = 0,
                   results: dict[bytes, bytes | None] | None = None) -> list[list[Any]]:
        """Run single-slot commands: grouped by master, one pipeline each, all masters
        at once, retried on redirections and connection errors until ``wait_s``.
        Returns the commands that did not succeed: refused by a full master (at
        once), or not done by the deadline (the cluster is then unreachable)."""
        deadline = time.monotonic() + self.settings.wait_s
        pending = commands
        delay = 0.05
        refused: list[list[Any]] = []
        while True:
            try:
                retry = await asyncio.wait_for(
                    self._run_once(pending, connections, wait_replicas, results, refused),
                    timeout=max(0.001, deadline - time.monotonic()))
            except TimeoutError:  # a node that does not answer (stopped, partitioned)
                retry = pending
            if not retry:
                if not self.reachable:
                    self._set_reachable(True)
                return refused
            if time.monotonic() + delay > deadline or self._cluster is None:
                self._set_reachable(False)
                return retry + refused
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                await asyncio.wait_for(self._refresh(), timeout=max(0.001, deadline - time.monotonic()))
            except TimeoutError:
                pass
            pending = retry

    async def _run_once(self, commands: list[list[Any]], connections: dict[str, aioredis.Redis],
                        wait_replicas: int, results: dict[bytes, bytes | None] | None,
                        refused: list[list[Any]]) -> list[list[Any]]:
        by_node: dict[str, list[list[Any]]] = defaultdict(list)
        retry: list[list[Any]] = []
        for command in commands:
            node = self._node_for(_route_key(command))
            if node is None:
                retry.append(command)
            else:
                by_node[node].append(command)
        outcomes = await asyncio.gather(
            *(self._pipeline(node, node_commands, connections, wait_replicas, results, refused)
              for node, node_commands in by_node.items()))
        for failed in outcomes:
            retry.extend(failed)
        return retry

    async def _pipeline(self, node: str, commands: list[list[Any]],
                        connections: dict[str, aioredis.Redis], wait_replicas: int,
                        results: dict[bytes, bytes | None] | None,
                        refused: list[list[Any]]) -> list[list[Any]]:
        """One pipeline to one master: the commands to retry (``refused`` gets
        those a full master refused, which are not retried)."""
        connection = connections.get(node)
        if connection is None:
            host, port = node.rsplit(":", 1)
            connection = connections[node] = aioredis.Redis(
                host=host, port=int(port), single_connection_client=True, protocol=2,
                socket_timeout=max(1.0, min(5.0, self.settings.wait_s)),
                socket_connect_timeout=1.0)
        pipe = connection.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        writes = any(command[0] != "MGET" for command in commands)
        if wait_replicas and writes:
            pipe.execute_command("WAIT", wait_replicas, int(self.settings.wait_s * 1000))
        started = time.perf_counter()
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (RedisError, OSError, asyncio.CancelledError) as error:
            # The connection is in an unknown state: a new one next time.
            if connections.get(node) is connection:
                del connections[node]
            self.counters["connection_errors"] += 1
            if isinstance(error, asyncio.CancelledError):  # the batch's deadline
                self._spawn(connection.aclose())  # a cancelled task cannot await it
                raise
            await connection.aclose()
            log.debug("remote pipeline failed", extra={"node": node, "error": str(error)})
            return commands
        bucket = _rtt_bucket((time.perf_counter() - started) * 1e6)
        self.counters["round_trips"] += 1
        guests = {self._guest_of(_route_key(command)) for command in commands}
        for guest in guests:
            if guest is not None:
                guest.rtt_us[bucket] += 1
        failed: list[list[Any]] = []
        for command, reply in zip(commands, replies):
            if isinstance(reply, OutOfMemoryError):
                self.counters["refused_full"] += 1
                self._full_until = time.monotonic() + FULL_BACKOFF_S
                refused.append(command)
            elif _fenced(reply):  # another tmemd claimed the guest: never retried
                self._lose_ownership(self._guest_of(_route_key(command)), str(reply))
                refused.append(command)
            elif _function_missing(reply):  # a master that joined (or lost them) since start
                await connection.execute_command(  # type: ignore[no-untyped-call]
                    "FUNCTION", "LOAD", "REPLACE", FUNCTION_LIBRARY)
                self.counters["command_errors"] += 1
                failed.append(command)
            elif isinstance(reply, Exception):
                if not isinstance(reply, _RETRIED):
                    log.error("remote command failed", extra={"node": node, "error": repr(reply)})
                self.counters["redirections" if isinstance(reply, _REDIRECTIONS)
                              else "command_errors"] += 1
                failed.append(command)
            elif results is not None and command[0] == "MGET":
                for key, value in zip(command[1:], reply):
                    results[key] = value
        if wait_replicas and writes and len(replies) > len(commands):
            acked = replies[-1]
            if isinstance(acked, Exception) or acked < wait_replicas:
                # Not on enough replicas yet: not acknowledged; retried (a rewrite of
                # the same keys and values, then WAIT again).
                self.counters["replica_waits_short"] += 1
                return [command for command in commands
                        if command[0] != "MGET" and all(command is not r for r in refused)] + failed
        return failed

    def _lose_ownership(self, guest: GuestRemote | None, reason: str) -> None:
        if guest is None or guest.fenced:
            return
        guest.fenced = True
        guest.epoch = None
        log.error("another tmemd owns this guest in the cluster now: its new pages go to the "
                  "fallback disk, and this tmemd never writes or deletes its keys again",
                  extra={"guest": guest.name, "uuid": str(guest.uuid), "reason": reason})

    def _guest_of(self, key: bytes) -> GuestRemote | None:
        # b"tmem:{" + the guest's UUID in hex + b":", compared as bytes: no UUID.hex
        # formatting per guest and key (per write command, on the event loop).
        prefix = key[:_GUEST_PREFIX_LENGTH]
        return next((guest for guest in self._guests.values() if guest.prefix == prefix), None)

    def _node_for(self, key: bytes) -> str | None:
        if self._cluster is None:
            return None
        try:
            node = self._cluster.nodes_manager.get_node_from_slot(key_slot(key))
        except Exception:  # no master for the slot (failover under way)
            return None
        return f"{node.host}:{node.port}"

    async def _refresh(self) -> None:
        if self._cluster is None:
            return
        try:
            await self._cluster.nodes_manager.initialize()
        except (RedisError, RedisClusterException, OSError) as error:
            log.debug("slot map refresh failed", extra={"error": str(error)})

    def _set_reachable(self, reachable: bool) -> None:
        if reachable != self.reachable:
            self.reachable = reachable
            self.counters["became_reachable" if reachable else "became_unreachable"] += 1
            (log.info if reachable else log.error)(
                "remote tier reachable again" if reachable else
                "remote tier unreachable: puts go to the fallback disks, remote pages read as lost",
                extra={})

    async def _prober(self) -> None:
        """While unreachable, try the cluster every second."""
        while True:
            await asyncio.sleep(1.0)
            if self.reachable and self._cluster is not None:
                for guest in [guest for guest in self._guests.values() if guest.claim_pending]:
                    await self.claim(guest)
            if self.reachable or self._cluster is None:
                continue
            await self._refresh()
            try:
                masters = self._cluster.get_primaries()
                for node in masters:
                    await self._cluster.execute_command("PING", target_nodes=node)
                info = await self._cluster.execute_command("CLUSTER", "INFO",
                                                           target_nodes=masters[0])
            except (RedisError, RedisClusterException, OSError, IndexError):
                continue
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" in text:
                self._set_reachable(True)

    # -- demotion ------------------------------------------------------------------

    async def _demoter(self) -> None:
        """Keep memory for puts: while a guest's pages (or all of them) fill more
        than ``demote_above`` of its cap (the budget), write its least recently
        used pages to the cluster and keep only their RemotePages."""
        while True:
            try:
                await asyncio.wait_for(self._demote_wakeup.wait(), timeout=0.5)
            except TimeoutError:
                pass
            self._demote_wakeup.clear()
            if self._closed:
                return
            while self.reachable and not self._closed and (work := self._demotions()):
                for write in work:
                    self._queue_write(write)
                written = self.barrier()
                if written is not None:
                    await written

    def _demotions(self) -> list[_Write]:
        """The next batch of pages to demote, or [] if memory is not short."""
        store = self.store
        settings = self.settings
        if self._full_until > time.monotonic():
            return []
        candidates: list[Client] = []
        over_budget = store.used_bytes > store.budget_bytes * settings.demote_above
        for client in store.clients:
            guest = self._guests.get(client.name)
            if guest is None or guest.epoch is None:
                continue
            cap = client.cap_bytes
            if over_budget or (cap is not None and client.stored_bytes > cap * settings.demote_above):
                candidates.append(client)
        if not candidates:
            return []
        # The guest using the most memory for its weight gives first.
        client = max(candidates, key=lambda c: c.stored_bytes / max(c.weight, 1))
        guest = self._guests[client.name]
        target = store.budget_bytes * settings.demote_to
        cap_target = client.cap_bytes * settings.demote_to if client.cap_bytes is not None else None
        excess = max(store.used_bytes - target if over_budget else 0,
                     client.stored_bytes - cap_target if cap_target is not None else 0)
        pages = max(1, min(settings.demote_batch, int(excess) // 2048 + 1))
        writes: list[_Write] = []
        room = self.settings.inflight_bytes - self._inflight_bytes
        batch_bytes = 0  # not in client.remote_bytes until demote() enters them (in guest.demoting_bytes)
        for pool, oid, index, stored in store.demotion_candidates(client, pages):
            nbytes = VALUE_HEADER.size + len(stored)
            if nbytes > room or not self._room_in_quota(client, guest, batch_bytes + nbytes, True):
                guest.counters["demotions_refused"] += 1
                break
            batch_bytes += nbytes
            room -= nbytes
            version = self._version()
            key = page_key(guest, self._pool_id(pool), oid, index, version)
            writes.append(_Write(guest, pool, oid, index, RemotePage(version, nbytes), key,
                                 encode_value(key, version, stored), expected=stored))
        guest.demoting_bytes += batch_bytes
        return writes

    # -- control: a guest's pages home, a namespace forgotten -------------------------

    async def drain_home(self, client: Client, batch: int = 256) -> tuple[int, int]:
        """Read the guest's remote pages back into memory while they fit its local
        share (their copies in the cluster are then deleted): (pages moved home,
        pages left in the cluster). Runs between other requests."""
        moved = 0
        for pool in client.owned_pools():
            while pool.remote_pages:
                pages = [(oid, index, value) for oid, obj in pool.objects.items()
                         for index, value in obj.items()
                         if type(value) is RemotePage and value.pending is None][:batch]
                if not pages:
                    break
                await self.fetch(pool, pages)
                step = sum(1 for oid, index, page in pages
                           if self.store.promote(pool, oid, index, page))
                moved += step
                if step < len(pages):  # no more room (or pages the cluster lost): stop here
                    return moved, client.remote_pages
        return moved, client.remote_pages

    async def namespace_keys(self, guest_uuid: UUID, *, pages_only: bool = True) -> list[bytes]:
        """The keys in the cluster under the guest's namespace (SCAN on each master):
        its pages' (``pages_only``), or all, its fences and owner record too."""
        if self._cluster is None:
            raise RemoteError("the remote tier is closed")
        pattern = b"tmem:{%b:*" % guest_uuid.hex.encode()
        keys: list[bytes] = []
        for node in self._cluster.get_primaries():
            connection = aioredis.Redis(host=node.host, port=int(node.port), protocol=2,
                                        socket_timeout=self.settings.wait_s)
            try:
                keys += [key async for key in connection.scan_iter(match=pattern, count=1000)
                         if not pages_only or is_page_key(key)]
            except (RedisError, OSError) as error:
                raise RemoteError(f"cannot list {node.host}:{node.port}: {error}") from None
            finally:
                await connection.aclose()
        return keys

    async def forget_namespace(self, guest_uuid: UUID) -> int:
        """Delete every key of the guest's namespace: for a guest tmemd no longer
        serves (tmemctl forget), or orphans that failed deletes left. Only its owner
        may: the namespace is claimed first (refused if another host owns it), its
        pages deleted with that epoch (a claim by another tmemd meanwhile stops
        it), then its fences and owner record. Returns the count."""
        served = next((guest for guest in self._guests.values() if guest.uuid == guest_uuid), None)
        guest = served or GuestRemote(f"uuid {guest_uuid}", guest_uuid, None, 1)
        if guest.epoch is None and not await self.claim(guest):
            if guest.fenced:
                raise NotOwnerError(f"the namespace {guest_uuid} is another tmemd's (or handed off)")
            raise RemoteError(f"the namespace {guest_uuid} cannot be claimed: the cluster is unreachable")
        assert guest.epoch is not None
        keys = await self.namespace_keys(guest_uuid, pages_only=False)
        pages: dict[bytes, list[bytes]] = defaultdict(list)
        ownership: list[bytes] = []
        for key in keys:
            if is_page_key(key):
                pages[_tag_of(key)].append(key)
            else:
                ownership.append(key)
        commands = [["FCALL", "tmem_del", len(tag_keys) + 1, guest.fence_key(_bucket_of(tag)),
                     *tag_keys, guest.epoch] for tag, tag_keys in pages.items()]
        failed = await self._run(commands, self._writers)
        if failed or guest.fenced:
            raise RemoteError(f"{sum(len(_call_keys(c)) for c in failed)} keys could not be deleted"
                              + (" (another tmemd claimed the namespace)" if guest.fenced else ""))
        deletes = [["DEL", key] for key in ownership]
        if served is None:
            self._guests.pop(guest.name, None)
        elif deletes:
            # The fences go with the namespace: the served guest claims it afresh.
            served.epoch = None
        failed = await self._run(deletes, self._writers)
        if failed:
            raise RemoteError(f"{len(failed)} keys could not be deleted")
        if served is not None:
            await self.claim(served)
        return sum(1 for key in keys if is_page_key(key))

    # -- figures -------------------------------------------------------------------

    def guest_stats(self, name: str) -> RemoteGuestStats | None:
        guest = self._guests.get(name)
        try:
            client = self.store.client(name)
        except KeyError:
            return None
        if guest is None:
            return None
        counters = guest.counters
        return {
            "uuid": str(guest.uuid),
            "epoch": guest.epoch,
            "fenced": guest.fenced,
            "limit_bytes": self.limit_bytes(guest),
            "local_pages": client.pages - client.remote_pages,
            "local_bytes": client.stored_bytes,
            "remote_pages": client.remote_pages,
            "remote_bytes": client.remote_bytes,
            "remote_ephemeral_pages": len(client.remote_ephemeral),
            "puts": counters["puts"],
            "demoted": counters["demoted"],
            "gets": counters["gets"],
            "get_missing": counters["get_missing"],
            "get_errors": counters["get_errors"],
            "get_unreachable": counters["get_unreachable"],
            "stranded": counters["stranded"],
            "refused_quota": counters["refused_quota"],
            "refused_unreachable": counters["refused_unreachable"],
            "refused_inflight": counters["refused_inflight"],
            "refused_full": counters["refused_full"],
            "refused_unowned": counters["refused_unowned"],
            "ephemeral_demoted": counters["ephemeral_demoted"],
            "ephemeral_missing": counters["ephemeral_missing"],
            "ephemeral_shed": counters["ephemeral_shed"],
            "prefetched": counters["prefetched"],
            "read_ahead": counters["read_ahead"],
            "demotions_refused": counters["demotions_refused"],
            "rtt_us_histogram": {label: guest.rtt_us[label] for label in RTT_LABELS},
        }

    def stats(self, host_id: str = "") -> RemoteStats:
        counters = self.counters
        guests = {name: figures for name in self._guests
                  if (figures := self.guest_stats(name)) is not None}
        return {
            "host_id": host_id,
            "reachable": self.reachable,
            "seeds": [f"{host}:{port}" for host, port in self.settings.seeds],
            "replicas": self.settings.replicas,
            "wait_s": self.settings.wait_s,
            "budget_bytes": self.settings.budget_bytes,
            "total_bytes": self.total_bytes,
            "inflight_bytes": self._inflight_bytes,
            "read_cache_bytes": self._cached_bytes,
            "round_trips": counters["round_trips"],
            "connection_errors": counters["connection_errors"],
            "redirections": counters["redirections"],
            "command_errors": counters["command_errors"],
            "refused_full": counters["refused_full"],
            "replica_waits_short": counters["replica_waits_short"],
            "orphaned_deletes": counters["orphaned_deletes"],
            "became_unreachable": counters["became_unreachable"],
            "became_reachable": counters["became_reachable"],
            "guests": guests,
        }


RTT_LABELS: Final = tuple(f"<={bound}" for bound in RTT_BUCKETS_US) + (f">{RTT_BUCKETS_US[-1]}",)


def _config_value(reply: object, name: str) -> str:
    """CONFIG GET's reply (a list or a dict, by protocol and client) as one value."""
    if isinstance(reply, dict):
        value = reply.get(name, reply.get(name.encode(), b""))
    elif isinstance(reply, (list, tuple)) and len(reply) >= 2:
        value = reply[1]
    else:
        value = b""
    return value.decode() if isinstance(value, bytes) else str(value)

