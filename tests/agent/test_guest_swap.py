"""Frontswap through the agent in a real 256 MiB TCG guest: every mode, caps, channel loss.

One guest boots for the module; each test starts the agent in some mode, runs
the checksummed page toucher (tmem_workloads.usemem) and checks both the data and
that tmemd really stored the pages. In `make test` the workload runs in a memory
cgroup (1.5x its memory.max), to keep the module short; the `stress` tests (`make
stress`) swap 1.5-2x guest RAM with no cgroup around the workload: the agent itself
must not deadlock with the guest's reclaim (docs/AGENT.md).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from .conftest import (
    GUEST_NAME,
    agent_stats,
    pool_by_id,
    run_in_cgroup,
    start_agent,
    stop_agent,
)
from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.guestops import system_kept_out_of_swap
from tmem_host.vm.launcher import CommandResult, Guest
from tmem_wire.agent import AGENT_MODES

pytestmark = [pytest.mark.vm, pytest.mark.slow]

# The cgroup tests: 1.5x the memory the workload may use (its cgroup's memory.max).
WORKLOAD_MIB = 96
WORKLOAD_CGROUP_MAX = "64M"
WORKLOAD_TIMEOUT_S = 300.0
# Without a cgroup, a multiple of the guest's MemTotal; sync moves one page per
# round trip and needs minutes for that under TCG.
UNLIMITED_TIMEOUT_S = 900.0
MIN_SWAPPED_PAGES = 5_000  # at least ~20 MiB must have gone out and come back


def run_usemem(guest: Guest, mib: int = WORKLOAD_MIB, memory_max: str = WORKLOAD_CGROUP_MAX,
               timeout: float = WORKLOAD_TIMEOUT_S) -> dict[str, Any]:
    output = run_in_cgroup(guest, f"python3 -m tmem_workloads.usemem --mib {mib}", memory_max, timeout).stdout
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return result


def guest_ram_mib(guest: Guest) -> int:
    """The guest's MemTotal: what "N times guest RAM" is measured against."""
    return int(guest.ssh("awk '/^MemTotal:/ {print $2}' /proc/meminfo").stdout) // 1024


def run_unlimited_workload(guest: Guest, mode: str, ram_factor: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """usemem at RAM_FACTOR x guest RAM with no memory limit on it (memory.max
    "max"), through the agent in MODE; returns usemem's result and the agent's swap stats."""
    mib = int(guest_ram_mib(guest) * ram_factor)
    agent = start_agent(guest, f"--swap {mode}")
    try:
        result = run_usemem(guest, mib, memory_max="max", timeout=UNLIMITED_TIMEOUT_S)
        stats: dict[str, Any] = agent_stats(guest)["swap"]
    finally:
        stop_agent(guest, agent)
    assert result["mib"] == mib and result["verified"], result
    print(f"\n{mode}: usemem {mib} MiB ({ram_factor}x guest RAM), no cgroup: {result['total_s']} s,"
          f" agent latency {json.dumps(stats['latency'])}")
    return result, stats


@pytest.mark.parametrize("mode", AGENT_MODES)
def test_swap_workload_verifies_and_pages_go_through_tmem(guest: Guest, tmemd: TmemdProcess, mode: str) -> None:
    agent = start_agent(guest, f"--swap {mode}")
    try:
        result = run_usemem(guest)
        stats = agent_stats(guest)["swap"]
    finally:
        stop_agent(guest, agent)
    assert result["verified"], result
    check_pages_went_through_tmemd(tmemd, stats, mode)


# At least 1.5x guest RAM in every mode with no cgroup, in the module's 256 MiB guest:
# minutes per mode under TCG, so `make stress`. The deadlock bound itself (the fastest
# mode, twice the RAM of a smaller guest) is in make test:
# test_guest_swap_no_cgroup.py.
@pytest.mark.stress
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("mode", "ram_factor"), [("sync", 1.5), ("batched", 1.5), ("pipelined", 2.0)])
def test_swap_without_a_cgroup_at_1_5_to_2x_guest_ram(
    guest: Guest, tmemd: TmemdProcess, mode: str, ram_factor: float
) -> None:
    _, stats = run_unlimited_workload(guest, mode, ram_factor)
    check_pages_went_through_tmemd(tmemd, stats, mode)


def check_pages_went_through_tmemd(tmemd: TmemdProcess, stats: dict[str, Any], mode: str) -> None:
    counters = stats["counters"]
    assert stats["mode"] == mode
    assert counters["puts"] > MIN_SWAPPED_PAGES, counters
    assert counters["hits"] > MIN_SWAPPED_PAGES and counters["hits"] == counters["gets"], counters
    assert counters["lost_pages"] == 0 and counters["errors"] == 0, counters
    pool = pool_by_id(tmemd, stats["pool_id"])
    assert pool["puts"] >= counters["puts"] - counters["put_refusals"]
    assert pool["hits"] >= counters["hits"]


