"""A running TCG guest live-migrated between two tmemds mid-workload, on the block
path (docs/REMOTE.md, "Handing a guest off"): host a's QEMU swaps on host a's NBD
export, host b's QEMU waits with -incoming on host b's export; QMP migrate, then
the handoff (a fences the guest's namespace and writes its state, remote pages
by key), the restore on b (it takes the namespace over), and the destination
runs on. The checksummed workload must verify every page, some of them served by
b from the cluster and from what a handed over."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.remote.cluster import LocalCluster
from tmem_host.replies import NbdExportStats
from tmem_host.vm.guestops import enable_disk_swap, install_guest_code, io_errors
from tmem_host.vm.launcher import Guest, VmConfig, create_root_overlay
from tmem_host.waiting import wait_until

from ..daemon.test_control import ok, tmemctl
from .test_remote_control import remote

GUEST_MEMORY_MIB = 256
WORKLOAD_MIB = 384  # 1.5x the guest's RAM: a large part swaps out, and back in to verify
OUTPUT = "/root/usemem.out"


def export_stats(daemon: TmemdProcess) -> NbdExportStats:
    with daemon.control() as control:
        return control.stats()["nbd"]["g1"]


@pytest.mark.vm
@pytest.mark.slow
def test_a_guest_migrated_mid_workload_on_the_block_path_verifies_every_page(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    hosts = {name: TmemdProcess(tmp_path / name, budget="48M", guests=("g1",), nbd_size="1G",
                                extra_args=["--remote", redis_cluster.seed_spec, "--host-id", name])
             for name in ("a", "b")}
    handoff = tmp_path / "g1.handoff"
    try:
        a, b = hosts["a"].start(), hosts["b"].start()
        config = VmConfig(name="g1", memory_mib=GUEST_MEMORY_MIB, swap="nbd", nbd_socket=a.nbd_socket("g1"),
                          nbd_export="g1", share_agent=False, run_dir=tmp_path / "vm-a",
                          root_overlay=create_root_overlay(tmp_path / "root.qcow2"))
        with Guest(config) as source:
            install_guest_code(source)
            enable_disk_swap(source)
            source.ssh(f"setsid -f sh -c 'python3 -m tmem_workloads.usemem --mib {WORKLOAD_MIB} "
                       f"> {OUTPUT}.tmp 2>&1; mv {OUTPUT}.tmp {OUTPUT}' < /dev/null > /dev/null 2>&1")
            # Mid-workload: pages in a's memory and in the cluster.
            assert wait_until(lambda: export_stats(a)["pages_put_tmem"] > 8000
                              and remote(a)["remote_pages"] > 0, 300, interval=1.0), export_stats(a)
            destination = Guest(replace(config, nbd_socket=b.nbd_socket("g1"), run_dir=tmp_path / "vm-b",
                                        incoming=f"unix:{tmp_path / 'migrate.sock'}",
                                        ssh_key_from=source.key_path))
            destination.start()
            try:
                migration = source.migrate_to(destination)
                source.kill()  # stopped after the switch; its NBD connection to a closes
                line = ok(tmemctl(a, "handoff", "g1", str(handoff)))
                # The destination QEMU waits, connected and idle: the restore takes it.
                ok(tmemctl(b, "restore", str(handoff)))
                destination.resume_migrated()
                assert wait_until(lambda: destination.ssh(f"test -f {OUTPUT}", check=False).exit_status == 0,
                                  600, interval=2.0)
                output = destination.ssh(f"cat {OUTPUT}").stdout
                errors = io_errors(destination)
            finally:
                destination.shutdown()
        usemem = json.loads(output.strip().splitlines()[-1])
        assert usemem["verified"] and usemem["pages"] == WORKLOAD_MIB * 256, output
        assert errors == [], errors
        served = export_stats(b)
        figures = remote(b)
        assert served["pages_read_tmem"] > 0 and served["read_errors"] == 0, served
        assert figures["gets"] > 0 and figures["get_errors"] == figures["get_missing"] == 0, figures
        assert remote(a)["fenced"]
        print(f"\nlive migration mid-usemem ({WORKLOAD_MIB} MiB in {GUEST_MEMORY_MIB} MiB): "
              f"total {migration.get('total-time')} ms, downtime {migration.get('downtime')} ms, "
              f"RAM {migration.get('ram', {}).get('transferred', 0) >> 20} MiB; {line.strip()}; "
              f"b read {served['pages_read_tmem']} pages from tmem ({figures['gets']} from the cluster)")
    finally:
        for daemon in hosts.values():
            daemon.terminate()
        redis_cluster.flushall()
