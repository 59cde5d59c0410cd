"""The shapes of tmemd's control replies (docs/CONTROL.md), as TypedDicts.

Where a reply (or a part of one) is built, it is annotated with its type here:
the `stats` and `guests` commands (tmem_host.daemon.commands), a guest's record
(GuestRuntime.summary), the store's figures (Store.stats), a connection's
(AbiSession.stats), the NBD export's (NbdExport.stats), the journal's
(JournaledStore.journal_stats) and the connection limits'
(ConnectionLimiter.stats). Where a reply is read (tmemctl, the testbed), it
comes through ControlClient's typed methods (stats(), guests(), ...), so mypy
checks every key a reader names.

The keys and values are JSON. Every key here is always sent (a value may be
null: `X | None`); a key that is not would be NotRequired. Parts built by name
(counters) are cast, and tests/daemon/test_control.py checks real replies
against these types key for key. This module imports nothing but typing, so
the store, the journal and the NBD export, which sit below the daemon, can use
it too.
"""

# No `from __future__ import annotations`: TypedDict sees NotRequired at run time
# only in evaluated annotations (__required_keys__, which the tests check).

from typing import NotRequired, TypedDict

# -- the store (Store.stats()) ------------------------------------------------


class OpCounterStats(TypedDict):
    """A pool's, a client's or the whole store's operation counters."""

    puts: int
    refusals: int
    gets: int
    hits: int
    flushes: int
    evictions: int
    misses: int  # gets - hits


class StorePoolStats(OpCounterStats):
    """A pool as a client sees it, under `store.clients.NAME.pools`."""

    pool_id: int
    persistent: bool
    shared: bool
    shared_uuid: str | None
    owner: bool  # the client created it (a shared pool's other members: False)
    page_shift: int
    inclusive_gets: bool
    dedup: bool
    label: str
    objects: int
    pages: int
    raw_bytes: int
    stored_bytes: int
    # Its pages whose data is in the remote tier (counted in pages too), and their bytes there.
    remote_pages: int
    remote_bytes: int


class ClientStats(OpCounterStats):
    """A guest's figures in the store, under `store.clients.NAME`."""

    weight: int
    cap_bytes: int | None
    share_bytes: int  # its weighted share of the budget
    dedup: bool
    frozen: bool
    pages: int
    raw_bytes: int
    stored_bytes: int
    ephemeral_bytes: int
    remote_pages: int
    remote_bytes: int
    dedup_blobs: int
    dedup_hits: int
    pools: list[StorePoolStats]


class OverheadBytes(TypedDict):
    """What the store charges per page, object and dedup blob besides the data."""

    persistent_page: int
    ephemeral_page: int
    object: int
    dedup_blob: int


class StoreStats(OpCounterStats):
    """Store.stats(): the `stats` reply's `store` (counters summed over all clients,
    those of removed clients included)."""

    budget_bytes: int
    used_bytes: int
    free_bytes: int
    compress: bool
    overhead_bytes: OverheadBytes
    pages: int
    raw_bytes: int
    stored_bytes: int
    ephemeral_bytes: int
    remote_pages: int
    remote_bytes: int
    shared_pools: int
    clients: dict[str, ClientStats]


# -- a guest: the `guests` reply's records --------------------------------------


class GuestSettings(TypedDict):
    """A guest's configuration (GuestConfig.to_json())."""

    name: str
    weight: int
    cap_bytes: int | None
    shared_uuids: list[str]
    dedup: bool
    cid: int | None  # its vsock peer CID
    uuid: str  # its identity in the remote tier
    remote_cap_bytes: int | None
    remote_ephemeral: bool  # its evicted ephemeral pages go to the remote tier
    cached_disk: str | None  # the image tmemd serves as its cached disk
    cached_disk_pool: str | None  # the UUID of the shared pool its cached disk reads through
    cached_disk_write_allocate: bool  # its cached disk caches what the guest writes too


class PoolRecord(TypedDict):
    """A PoolStats record (tmem_wire.abi) as JSON, its flags spelled out
    (PoolFlag names; none: an ephemeral private pool)."""

    pool_id: int
    flags: list[str]
    page_shift: int
    pages: int
    raw_bytes: int
    stored_bytes: int
    puts: int
    gets: int
    hits: int
    flushes: int
    refusals: int
    evictions: int


class GuestRecord(GuestSettings):
    """One guest of the `guests` reply (and of `stats`' `guests`, and what
    `add-guest` answers): its settings, connections and pools."""

    connections: int  # live ABI connections
    connections_total: int
    draining: bool
    pools: list[PoolRecord]


# -- the parts of the `stats` reply ---------------------------------------------


class DaemonInfo(TypedDict):
    pid: int
    uptime_s: float
    run_dir: str


class ConnectionStats(TypedDict):
    """One live ABI connection (AbiSession.stats())."""

    guest: str
    transport: str  # unix or vsock
    connected_s: float
    negotiated: bool  # HELLO done
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int
    errors: int
    in_flight_max: int
    resyncs: int  # HELLOs after the first
    reply_backlogs: int
    store_waits: int  # passes that waited for the remote tier
    encoded_ahead: int  # PUT_BATCHes whose pages the encoder threads encoded
    discarded_bytes: int


