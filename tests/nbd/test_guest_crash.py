"""A graceful restart (SIGTERM, as `systemctl restart` or an upgrade does it) and a
kill -9 of tmemd while a TCG guest swaps through its NBD export, each followed by a
start on the same state dir: QEMU reconnects and reruns the requests in flight, the
workload completes and verifies every page, and the guest sees no I/O error."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.guestops import enable_disk_swap, io_errors, run_in_cgroup
from tmem_host.vm.launcher import CommandResult, Guest, VmConfig

from .conftest import export_stats

GUEST_MEMORY_MIB = 256
# Twice what the workload may keep in RAM: half of it swaps out and back in.
WORKLOAD_MIB = 192
CGROUP_MEMORY_MAX = "96M"
# Restart tmemd once this many swap slots are in tmem: mid-workload, with pages to lose.
RESTART_AFTER_SLOTS = 3000
# Then kill it once the restarted tmemd took this many more pages.
CRASH_AFTER_PUTS = 2000


@pytest.mark.vm
@pytest.mark.slow
def test_guest_swap_survives_a_graceful_restart_and_a_kill_9_of_tmemd(tmp_path: Path) -> None:
    with TmemdProcess(tmp_path / "run", budget="1G", guests=("g1",), nbd_size="1G") as daemon:
        config = VmConfig(name="g1", memory_mib=GUEST_MEMORY_MIB, swap="nbd",
                          nbd_socket=daemon.nbd_socket("g1"), nbd_export="g1",
                          run_dir=tmp_path / "vm")
        with Guest(config) as guest:
            enable_disk_swap(guest)
            results: list[CommandResult] = []
            workload = threading.Thread(target=lambda: results.append(run_in_cgroup(
                guest, f"python3 -m tmem_workloads.usemem --mib {WORKLOAD_MIB}",
                CGROUP_MEMORY_MAX, timeout=600)))
            workload.start()
            try:
                daemon.restart(
                    downtime=2.0, wait_s=300,
                    when=lambda: not workload.is_alive()
                    or export_stats(daemon, "g1")["slots_in_tmem"] >= RESTART_AFTER_SLOTS)
                restored = export_stats(daemon, "g1")["slots_in_tmem"]
                daemon.crash_and_restart(
                    downtime=2.0, wait_s=300,
                    when=lambda: not workload.is_alive()
                    or export_stats(daemon, "g1")["pages_put_tmem"] >= CRASH_AFTER_PUTS)
            finally:
                workload.join(600)
            assert results, "the workload did not finish"
            result = results[0]
            assert result.exit_status == 0, f"{result.stdout}\n{result.stderr}"
            outcome = json.loads(result.stdout.strip().splitlines()[-1])
            errors = io_errors(guest)
        assert outcome["verified"] and outcome["pages"] == WORKLOAD_MIB * 256
        assert errors == [], errors
        with daemon.control() as control:
            stats = control.request("stats")
    journal = stats["journal"]["g1"]
    nbd = stats["nbd"]["g1"]
    # Stopped mid-workload: thousands of pages came back and were read.
    assert restored >= RESTART_AFTER_SLOTS, restored
    assert journal["replayed_pages"] >= RESTART_AFTER_SLOTS, journal
    assert nbd["pages_read_tmem"] > 0 and nbd["read_errors"] == 0, nbd
    print(f"\ngraceful restart with {restored} slots in tmem, kill -9 with "
          f"{journal['replayed_pages']}: workload "
          f"{outcome['total_s']} s, journal {journal['size_bytes'] >> 20} MiB, "
          f"replay {journal['replay_s']} s, reconnects: {nbd['connections_total']} connections")
