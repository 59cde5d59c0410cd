"""Things the host does inside a booted guest over SSH: swap on a disk, start and
stop the tmem agent, read its counters, run a command in a memory cgroup.

One place for them, used by the testbed runner and the guest tests alike.
"""

from __future__ import annotations

import io
import json
import shlex
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tmem_host.vm.launcher import CommandResult, Guest
from tmem_host.vm.recipe import REPO_ROOT
from tmem_wire.agent import AGENT_LOG_FILE, AGENT_READY_FILE, AGENT_RUN_DIR, DISK_SERIALS

CGROUP_ROOT = "/sys/fs/cgroup"


def install_guest_code(guest: Guest) -> None:
    """Copy the agent, the workloads and the wire ABI onto the guest's root disk
    at /opt/tmem (where the image's tmem.pth looks), for a guest booted without
    the 9p share (share_agent=False): QEMU does not migrate a guest that has one
    mounted."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for directory, package in (("guest", "tmem_guest"), ("guest", "tmem_workloads"),
                                   ("wire", "tmem_wire")):
            tar.add(REPO_ROOT / directory / package, arcname=f"{directory}/{package}",
                    filter=lambda info: None if "__pycache__" in info.name else info)
    guest.ssh("mkdir -p /opt/tmem && tar -C /opt/tmem -xf -", input=archive.getvalue())


# Where start_detached keeps a workload's script and result: the root disk, so
# that a migration or a saved state carries them with the guest.
DETACHED_SCRIPT = "/root/workload.sh"
DETACHED_OUTPUT = "/root/workload.out"


def start_detached(guest: Guest, command: str) -> None:
    """Run COMMAND in the background, outliving this SSH session (and the QEMU it
    came through: a migrated guest finishes it elsewhere); its output appears at
    DETACHED_OUTPUT, whole, when it is done (see detached_output)."""
    guest.ssh(f"cat > {DETACHED_SCRIPT} && setsid -f sh -c 'sh {DETACHED_SCRIPT} > {DETACHED_OUTPUT}.tmp "
              f"2>&1; mv {DETACHED_OUTPUT}.tmp {DETACHED_OUTPUT}' < /dev/null > /dev/null 2>&1",
              input=command.encode())


def detached_output(guest: Guest, timeout: float = 60.0) -> str | None:
    """The output of start_detached's command once it is done, else None."""
    result = guest.ssh(f"cat {DETACHED_OUTPUT}", timeout=timeout, check=False)
    return result.stdout if result.exit_status == 0 else None


def disk_by_serial(serial: str) -> str:
    """A shell expression for the /dev path of the guest's virtio disk with this serial."""
    return f"$(python3 -m tmem_guest find-disk {shlex.quote(serial)})"


def enable_disk_swap(guest: Guest, serial: str = DISK_SERIALS["swap"], priority: int = 10) -> str:
    """mkswap and swapon (with discard) the disk with this serial; returns its device.

    tmemd's NBD export is first marked non-rotational in the guest (virtio-blk
    reports every disk as rotational). Linux keeps per-cluster swap state only
    for non-rotational devices, and only that state discards a cluster once all
    its slots are free; on a rotational device `swapon --discard` trims the area
    once at swapon and never again, so tmemd kept every page a guest freed (one
    384 MiB run left 102,935 dead pages in tmem, against 3,096 when marked;
    docs/TESTBED.md)."""
    solid_state = "echo 0 > /sys/block/${dev#/dev/}/queue/rotational && " if guest.config.swap == "nbd" else ""
    result = guest.ssh(
        f"dev={disk_by_serial(serial)} && {solid_state}mkswap -q $dev && "
        f"swapon --discard -p {priority} $dev && echo $dev",
        timeout=60,
    )
    return result.stdout.strip()


def start_agent(guest: Guest, arguments: str, timeout: float = 120.0) -> int:
    """Start `python3 -m tmem_guest start ARGUMENTS` in the background and wait until
    it is ready; returns its pid (which it writes into the ready file)."""
    guest.ssh(
        f"mkdir -p {AGENT_RUN_DIR} && rm -f {AGENT_READY_FILE} && setsid -f python3 -m tmem_guest start "
        f"{arguments} > {AGENT_LOG_FILE} 2>&1 < /dev/null"
    )
    deadline = time.monotonic() + timeout
    while (ready := guest.ssh(f"cat {AGENT_READY_FILE}", check=False)).exit_status != 0:
        if time.monotonic() > deadline:
            raise AgentError(f"agent not ready in {timeout:.0f} s:\n{agent_log(guest)}")
        time.sleep(0.5)
    return int(ready.stdout)


