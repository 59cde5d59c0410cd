"""Two guests at once, one swapping on tmemd's NBD export; both power off cleanly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.image import GuestImage
from tmem_host.vm.launcher import Guest, VmConfig
from tmem_wire.agent import DISK_SERIALS

from .conftest import processes_mentioning

pytestmark = [pytest.mark.vm, pytest.mark.slow]

NBD_EXPORT_MIB = 200


def test_two_guests_boot_together_and_power_off_cleanly(image: GuestImage, tmp_path: Path) -> None:
    with TmemdProcess(tmp_path / "tmemd", budget="64M", guests=("left", "right"),
                      extra_args=["--nbd-size", f"{NBD_EXPORT_MIB}M"]) as daemon:
        guests = [
            Guest(VmConfig(name="left", image=image, accel="tcg", swap="nbd",
                           nbd_socket=daemon.nbd_socket("left"), nbd_export="left",
                           run_dir=tmp_path / "left")),
            Guest(VmConfig(name="right", image=image, accel="tcg", swap="ssd", swap_mib=128,
                           tmem_socket=daemon.abi_socket("right"),
                           run_dir=tmp_path / "right")),
        ]
        try:
            for guest in guests:
                guest.start()  # both boot while we wait for the first
            for guest in guests:
                guest.wait_ready()
                print(f"{guest.config.name}: {guest.boot_times}")
            assert guests[0].run_dir != guests[1].run_dir
            assert guests[0].ssh_port != guests[1].ssh_port
            assert [g.ssh("hostname").stdout.strip() for g in guests] == ["left", "right"]
            swap_sizes = [
                g.ssh(f"for d in /sys/block/vd*; do if [ $(cat $d/serial) = {DISK_SERIALS['swap']} ];"
                      " then cat $d/size; fi; done").stdout.strip() for g in guests]
            assert [int(s) * 512 for s in swap_sizes] == [NBD_EXPORT_MIB << 20, 128 << 20]
            pids = [g.pid for g in guests]
            results = [g.shutdown() for g in guests]
        finally:
            for guest in guests:
                guest.kill()
    assert [(r.exit_code, r.method) for r in results] == [(0, "poweroff"), (0, "poweroff")]
    for pid, guest in zip(pids, guests):
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert processes_mentioning(str(guest.run_dir)) == []
        for log in ("console.log", "qemu-stderr.log", "qmp.log"):
            assert (guest.run_dir / log).is_file()
        assert not (guest.run_dir / "swap.img").exists()  # scratch disks go with QEMU
    assert "tmem-init: shutting down" in guests[0].console_text()
