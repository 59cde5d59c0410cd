"""Metric readers against real /proc files of this machine and of a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tmem_guest import snapshot
from tmem_host.testbed import hostmetrics


def test_guest_snapshot_parsers() -> None:
    vmstat = snapshot.read_vmstat("nr_free_pages 5\npswpin 12\npswpout 34\npgmajfault 7\n")
    assert vmstat == {"pswpin": 12, "pswpout": 34, "pgmajfault": 7}
    psi = snapshot.read_psi(
        "some avg10=1.50 avg60=0.00 avg300=0.00 total=1234\nfull avg10=0.25 avg60=0.00 avg300=0.00 total=99\n"
    )
    assert psi["some_avg10"] == 1.5 and psi["some_total_us"] == 1234 and psi["full_total_us"] == 99
    meminfo = snapshot.read_meminfo("MemTotal:  204800 kB\nFoo: 1 kB\nSwapFree: 8 kB\n")
    assert meminfo == {"MemTotal": 204800 * 1024, "SwapFree": 8192}


def test_guest_snapshot_reads_this_kernel() -> None:
    taken = snapshot.snapshot()
    assert isinstance(taken["vmstat"], dict) and "pswpout" in taken["vmstat"]
    assert isinstance(taken["meminfo"], dict) and taken["meminfo"]["MemTotal"] > 0


def test_process_usage_sees_cpu_and_memory_of_a_child() -> None:
    # The child allocates 64 MiB and burns CPU; its usage must show both.
    child = subprocess.Popen(
        [sys.executable, "-c", "b = bytearray(64 << 20); b[::4096] = b'x' * (len(b) // 4096)\n"
         "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
         "print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        usage = hostmetrics.process_usage(child.pid)
        assert usage is not None
        assert usage.rss_bytes > 64 << 20 and usage.peak_rss_bytes >= usage.rss_bytes
        assert usage.cpu_s >= 0.25 and usage.guest_cpu_s == 0  # no KVM vCPU in it
        with hostmetrics.MemoryTimeline({"qemu": [child.pid], "tmemd": [os.getpid()]}, interval=0.05) as timeline:
            time.sleep(0.3)
        assert len(timeline.points) >= 3
        assert all(point[2] > 64 << 20 and point[1] > 0 for point in timeline.points)
    finally:
        child.kill()
        child.communicate()
    assert hostmetrics.process_usage(child.pid) is None


def _written(path: Path, size: int) -> None:
    with path.open("wb") as file:
        file.write(os.urandom(size))
        file.flush()
        os.fsync(file.fileno())


def test_cached_bytes_follows_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "image"
    _written(path, 8 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean after the fsync: dropped
        assert hostmetrics.cached_bytes(fd) < 1 << 20
        os.pread(fd, 4 << 20, 0)
        assert 4 << 20 <= hostmetrics.cached_bytes(fd) <= 8 << 20
    finally:
        os.close(fd)
    empty = tmp_path / "empty"
    empty.touch()
    fd = os.open(empty, os.O_RDONLY)
    try:
        assert hostmetrics.cached_bytes(fd) == 0
    finally:
        os.close(fd)


def test_the_timeline_counts_each_open_file_once_by_role(tmp_path: Path) -> None:
    # A "QEMU" holding a disk image and the shared root image open, a "tmemd"
    # holding the same disk image (counted once, for QEMU) and a journal of its own;
    # the disk image deleted, as QEMU's snapshot overlay is.
    shared = tmp_path / "images"
    shared.mkdir()
    disk, root, journal = tmp_path / "disk.img", shared / "rootfs.ext4", tmp_path / "journal"
    for path, size in ((disk, 6 << 20), (root, 3 << 20), (journal, 2 << 20)):
        _written(path, size)
        with path.open("rb") as file:
            file.read()
    hold = "import sys, time\nfiles = [open(p, 'rb') for p in sys.argv[1:]]\nprint('ready', flush=True)\ntime.sleep(30)"
    qemu = subprocess.Popen([sys.executable, "-c", hold, str(disk), str(root)], stdout=subprocess.PIPE)
    tmemd = subprocess.Popen([sys.executable, "-c", hold, str(disk), str(journal)], stdout=subprocess.PIPE)
    try:
        for child in (qemu, tmemd):
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        disk.unlink()
        timeline = hostmetrics.MemoryTimeline({"qemu": [qemu.pid], "tmemd": [tmemd.pid]}, image_dir=shared)
        row = dict(zip(hostmetrics.MEMORY_COMPONENTS, timeline.sample()))
        assert row["guest_file_cache"] == 6 << 20
        assert row["root_image_cache"] == 3 << 20
        assert row["tmemd_file_cache"] == 2 << 20
        assert row["qemu_rss"] > 0 and row["tmemd_rss"] > 0 and row["redis_rss"] == 0
    finally:
        for child in (qemu, tmemd):
            child.kill()
            child.communicate()


def test_component_peaks_reads_both_row_layouts() -> None:
    legacy = [[0.0, 10, 20], [0.5, 30, 5]]
    assert hostmetrics.component_peaks(legacy) == {"tmemd_rss": 30, "qemu_rss": 20, "total": 35}
    rows = [[0.0, 1, 2, 0, 4, 0, 8], [0.5, 2, 1, 0, 9, 0, 8]]
    peaks = hostmetrics.component_peaks(rows)
    # The shared root image is not the run's own: left out of the total.
    assert peaks["guest_file_cache"] == 9 and peaks["root_image_cache"] == 8 and peaks["total"] == 12
    assert hostmetrics.component_peaks([]) == {}
