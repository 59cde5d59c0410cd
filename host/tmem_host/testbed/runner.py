"""Run a scenario: for every mode and repetition, start tmemd if the mode needs it,
boot the guests, prepare swap (or the page-cache file set) the mode's way, run the
workload, collect metrics, tear everything down; write run.json and the reports.

Every repetition boots fresh guests (and a fresh tmemd, and for a remote mode a
fresh Redis Cluster), so no run inherits page cache, swap slots or tmem pages
from the one before it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast, get_args

from tmem_host.daemon.config import format_size
from tmem_host.daemon.process import TmemdFailed, TmemdProcess
from tmem_host.remote.cluster import ClusterError, LocalCluster
from tmem_host.replies import StatsReply
from tmem_host.testbed import commandload, density, hostmetrics, kvload, psi, report
from tmem_host.testbed.modes import MODES, Mode
from tmem_host.testbed.records import (
    guest_name,
    CalibrationRecord, CpuBenchRecord, HostMetadata, MigrationRecord, RunMetadata, RunRecord, Sample, TmemdCounter, TmemdCounters,
)
from tmem_host.testbed.scenario import Scenario
from tmem_host.vm import guestops, launcher
from tmem_host.vm.image import GuestImage, ImageError, build_image, require_image
from tmem_wire.agent import DISK_SERIALS
from tmem_workloads import cpubench
from tmem_wire.frontswap import PAGE_SIZE

# Exit codes of `tmem-testbed run`.
EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_USAGE = 2
EXIT_INFRASTRUCTURE = 3

# Headroom a bigmem guest gets above the working set so it never swaps.
BIGMEM_HEADROOM_MIB = 192

# Remote modes: tmemd's budget is about this share of the guests' working sets
# (the scenario's budget does not apply); what does not fit goes to the cluster.
REMOTE_LOCAL_SHARE = 0.25
# tmemd's memory per page it keeps in the cluster: ~430 bytes of metadata
# (tmem_host.remote.tier; the store charges 272 of them), rounded up.
REMOTE_PAGE_METADATA_BYTES = 450
# At most this share of the budget for that metadata were every page of the sets
# remote: persistent use (metadata included) stops at 90% of the budget, so 40%
# stays for pages in memory and demotion keeps room, instead of refusing puts.
REMOTE_METADATA_SHARE = 0.5
# Writes wait (WAIT) for one replica: a master's crash loses no acknowledged page.
REMOTE_REPLICAS = 1


# What makes a run say nothing about tmem: the machinery under it failed.
INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    launcher.LauncherError, guestops.AgentError, TmemdFailed, ImageError, ClusterError, kvload.KvError,
    commandload.CommandError, OSError,
)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    results: Path
    exit_code: int
    run: RunRecord


ProgressCallback = Callable[[str, int, int], None]  # description, completed, total


def new_run_id(scenario: Scenario) -> str:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{scenario.name}-{secrets.token_hex(2)}"


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def host_metadata() -> HostMetadata:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu_version = "not found"
    if shutil.which(launcher.QEMU_BINARY):
        qemu = subprocess.run([launcher.QEMU_BINARY, "--version"], capture_output=True, text=True, check=False)
        qemu_version = qemu.stdout.splitlines()[0] if qemu.stdout else "unknown"
    return {
        "host_cpu": f"{cpu} ({os.cpu_count()} cores)",
        "host_load": [round(load, 2) for load in os.getloadavg()],
        "host_kernel": platform.release(),
        "qemu_version": qemu_version,
    }


def working_set_mib(scenario: Scenario) -> int:
    """usemem & co: ratio x guest RAM; pagecache: the file set, ratio x the reader's
    limit; build and command (no ratio): the guest's RAM."""
    if scenario.workload == "pagecache":
        return int(int(scenario.params["reader_mib"]) * float(scenario.params["ratio"]))
    return int(scenario.guests.memory_mib * float(scenario.params.get("ratio", 1.0)))


def workload_seed(index: int, repetition: int) -> int:
    return 1000 * repetition + index + 1


def guest_memory_mib(scenario: Scenario, mode: Mode) -> int:
    if mode.density:
        return density.plan(scenario, mode).boot_mib
    if mode.enough_memory:
        return working_set_mib(scenario) + BIGMEM_HEADROOM_MIB
    return scenario.guests.memory_mib


def tmemd_guest_specs(scenario: Scenario, cached_disks: Mapping[str, Path] | None = None,
                      cached_disk_pool: uuid.UUID | None = None, write_allocate: bool = False) -> list[str]:
    """``cached_disks``: each guest's data disk image, for a mode whose data disk is
    tmemd's cached disk; ``cached_disk_pool``: the shared pool they read through;
    ``write_allocate``: their writes fill the cache too."""
    specs = []
    for index in range(scenario.guests.count):
        spec = f"{guest_name(index)}:weight={scenario.guests.weight(index)}"
        if scenario.guests.cap(index):
            spec += f":cap={format_size(scenario.guests.cap(index))}"
        if cached_disks is not None:
            spec += f":cached-disk={cached_disks[guest_name(index)]}"
            if cached_disk_pool is not None:
                spec += f":cached-disk-pool={cached_disk_pool}"
            if write_allocate:
                spec += ":cached-disk-write-allocate"
        specs.append(spec)
    return specs


def data_disk_mib(scenario: Scenario) -> int:
    """The page-cache workload's data disk: the set, and the room ext4 needs around it."""
    return working_set_mib(scenario) * 5 // 4 + 64 if scenario.workload == "pagecache" else 0


