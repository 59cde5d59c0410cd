"""Scenario files (TOML): what to boot, what to run, which modes to compare.

Validation is strict and speaks in one line naming the file, the key and what is
wrong (`default.toml: workload.ratio: must be a number > 0, got 'x'`), so that a
typo never costs a 20-minute run. Unknown keys are errors too.

    name = "default"
    repetitions = 3
    baseline = "disk-hdd"
    modes = ["bigmem", "disk-hdd", "tmem-blk"]
    calibrate = true    # time the guest CPU against the host's first (about 5 s
                        # under TCG); false: the report has no CPU factor

    [guests]            # identical guests booted side by side
    count = 1
    memory_mib = 256
    vcpus = 1
    swap_mib = 1024
    workload_memory_mib = 192  # memory.max of the swap workload's cgroup (default: memory_mib - 64)
    weights = [100]     # optional, one per guest
    caps = ["0"]        # optional, one per guest ("0" = no cap)

    [host]
    budget = "1G"       # tmemd's global budget

    [workload]
    kind = "usemem"     # see WORKLOADS (each lists the modes it accepts; density:
                        # its own policies, sized from [host] budget, docs/TESTBED.md)
    ratio = 1.5         # working set as a fraction of guest RAM
                        # (pagecache: file set as a fraction of reader_mib)

    [timeouts]
    boot_s = 240
    workload_s = 900

    [migration]         # optional: live-migrate the guest mid-workload (docs/TESTBED.md)
    compare = true      # each mode also runs without a migration (first)
    at = 0.5            # when: this fraction of that run's wall time (needs compare)
    # after_s = 15      # or: this many seconds into the workload
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from tmem_host.testbed.modes import MODES
from tmem_host.testbed.records import ScenarioRecord
from tmem_host.daemon.config import format_size, parse_size


class ScenarioError(Exception):
    """A scenario file that cannot be run; str() is the one-line diagnosis."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A workload kind and the parameters it accepts, with their defaults."""

    kind: str
    summary: str
    defaults: Mapping[str, Any]
    # The modes that mean something for this workload (a swap mode says nothing
    # about a page-cache workload, and zswap has no page-cache counterpart).
    modes: tuple[str, ...]
    guests_min: int = 1


# A mode without swap is a swap workload's mode only if it has the RAM not to need any.
SWAP_MODES = tuple(name for name, mode in MODES.items()
                   if not mode.density and (mode.swap != "none" or mode.enough_memory))
DENSITY_MODES = tuple(name for name, mode in MODES.items() if mode.density)
DENSITY_VARIANTS = ("staggered", "steady")
# A density guest's hungry phase: usemem's verified working set, or an application
# that checks its result (gcc building Lua: tmem_workloads.build; redis-server
# loaded, benchmarked and verified in the guest: tmem_workloads.kv).
DENSITY_PHASES = ("usemem", "build", "kv")
PAGECACHE_MODES = ("bigmem", "disk-hdd", "disk-hostcache", "tmem-agent", "tmem-cache", "tmem-cache-around",
                   "tmem-cache-shared")

