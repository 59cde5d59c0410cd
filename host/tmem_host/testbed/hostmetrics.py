"""Host-side cost of a run: CPU time and resident memory of tmemd and each QEMU,
read from /proc, plus a sampled timeline of the host memory the run takes by
component, page cache included (the "host memory over time" plot)."""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    cpu_s: float  # user + system
    rss_bytes: int
    peak_rss_bytes: int  # VmHWM: the high-water mark since the process started
    guest_cpu_s: float = 0.0  # of cpu_s, the time its KVM vCPUs ran in guest mode


def process_usage(pid: int) -> ProcessUsage | None:
    """None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            stat = stat_file.read()
        with open(f"/proc/{pid}/status") as status_file:
            status = status_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields after the parenthesised command name, which may contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, guest_time = int(fields[11]), int(fields[12]), int(fields[40])
    memory = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            memory[name] = int(rest.split()[0]) * 1024
    return ProcessUsage(
        cpu_s=(utime + stime) / _CLOCK_TICKS,
        rss_bytes=memory.get("VmRSS", 0),
        peak_rss_bytes=memory.get("VmHWM", 0),
        guest_cpu_s=guest_time / _CLOCK_TICKS,
    )


@dataclass(frozen=True, slots=True)
class HostCpu:
    """The host's CPU time since boot, from /proc/stat's "cpu" line (clock ticks)."""
    busy: int  # every state but idle and iowait
    total: int

    @classmethod
    def now(cls) -> HostCpu:
        with open("/proc/stat") as stat_file:
            fields = [int(field) for field in stat_file.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        total = sum(fields[:8])
        return cls(busy=total - fields[3] - fields[4], total=total)

    def busy_since(self, earlier: HostCpu) -> float:
        """The share of all the host's cores that was busy between the two readings."""
        return (self.busy - earlier.busy) / max(1, self.total - earlier.total)


# What a timeline row holds after its time (seconds since the start), in bytes:
# resident memory of tmemd, of the guests' QEMUs (summed) and of a remote mode's
# Redis nodes; then the host page cache the files those processes hold open take
# (mincore): the guests' disk images (the swap a disk mode writes lands here: "let
# the host cache it" is memory too), tmemd's files (journal, NBD fallback), and the
# cached root image every guest boots from (shared, the same in every mode).
MEMORY_COMPONENTS = ("tmemd_rss", "qemu_rss", "redis_rss", "guest_file_cache", "tmemd_file_cache",
                     "root_image_cache")
# Runs recorded before the file caches were sampled have rows [seconds, tmemd_rss, qemu_rss].
LEGACY_COMPONENTS = MEMORY_COMPONENTS[:2]
# Not the run's own: every mode boots from the same root image (650-700 MiB of it
# cached here), so a run's total leaves it out and the reports show it apart.
SHARED_COMPONENTS = ("root_image_cache",)


def row_components(point: Sequence[float]) -> dict[str, float]:
    """A timeline row's components by name, for rows of either layout."""
    names = MEMORY_COMPONENTS if len(point) > len(LEGACY_COMPONENTS) + 1 else LEGACY_COMPONENTS
    return dict(zip(names, point[1:]))