def remote_budget_bytes(scenario: Scenario) -> int:
    """tmemd's budget in a remote mode, whole MiB: REMOTE_LOCAL_SHARE of the guests'
    working sets, but at least the metadata floor. A quarter is 1024 bytes a page
    and the floor 900, so the floor binds only for a share below ~0.22; remote.toml's
    guest (320 MiB, 81920 pages): 80 MiB, floor 70 MiB."""
    pages = working_set_mib(scenario) * scenario.guests.count * ((1 << 20) // PAGE_SIZE)
    share = pages * PAGE_SIZE * REMOTE_LOCAL_SHARE
    floor = pages * REMOTE_PAGE_METADATA_BYTES / REMOTE_METADATA_SHARE
    return math.ceil(max(share, floor) / (1 << 20)) << 20


@dataclass(frozen=True, slots=True)
class TmemdArguments:
    """What a mode starts tmemd with (TmemdProcess's arguments)."""

    budget: str
    guests: list[str]
    extra_args: list[str]


def tmemd_arguments(scenario: Scenario, mode: Mode, remote_seeds: str | None = None,
                    cached_disks: Mapping[str, Path] | None = None) -> TmemdArguments:
    """tmemd's budget, guests and options for ``mode``; a remote mode needs its
    cluster's seed nodes (LocalCluster.seed_spec), a cached-disk mode the guests'
    data disk images."""
    extra = ["--nbd-size", f"{scenario.guests.swap_mib}M"]
    if mode.swap == "nbd" or mode.data_disk == "nbd":
        # A refused page (a cache miss) goes to a disk as slow as the other modes'
        # (frontswap's real swap disk), not to the host page cache at memory speed.
        extra += ["--fallback-iops", str(launcher.DISK_IOPS["hdd"])]
    if not mode.compress:
        extra.append("--no-compress")
    if not mode.journal:
        extra.append("--no-journal")
    budget = density.plan(scenario, mode).tmemd_budget if mode.density else scenario.budget_bytes
    if mode.remote:
        if remote_seeds is None:
            raise ValueError(f"mode {mode.name} needs the cluster's seed nodes")
        budget = remote_budget_bytes(scenario)
        extra += ["--remote", remote_seeds, "--remote-replicas", str(REMOTE_REPLICAS)]
    # One pool for the run's guests (their disks are one image: shared_image).
    pool = uuid.uuid5(uuid.NAMESPACE_URL, f"tmem-testbed:{scenario.name}") if mode.shared_cache else None
    return TmemdArguments(format_size(budget),
                          tmemd_guest_specs(scenario, cached_disks, pool, mode.cache_writes), extra)


@contextlib.contextmanager
def local_cluster(log_dir: Path) -> Iterator[LocalCluster]:
    """A fresh 3-master, 3-replica Redis Cluster, healthy, in a scratch directory
    (its AOF files hold every remote page: not worth keeping); its nodes' logs are
    copied to ``log_dir`` when it stops, also after a failed start."""
    with tempfile.TemporaryDirectory(prefix="tmem-redis-") as scratch:
        cluster = LocalCluster(Path(scratch))
        try:
            with cluster:
                yield cluster
        finally:
            cluster.collect_logs(log_dir)


def guest_config(
    scenario: Scenario, mode: Mode, index: int, tmemd: TmemdProcess | None, run_dir: Path,
    image: GuestImage | None = None,
) -> launcher.VmConfig:
    name = guest_name(index)
    # The page-cache workload does not swap: its disk is the data disk the file set is on.
    pagecache = scenario.workload == "pagecache"
    swap = "none" if pagecache else mode.swap
    return launcher.VmConfig(
        name=name,
        memory_mib=guest_memory_mib(scenario, mode),
        vcpus=scenario.guests.vcpus,
        swap=swap,
        swap_mib=scenario.guests.swap_mib,
        nbd_socket=tmemd.nbd_socket(name) if tmemd is not None and swap == "nbd" else None,
        nbd_export=name if swap == "nbd" else None,
        data_disk_mib=data_disk_mib(scenario),
        data_disk_speed=mode.data_disk,
        data_nbd_socket=tmemd.disk_socket(name) if tmemd is not None and mode.data_disk == "nbd" else None,
        tmem_socket=tmemd.abi_socket(name) if tmemd is not None and mode.agent is not None else None,
        balloon=mode.balloon,
        run_dir=run_dir / name,
        boot_timeout=scenario.boot_timeout_s,
        image=image,
    )


def workload_command(scenario: Scenario, index: int, repetition: int) -> str:
    params = scenario.params
    mib = working_set_mib(scenario)
    seed = workload_seed(index, repetition)
    if scenario.workload in ("usemem", "contention"):
        def usemem(burst_seed: int) -> str:
            return (
                f"python3 -m tmem_workloads.usemem --mib {mib} --seed {burst_seed} "
                f"--order {params['order']} --passes {params['passes']}"
            )

        if scenario.workload == "contention":
            # Bursty phases: working sets grow, are released, idle, and grow again,
            # so the host budget changes hands between the guests.
            bursts = [usemem(seed * 100 + burst) for burst in range(int(params["bursts"]))]
            return " && sleep 3 && ".join(bursts)
        return usemem(seed)
    if scenario.workload == "build":
        jobs = int(params["jobs"]) or scenario.guests.vcpus
        return density.build_command(str(params["cflags"]), jobs)
    if scenario.workload == "stress-vm":
        return (
            f"stress-ng --vm 1 --vm-bytes {mib}M --vm-method {shlex.quote(str(params['method']))} "
            f"--vm-keep --verify --timeout {int(params['seconds'])}s --metrics-brief"
        )
    raise ValueError(f"unknown workload {scenario.workload!r}")


SWAP_DISK_SERIAL = DISK_SERIALS["swap"]
DATA_DISK_SERIAL = DISK_SERIALS["data"]
DATA_MOUNT = "/data"
# ext4 with page-sized blocks whatever the disk's size: below 512 MiB mke2fs picks
# 1 KiB blocks ("small"), and a file's 4 KiB page then starts at any 1 KiB offset,
# which QEMU's NBD client (the export's minimum block is a page) widens to an
# aligned 8 KiB read, twice the pages a disk file in the host page cache is asked for.
MAKE_DATA_FS = "mkfs.ext4 -q -F -b 4096"
FILE_SET = f"{DATA_MOUNT}/set"
CACHE_MOUNT = "/mnt/cache"


# A phase of a workload: a guest command, or a host-driven step (the kv workload's
# load generator, the command workload's run-then-verify) that reports the same way.
Phase = str | Callable[[launcher.Guest], launcher.CommandResult]


def workload_memory_max(scenario: Scenario, mode: Mode) -> str:
    """memory.max of the workload's cgroup: none for bigmem (the floor)."""
    return "max" if mode.enough_memory else f"{scenario.guests.workload_memory_mib}M"


def workload_phases(scenario: Scenario, mode: Mode, index: int, repetition: int) -> list[Phase]:
    """The workload as phases run one after the other; tmemd's counters are taken
    between them (pagecache: one reader per pass, so hits are per pass)."""
    if scenario.workload == "kv":
        kv = kvload.KvParams(mib=working_set_mib(scenario), value_bytes=int(scenario.params["value_bytes"]),
                             requests=int(scenario.params["requests"]),
                             clients=int(scenario.params["clients"]), seed=workload_seed(index, repetition))
        return [_host_driven("kv", lambda guest: kvload.run(guest, kv, scenario.workload_timeout_s))]
    if scenario.workload == "command":
        return [_host_driven("command", lambda guest: commandload.run(
            guest, commandload.CommandSpec.from_params(scenario.params), workload_memory_max(scenario, mode),
            scenario.workload_timeout_s))]
    if scenario.workload != "pagecache":
        return [guestops.in_cgroup(workload_command(scenario, index, repetition),
                                   workload_memory_max(scenario, mode))]
    params = scenario.params
    # The reader runs in a memory cgroup: memory.max bounds the page cache it may
    # keep (its pages are charged to it), so a set of ratio x reader_mib cannot stay
    # cached, while the agent, outside the cgroup, keeps the memory its FUSE I/O needs.
    # A guest small enough to do this with its RAM would leave the agent no room, and
    # a set of 1.5x a 256 MiB guest takes minutes through FUSE in Python under TCG.
    # bigmem: no limit, the set stays in the guest page cache (the floor).
    limit = "max" if mode.enough_memory else f"{int(params['reader_mib'])}M"
    directory = CACHE_MOUNT if mode.agent is not None else FILE_SET
    # One image for all: the first guest's set (its seed) is every guest's.
    set_index = 0 if params["shared_image"] else index
    reader = (f"python3 -m tmem_workloads.pagecache read --dir {directory} "
              f"{_file_set_arguments(scenario, set_index, repetition)} --passes 1 "
              f"--order {params['order']} --reads {int(params['reads'])}")
    return [guestops.in_cgroup(reader, limit, "pagecache-reader")] * int(params["passes"])


def _file_set_arguments(scenario: Scenario, index: int, repetition: int) -> str:
    return (f"--mib {working_set_mib(scenario)} --file-mib {int(scenario.params['file_mib'])} "
            f"--seed {workload_seed(index, repetition)}")


def prepare_pagecache(
    guest: launcher.Guest, mode: Mode, scenario: Scenario, index: int, repetition: int
) -> int | None:
    """ext4 on the data disk, the file set written and dropped from the page cache
    (bigmem keeps it: the floor is a guest that holds the set in RAM); for agent
    modes the agent's cleancache mount over it. One image for all (shared_image):
    the first guest makes it, then every guest mounts it read-only."""
    keep = " --keep-cache" if mode.enough_memory else ""
    if scenario.params["shared_image"]:
        # Guests are prepared in order: the first one's set is on the image by now.
        guest.ssh(f"dev={guestops.disk_by_serial(DATA_DISK_SERIAL)} && mkdir -p {DATA_MOUNT} && "
                  f"mount -o ro,noload $dev {DATA_MOUNT}" if index else
                  f"dev={guestops.disk_by_serial(DATA_DISK_SERIAL)} && {MAKE_DATA_FS} $dev && "
                  f"mkdir -p {DATA_MOUNT} && mount $dev {DATA_MOUNT} && python3 -m tmem_workloads.pagecache "
                  f"prepare --dir {FILE_SET} {_file_set_arguments(scenario, 0, repetition)} && "
                  f"mount -o remount,ro {DATA_MOUNT}", timeout=scenario.workload_timeout_s)
        return None
    guest.ssh(
        f"dev={guestops.disk_by_serial(DATA_DISK_SERIAL)} && {MAKE_DATA_FS} $dev && mkdir -p {DATA_MOUNT} && "
        f"mount $dev {DATA_MOUNT} && python3 -m tmem_workloads.pagecache prepare --dir {FILE_SET} "
        f"{_file_set_arguments(scenario, index, repetition)}{keep}",
        timeout=scenario.workload_timeout_s,
    )
    if mode.agent is not None:
        return guestops.start_agent(guest, f"--cache {FILE_SET} {CACHE_MOUNT}")
    return None


def _host_driven(name: str, step: Callable[[launcher.Guest], dict[str, Any]]) -> Phase:
    """A host-driven step as a phase: its result as the JSON line a guest workload
    prints, exit status 1 unless it verified."""
    def phase(guest: launcher.Guest) -> launcher.CommandResult:
        result = step(guest)
        return launcher.CommandResult(name, 0 if result.get("verified") is True else 1, json.dumps(result), "")

    return phase


def prepare_workload(guest: launcher.Guest, mode: Mode, scenario: Scenario) -> None:
    """What a workload needs running before it is measured: the key-value server
    (in the workload's cgroup), the command workload's setup."""
    if scenario.workload == "kv":
        kvload.start_server(guest, workload_memory_max(scenario, mode))
    elif scenario.workload == "command":
        commandload.setup(guest, commandload.CommandSpec.from_params(scenario.params), scenario.workload_timeout_s)


def prepare_swap(guest: launcher.Guest, mode: Mode) -> int | None:
    """Swap the mode's way: a disk (maybe under zswap), the NBD export, or the agent
    (whose pid is returned)."""
    if mode.swap == "none":
        return None
    if mode.zswap:
        guest.ssh(
            "modprobe lz4; modprobe zbud; "
            "echo lz4 > /sys/module/zswap/parameters/compressor && "
            "echo zbud > /sys/module/zswap/parameters/zpool && "
            "echo Y > /sys/module/zswap/parameters/enabled",
            timeout=60,
        )
    if mode.agent is not None:
        # The agent serves /dev/nbd0 as swap (fallback: the swap disk) in the background.
        return guestops.start_agent(guest, f"--swap {mode.agent} --swap-disk-serial {SWAP_DISK_SERIAL}")
    guestops.enable_disk_swap(guest, SWAP_DISK_SERIAL)
    return None


def _delta(after: Mapping[str, float], before: Mapping[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0) for key in after if isinstance(after[key], (int, float))}


TMEMD_COUNTERS: tuple[TmemdCounter, ...] = get_args(TmemdCounter)
SELF_TIMED_WORKLOADS = ("usemem", "pagecache", "kv", "build", "command")


def _tmemd_counters(stats: StatsReply, guest: str) -> TmemdCounters:
    """A guest's store counters (0 if the store has no such client), plus its NBD
    export's and its remote tier's figures when it has them."""
    client = stats["store"]["clients"].get(guest)
    counters = cast(TmemdCounters, {key: client[key] if client is not None else 0 for key in TMEMD_COUNTERS})
    export = stats["nbd"].get(guest)
    if export:
        counters["nbd"] = export
    remote = stats["remote"]["guests"].get(guest) if stats["remote"] is not None else None
    if remote is not None:
        counters["remote"] = remote
    cached_disk = stats.get("cached_disks", {}).get(guest)
    if cached_disk is not None:
        counters["cached_disk"] = cached_disk
    return counters


class Runner:
    def __init__(
        self,
        scenario: Scenario,
        results_root: Path,
        *,
        progress: ProgressCallback | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.scenario = scenario
        self.results_root = results_root
        self.progress = progress
        self.log = log
        self.run_id = new_run_id(scenario)
        self.results = results_root / self.run_id
        self.image_dir: Path | None = None  # the guest image's cache directory, once run() found it
        self.image: GuestImage | None = None

    def _image(self) -> GuestImage:
        """The image, with the command workload's extra packages if it names any
        (another recipe hash: built here, once, when it is not cached)."""
        packages = tuple(self.scenario.params.get("packages", ()))
        if not packages:
            return require_image()
        try:
            return require_image(packages)
        except ImageError:
            self.log(f"building the guest image with {', '.join(packages)} (once; cached by recipe hash)")
            return build_image(extra_packages=packages)

    def run(self) -> RunOutcome:
        self.results.mkdir(parents=True)
        image = self._image()
        self.image = image
        self.image_dir = image.directory
        host = host_metadata()
        metadata: RunMetadata = {
            "started": _utc_now(), "host_cpu": host["host_cpu"], "host_load": host["host_load"],
            "host_kernel": host["host_kernel"], "qemu_version": host["qemu_version"],
            "image_hash": image.directory.name, "guest_kernel": image.kernel_version,
        }
        samples: list[Sample] = []
        run: RunRecord = {"schema": 1, "id": self.run_id, "scenario": self.scenario.to_json(),
                          "metadata": metadata, "samples": samples}
        total = len(self.scenario.modes) * self.scenario.repetitions
        done = 0
        exit_code = EXIT_OK
        try:
            for repetition in range(self.scenario.repetitions):
                if self.scenario.workload == "density":
                    alone = self.run_alone(repetition, metadata)
                    samples.append(alone)
                    self.log(self._sample_line(alone))
                    if not alone["ok"]:
                        exit_code = EXIT_VERIFICATION_FAILED if alone["verified"] is False else EXIT_INFRASTRUCTURE
                # Modes interleave across repetitions, so slow drift in host load
                # spreads over all modes instead of biasing the last one.
                for mode_name in self.scenario.modes:
                    if self.progress:
                        self.progress(f"{mode_name} #{repetition + 1}", done, total)
                    migration = self.scenario.migration
                    if self.scenario.workload == "density":
                        new = self.run_density_case(MODES[mode_name], repetition, metadata)
                    elif migration is None:
                        new = self.run_once(MODES[mode_name], repetition, metadata)
                    else:  # the run without a migration first: the slowdown's reference
                        new = []
                        reference: float | None = None
                        if migration.compare:
                            new.append(self.run_migration_case(MODES[mode_name], repetition, None, metadata))
                            reference = new[0]["wall_s"]
                        after_s = (migration.after_s if migration.at is None
                                   else None if reference is None else reference * migration.at)
                        new.append(self.run_migration_case(MODES[mode_name], repetition, after_s, metadata)
                                   if after_s is not None else
                                   _failed_sample(mode_name, repetition, guest_name(0), "infrastructure: "
                                                  "no unmigrated run to time the migration by", migrated=True))
                    samples.extend(new)
                    for sample in new:
                        self.log(self._sample_line(sample))
                        if sample["verified"] is False:
                            exit_code = EXIT_VERIFICATION_FAILED  # wrong data trumps everything
                        elif not sample["ok"] and exit_code == EXIT_OK:
                            exit_code = EXIT_INFRASTRUCTURE
                    done += 1
                    self._save(run)
        finally:
            metadata["finished"] = _utc_now()
            self._save(run)
            report.write_reports(self.results)
            self._point_latest()
        if self.progress:
            self.progress("done", total, total)
        return RunOutcome(self.results, exit_code, run)

    def _sample_line(self, sample: Sample) -> str:
        what = f"{sample['mode']} #{sample['repetition'] + 1} {sample['guest']}"
        if sample.get("migrated"):
            what += " (migrated)"
        if sample["ok"]:
            return f"{what}: {sample['wall_s']:.1f} s, verified"
        return f"{what}: FAILED: {sample['error']}"

    def _save(self, run: RunRecord) -> None:
        path = self.results / report.RUN_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(run, indent=1) + "\n")
        temporary.replace(path)

    def _point_latest(self) -> None:
        latest = self.results_root / "latest"
        temporary = self.results_root / f".latest-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        temporary.symlink_to(self.results.name)
        temporary.replace(latest)

    @contextlib.contextmanager
    def _tmemd(self, mode: Mode, vm_dir: Path) -> Iterator[tuple[TmemdProcess | None, LocalCluster | None]]:
        """tmemd if the mode has it, and the cluster below it if the mode is remote."""
        if not mode.tmemd:
            yield None, None
            return
        with contextlib.ExitStack() as stack:
            # Entered first, a remote mode's cluster stops after tmemd.
            cluster = stack.enter_context(local_cluster(vm_dir / "redis")) if mode.remote else None
            # Socket paths must fit sun_path (108 bytes): tmemd runs in a short
            # temporary directory and its log is kept with the run's other logs.
            run_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="tmemd-"))
            cached_disks = None
            if mode.data_disk == "nbd" and self.scenario.workload == "pagecache":
                # The guests' data disks are tmemd's images (sparse, gone with its run
                # dir): one each, or one for all (shared_image).
                cached_disks = {}
                shared = bool(self.scenario.params["shared_image"])
                for index in range(self.scenario.guests.count):
                    image = Path(run_dir) / ("data.img" if shared else f"{guest_name(index)}.data.img")
                    cached_disks[guest_name(index)] = image
                    if not image.exists():
                        with image.open("wb") as sparse:
                            sparse.truncate(data_disk_mib(self.scenario) << 20)
            arguments = tmemd_arguments(self.scenario, mode, cluster.seed_spec if cluster is not None else None,
                                        cached_disks)
            tmemd = TmemdProcess(Path(run_dir), budget=arguments.budget, guests=arguments.guests,
                                 extra_args=arguments.extra_args)
            try:
                with tmemd:
                    yield tmemd, cluster
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.copy(tmemd.log_path, vm_dir / "tmemd.log")

    def _calibrate_once(self, guest: launcher.Guest, metadata: RunMetadata) -> None:
        """The accelerator and (unless the scenario says not to) the guest CPU's
        speed against the host's, from the run's first guest (before anything else
        runs in it)."""
        metadata.setdefault("accelerator", "kvm" if guest.qmp("query-kvm").get("enabled") else "tcg")
        if "calibration" not in metadata and self.scenario.calibrate:
            metadata["calibration"] = calibrate(guest)
            self.log(f"calibration: the guest CPU ran {metadata['calibration']['python_factor']:.1f}x "
                     "slower than the host's (pure Python)" +
                     (f", {factor:.1f}x (lz4)" if (factor := metadata["calibration"]["lz4_factor"]) else ""))

    def run_once(self, mode: Mode, repetition: int, metadata: RunMetadata) -> list[Sample]:
        """One repetition of one mode: a sample per guest."""
        vm_dir = self.results / "vms" / f"{mode.name}-{repetition + 1}"
        vm_dir.mkdir(parents=True)
        names = [guest_name(index) for index in range(self.scenario.guests.count)]
        try:
            with self._tmemd(mode, vm_dir) as (tmemd, cluster), contextlib.ExitStack() as stack:
                guests = [
                    stack.enter_context(launcher.Guest(guest_config(self.scenario, mode, index, tmemd, vm_dir, self.image)))
                    for index in range(self.scenario.guests.count)
                ]
                self._calibrate_once(guests[0], metadata)
                agents = [
                    prepare_pagecache(guest, mode, self.scenario, index, repetition)
                    if self.scenario.workload == "pagecache" else prepare_swap(guest, mode)
                    for index, guest in enumerate(guests)
                ]
                for guest in guests:
                    prepare_workload(guest, mode, self.scenario)
                return self._measure(mode, repetition, guests, agents, tmemd, cluster)
        except INFRASTRUCTURE_ERRORS as error:
            return [_failed_sample(mode.name, repetition, name, error) for name in names]

    def _measure(
        self, mode: Mode, repetition: int, guests: list[launcher.Guest], agents: list[int | None],
        tmemd: TmemdProcess | None, cluster: LocalCluster | None,
    ) -> list[Sample]:
        before = [json.loads(guest.ssh("python3 -m tmem_guest.snapshot", timeout=60).stdout) for guest in guests]
        qemu_pids = [guest.pid for guest in guests if guest.pid is not None]
        # The cluster's nodes share the host's CPUs with QEMU and tmemd: their cost too.
        redis_pids = [pid for node in cluster.nodes if (pid := node.pid) is not None] if cluster else []
        processes = {"qemu": qemu_pids, "tmemd": [tmemd.pid] if tmemd else [], "redis": redis_pids}
        host_before = {pid: hostmetrics.process_usage(pid) for pids in processes.values() for pid in pids}
        timeout = self.scenario.workload_timeout_s
        with hostmetrics.MemoryTimeline(processes, image_dir=self.image_dir) as timeline, \
                ThreadPoolExecutor(len(guests)) as pool:
            def run(index: int, guest: launcher.Guest) -> PhaseRuns:
                return _run_phases(guest, workload_phases(self.scenario, mode, index, repetition), timeout,
                                   _tmemd_snapshot(tmemd, guest.config.name) if tmemd else None)

            if self.scenario.params.get("shared_image"):
                # One after the other: each guest reads what the ones before it brought in.
                phase_runs = [run(index, guest) for index, guest in enumerate(guests)]
            else:
                # All guests start their workload together (contention), each on its own SSH channel.
                futures = [pool.submit(run, index, guest) for index, guest in enumerate(guests)]
                phase_runs = [future.result() for future in futures]
        tmemd_stats: StatsReply | None = None
        if tmemd:
            with tmemd.control() as control:
                tmemd_stats = control.stats()
        samples: list[Sample] = []
        for index, (guest, phases) in enumerate(zip(guests, phase_runs)):
            after = json.loads(guest.ssh("python3 -m tmem_guest.snapshot", timeout=60).stdout)
            result, wall = phases.results[-1], phases.wall_s
            outputs = [_parse_workload_output(each.stdout) for each in phases.results]
            workload = _merge_passes(outputs, phases.tmemd) if self.scenario.workload == "pagecache" else outputs[0]
            verified = result.exit_status == 0 and workload.get("verified", True) is not False
            host: dict[str, float] = {}
            for role, pids in {**processes, "qemu": [guest.pid] if guest.pid is not None else []}.items():
                usage = _usage_since(pids, host_before)
                if usage is not None:
                    host[f"{role}_cpu_s"], host[f"{role}_peak_rss"] = round(usage[0], 2), usage[1]
            agent = None
            agent_pid = agents[index]
            if agent_pid is not None:
                if self.scenario.workload == "pagecache":
                    guestops.stop_agent(guest, agent_pid)  # unmounts; its last counters are final
                agent = guestops.agent_stats(guest)
            samples.append({
                "mode": mode.name,
                "repetition": repetition,
                "guest": guest.config.name,
                "ok": verified,
                "verified": verified,
                "error": None if verified else _failure_text(result),
                # Workloads that time themselves (inside the guest: no SSH overhead; kv:
                # its load and benchmark, not the check after them); others by the host.
                "wall_s": round(float(workload.get("total_s", wall))
                                if self.scenario.workload in SELF_TIMED_WORKLOADS else wall, 3),
                "workload": workload,
                "vmstat": _delta(after["vmstat"], before[index]["vmstat"]),
                "psi": _delta(after["psi"], before[index]["psi"]),
                "agent": agent,
                "tmemd": _tmemd_counters(tmemd_stats, guest.config.name) if tmemd_stats is not None else None,
                "host": host,
                "timeline": timeline.points,
                "host_memory": hostmetrics.component_peaks(timeline.points),
            })
        return samples


    # -- the density scenario (testbed.density) ------------------------------------

    def run_alone(self, repetition: int, metadata: RunMetadata) -> Sample:
        """The density scenario's reference: one hungry phase in one guest with
        enough RAM, alone on the host (each guest's slowdown is against it)."""
        vm_dir = self.results / "vms" / f"alone-{repetition + 1}"
        vm_dir.mkdir(parents=True)
        name = guest_name(0)
        memory = int(self.scenario.params["hungry_mib"]) + density.ALONE_HEADROOM_MIB
        config = launcher.VmConfig(name=name, memory_mib=memory, vcpus=self.scenario.guests.vcpus,
                                   run_dir=vm_dir / name, boot_timeout=self.scenario.boot_timeout_s)
        try:
            with launcher.Guest(config) as guest:
                self._calibrate_once(guest, metadata)
                command = density.phase_command(self.scenario, 1000 * repetition + 999)
                result = guest.ssh(command, timeout=self.scenario.workload_timeout_s, check=False)
        except INFRASTRUCTURE_ERRORS as error:
            return _failed_sample(DENSITY_ALONE, repetition, name, error)
        workload = _parse_workload_output(result.stdout)
        verified = result.exit_status == 0 and workload.get("verified") is True
        return {"mode": DENSITY_ALONE, "repetition": repetition, "guest": name, "ok": verified,
                "verified": verified, "error": None if verified else _failure_text(result),
                "wall_s": workload.get("total_s"), "workload": workload}

    def run_density_case(self, mode: Mode, repetition: int, metadata: RunMetadata) -> list[Sample]:
        """One repetition of one density policy: the guests sized by density.plan,
        their staggered phases launched in the background, the monitor (and the
        balancer) running until the last guest is done; a sample per guest, the
        run's figures (makespan, the monitor's rows) on the first guest's."""
        vm_dir = self.results / "vms" / f"{mode.name}-{repetition + 1}"
        vm_dir.mkdir(parents=True)
        count = self.scenario.guests.count
        names = [guest_name(index) for index in range(count)]
        plan = density.plan(self.scenario, mode)
        try:
            with self._tmemd(mode, vm_dir) as (tmemd, _), contextlib.ExitStack() as stack:
                guests = [stack.enter_context(launcher.Guest(guest_config(self.scenario, mode, index, tmemd, vm_dir, self.image)))
                          for index in range(count)]
                self._calibrate_once(guests[0], metadata)
                for guest in guests:
                    prepare_swap(guest, mode)
                if mode.balloon:
                    density.settle(guests, plan.start_mib)
                before = [json.loads(guest.ssh("python3 -m tmem_guest.snapshot", timeout=60).stdout)
                          for guest in guests]
                processes = {"qemu": [guest.pid for guest in guests if guest.pid is not None],
                             "tmemd": [tmemd.pid] if tmemd else [], "redis": []}
                with contextlib.ExitStack() as streams, \
                        hostmetrics.MemoryTimeline(processes, interval=density.TICK_S, image_dir=self.image_dir) \
                        as timeline:
                    # The balancer's second signal: each guest's memory pressure, read
                    # over SSH until the workloads are done.
                    pressure = {guest.config.name: streams.enter_context(psi.PressureStream(guest))
                                for guest in guests} if mode.balloon else {}
                    monitor = streams.enter_context(density.DensityMonitor(guests, mode, plan, tmemd, pressure))
                    started = time.monotonic()
                    for index, guest in enumerate(guests):
                        guestops.start_detached(guest, density.guest_command(self.scenario, index, repetition))
                    outputs: dict[int, tuple[str, float]] = {}
                    stalled_polls = 0
                    deadline = started + self.scenario.workload_timeout_s
                    while len(outputs) < count:
                        if time.monotonic() > deadline:
                            raise launcher.SshTimeoutError(f"the guests did not finish in "
                                                           f"{self.scenario.workload_timeout_s:.0f} s")
                        time.sleep(density.POLL_S)
                        for index, guest in enumerate(guests):
                            if index in outputs:
                                continue
                            try:
                                output = guestops.detached_output(guest, timeout=density.POLL_TIMEOUT_S)
                            except launcher.SshTimeoutError:
                                stalled_polls += 1  # asked again next round
                                continue
                            if output is not None:
                                outputs[index] = (output, time.monotonic() - started)
                    makespan = max(done for _, done in outputs.values())
                if mode.balloon:
                    density.release(guests, plan.boot_mib)
                stats = None
                if tmemd is not None:
                    with tmemd.control() as control:
                        stats = control.stats()
                samples: list[Sample] = []
                for index, guest in enumerate(guests):
                    after = json.loads(guest.ssh("python3 -m tmem_guest.snapshot", timeout=60).stdout)
                    output, done = outputs[index]
                    workload = _parse_workload_output(output)
                    phases = workload.get("bursts", [workload]) if "verified" in workload else []
                    verified = (len(phases) == int(self.scenario.params["phases"])
                                and all(phase.get("verified") is True for phase in phases))
                    sample: Sample = {
                        "mode": mode.name, "repetition": repetition, "guest": guest.config.name,
                        "ok": verified, "verified": verified,
                        "error": None if verified else "verification failed: " + output.strip()[-300:],
                        # The guest's working time: its phases, not the sleeps between them.
                        "wall_s": round(sum(float(phase.get("total_s", 0)) for phase in phases), 3),
                        "workload": {**workload, "phase_s": [phase.get("total_s") for phase in phases],
                                     "done_s": round(done, 2)},
                        "vmstat": _delta(after["vmstat"], before[index]["vmstat"]),
                        "psi": _delta(after["psi"], before[index]["psi"]),
                        "tmemd": _tmemd_counters(stats, guest.config.name) if stats is not None else None,
                    }
                    if index == 0:
                        sample["timeline"] = timeline.points
                        sample["host_memory"] = hostmetrics.component_peaks(timeline.points)
                        sample["density"] = {
                            "makespan_s": round(makespan, 2), "budget_bytes": plan.budget,
                            "boot_mib": plan.boot_mib, "start_mib": plan.start_mib,
                            "tmemd_budget_bytes": plan.tmemd_budget, "balloon_moves": monitor.moves,
                            "committed_peak_bytes": density.committed_peak(monitor.rows, count),
                            "hunger": dict(monitor.policy.hunger),
                            # SSH reads a guest did not answer in time (done-polls, PSI reads).
                            "stalled_polls": stalled_polls + sum(stream.stalled_reads
                                                                 for stream in pressure.values()),
                            "stall_s": [round((stream.latest.some_us - stream.first.some_us) / 1e6, 2)
                                        for stream in pressure.values()
                                        if stream.latest is not None and stream.first is not None],
                            "monitor": monitor.rows,
                        }
                    samples.append(sample)
                return samples
        except INFRASTRUCTURE_ERRORS as error:
            return [_failed_sample(mode.name, repetition, name, error) for name in names]

    # -- live migration (scenario [migration]) ------------------------------------

    def run_migration_case(self, mode: Mode, repetition: int, after_s: float | None,
                           metadata: RunMetadata) -> Sample:
        """One guest, set up to be migratable (a shared qcow2 root overlay and shared
        scratch disks, no 9p share, two tmemds a and b for tmem modes, one cluster
        for tmem-remote), its workload launched in the background; unless
        ``after_s`` is None, live-migrated from a's QEMU to b's ``after_s`` into the
        workload, tmemd a handing the guest to tmemd b while it is stopped. Timed by
        the host, launch to result, the same way with and without the migration."""
        name = guest_name(0)
        migrate = after_s is not None
        vm_dir = self.results / "vms" / f"{mode.name}-{repetition + 1}{'-migrated' if migrate else ''}"
        vm_dir.mkdir(parents=True)
        try:
            with contextlib.ExitStack() as stack:
                cluster = stack.enter_context(local_cluster(vm_dir / "redis")) if mode.remote else None
                tmemds = {side: self._migration_tmemd(stack, mode, side, cluster, vm_dir)
                          for side in ("a", "b")} if mode.tmemd else {}
                config = guest_config(self.scenario, mode, 0, tmemds.get("a"), vm_dir, self.image)
                config = replace(config, run_dir=vm_dir / "a", share_agent=False,
                                 root_overlay=launcher.create_root_overlay(vm_dir / "root.qcow2"),
                                 shared_disk_dir=vm_dir / "disks")
                source = stack.enter_context(launcher.Guest(config))
                guestops.install_guest_code(source)
                self._calibrate_once(source, metadata)
                prepare_swap(source, mode)
                command = workload_phases(self.scenario, mode, 0, repetition)[0]
                assert isinstance(command, str)  # a migration scenario runs usemem
                guestops.start_detached(source, command)
                started = time.monotonic()
                guest, migration = source, None
                if after_s is not None:
                    time.sleep(max(0.0, started + after_s - time.monotonic()))
                    if guestops.detached_output(source) is not None:
                        raise launcher.QemuError("the workload ended before the migration: lower after_s")
                    began = time.monotonic() - started
                    guest, migration = self._migrate(stack, source, config, mode, tmemds, vm_dir)
                    migration["started_s"] = round(began, 2)
                deadline = started + self.scenario.workload_timeout_s
                while (output := guestops.detached_output(guest)) is None:
                    if time.monotonic() > deadline:
                        raise launcher.SshTimeoutError(f"the workload did not finish in "
                                                       f"{self.scenario.workload_timeout_s:.0f} s")
                    time.sleep(0.25)
                wall = time.monotonic() - started
                workload = _parse_workload_output(output)
                verified = workload.get("verified") is True
                tmemd = tmemds.get("b" if migrate else "a")
                stats = None
                if tmemd is not None:
                    with tmemd.control() as control:
                        stats = control.stats()
                if migration is not None and stats is not None:
                    migration["served_from_tmem"] = _served_from_tmem(stats, name)
                sample: Sample = {
                    "mode": mode.name, "repetition": repetition, "guest": name,
                    "ok": verified, "verified": verified,
                    "error": None if verified else "verification failed: " + output.strip()[-300:],
                    "wall_s": round(wall, 3), "workload": workload,
                    "agent": guestops.agent_stats(guest) if mode.agent is not None else None,
                    "tmemd": _tmemd_counters(stats, name) if stats is not None else None,
                    "migrated": migrate, "migration": migration,
                }
                return sample
        except INFRASTRUCTURE_ERRORS as error:
            return _failed_sample(mode.name, repetition, name, error, migrated=migrate)

    def _migration_tmemd(self, stack: contextlib.ExitStack, mode: Mode, side: str,
                         cluster: LocalCluster | None, vm_dir: Path) -> TmemdProcess:
        """Host ``side``'s tmemd (its own host id, run dir and state); its log is kept."""
        arguments = tmemd_arguments(self.scenario, mode, cluster.seed_spec if cluster is not None else None)
        run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"tmemd-{side}-")))
        tmemd = TmemdProcess(run_dir, budget=arguments.budget, guests=arguments.guests,
                             extra_args=[*arguments.extra_args, "--host-id", side])
        stack.callback(lambda: shutil.copy(tmemd.log_path, vm_dir / f"tmemd-{side}.log")
                       if tmemd.log_path.exists() else None)
        stack.enter_context(tmemd)
        return tmemd

    def _migrate(self, stack: contextlib.ExitStack, source: launcher.Guest, config: launcher.VmConfig,
                 mode: Mode, tmemds: dict[str, TmemdProcess], vm_dir: Path
                 ) -> tuple[launcher.Guest, MigrationRecord]:
        """Live-migrate ``source`` to a QEMU wired to host b; hand the guest from
        tmemd a to tmemd b while it is stopped; run it there."""
        # A short directory: the socket's path must fit sun_path (108 bytes).
        sockets = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tmem-migrate-")))
        incoming = replace(config, run_dir=vm_dir / "b", incoming=f"unix:{sockets / 'migrate.sock'}",
                           ssh_key_from=source.key_path)
        if "b" in tmemds:
            b = tmemds["b"]
            name = config.name
            incoming.nbd_socket = b.nbd_socket(name) if config.nbd_socket is not None else None
            incoming.tmem_socket = b.abi_socket(name) if config.tmem_socket is not None else None
        destination = launcher.Guest(incoming)
        stack.callback(destination.shutdown)
        destination.start()
        info = source.migrate_to(destination)
        stopped = time.monotonic()
        source.kill()  # stopped after the switch; its connections to tmemd a close
        handoff_bytes = 0
        if tmemds:
            state = vm_dir / "handoff"
            with tmemds["a"].control() as control:
                # Remote pages stay in the cluster (handed off by key); else all in the file.
                handoff_bytes = control.request("handoff" if mode.remote else "save",
                                                guest=config.name, path=str(state))["bytes"]
            with tmemds["b"].control() as control:
                control.request("restore", path=str(state))
        destination.resume_migrated()
        return destination, {
            "total_ms": int(info.get("total-time", 0)), "downtime_ms": int(info.get("downtime", 0)),
            "ram_bytes": int(info.get("ram", {}).get("transferred", 0)),
            "handoff_s": round(time.monotonic() - stopped, 3), "handoff_bytes": handoff_bytes,
            "served_from_tmem": 0, "started_s": 0.0,
        }


