"""Fixtures for the guest agent tests: a real tmemd and one real TCG guest per module.

The agent helpers (start, stop, stats, log) are tmem_host.vm.guestops', re-exported
here for the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.replies import PoolRecord
from tmem_host.vm import guestops
from tmem_host.vm.guestops import agent_log, agent_stats, start_agent, stop_agent
from tmem_host.vm.launcher import CommandResult, Guest, VmConfig

GUEST_NAME = "agent"


@pytest.fixture(scope="module")
def tmemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TmemdProcess]:
    with TmemdProcess(tmp_path_factory.mktemp("tmemd"), budget="768M", guests=(GUEST_NAME,)) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def guest(tmemd: TmemdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    yield from boot_agent_guest(tmemd, tmp_path_factory, memory_mib=256)


def boot_agent_guest(tmemd: TmemdProcess, tmp_path_factory: pytest.TempPathFactory, memory_mib: int) -> Iterator[Guest]:
    """A TCG guest wired to `tmemd` for the agent: its port, a fallback swap disk, a data disk."""
    config = VmConfig(
        name=GUEST_NAME,
        memory_mib=memory_mib,
        accel="tcg",
        swap="hostcache",  # the agent's fallback disk (serial tmem-swap)
        swap_mib=1024,
        data_disk_mib=512,
        tmem_socket=tmemd.abi_socket(GUEST_NAME),
        run_dir=tmp_path_factory.mktemp("guest"),
    )
    with Guest(config) as booted:
        yield booted


def run_in_cgroup(guest: Guest, command: str, memory_max: str, timeout: float, check: bool = True) -> CommandResult:
    """guestops.run_in_cgroup, failing the test with the agent's log when check is set."""
    result = guestops.run_in_cgroup(guest, command, memory_max, timeout)
    if check and result.exit_status != 0:
        raise AssertionError(
            f"{command} exited {result.exit_status}\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
            f"agent log:\n{agent_log(guest)}"
        )
    return result


def guest_pools(tmemd: TmemdProcess) -> list[PoolRecord]:
    with tmemd.control() as control:
        stats = control.stats()
    return stats["guests"][GUEST_NAME]["pools"]


def pool_by_id(tmemd: TmemdProcess, pool_id: int) -> PoolRecord:
    for pool in guest_pools(tmemd):
        if pool["pool_id"] == pool_id:
            return pool
    raise AssertionError(f"tmemd has no pool {pool_id} for {GUEST_NAME}: {guest_pools(tmemd)}")



__all__ = ["agent_log", "agent_stats", "start_agent", "stop_agent", "run_in_cgroup", "guest_pools", "pool_by_id"]
