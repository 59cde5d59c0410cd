"""The configurations the testbed compares: tmem's two frontends and the baselines
Linux actually chose (disk swap, zswap, the host page cache).

A mode is data, not code: the runner reads these fields to decide how to boot the
guest, whether tmemd runs, and what to start inside the guest. Swap workloads use
`swap` (and zswap, agent's swap mode); the page-cache workload uses `data_disk`
(where its file set lives) and starts the agent's cleancache mount if `agent` is set.
A `remote` mode runs tmemd over a fresh local Redis Cluster with a small budget
(runner.remote_budget_bytes), so most of the guest's pages live in the cluster.
Which modes a workload accepts is listed on its WorkloadSpec (scenario.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from tmem_host.vm.launcher import DataDisk, SwapKind
from tmem_wire.agent import AgentMode


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    summary: str
    swap: SwapKind
    # Give the guest enough RAM that the workload never swaps (the floor).
    enough_memory: bool = False
    zswap: bool = False
    tmemd: bool = False
    # The in-guest agent's frontswap mode; None means no agent.
    agent: AgentMode | None = None
    compress: bool = True
    # tmemd's crash journal (docs/RELIABILITY.md); off: --no-journal.
    journal: bool = True
    # The data disk's speed class (page-cache workloads); "nbd": tmemd's cached
    # disk (the image behind it answers at the hdd disk's speed).
    data_disk: DataDisk = "hdd"
    # tmemd's remote tier on a local 3+3 Redis Cluster, under a budget of about a
    # quarter of the working set (docs/TESTBED.md).
    remote: bool = False
    # Why the mode's cost is guest CPU time (empty: it is not): under TCG, where the
    # guest CPU is emulated, such a mode's standing depends on the calibration factor.
    guest_cpu: str = ""
    # A host policy of the density scenario (its workload's modes only): guest RAM
    # and tmemd's budget come from the scenario's host budget (testbed.density).
    density: bool = False
    # A virtio-balloon device in every guest, driven by the host's balancer.
    balloon: bool = False
    # Cached disks (data_disk "nbd") of one image read through one shared pool
    # (a pagecache scenario with shared_image).
    shared_cache: bool = False
    # Cached disks put what the guest writes into the cache too (write-allocate:
    # cleancache puts a written page once it is clean and evicted); off, only
    # reads fill it (write-around).
    cache_writes: bool = False


MODES: dict[str, Mode] = {
    mode.name: mode
    for mode in (
        Mode("bigmem", "the same workload with enough RAM: the floor", swap="none", enough_memory=True),
        Mode("disk-hdd", "swap (or the file set) on a disk throttled to ~200 IOPS", swap="hdd"),
        Mode(
            "disk-hostcache",
            "swap (or the file set) on an unthrottled disk backed by the host page cache",
            swap="hostcache",
            data_disk="hostcache",
        ),
        Mode("zswap", "in-guest compressed swap cache (zswap, lz4) over the hdd disk", swap="hdd", zswap=True,
             guest_cpu="zswap compresses in the guest kernel"),
        Mode("tmem-blk", "swap on tmemd's NBD export through QEMU's block layer", swap="nbd", tmemd=True),
        Mode(
            "tmem-agent",
            "the guest agent over virtio-serial: pipelined frontswap (hdd fallback), or its FUSE "
            "cleancache over files on the hdd disk",
            swap="hdd",
            tmemd=True,
            agent="pipelined",
            guest_cpu="the agent is Python in the guest",
        ),
        Mode(
            "tmem-agent-sync",
            "the guest agent, one page per round trip (the 2011 ABI), hdd fallback",
            swap="hdd",
            tmemd=True,
            agent="sync",
            guest_cpu="the agent is Python in the guest",
        ),
        Mode(
            "tmem-nocompress",
            "tmemd's NBD export with compression off",
            swap="nbd",
            tmemd=True,
            compress=False,
        ),
        Mode(
            "tmem-nojournal",
            "tmemd's NBD export with its crash journal off: what the journal costs",
            swap="nbd",
            tmemd=True,
            journal=False,
        ),
        Mode(
            "tmem-remote",
            "as tmem-blk, but tmemd keeps about a quarter of the working set in memory and the "
            "rest in a local Redis Cluster (3 masters, 3 replicas, --remote-replicas 1)",
            swap="nbd",
            tmemd=True,
            remote=True,
        ),
        Mode(
            "tmem-cache",
            "the data disk through tmemd's cached disk (NBD, no guest code): reads and writes fill "
            "the guest's ephemeral pool (write-allocate), the hdd disk behind it",
            swap="none",
            tmemd=True,
            data_disk="nbd",
            cache_writes=True,
        ),
        Mode(
            "tmem-cache-around",
            "as tmem-cache, but only reads fill the pool (write-around): what was written comes "
            "from the hdd disk the first time",
            swap="none",
            tmemd=True,
            data_disk="nbd",
        ),
        Mode(
            "tmem-cache-shared",
            "as tmem-cache, for guests whose data disks are one image (shared_image): they read it "
            "through one shared ephemeral pool, so one guest's reads and writes are the next one's hits",
            swap="none",
            tmemd=True,
            data_disk="nbd",
            shared_cache=True,
            cache_writes=True,
        ),
        # The density scenario's policies: N guests, one host budget M for their RAM
        # and tmem (testbed.density.plan sizes them).
        Mode("static", "each guest gets M/N of RAM and swaps to the hdd disk: a host without overcommit",
             swap="hdd", density=True),
        Mode("balloon", "guests boot with room to grow; the host's balancer (virtio-balloon) moves RAM "
             "to the hungry ones within M; swap on the hdd disk", swap="hdd", density=True, balloon=True),
        Mode("tmem", "small guests swapping through tmemd's NBD export; one tmemd budget of M minus "
             "their RAM, shared", swap="nbd", tmemd=True, density=True),
        Mode("tmem-balloon", "ballooning plus tmem, Xen's production setup: the balancer moves RAM between "
             "the guests and tmemd's budget is what they do not hold", swap="nbd", tmemd=True,
             density=True, balloon=True),
    )
}