# Half cpubench's default work: about 5 s in a TCG guest here (pure Python ran 14x,
# lz4 11.5x slower than the host; docs/TESTBED.md).
CALIBRATION_SCALE = 0.5


def calibrate(guest: launcher.Guest) -> CalibrationRecord:
    """tmem_workloads.cpubench in ``guest``, then the same in this process on the
    host (between runs: nothing else of the testbed's is busy)."""
    lines = _json_lines(guest.ssh(f"python3 -m tmem_workloads.cpubench --scale {CALIBRATION_SCALE}",
                                  timeout=600).stdout)
    if not lines:
        raise guestops.AgentError("cpubench printed no result in the guest")
    in_guest = cast(CpuBenchRecord, lines[-1])
    on_host = cast(CpuBenchRecord, cpubench.run(CALIBRATION_SCALE, 3))
    guest_lz4, host_lz4 = in_guest["lz4_s"], on_host["lz4_s"]
    return {
        "guest": in_guest, "host": on_host,
        "python_factor": round(in_guest["python_s"] / on_host["python_s"], 2),
        "lz4_factor": round(guest_lz4 / host_lz4, 2) if guest_lz4 and host_lz4 else None,
    }


# The density scenario's reference runs: their samples' mode.
DENSITY_ALONE = "alone"


