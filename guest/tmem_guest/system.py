"""Guest system plumbing: memory locking, IO_FLUSHER, VM sysctls, disks by serial.

Why: the swap agent sits on the guest's own reclaim path. If it page-faults or
its kernel allocations wait on reclaim, reclaim waits on the agent: deadlock
(measured, docs/AGENT.md). mlockall keeps its memory resident, PR_SET_IO_FLUSHER
makes its allocations GFP_NOIO, and larger free-memory watermarks leave the
kernel room for the bounce buffers and socket buffers the agent's I/O needs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import stat
import sys
from pathlib import Path

MCL_CURRENT = 1
MCL_FUTURE = 2
PR_SET_IO_FLUSHER = 57

# The tuning that (with mlock and IO_FLUSHER) kept a Python NBD agent alive in a
# 256 MiB TCG guest (docs/PROTOTYPE.md).
SWAP_AGENT_SYSCTLS = {
    "vm/min_free_kbytes": "16384",
    "vm/watermark_scale_factor": "1000",
}


# Allocator settings for the swap agent's process (read at interpreter start, so
# the agent re-executes itself with them). Memory the agent frees must stay in its
# locked heap and be reused: pymalloc returns empty 1 MiB arenas with munmap and
# glibc serves big blocks (a 128 KiB batch frame) with mmap/munmap and trims the
# heap top, and every fresh mapping is a fault-in (MCL_FUTURE locks it) that needs
# free guest pages exactly when reclaim is waiting on the agent. So: plain malloc
# for Python objects, one arena (not one per thread), nothing mmapped below 32 MiB,
# no trimming, and a pad that grows the heap in 8 MiB steps.
ALLOCATOR_ENVIRONMENT = {
    "PYTHONMALLOC": "malloc",
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),
    "MALLOC_TOP_PAD_": str(8 * 1024 * 1024),
}


def with_allocator_settings() -> bool:
    """True if this process started with ALLOCATOR_ENVIRONMENT."""
    return all(os.environ.get(name) == value for name, value in ALLOCATOR_ENVIRONMENT.items())


def reexec_with_allocator_settings(module: str, arguments: list[str]) -> None:
    """Replace this process by `python3 -m MODULE ARGUMENTS` with ALLOCATOR_ENVIRONMENT."""
    environment = {**os.environ, **ALLOCATOR_ENVIRONMENT}
    os.execve(sys.executable, [sys.executable, "-m", module, *arguments], environment)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def lock_memory() -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE): the agent must never wait on its own swap."""
    if _libc().mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mlockall: {os.strerror(error)}")


def become_io_flusher() -> None:
    """prctl(PR_SET_IO_FLUSHER, 1): this process's allocations no longer recurse into I/O."""
    if _libc().prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_IO_FLUSHER): {os.strerror(error)}")


# File systems whose regular files live in swappable memory (shmem).
SWAP_BACKED_FILESYSTEMS = frozenset({"tmpfs", "devtmpfs"})


def swap_backed_outputs(fds: tuple[int, ...] = (1, 2), mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """The descriptors among `fds` that are regular files on a swap-backed file system.

    A swap agent must not write to one: once the file's last page is swapped out
    (through the agent's own device), the next write waits for a swap-in the agent
    itself must serve. Returned as "fd N: PATH on FSTYPE MOUNTPOINT" for the error.
    """
    mounts: dict[str, tuple[str, str]] = {}
    for line in mountinfo.read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        words = fields.split()
        mounts[words[2]] = (tail.split()[0], words[4])  # major:minor -> (fstype, mount point)
    found = []
    for fd in fds:
        try:
            status = os.fstat(fd)
        except OSError:
            continue
        if not stat.S_ISREG(status.st_mode):
            continue
        fstype, mount_point = mounts.get(f"{os.major(status.st_dev)}:{os.minor(status.st_dev)}", ("", ""))
        if fstype in SWAP_BACKED_FILESYSTEMS:
            found.append(f"fd {fd}: {os.readlink(f'/proc/self/fd/{fd}')} on {fstype} {mount_point}")
    return found


def write_sysctls(settings: dict[str, str], proc_sys: Path = Path("/proc/sys")) -> None:
    for name, value in settings.items():
        (proc_sys / name).write_text(value)


def find_disk_by_serial(serial: str, sysfs: Path = Path("/sys/block")) -> Path:
    """The /dev node of the virtio-blk disk whose serial is `serial` (names follow PCI order)."""
    for entry in sorted(sysfs.glob("*")):
        serial_file = entry / "serial"
        if serial_file.is_file() and serial_file.read_text().strip() == serial:
            return Path("/dev") / entry.name
    raise FileNotFoundError(f"no disk with serial {serial!r} under {sysfs}")


def aligned_buffer(size: int) -> mmap.mmap:
    """A page-aligned anonymous buffer, as O_DIRECT needs; allocated once, reused."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