def test_capped_guest_refused_pages_verify_from_the_fallback_disk(guest: Guest, tmemd: TmemdProcess) -> None:
    with tmemd.control() as control:
        control.request("set-cap", guest=GUEST_NAME, cap="4M")
    try:
        agent = start_agent(guest, "--swap batched")
        try:
            result = run_usemem(guest)
            stats = agent_stats(guest)["swap"]
        finally:
            stop_agent(guest, agent)
    finally:
        with tmemd.control() as control:
            control.request("set-cap", guest=GUEST_NAME, cap=None)
    assert result["verified"], result
    counters = stats["counters"]
    assert counters["put_refusals"] > MIN_SWAPPED_PAGES // 2, counters
    assert counters["disk_writes"] == counters["put_refusals"]
    assert counters["disk_reads"] > 0 and counters["lost_pages"] == 0, counters
    assert pool_by_id(tmemd, stats["pool_id"])["refusals"] > 0


def test_tmemd_restart_agent_falls_back_then_reconnects(guest: Guest, tmemd: TmemdProcess) -> None:
    agent = start_agent(guest, "--swap batched")
    try:
        before = agent_stats(guest)["swap"]["counters"]
        tmemd.terminate()
        try:
            # tmemd is gone: every page must go to the fallback disk, and verify from it.
            result = run_usemem(guest)
            down = agent_stats(guest)["swap"]
        finally:
            tmemd.start()
        assert result["verified"], result
        assert down["session_up"] is False
        assert down["counters"]["puts"] == before["puts"], (before, down["counters"])
        assert down["counters"]["disk_writes"] - before["disk_writes"] > MIN_SWAPPED_PAGES, down["counters"]
        guest.ssh("for i in $(seq 60); do python3 -m tmem_guest stats | grep -q '\"session_up\": true' && exit 0;"
                  " sleep 0.5; done; exit 1")
        result = run_usemem(guest)
        up = agent_stats(guest)["swap"]
    finally:
        stop_agent(guest, agent)
    assert result["verified"], result
    assert up["connections"] >= 2
    assert up["counters"]["puts"] - down["counters"]["puts"] > MIN_SWAPPED_PAGES, up["counters"]
    assert up["counters"]["lost_pages"] == 0, up["counters"]


# Fill memory, announce it, wait for the go, verify: between the two, the test
# makes tmemd lose the swapped-out pages.
FILL_WAIT_VERIFY = """
import mmap, os, sys, time
from tmem_workloads import usemem
templates = usemem.page_templates(3)
region = mmap.mmap(-1, {mib} << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
usemem.fill(region, templates, seed=3, order="sequential")
open("/tmp/filled", "w").close()
while not os.path.exists("/tmp/go"):
    time.sleep(0.2)
bad = usemem.verify(region, templates, seed=3, order="sequential", order_seed=0)
print("bad pages", len(bad))
sys.exit(1 if bad else 0)
"""


def test_pages_tmem_lost_read_as_errors_never_as_stale_data(guest: Guest, tmemd: TmemdProcess) -> None:
    # The flush below drops the whole pool: only the verifier may have pages there
    # (in 3 of 4 runs without this, a lost page of init's panicked the guest).
    with system_kept_out_of_swap(guest):
        verify_after_losing_pages(guest, tmemd)


def verify_after_losing_pages(guest: Guest, tmemd: TmemdProcess) -> None:
    agent = start_agent(guest, "--swap batched")
    verifier: dict[str, CommandResult] = {}
    try:
        guest.ssh("rm -f /tmp/filled /tmp/go; cat > /tmp/fill_wait_verify.py",
                  input=FILL_WAIT_VERIFY.format(mib=WORKLOAD_MIB).encode())
        # The verifier runs in the foreground of its own SSH channel, in the workload cgroup.
        thread = threading.Thread(
            target=lambda: verifier.update(
                result=run_in_cgroup(guest, "python3 /tmp/fill_wait_verify.py", WORKLOAD_CGROUP_MAX,
                                     WORKLOAD_TIMEOUT_S, check=False)
            )
        )
        thread.start()
        guest.ssh("for i in $(seq 600); do test -f /tmp/filled && exit 0; sleep 0.5; done; exit 1", timeout=330)
        with tmemd.control() as control:
            control.request("flush", guest=GUEST_NAME, pool=agent_stats(guest)["swap"]["pool_id"])
        guest.ssh("touch /tmp/go")
        thread.join(WORKLOAD_TIMEOUT_S + 30)
        stats = agent_stats(guest)["swap"]["counters"]
    finally:
        stop_agent(guest, agent)
    result = verifier["result"]
    # The verifier was killed by SIGBUS (swap-in I/O error; sshd reports the signal,
    # so no exit status) before it could compare a wrong page; had the agent served
    # anything but the real page, it would have printed bad pages and exited 1.
    assert result.exit_status == -1, result
    assert "bad pages" not in result.stdout, result
    assert stats["lost_pages"] > 0, stats
