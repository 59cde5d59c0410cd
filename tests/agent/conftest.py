"""Fixtures for the guest agent tests: a real tmemd and one real TCG guest per module."""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.launcher import CommandResult, Guest, GuestConfig

GUEST_NAME = "agent"
AGENT_LOG = "/run/tmem-agent/agent.log"
READY_FILE = "/run/tmem-agent/ready"
WORKLOAD_CGROUP = "/sys/fs/cgroup/workload"


@pytest.fixture(scope="module")
def tmemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TmemdProcess]:
    with TmemdProcess(tmp_path_factory.mktemp("tmemd"), budget="768M", guests=(GUEST_NAME,)) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def guest(tmemd: TmemdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    config = GuestConfig(
        name=GUEST_NAME,
        memory_mib=256,
        accel="tcg",
        swap="hostcache",  # the agent's fallback disk (serial tmem-swap)
        swap_mib=1024,
        data_disk_mib=512,
        tmem_socket=tmemd.abi_socket(GUEST_NAME),
        run_dir=tmp_path_factory.mktemp("guest"),
    )
    with Guest(config) as booted:
        yield booted


def start_agent(guest: Guest, arguments: str, timeout: float = 60.0) -> int:
    """Start `python3 -m tmem_guest start ARGUMENTS` in the background; wait until
    ready; return its pid (the agent writes it into the ready file)."""
    guest.ssh(
        f"mkdir -p /run/tmem-agent && setsid -f python3 -m tmem_guest start {arguments} "
        f"> {AGENT_LOG} 2>&1 < /dev/null"
    )
    deadline = time.monotonic() + timeout
    while (ready := guest.ssh(f"cat {READY_FILE}", check=False)).exit_status != 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"agent not ready in {timeout} s:\n{agent_log(guest)}")
        time.sleep(0.5)
    return int(ready.stdout)


def stop_agent(guest: Guest, pid: int, timeout: float = 120.0) -> None:
    """SIGTERM the agent (it swaps off and unmounts) and wait for it to exit."""
    result = guest.ssh(
        f"kill -TERM {pid}; for i in $(seq {int(timeout * 2)}); do "
        f"kill -0 {pid} 2>/dev/null || exit 0; sleep 0.5; done; exit 1",
        timeout=timeout + 10, check=False,
    )
    if result.exit_status != 0:
        raise AssertionError(f"agent {pid} did not stop in {timeout} s:\n{agent_log(guest)}")


def agent_log(guest: Guest) -> str:
    return guest.ssh(f"tail -n 40 {AGENT_LOG}", check=False).stdout


def agent_stats(guest: Guest) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(guest.ssh("python3 -m tmem_guest stats").stdout)
    return stats


def run_in_cgroup(guest: Guest, command: str, memory_max: str, timeout: float, check: bool = True) -> CommandResult:
    """Run `command` in a cgroup with memory.max: it swaps at that limit while the
    agent, outside it, keeps the memory its own I/O needs (FACTS.md: the robust guard
    against the reclaim deadlock)."""
    script = (
        "echo +memory > /sys/fs/cgroup/cgroup.subtree_control && "
        f"mkdir -p {WORKLOAD_CGROUP} && echo {memory_max} > {WORKLOAD_CGROUP}/memory.max && "
        f"echo $$ > {WORKLOAD_CGROUP}/cgroup.procs && exec {command}"
    )
    result = guest.ssh(f"sh -c {shlex.quote(script)}", timeout=timeout, check=False)
    if check and result.exit_status != 0:
        raise AssertionError(
            f"{command} exited {result.exit_status}\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
            f"agent log:\n{agent_log(guest)}"
        )
    return result


def guest_pools(tmemd: TmemdProcess) -> list[dict[str, Any]]:
    with tmemd.control() as control:
        stats = control.request("stats")
    pools: list[dict[str, Any]] = stats["guests"][GUEST_NAME]["pools"]
    return pools


def pool_by_id(tmemd: TmemdProcess, pool_id: int) -> dict[str, Any]:
    for pool in guest_pools(tmemd):
        if pool["pool_id"] == pool_id:
            return pool
    raise AssertionError(f"tmemd has no pool {pool_id} for {GUEST_NAME}: {guest_pools(tmemd)}")

