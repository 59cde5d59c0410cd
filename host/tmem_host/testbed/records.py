"""The records of a run's run.json (TypedDicts, since they are JSON): the run,
its scenario and metadata, and one Sample per guest and repetition.

The runner builds them (tmem_host.testbed.runner) and the reports read them
back (tmem_host.testbed.report), both through these types, so mypy checks the
keys on both sides. run.json is schema 1; runs recorded earlier may lack keys
added since (the reports read them with .get()).
"""

# No `from __future__ import annotations`: TypedDict sees NotRequired at run time
# only in evaluated annotations (__required_keys__, which the tests check).

from collections.abc import Sequence
from typing import Any, Literal, NotRequired, TypedDict

from tmem_host.replies import NbdExportStats, CachedDiskStats, RemoteGuestStats



def guest_name(index: int) -> str:
    """The testbed's name for a scenario's guest number ``index``."""
    return f"g{index}"

class GuestsRecord(TypedDict):
    """Scenario.guests (GuestsSpec) as JSON."""

    count: int
    memory_mib: int
    vcpus: int
    swap_mib: int
    weights: Sequence[int]
    caps: Sequence[int]  # bytes, 0 = no cap
    workload_memory_mib: int


class MigrationSpecRecord(TypedDict):
    """A scenario's [migration] table."""

    at: float | None  # when: this fraction of the unmigrated run's wall time
    after_s: float | None  # or: this many seconds into the workload
    compare: bool  # each mode also runs without a migration (the slowdown's reference)


class MigrationRecord(TypedDict):
    """What a migrated sample measured (QEMU's query-migrate, the handoff, tmemd b)."""

    total_ms: int  # QEMU's total migration time
    downtime_ms: int  # QEMU's downtime (the stop-and-copy)
    ram_bytes: int  # RAM QEMU transferred
    handoff_s: float  # the guest stopped: from the source QEMU's stop to the destination's cont
    handoff_bytes: int  # the handoff (or save) file tmemd a wrote; 0 without tmemd
    served_from_tmem: int  # swap pages the destination's tmemd served after the switch
    started_s: float  # when the migration began, seconds into the workload


class ScenarioRecord(TypedDict):
    """Scenario.to_json()."""

    name: str
    source: str
    modes: Sequence[str]
    baseline: str
    repetitions: int
    guests: GuestsRecord
    budget_bytes: int
    workload: str
    params: dict[str, Any]
    boot_timeout_s: float
    workload_timeout_s: float
    description: str
    extra: dict[str, Any]
    migration: NotRequired[MigrationSpecRecord | None]  # scenarios before migration lack the key
    calibrate: NotRequired[bool]  # runs before the key calibrated


class HostMetadata(TypedDict):
    """What the runner records about the host (runner.host_metadata())."""

    host_cpu: str
    host_load: list[float]  # 1/5/15 min, at start
    host_kernel: str
    qemu_version: str


class CpuBenchRecord(TypedDict):
    """tmem_workloads.cpubench's result (best of its trials)."""

    python_rounds: int
    python_s: float
    lz4_pages: int
    lz4_s: float | None  # None: no lz4 module where it ran
    lz4_error: NotRequired[str]


class CalibrationRecord(TypedDict):
    """How much slower the guest CPU ran than the host's: cpubench in the run's first
    guest and then on the host, factor = guest seconds / host seconds."""

    guest: CpuBenchRecord
    host: CpuBenchRecord
    python_factor: float
    lz4_factor: float | None


class RunMetadata(HostMetadata):
    started: str  # ISO 8601, UTC
    image_hash: str
    guest_kernel: str
    accelerator: NotRequired[str]  # as QMP reports it, once a guest has booted
    calibration: NotRequired[CalibrationRecord]  # once a guest has booted (runs before it lack it)
    finished: NotRequired[str]  # written when the run ends