class DiskExportStats(TypedDict):
    """What every NBD export of tmemd counts (nbd.export.DiskExport)."""

    name: str
    size_bytes: int
    pool_id: int | None  # None: no pool (yet, or the store refused it)
    connections: int
    requests: int
    reads: int
    writes: int
    trims: int
    zeroes: int
    flushes: int
    invalid_requests: int
    fallback_errors: int  # the disk behind the export failed
    pool_create_failures: int
    connections_total: int
    protocol_errors: int
    reply_backlogs: int
    store_waits: int  # passes that waited for the remote tier
    fallback_throttled_us: int  # replies' wait for the disk's throttle (--fallback-iops)
    request_pages_histogram: dict[str, int]  # "1", "2", "4", ... "256+" pages per request


class NbdExportStats(DiskExportStats):
    """A guest's NBD swap export (NbdExport.stats(); its counters: nbd.export.COUNTER_NAMES)."""

    slots_in_tmem: int
    pages_put_tmem: int
    pages_refused_fallback: int
    pages_read_tmem: int
    pages_read_fallback: int
    pages_discarded: int
    read_errors: int
    pages_drained: int


class JournalStats(TypedDict):
    """A guest's crash journal (JournaledStore.journal_stats(), docs/RELIABILITY.md)."""

    path: str
    durability: str  # none, journal or fsync
    syncs: int
    reserved_bytes: int
    size_bytes: int
    live_bytes: int  # what a compaction would keep
    broken: bool  # a write failed: no longer written
    writes: int
    records: int
    write_errors: int
    compactions: int
    last_compaction_s: float  # from its start to the swap of the files
    last_compaction_pause_s: float  # the longest step: how long it held tmemd's event loop at once
    compacting: bool  # a compaction in steps is under way
    replayed_records: int
    replayed_pages: int
    replay_truncated_bytes: int
    replay_s: float


class LimitCounters(TypedDict):
    """What the connection limits did (limits.COUNTER_NAMES)."""

    refused_full: int
    refused_descriptors: int
    evicted: int
    handshake_timeouts: int
    idle_timeouts: int


class ConnectionGroupStats(LimitCounters):
    """One guest's ABI or NBD socket, or the control socket."""

    connections: int  # live


class GuestLimitStats(TypedDict):
    abi: ConnectionGroupStats
    nbd: ConnectionGroupStats


class LimitsStats(TypedDict):
    """ConnectionLimiter.stats(): the `stats` reply's `limits`."""

    connections_per_guest: int
    control_connections_max: int
    handshake_timeout_s: float
    idle_timeout_s: float
    reply_bytes_in_flight_max: int
    descriptor_limit: int
    descriptor_reserve: int
    guest_connections: int  # live ABI + NBD connections, all guests
    totals: LimitCounters  # all guests and the control socket
    control: ConnectionGroupStats
    guests: dict[str, GuestLimitStats]


class RemoteGuestStats(TypedDict):
    """One guest in the remote tier (docs/REMOTE.md), under `remote.guests.NAME`."""

    uuid: str  # its pages' namespace in the cluster
    epoch: int | None  # the epoch this tmemd owns the namespace with; None: not its owner
    fenced: bool  # another tmemd owns the namespace: nothing is written or deleted there
    limit_bytes: int | None  # its cap and weighted share of the remote budget
    local_pages: int  # pages whose data is in tmemd's memory
    local_bytes: int  # what they (and the remote pages' metadata) are charged
    remote_pages: int
    remote_bytes: int
    remote_ephemeral_pages: int  # of remote_pages: evicted ephemeral pages (remote-ephemeral)
    puts: int  # pages put straight to the cluster (no room in memory)
    demoted: int  # cold pages moved to the cluster to make room
    gets: int  # pages read back, checked
    get_missing: int  # not in the cluster: the guest's read fails
    get_errors: int  # failed the check (damaged, another key's, an older version)
    get_unreachable: int
    stranded: int  # writes that failed: the page stayed in memory
    refused_quota: int
    refused_unreachable: int
    refused_inflight: int
    refused_full: int  # a master was out of memory (OOM): the page went to the disk
    refused_unowned: int  # this tmemd does not own the namespace (fenced, or not claimed yet)
    ephemeral_demoted: int  # evicted ephemeral pages sent to the cluster, not dropped
    ephemeral_missing: int  # ephemeral pages the cluster no longer had (TTL, eviction): misses
    ephemeral_shed: int  # ephemeral pages dropped from the cluster for persistent ones
    prefetched: int  # pages read around the wanted ones (same hash tag, same round trip)
    read_ahead: int  # pages read ahead of a sequential stream of gets (the next neighbourhoods)
    demotions_refused: int
    rtt_us_histogram: dict[str, int]  # its round trips, by upper bound in microseconds