def _failed_sample(mode: str, repetition: int, guest: str, error: str | BaseException, *,
                   migrated: bool | None = None) -> Sample:
    """A guest's sample when the machinery failed before the workload could tell:
    ``error`` is the diagnosis, or the exception whose first line is it
    (``migrated``: in a migration scenario, which of its two runs)."""
    if isinstance(error, BaseException):
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        error = f"infrastructure: {first_line}"
    sample: Sample = {"mode": mode, "repetition": repetition, "guest": guest, "ok": False,
                      "verified": None, "wall_s": None, "error": error}
    if migrated is not None:
        sample["migrated"] = migrated
    return sample


def _served_from_tmem(stats: StatsReply, guest: str) -> int:
    """Swap pages the guest's tmemd served: NBD reads from tmem, or the agent's hits."""
    export = stats["nbd"].get(guest)
    reads = export["pages_read_tmem"] if export is not None else 0
    return int(reads) or int(stats["store"]["clients"][guest]["hits"])


def _usage_since(pids: list[int], before: Mapping[int, hostmetrics.ProcessUsage | None]) -> tuple[float, int] | None:
    """CPU seconds since ``before`` and peak RSS, summed over ``pids``; None if
    there are none or one is gone."""
    cpu_s, peak_rss = 0.0, 0
    for pid in pids:
        start, now = before.get(pid), hostmetrics.process_usage(pid)
        if start is None or now is None:
            return None
        cpu_s += now.cpu_s - start.cpu_s
        peak_rss += now.peak_rss_bytes
    return (cpu_s, peak_rss) if pids else None