WORKLOADS: dict[str, WorkloadSpec] = {
    spec.kind: spec
    for spec in (
        WorkloadSpec(
            "usemem",
            "checksummed page toucher: write a working set, verify every page",
            {"ratio": 1.5, "order": "sequential", "passes": 1},
            SWAP_MODES,
        ),
        WorkloadSpec(
            "stress-vm",
            "stress-ng --vm with --verify over a working set",
            {"ratio": 1.5, "method": "write64", "seconds": 30},
            SWAP_MODES,
        ),
        WorkloadSpec(
            "contention",
            "several guests under one host budget, bursty usemem phases",
            {"ratio": 1.5, "order": "random", "passes": 1, "bursts": 2},
            SWAP_MODES,
            guests_min=2,
        ),
        WorkloadSpec(
            "density",
            "several guests, one host memory budget ([host] budget) for their RAM and tmem; each guest "
            "alternates hungry phases (a usemem of hungry_mib; phase = \"build\": gcc building Lua with "
            "make -j<jobs>, about hungry_mib at its peak; phase = \"kv\": redis-server holding hungry_mib, "
            "redis-benchmark GETs, every value verified) and quiet ones, staggered (or all busy: steady)",
            {"hungry_mib": 384, "phases": 2, "quiet_s": 20, "stagger_s": 15, "variant": "staggered",
             "order": "sequential", "floor_mib": 128, "tmem_share": 0.5, "phase": "usemem", "cflags": "-O2",
             "jobs": 1, "value_bytes": 4000, "requests": 20000, "clients": 4},
            DENSITY_MODES,
            guests_min=2,
        ),
        WorkloadSpec(
            "kv",
            "redis-server in the guest holding ratio x guest RAM, loaded from the host, then "
            "redis-benchmark GETs of random keys (throughput, p50/p99/p99.9); every value verified",
            {"ratio": 1.5, "value_bytes": 4000, "requests": 20000, "clients": 4},
            SWAP_MODES,
        ),
        WorkloadSpec(
            "build",
            "gcc builds Lua 5.4 (Debian's upstream tarball, in the image) with make -j<vCPUs> in the "
            "workload cgroup, then the built interpreter runs a checked program",
            {"cflags": "-O2", "jobs": 0},
            SWAP_MODES,
        ),
        WorkloadSpec(
            "command",
            "your own: setup (untimed), run (timed, in the workload cgroup), verify (exit 0 = verified) "
            "commands in the guest, a metric parsed from run's output, extra Debian packages in the image",
            {"setup": "", "run": "", "verify": "", "metric": "", "metric_name": "metric", "packages": ()},
            SWAP_MODES,
        ),
        WorkloadSpec(
            "pagecache",
            "checksummed re-reads of a file set on the data disk, whole files or random pages (cleancache "
            "through the agent's FUSE mount, or tmemd's cached disk)",
            # reader_mib: the reader's memory cgroup limit (its page cache); the set is ratio x that.
            # order random: `reads` single pages per pass at random (0: as many as the set has).
            # shared_image: every guest's data disk is one image (tmemd's cached disks only),
            # prepared by the first guest and read by one guest after the other.
            {"ratio": 1.5, "passes": 2, "reader_mib": 96, "file_mib": 4, "order": "sequential", "reads": 0,
             "shared_image": False},
            PAGECACHE_MODES,
        ),
    )
}

_ORDERS = ("sequential", "random")
# What the kernel, sshd and the agent keep outside the workload's cgroup by default.
WORKLOAD_MEMORY_RESERVE_MIB = 64


@dataclass(frozen=True, slots=True)
class GuestsSpec:
    count: int = 1
    memory_mib: int = 256
    vcpus: int = 1
    swap_mib: int = 1024
    weights: tuple[int, ...] = ()
    caps: tuple[int, ...] = ()  # bytes, 0 = no cap
    # Swap workloads run in a memory cgroup of this size in every mode but bigmem:
    # the guard docs/PROTOTYPE.md found robust against reclaim deadlocks with a user-space
    # swap device (the agent, outside it, keeps the memory its own I/O needs), and
    # the same for every mode so that the comparison stays fair.
    workload_memory_mib: int = 192

    def weight(self, index: int) -> int:
        return self.weights[index] if self.weights else 100

    def cap(self, index: int) -> int:
        return self.caps[index] if self.caps else 0


# Modes a migration scenario can move between two hosts (a shared disk image, or
# two tmemds; tmem-remote's share one cluster and hand the guest off by key).
MIGRATION_MODES = ("bigmem", "disk-hostcache", "tmem-blk", "tmem-remote", "tmem-agent")


@dataclass(frozen=True, slots=True)
class MigrationSpec:
    """When the guest migrates: at ``at`` times the wall time of the same mode's
    unmigrated run just before (``compare``), or ``after_s`` into the workload."""

    at: float | None = 0.5
    after_s: float | None = None
    compare: bool = True


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    source: str
    modes: tuple[str, ...]
    baseline: str
    repetitions: int
    guests: GuestsSpec
    budget_bytes: int
    workload: str
    params: Mapping[str, Any]
    boot_timeout_s: float = 240.0
    workload_timeout_s: float = 900.0
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    migration: MigrationSpec | None = None
    calibrate: bool = True

    def to_json(self) -> ScenarioRecord:
        data = asdict(self)
        data["params"] = dict(self.params)
        data["extra"] = dict(self.extra)
        return cast(ScenarioRecord, data)


