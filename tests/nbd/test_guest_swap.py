"""A real TCG guest swaps on tmemd's NBD export through QEMU's NBD client."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.guestops import enable_disk_swap
from tmem_host.vm.launcher import Guest, VmConfig, SwapKind
from tmem_host.waiting import wait_until

from .conftest import export_stats

GUEST_MEMORY_MIB = 256
# 1.5x the guest's RAM: well over what fits, so a large part must swap out and back.
WORKLOAD_MIB = 384
CAP = "32M"


def run_swap_workload(guest: Guest) -> dict[str, Any]:
    """Swap on the guest's swap disk, run the checksummed page toucher, return its result."""
    enable_disk_swap(guest)
    started = time.monotonic()
    result = guest.ssh(f"python3 -m tmem_workloads.usemem --mib {WORKLOAD_MIB}",
                       timeout=600, check=False)
    wall_s = time.monotonic() - started
    swaps = guest.ssh("cat /proc/swaps").stdout
    assert result.exit_status == 0, f"{result.stdout}\n{result.stderr}\n{swaps}"
    outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    outcome["wall_s"] = round(wall_s, 1)
    return outcome


def boot(name: str, swap: SwapKind, run_dir: Path, daemon: TmemdProcess | None = None) -> Guest:
    config = VmConfig(name=name, memory_mib=GUEST_MEMORY_MIB, swap=swap, swap_mib=1024,
                      run_dir=run_dir / f"vm-{name}-{swap}")
    if daemon is not None:
        config.nbd_socket = daemon.nbd_socket(name)
        config.nbd_export = name
    return Guest(config)


@pytest.mark.vm
@pytest.mark.slow
def test_guest_swaps_on_the_export_with_and_without_a_cap(tmp_path: Path) -> None:
    with TmemdProcess(tmp_path / "run", budget="1G", guests=("g1", f"capped:cap={CAP}"),
                      nbd_size="1G") as daemon:
        with boot("g1", "nbd", tmp_path, daemon) as guest:
            outcome = run_swap_workload(guest)
        assert outcome["verified"] and outcome["pages"] == WORKLOAD_MIB * 256
        # Linux discards freed clusters from a worker: give it a moment.
        wait_until(lambda: export_stats(daemon, "g1")["slots_in_tmem"] < WORKLOAD_MIB * 256 // 10, 30, 0.5)
        stats = export_stats(daemon, "g1")
        assert stats["pages_put_tmem"] > 10_000 and stats["pages_read_tmem"] > 10_000
        assert stats["pages_refused_fallback"] == 0 and stats["read_errors"] == 0
        assert stats["protocol_errors"] == 0
        # swapon --discard reaches tmemd as NBD TRIM (discard=unmap on the blockdev),
        # and not only once at swapon: the export is marked non-rotational in the
        # guest, so Linux discards each swap cluster its slots were all freed from.
        # The slots the workload freed when it exited left tmem (a rotational
        # export kept over 100,000 of them).
        assert stats["trims"] > 10 and stats["pages_discarded"] > 0, stats
        assert stats["slots_in_tmem"] < stats["pages_put_tmem"] // 10, stats
        print(f"\ndiscards: {stats['trims']} trims, {stats['pages_discarded']} pages, "
              f"{stats['slots_in_tmem']} slots still in tmem")

        with boot("capped", "nbd", tmp_path, daemon) as guest:
            capped = run_swap_workload(guest)
        assert capped["verified"]
        capped_stats = export_stats(daemon, "capped")
        assert capped_stats["pages_refused_fallback"] > 10_000
        assert capped_stats["pages_read_fallback"] > 1_000 and capped_stats["pages_put_tmem"] > 0
        assert capped_stats["read_errors"] == 0
    print(f"\nNBD swap, {WORKLOAD_MIB} MiB in a {GUEST_MEMORY_MIB} MiB guest: "
          f"uncapped {outcome['total_s']} s ({json.dumps(stats['request_pages_histogram'])}), "
          f"cap {CAP} {capped['total_s']} s")