# The counters of TmemdCounters (what runner.TMEMD_COUNTERS records).
TmemdCounter = Literal["puts", "gets", "hits", "refusals", "evictions", "flushes", "pages", "raw_bytes",
                       "stored_bytes"]


class TmemdCounters(TypedDict):
    """A guest's counters in tmemd's store (its `stats` reply's store client)
    at the end of the workload; the pagecache workload's `pass_tmemd` holds
    their differences over each pass."""

    puts: int
    gets: int
    hits: int
    refusals: int
    evictions: int
    flushes: int
    pages: int
    raw_bytes: int
    stored_bytes: int
    nbd: NotRequired[NbdExportStats]  # the guest's NBD export, when it has one
    # The guest in tmemd's remote tier (remote modes; runs before it lack the key):
    # local vs remote pages, puts, demotions, reads from the cluster, round trips.
    remote: NotRequired[RemoteGuestStats]
    # The guest's cached disk (modes whose data disk is tmemd's: tmem-cache).
    cached_disk: NotRequired[CachedDiskStats]


class DensityRecord(TypedDict):
    """A density run's own figures (on its first guest's sample; testbed.density)."""

    makespan_s: float  # launch to the last guest's last phase, host clock
    budget_bytes: int  # M
    boot_mib: int  # each guest's RAM at boot
    start_mib: int  # each guest's RAM (balloon target) when the workload started
    tmemd_budget_bytes: int  # tmemd's budget at the start (0: no tmemd)
    balloon_moves: int  # balloon targets the balancer changed
    committed_peak_bytes: int  # the most the guests held plus tmemd's used bytes at one tick
    # Balloon policies: the ticks a guest was found hungry by its swap counters, or
    # by its memory pressure (PSI) alone; each guest's PSI "some" stall over the run.
    hunger: NotRequired[dict[str, int]]
    stall_s: NotRequired[list[float]]
    # SSH reads a guest did not answer in time (its sshd stalled): done-polls
    # (density.POLL_TIMEOUT_S) and PSI reads (psi.READ_TIMEOUT_S).
    stalled_polls: NotRequired[int]
    # Every second: [seconds, tmemd used, tmemd budget, each guest's RAM..., each guest's target...]
    monitor: list[list[float]]


class Sample(TypedDict):
    """One guest's result in one repetition of one mode."""

    mode: str
    repetition: int  # from 0
    guest: str
    ok: bool
    verified: bool | None  # None: the infrastructure failed before the workload could tell
    error: str | None
    wall_s: float | None  # the workload's wall time; None when it did not run
    # The measurements, absent when the infrastructure failed:
    workload: NotRequired[dict[str, Any]]  # the workload's own JSON result (pagecache: merged passes)
    vmstat: NotRequired[dict[str, float]]  # guest /proc/vmstat deltas
    psi: NotRequired[dict[str, float]]  # guest memory pressure deltas
    agent: NotRequired[dict[str, Any] | None]  # `python3 -m tmem_guest stats`; None without an agent
    tmemd: NotRequired[TmemdCounters | None]  # None without tmemd
    # ROLE_cpu_s and ROLE_peak_rss, ROLE qemu, tmemd or redis (the cluster's nodes, summed)
    host: NotRequired[dict[str, float]]
    # [seconds, *hostmetrics.MEMORY_COMPONENTS] rows, bytes (runs before the file
    # caches were sampled: [seconds, tmemd RSS, QEMU RSS])
    timeline: NotRequired[list[list[float]]]
    # Each component's peak over the timeline, and "total": the peak of their sum.
    host_memory: NotRequired[dict[str, int]]
    # A migration scenario's samples: whether this one was live-migrated mid-workload,
    # and what the migration measured (wall_s is then the host's, launch to result).
    migrated: NotRequired[bool]
    migration: NotRequired[MigrationRecord | None]
    density: NotRequired[DensityRecord]  # a density run's first guest


class RunRecord(TypedDict):
    """run.json."""

    schema: int
    id: str
    scenario: ScenarioRecord
    metadata: RunMetadata
    samples: list[Sample]