def run_total(point: Sequence[float]) -> float:
    """The host memory a timeline row says the run took: all but SHARED_COMPONENTS."""
    return sum(value for name, value in row_components(point).items() if name not in SHARED_COMPONENTS)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def cached_bytes(fd: int) -> int:
    """Bytes of the file open at ``fd`` that are in the host page cache (mincore(2)
    over a read-only mapping, which faults nothing in)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address == _MAP_FAILED:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    try:
        pages = (size + _PAGE_SIZE - 1) // _PAGE_SIZE
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(address, size, vector) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        resident = bytes(vector)
        # Only bit 0 means anything (the others are reserved and zero).
        return (pages - resident.count(0)) * _PAGE_SIZE
    finally:
        _libc.munmap(address, size)


def open_files(pid: int) -> list[str]:
    """/proc paths of the regular files ``pid`` holds open (deleted ones too: the
    /proc link opens the file itself); empty when the process is gone."""
    directory = f"/proc/{pid}/fd"
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    files = []
    for name in names:
        path = f"{directory}/{name}"
        try:
            if stat.S_ISREG(os.stat(path).st_mode):
                files.append(path)
        except OSError:  # closed meanwhile
            continue
    return files


@dataclass
class FileCacheCounter:
    """Page cache of the files a set of processes holds open, each file (by inode)
    counted once per sample; ``shared_under``: files whose target lies in this
    directory (the image cache) count apart."""

    shared_under: Path | None = None

    def sample(self, pids: Iterable[int], seen: set[tuple[int, int]]) -> tuple[int, int]:
        """(bytes of the processes' own files, bytes of shared ones); ``seen``: the
        inodes already counted in this sample (by another role), updated."""
        own = shared = 0
        for pid in pids:
            for path in open_files(pid):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    status = os.fstat(fd)
                    identity = (status.st_dev, status.st_ino)
                    if identity in seen:
                        continue
                    seen.add(identity)
                    cached = cached_bytes(fd)
                except OSError:
                    continue
                finally:
                    os.close(fd)
                if self._shared(path):
                    shared += cached
                else:
                    own += cached
        return own, shared

    def _shared(self, path: str) -> bool:
        if self.shared_under is None:
            return False
        try:
            target = Path(os.readlink(path))
        except OSError:
            return False
        return target.is_relative_to(self.shared_under)


class SamplerThread:
    """A context manager that runs ``self._run()`` in a thread it owns: entering
    starts it, leaving sets ``self._stop`` and joins it, and an error the thread
    stored in ``self._error`` is raised again (unless one is on its way already)."""

    _stop: threading.Event
    _thread: threading.Thread | None = None
    _error: BaseException | None = None
    thread_name = "sampler"

    def _run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None and exc_info[0] is None:
            raise self._error


@dataclass
class MemoryTimeline(SamplerThread):
    """Samples the host memory a run takes every ``interval`` seconds in a thread:
    one row per sample, [seconds since start, *MEMORY_COMPONENTS].

    ``processes`` maps a role ("tmemd", "qemu", "redis") to pids; ``image_dir``
    is where the shared root image lives (its page cache counts as root_image_cache).
    """

    processes: Mapping[str, list[int]]
    interval: float = 0.5
    image_dir: Path | None = None
    points: list[list[float]] = field(default_factory=list)
    thread_name = "memory-timeline"

    def _rss(self, role: str) -> int:
        total = 0
        for pid in self.processes.get(role, []):
            usage = process_usage(pid)
            total += usage.rss_bytes if usage else 0
        return total

    def sample(self) -> list[int]:
        """One row's components (MEMORY_COMPONENTS order)."""
        files = FileCacheCounter(self.image_dir)
        seen: set[tuple[int, int]] = set()
        guest_files, root_image = files.sample(self.processes.get("qemu", []), seen)
        tmemd_files, _ = files.sample(self.processes.get("tmemd", []), seen)
        return [self._rss("tmemd"), self._rss("qemu"), self._rss("redis"), guest_files, tmemd_files, root_image]

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            row = self.sample()
            self.points.append([round(time.monotonic() - started, 2), *row])
            if self._stop.wait(self.interval):
                return


def component_peaks(points: Sequence[Sequence[float]]) -> dict[str, int]:
    """Each component's peak over a timeline, and ``total``: the peak of the run's
    own (run_total) at one instant: what the host had to have for it."""
    peaks: dict[str, int] = {}
    total = 0
    for point in points:
        for name, value in row_components(point).items():
            peaks[name] = max(peaks.get(name, 0), int(value))
        total = max(total, int(run_total(point)))
    if points:
        peaks["total"] = total
    return peaks
