"""One real TCG guest (256 MiB, 1 vCPU) with a real tmemd on its tmem channel."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm import accel
from tmem_host.vm.image import GuestImage
from tmem_host.vm.launcher import (
    DISK_IOPS, CommandFailedError, Guest, SshError, SshTimeoutError, VmConfig,
)
from tmem_wire.agent import DISK_SERIALS
from tmem_wire.agent import PORT_NAME as TMEM_PORT_NAME

pytestmark = [pytest.mark.vm, pytest.mark.slow]

NAME = "vmtest"
MEMORY_MIB = 256
SWAP_MIB = 384
DATA_MIB = 64


@pytest.fixture(scope="module")
def tmemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TmemdProcess]:
    with TmemdProcess(tmp_path_factory.mktemp("tmemd"), budget="64M", guests=(NAME,)) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def guest(tmemd: TmemdProcess, image: GuestImage,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    config = VmConfig(name=NAME, memory_mib=MEMORY_MIB, vcpus=1, accel="auto",
                      swap="hdd", swap_mib=SWAP_MIB, data_disk_mib=DATA_MIB, data_disk_speed="ssd",
                      tmem_socket=tmemd.abi_socket(NAME), image=image,
                      run_dir=tmp_path_factory.mktemp("guest"))
    with Guest(config) as booted:
        print(f"boot times: {booted.boot_times}")
        yield booted


def disk_by_serial(guest: Guest, serial: str) -> str:
    script = ('for d in /sys/block/*; do if [ "$(cat $d/serial 2>/dev/null)" = "%s" ]; '
              'then echo ${d##*/}; fi; done' % serial)
    return guest.ssh(script).stdout.strip()


def test_ssh_runs_commands_as_root_on_the_named_guest(guest: Guest) -> None:
    result = guest.ssh("echo hello; id -u; hostname")
    assert result.exit_status == 0
    assert result.stdout.split() == ["hello", "0", NAME]


def test_memory_limit_holds(guest: Guest) -> None:
    meminfo = dict(line.split(":", 1) for line in guest.ssh("cat /proc/meminfo").stdout.splitlines())
    total_mib = int(meminfo["MemTotal"].split()[0]) / 1024
    # The kernel keeps some of the configured RAM for itself; about 204 MiB of 256 here.
    assert MEMORY_MIB * 0.7 < total_mib < MEMORY_MIB


def test_qmp_reports_running_and_the_accelerator_verdict(guest: Guest, image: GuestImage) -> None:
    status = guest.qmp("query-status")
    assert status["status"] == "running" and status["running"] is True
    assert guest.qmp("query-kvm")["enabled"] is (accel.verdict(image).accel == "kvm")
    assert guest.accel == accel.verdict(image).accel


def test_an_emulated_cpu_has_no_rep_movsb_fast_strings(guest: Guest) -> None:
    # Under TCG the guest must not see ERMS/FSRM: its kernel would copy and clear
    # pages with rep movsb/stosb, one byte per pass of QEMU 7.2's TCG (launcher.TCG_CPU_MODEL).
    flags = guest.ssh("grep -m1 '^flags' /proc/cpuinfo").stdout.split()
    if guest.accel == "tcg":
        assert "erms" not in flags and "fsrm" not in flags, flags
        assert "sse4_2" in flags and "avx2" in flags  # the rest of -cpu max stays


def test_tmem_port_is_named_and_connected_to_tmemd(guest: Guest) -> None:
    names = guest.ssh("cat /sys/class/virtio-ports/*/name").stdout.split()
    assert TMEM_PORT_NAME in names
    port = guest.ssh(f"grep -l '^{TMEM_PORT_NAME}$' /sys/class/virtio-ports/*/name").stdout
    device = Path(port.strip()).parent.name
    assert guest.ssh(f"test -c /dev/{device}", check=False).exit_status == 0
    # QEMU's end of the channel is connected to the real tmemd socket.
    chardevs = {c["label"]: c for c in guest.qmp("query-chardev")}
    assert not chardevs["tmem0"]["filename"].startswith("disconnected")


def test_disks_are_found_by_serial_with_their_sizes(guest: Guest) -> None:
    for serial, size_mib in ((DISK_SERIALS["swap"], SWAP_MIB), (DISK_SERIALS["data"], DATA_MIB)):
        device = disk_by_serial(guest, serial)
        assert device.startswith("vd"), serial
        sectors = int(guest.ssh(f"cat /sys/block/{device}/size").stdout)
        assert sectors * 512 == size_mib << 20
    root = disk_by_serial(guest, DISK_SERIALS["root"])
    assert guest.ssh("findmnt -n -o SOURCE /").stdout.strip() == f"/dev/{root}"


def test_disk_speed_classes_are_qemu_throttles(guest: Guest) -> None:
    # The swap disk (hdd) and the data disk (ssd) share one throttling path; QEMU
    # reports the limits it enforces; the root disk is unthrottled.
    inserted = {block["device"]: block["inserted"] for block in guest.qmp("query-block")}
    assert inserted["swap"]["iops"] == DISK_IOPS["hdd"] == 200
    assert inserted["data"]["iops"] == DISK_IOPS["ssd"]
    assert inserted["root"]["iops"] == 0
    assert f"id=data,format=raw,throttling.iops-total={DISK_IOPS['ssd']}" in " ".join(guest.command)


def test_agent_source_is_shared_read_only_and_importable(guest: Guest) -> None:
    result = guest.ssh("python3 -c 'import tmem_guest, tmem_wire; "
                       "print(tmem_guest.__file__); print(tmem_wire.__file__)'")
    assert result.stdout.split() == ["/opt/tmem/guest/tmem_guest/__init__.py",
                                     "/opt/tmem/wire/tmem_wire/__init__.py"]
    assert guest.ssh("touch /opt/tmem/guest/x", check=False).exit_status != 0


def test_the_kv_phase_runs_redis_of_its_own_in_the_guest(guest: Guest) -> None:
    """The density scenario's kv phase: the image's redis-server and redis-benchmark,
    driven by tmem_workloads.kv inside the guest, every value read back."""
    result = guest.ssh("python3 -m tmem_workloads.kv --start-server --mib 4 --requests 300 --clients 2",
                       timeout=300)
    figures = json.loads(result.stdout)
    assert figures["verified"] and figures["dbsize"] == (4 << 20) // 4000
    assert figures["latency"]["requests"] == 300 and figures["latency"]["p99_ms"] > 0
    assert guest.ssh("pgrep -x redis-server", check=False).exit_status != 0  # shut down with the phase


def test_reclaim_sysctls_are_applied(guest: Guest) -> None:
    values = guest.ssh("cat /proc/sys/vm/min_free_kbytes /proc/sys/vm/watermark_scale_factor")
    assert values.stdout.split() == ["16384", "1000"]


def test_files_go_in_and_out(guest: Guest, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    local = tmp_path / "payload"
    local.write_bytes(payload)
    guest.put_file(local, "/tmp/payload")
    digest = guest.ssh("sha256sum /tmp/payload").stdout.split()[0]
    assert digest == hashlib.sha256(payload).hexdigest()
    back = tmp_path / "back"
    guest.get_file("/tmp/payload", back)
    assert back.read_bytes() == payload
    with pytest.raises(SshError, match="no/such/file"):
        guest.get_file("/no/such/file", tmp_path / "never")


def test_command_failures_and_timeouts_are_reported(guest: Guest) -> None:
    with pytest.raises(CommandFailedError) as failure:
        guest.ssh("echo out; echo err >&2; exit 3")
    assert failure.value.result.exit_status == 3
    assert failure.value.result.stdout == "out\n" and failure.value.result.stderr == "err\n"
    assert guest.ssh("exit 4", check=False).exit_status == 4
    assert guest.ssh("cat", input=b"through stdin").stdout == "through stdin"
    with pytest.raises(SshTimeoutError):
        guest.ssh("sleep 30", timeout=1.0)
    assert guest.ssh("echo still usable").stdout == "still usable\n"


def test_console_shows_the_readiness_marker(guest: Guest) -> None:
    assert "TMEM-GUEST-READY" in guest.console_text()
    assert guest.boot_times.marker is not None and guest.boot_times.ssh is not None


def test_sysrq_dumps_reach_the_console_and_quiet_returns(guest: Guest) -> None:
    dump = guest.sysrq("m")
    assert "sysrq: Show Memory" in dump and "Mem-Info:" in dump
    assert guest.ssh("cat /proc/sys/kernel/printk").stdout.split()[0] == "4"
