"""Cleancache through the agent's FUSE mount in a real TCG guest.

The reader runs in a cgroup whose memory.max is far below the file set, so its
page cache cannot hold the set: the second pass must come back through the
agent, and tmem must serve it.
"""

from __future__ import annotations

import shlex

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.launcher import Guest

from .conftest import agent_stats, pool_by_id, run_in_cgroup, start_agent, stop_agent

pytestmark = [pytest.mark.vm, pytest.mark.slow]

BACKING = "/data/files"
MOUNT = "/mnt/cache"
FILE_COUNT = 24
FILE_MIB = 2  # 48 MiB of files
READER_CGROUP_MAX = "16M"  # the reader's page cache holds a third of the set at most
PAGES_PER_FILE = FILE_MIB * 256

PREPARE_DATA_DISK = f"""
set -e
disk=
for d in /sys/block/*; do [ "$(cat $d/serial 2>/dev/null)" = tmem-data ] && disk=/dev/$(basename $d); done
mountpoint -q /data || {{ mkfs.ext4 -q -F $disk; mkdir -p /data; mount $disk /data; }}
rm -rf {BACKING}; mkdir -p {BACKING}
for i in $(seq {FILE_COUNT}); do head -c {FILE_MIB * 1024 * 1024 - 1000} /dev/urandom > {BACKING}/f$i; done
cd {BACKING} && md5sum f* > /tmp/backing.md5
sync; echo 3 > /proc/sys/vm/drop_caches
"""


def read_all_and_check(guest: Guest) -> None:
    run_in_cgroup(guest, f"sh -c 'cd {MOUNT} && md5sum -c --quiet /tmp/backing.md5'", READER_CGROUP_MAX, 300).stdout


def test_second_pass_hits_in_tmem_and_rewrites_are_never_stale(guest: Guest, tmemd: TmemdProcess) -> None:
    guest.ssh(f"sh -c {shlex.quote(PREPARE_DATA_DISK)}", timeout=120)
    agent = start_agent(guest, f"--cache {BACKING} {MOUNT}")
    try:
        read_all_and_check(guest)
        first = agent_stats(guest)["cache"]["counters"]
        read_all_and_check(guest)
        second = agent_stats(guest)["cache"]["counters"]
        # Overwrite part of a file (the pages it touches must be invalidated), grow
        # another, truncate a third, replace a fourth by rename: each must read back new.
        guest.ssh(
            f"cd {MOUNT} && dd if=/dev/zero of=f1 bs=4096 seek=7 count=3 conv=notrunc status=none && "
            f"printf tail >> f2 && truncate -s 5000 f3 && head -c 100000 /dev/urandom > new && mv new f4 && "
            f"cd {BACKING} && md5sum f* > /tmp/backing.md5"
        )
        read_all_and_check(guest)
        third = agent_stats(guest)["cache"]
    finally:
        stop_agent(guest, agent)
    set_pages = FILE_COUNT * PAGES_PER_FILE
    assert first["misses"] >= set_pages * 0.9 and first["puts"] >= set_pages * 0.9, first
    hits = second["hits"] - first["hits"]
    assert hits >= set_pages * 0.5, (first, second)  # the reader's page cache could hold at most a third
    assert third["counters"]["flushes"] > 0 and third["counters"]["errors"] == 0, third
    assert pool_by_id(tmemd, third["pool_id"])["hits"] >= hits