class _Reader:
    """Typed access to one TOML table that remembers the keys it has not read."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.table = table
        self.unread = set(table)

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, problem: str) -> ScenarioError:
        return ScenarioError(self.source, self.key(name), problem)

    def raw(self, name: str, default: Any) -> Any:
        self.unread.discard(name)
        return self.table.get(name, default)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise self.fail(name, f"must be {bound}, got {value}")
        return value

    def number(self, name: str, default: float, *, above: float) -> float:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(name, f"must be a number > {above:g}, got {value!r}")
        if not value > above:
            raise self.fail(name, f"must be a number > {above:g}, got {value!r}")
        return float(value)

    def string(self, name: str, default: str, *, choices: tuple[str, ...] | None = None) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    def size(self, name: str, default: str) -> int:
        value = self.raw(name, default)
        try:
            return parse_size(value)
        except (ValueError, TypeError) as error:
            raise self.fail(name, str(error)) from None

    def table_of(self, name: str) -> _Reader:
        value = self.raw(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a table ([{self.key(name)}]), got {value!r}")
        return _Reader(self.source, f"{self.key(name)}.", value)

    def list_of(self, name: str, parse: Callable[[Any], Any], what: str) -> tuple[Any, ...]:
        value = self.raw(name, [])
        if not isinstance(value, list):
            raise self.fail(name, f"must be a list of {what}, got {value!r}")
        parsed = []
        for position, item in enumerate(value):
            try:
                parsed.append(parse(item))
            except (ValueError, TypeError) as error:
                raise ScenarioError(self.source, f"{self.key(name)}[{position}]", str(error)) from None
        return tuple(parsed)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}")
        return value

    def finish(self) -> None:
        if self.unread:
            name = sorted(self.unread)[0]
            raise self.fail(name, "unknown key")


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a positive integer, got {value!r}")
    return value


_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")


def _package_name(value: Any) -> str:
    if not isinstance(value, str) or not _PACKAGE_NAME.match(value):
        raise ValueError(f"not a Debian package name: {value!r}")
    return value


def _mode_name(value: Any) -> str:
    if value not in MODES:
        raise ValueError(f"unknown mode {value!r}; modes are {', '.join(MODES)}")
    return str(value)


def parse_scenario(data: Mapping[str, Any], source: str) -> Scenario:
    top = _Reader(source, "", data)
    name = top.string("name", Path(source).stem)
    description = top.string("description", "")
    modes = top.list_of("modes", _mode_name, "mode names")
    if not modes:
        raise top.fail("modes", f"must name at least one mode; modes are {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise top.fail("modes", "names a mode twice")
    baseline = top.string("baseline", modes[0])
    if baseline not in modes:
        raise top.fail("baseline", f"must be one of the scenario's modes ({', '.join(modes)}), got {baseline!r}")
    repetitions = top.integer("repetitions", 3, minimum=1, maximum=50)
    calibrate = top.boolean("calibrate", True)

    guests_table = top.table_of("guests")
    count = guests_table.integer("count", 1, minimum=1, maximum=8)
    memory_mib = guests_table.integer("memory_mib", 256, minimum=128, maximum=16384)
    guests = GuestsSpec(
        count=count,
        memory_mib=memory_mib,
        vcpus=guests_table.integer("vcpus", 1, minimum=1, maximum=8),
        swap_mib=guests_table.integer("swap_mib", 1024, minimum=64, maximum=65536),
        workload_memory_mib=guests_table.integer(
            "workload_memory_mib", memory_mib - WORKLOAD_MEMORY_RESERVE_MIB, minimum=32, maximum=memory_mib
        ),
        weights=guests_table.list_of("weights", _positive_int, "positive integers"),
        caps=guests_table.list_of("caps", parse_size, "sizes"),
    )
    for key, values in (("weights", guests.weights), ("caps", guests.caps)):
        if values and len(values) != count:
            raise guests_table.fail(key, f"must have one entry per guest ({count}), got {len(values)}")
    guests_table.finish()

    host = top.table_of("host")
    budget = host.size("budget", "1G")
    if budget <= 0:
        raise host.fail("budget", "must be > 0")
    host.finish()

    workload_table = top.table_of("workload")
    kind = workload_table.string("kind", "usemem", choices=tuple(WORKLOADS))
    spec = WORKLOADS[kind]
    params: dict[str, Any] = {}
    for key, default in spec.defaults.items():
        if key == "ratio":
            params[key] = workload_table.number(key, default, above=0.0)
        elif key == "order":
            params[key] = workload_table.string(key, default, choices=_ORDERS)
        elif key == "variant":
            params[key] = workload_table.string(key, default, choices=DENSITY_VARIANTS)
        elif key == "phase":
            params[key] = workload_table.string(key, default, choices=DENSITY_PHASES)
        elif key == "tmem_share":
            params[key] = workload_table.number(key, default, above=0.0)
            if params[key] >= 1.0:
                raise workload_table.fail(key, f"must be a fraction of the budget below 1, got {params[key]:g}")
        elif key in ("quiet_s", "stagger_s", "jobs", "reads"):
            params[key] = workload_table.integer(key, default, minimum=0)
        elif key == "packages":
            params[key] = workload_table.list_of(key, _package_name, "Debian package names")
        elif key == "metric":
            params[key] = workload_table.string(key, default)
            try:
                if params[key] and re.compile(params[key]).groups != 1:
                    raise workload_table.fail(key, "must be a regular expression with one group (the number)")
            except re.error as error:
                raise workload_table.fail(key, f"not a regular expression: {error}") from None
        elif isinstance(default, bool):
            params[key] = workload_table.boolean(key, default)
        elif isinstance(default, int):
            params[key] = workload_table.integer(key, default, minimum=1)
        else:
            params[key] = workload_table.string(key, default)
    workload_table.finish()
    if kind == "command" and not params["run"].strip():
        raise workload_table.fail("run", "a command workload needs a run command")
    if count < spec.guests_min:
        raise ScenarioError(source, "guests.count", f"workload {kind!r} needs at least {spec.guests_min} guests")
    if kind == "density" and (params["floor_mib"] * count) << 20 > budget:
        raise ScenarioError(source, "workload.floor_mib", f"{count} guests of at least {params['floor_mib']} MiB "
                                                          f"do not fit the host budget ({format_size(budget)})")
    for position, mode in enumerate(modes):
        if mode not in spec.modes:
            raise top.fail(f"modes[{position}]", f"mode {mode!r} does not apply to workload {kind!r}; "
                                                 f"its modes are {', '.join(spec.modes)}")
        if params.get("shared_image") and MODES[mode].data_disk != "nbd":
            raise top.fail(f"modes[{position}]", f"mode {mode!r} gives each guest a disk of its own; "
                                                 "shared_image needs tmemd's cached disks (tmem-cache, "
                                                 "tmem-cache-shared)")
        if MODES[mode].shared_cache and not params.get("shared_image"):
            raise top.fail(f"modes[{position}]", f"mode {mode!r} shares one image's pool: it needs "
                                                 "workload.shared_image = true")
    if params.get("shared_image") and count < 2:
        raise ScenarioError(source, "guests.count", "shared_image needs at least 2 guests")

    timeouts = top.table_of("timeouts")
    boot_timeout = timeouts.number("boot_s", 240.0, above=0.0)
    workload_timeout = timeouts.number("workload_s", 900.0, above=0.0)
    timeouts.finish()
    migration: MigrationSpec | None = None
    if "migration" in data:
        table = top.table_of("migration")
        compare = table.boolean("compare", True)
        if "after_s" in table.table:
            if "at" in table.table:
                raise table.fail("at", "give either at or after_s, not both")
            migration = MigrationSpec(at=None, after_s=table.number("after_s", 15.0, above=0.0),
                                      compare=compare)
        else:
            at = table.number("at", 0.5, above=0.0)
            if at >= 1.0:
                raise table.fail("at", f"must be a fraction of the run's wall time below 1, got {at:g}")
            if not compare:
                raise table.fail("at", "needs compare = true (the unmigrated run's wall time), or use after_s")
            migration = MigrationSpec(at=at, after_s=None, compare=True)
        table.finish()
        if count != 1:
            raise ScenarioError(source, "guests.count", "a migration scenario migrates one guest")
        if kind != "usemem":
            raise ScenarioError(source, "workload.kind", "a migration scenario runs usemem")
        for position, mode in enumerate(modes):
            if mode not in MIGRATION_MODES:
                raise top.fail(f"modes[{position}]", f"mode {mode!r} is not migrated; "
                                                     f"migrated modes are {', '.join(MIGRATION_MODES)}")
    top.finish()
    return Scenario(
        name=name,
        source=source,
        modes=modes,
        baseline=baseline,
        repetitions=repetitions,
        guests=guests,
        budget_bytes=budget,
        workload=kind,
        params=params,
        boot_timeout_s=boot_timeout,
        workload_timeout_s=workload_timeout,
        description=description,
        migration=migration,
        calibrate=calibrate,
    )


def load_scenario(path: Path) -> Scenario:
    source = path.name
    try:
        text = path.read_text()
    except OSError as error:
        raise ScenarioError(source, "", f"cannot read: {error.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(source, "", f"not valid TOML: {error}") from None
    return parse_scenario(data, source)