class RemoteStats(TypedDict):
    """The remote tier, under `remote` (None without --remote)."""

    host_id: str
    reachable: bool
    seeds: list[str]
    replicas: int
    wait_s: float
    budget_bytes: int | None
    total_bytes: int
    inflight_bytes: int
    read_cache_bytes: int  # copies of remote pages kept for the next gets (read, read around, written)
    round_trips: int
    connection_errors: int
    redirections: int
    command_errors: int
    refused_full: int  # commands a master refused for lack of memory (OOM)
    replica_waits_short: int
    orphaned_deletes: int
    became_unreachable: int
    became_reachable: int
    guests: dict[str, RemoteGuestStats]


class CachedDiskStats(DiskExportStats):
    """A guest's cached disk (CachedDiskExport.stats(); its counters:
    nbd.readcache.CACHED_DISK_COUNTERS)."""

    backing: str  # the disk image's path
    direct_io: bool  # the image is read with O_DIRECT (no copy in the host page cache)
    shared_pool: str | None  # the UUID of the shared pool it reads through (None: private)
    write_allocate: bool  # a WRITE puts its pages into the cache too
    pages_cached_now: int
    pages_read_cache: int
    pages_read_backing: int
    pages_cached: int
    pages_not_cached: int
    pages_written: int
    pages_written_cached: int
    pages_invalidated: int


class StatsReply(TypedDict):
    """The `stats` reply."""

    daemon: DaemonInfo
    store: StoreStats
    guests: dict[str, GuestRecord]
    connections: list[ConnectionStats]
    nbd: dict[str, NbdExportStats]
    cached_disks: dict[str, CachedDiskStats]  # guests with a cached disk
    journal: dict[str, JournalStats]  # guests whose store keeps a journal
    limits: LimitsStats
    remote: RemoteStats | None


# -- the other commands' replies ------------------------------------------------


class BudgetReply(TypedDict):
    budget_bytes: int


class WeightReply(TypedDict):
    guest: str
    weight: int


class CapReply(TypedDict):
    guest: str
    cap_bytes: int | None


class FreezeReply(TypedDict):
    guest: str
    frozen: bool


class ThawReply(TypedDict):
    guest: str
    frozen: bool
    draining: bool


class DrainReply(TypedDict):
    guest: str
    draining: bool
    persistent_pages: int  # what the guest's persistent pools held when the drain began
    agent_connections: int  # its ABI connections that negotiated Feature.DRAIN


class FlushReply(TypedDict):
    guest: str
    pool: int | None  # None: every pool of the guest


class RemoveGuestReply(TypedDict):
    guest: str
    removed: bool
    data_kept: bool


class ForgetReply(TypedDict):
    guest: str
    forgotten: bool
    configured: bool  # a configured guest starts afresh; else its files were deleted
    remote_keys_deleted: NotRequired[int]  # keys of its namespace deleted in the cluster (with a tier)


class SaveReply(TypedDict):
    """The `save` reply: what the file holds (docs/RELIABILITY.md, "Save and restore")."""

    guest: str
    path: str
    bytes: int  # the file's size
    sha256: str  # the file's digest (hex)
    pools: int  # persistent pools
    pages: int  # their pages, remote ones included
    remote_pages: int  # of which were read back from the remote tier
    fallback_pages: int  # non-zero pages of the NBD export's fallback file
    lost_pages: int  # pages that read as errors: lost NBD slots, lost keys of agent pools


class RestoreReply(TypedDict):
    """The `restore` reply."""

    guest: str
    path: str
    saved_guest: str  # the guest the file was saved from
    pools: int
    pages: int  # pages the guest's journal brought back (all of the file's)
    fallback_pages: int
    lost_pages: int  # as in SaveReply, counted on the restored guest


# -- the remote tier's commands (docs/CONTROL.md, "Remote tier") -------------------


class RemoteGuestReply(RemoteGuestStats):
    """The `remote` reply: the guest's figures in the tier and what the cluster holds."""

    guest: str
    reachable: bool  # the tier's state (unreachable: remote reads fail, puts go to disk)
    # Keys under its namespace in the cluster (SCAN of every master); more than
    # remote_pages: orphans (failed deletes, writes in flight). None: not listed.
    cluster_keys: int | None
    cluster_error: str | None  # why cluster_keys is None


class RemoteDrainReply(TypedDict):
    """The `remote-drain` reply."""

    guest: str
    to: str  # "home" (into memory) or "disk" (the guest's fallback, as `drain`)
    moved: int  # home: pages read back into memory; disk: 0 (the drain runs on)
    left: int  # the guest's remote pages after the command (disk: at its start)
    draining: bool  # disk: the guest drains (frozen) until `thaw`
    persistent_pages: int  # its persistent pages now (disk: what the drain must move)


class RemoteClaimReply(TypedDict):
    """The `remote-claim` reply."""

    guest: str
    epoch: int  # the epoch this tmemd owns the guest's namespace with now


class RemoteForgetReply(TypedDict):
    """The `remote-forget` reply."""

    guest: str
    uuid: str  # the namespace deleted
    deleted: int  # keys deleted


class ShutdownReply(TypedDict):
    stopping: bool