def stop_agent(guest: Guest, pid: int, timeout: float = 120.0) -> None:
    """SIGTERM the agent (it swaps off, unmounts, publishes its last counters) and wait."""
    result = guest.ssh(
        f"kill -TERM {pid}; for i in $(seq {int(timeout * 2)}); do "
        f"kill -0 {pid} 2>/dev/null || exit 0; sleep 0.5; done; exit 1",
        timeout=timeout + 10,
        check=False,
    )
    if result.exit_status != 0:
        raise AgentError(f"agent {pid} did not stop in {timeout:.0f} s:\n{agent_log(guest)}")


class AgentError(RuntimeError):
    """The agent did not start or stop; the message carries its log tail."""


def agent_log(guest: Guest, lines: int = 40) -> str:
    return guest.ssh(f"tail -n {lines} {AGENT_LOG_FILE}", check=False).stdout


def agent_stats(guest: Guest) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(guest.ssh("python3 -m tmem_guest stats", timeout=60).stdout)
    return stats


def memory_cgroup(cgroup: str) -> tuple[str, str]:
    """(the cgroup's directory, a shell fragment creating it with the memory controller)."""
    path = f"{CGROUP_ROOT}/{cgroup}"
    return path, f"echo +memory > {CGROUP_ROOT}/cgroup.subtree_control && mkdir -p {path}"


def in_cgroup(command: str, memory_max: str, cgroup: str = "workload") -> str:
    """A shell command running COMMAND in a memory cgroup with this memory.max
    ("max" for no limit). docs/PROTOTYPE.md: a cgroup around the workload is the robust guard
    against reclaim deadlocks with a user-space swap device, because the processes
    outside it (the agent, sshd) keep the memory their own I/O needs."""
    path, create = memory_cgroup(cgroup)
    script = (
        f"{create} && "
        # COMMAND may be a compound (a && b): exec a shell for it, not its first word.
        f"echo {memory_max} > {path}/memory.max && echo $$ > {path}/cgroup.procs && exec sh -c {shlex.quote(command)}"
    )
    return f"sh -c {shlex.quote(script)}"


@contextmanager
def system_kept_out_of_swap(guest: Guest, cgroup: str = "system") -> Iterator[None]:
    """Move every process of the root cgroup (init, sshd, the agent) into a cgroup
    that may not swap (memory.swap.max 0), and back at the end. Commands started
    over SSH meanwhile start there too (sshd's children); in_cgroup() moves a
    workload on into its own. For tests that make tmem lose pages on purpose: a
    lost page of init's panics the guest (kswapd swaps idle pages of everyone)."""
    path, create = memory_cgroup(cgroup)
    guest.ssh(
        f"{create} && echo 0 > {path}/memory.swap.max && "
        # Kernel threads cannot move (EINVAL): skipped.
        f"for pid in $(cat {CGROUP_ROOT}/cgroup.procs); do echo $pid > {path}/cgroup.procs 2>/dev/null; done; "
        f"grep -qx 1 {path}/cgroup.procs"
    )
    try:
        yield
    finally:
        guest.ssh(f"for pid in $(cat {path}/cgroup.procs); do echo $pid > {CGROUP_ROOT}/cgroup.procs; done",
                  check=False)


def run_in_cgroup(guest: Guest, command: str, memory_max: str, timeout: float,
                  cgroup: str = "workload") -> CommandResult:
    return guest.ssh(in_cgroup(command, memory_max, cgroup), timeout=timeout, check=False)


# What the guest kernel prints when a block request or a swap page fails.
IO_ERROR_PATTERNS = ("I/O error", "Read-error on swap-device", "Write-error on swap-device",
                     "Buffer I/O error")


def io_errors(guest: Guest) -> list[str]:
    """The guest kernel's log lines that report a failed block or swap I/O."""
    log = guest.ssh("dmesg", timeout=60).stdout
    return [line for line in log.splitlines() if any(p in line for p in IO_ERROR_PATTERNS)]