@dataclass(frozen=True, slots=True)
class PhaseRuns:
    results: list[launcher.CommandResult]  # up to the first that failed
    wall_s: float  # host-side, all phases
    tmemd: list[TmemdCounters]  # the guest's tmemd counters before and after each phase


def _run_phases(
    guest: launcher.Guest, phases: list[Phase], timeout: float, snapshot: Callable[[], TmemdCounters] | None
) -> PhaseRuns:
    started = time.monotonic()
    results: list[launcher.CommandResult] = []
    counters = [snapshot()] if snapshot else []
    for phase in phases:
        results.append(guest.ssh(phase, timeout=timeout, check=False) if isinstance(phase, str) else phase(guest))
        if snapshot:
            counters.append(snapshot())
        if results[-1].exit_status != 0:
            break
    return PhaseRuns(results, time.monotonic() - started, counters)


def _tmemd_snapshot(tmemd: TmemdProcess, guest: str) -> Callable[[], TmemdCounters]:
    def snapshot() -> TmemdCounters:
        with tmemd.control() as control:
            return _tmemd_counters(control.stats(), guest)

    return snapshot


def _merge_passes(outputs: list[dict[str, Any]], tmemd: list[TmemdCounters]) -> dict[str, Any]:
    """One pagecache result from its one-pass readers, with tmemd's counters per pass."""
    merged = dict(outputs[-1])
    merged["passes"] = len(outputs)
    merged["pass_s"] = [s for output in outputs for s in output.get("pass_s", [])]
    merged["total_s"] = round(sum(merged["pass_s"]), 3)
    merged["bytes"] = sum(int(output.get("bytes", 0)) for output in outputs)
    merged["bad_pages"] = sum(int(output.get("bad_pages", 0)) for output in outputs)
    merged["first_bad_pages"] = [page for output in outputs for page in output.get("first_bad_pages", [])][:16]
    merged["verified"] = all(output.get("verified") is True for output in outputs)
    if tmemd:
        merged["pass_tmemd"] = [
            {key: after[key] - before[key] for key in TMEMD_COUNTERS} for before, after in zip(tmemd, tmemd[1:])
        ]
    return merged


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    results = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                results.append(json.loads(line))
    return results


def _parse_workload_output(stdout: str) -> dict[str, Any]:
    """The workload's JSON result line; a multi-burst run's bursts, merged."""
    results = _json_lines(stdout)
    if not results:
        return {"output_tail": stdout[-2000:]}
    if len(results) == 1:
        return results[0]
    return {
        "bursts": results,
        "verified": all(result.get("verified") is True for result in results),
        "total_s": round(sum(float(result.get("total_s", 0)) for result in results), 3),
    }


def _failure_text(result: launcher.CommandResult) -> str:
    tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
    return f"verification failed (exit {result.exit_status}): " + " | ".join(tail)
