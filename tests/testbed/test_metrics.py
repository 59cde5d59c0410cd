"""Metric readers against real /proc files of this machine and of a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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
        assert usage.cpu_s >= 0.25
        with hostmetrics.RssTimeline({"qemu": [child.pid], "tmemd": [os.getpid()]}, interval=0.05) as timeline:
            time.sleep(0.3)
        assert len(timeline.points) >= 3
        assert all(point[2] > 64 << 20 and point[1] > 0 for point in timeline.points)
    finally:
        child.kill()
        child.communicate()
    assert hostmetrics.process_usage(child.pid) is None
