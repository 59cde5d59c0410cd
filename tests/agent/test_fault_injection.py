"""Fault injection across guests (issue #7, point 4), one boot of two TCG guests.

Guest A (the victim) runs the agent (pipelined) and a checksummed usemem loop
in a memory cgroup, swapping through tmemd for the whole test. Meanwhile:

1. guest B (the attacker) runs tmem_workloads.hostile on its own channel:
   malformed frames, forged requests for A's pool ids and frontswap keys, then
   a put flood that fills the host budget; B is held to its cap;
2. A's tmem channel is hot-unplugged (QMP device_del) and plugged back: a
   workload started while it is gone swaps to A's fallback disk and verifies,
   and the agent reconnects after;
3. tmemd is stopped (SIGSTOP) for longer than the agent's request timeout, then
   continued: the agent drops the session and comes back to the same tmemd;
4. tmemd is killed with SIGKILL and restarted: its journal gives A's pool back.

Throughout, every usemem pass in A must verify, tmemd must answer A, and A's
agent must never read a page it lost.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.guestops import (
    agent_log,
    agent_stats,
    in_cgroup,
    run_in_cgroup,
    start_agent,
    stop_agent,
    system_kept_out_of_swap,
)
from tmem_host.vm.launcher import Guest, VmConfig
from tmem_wire.agent import PORT_NAME

pytestmark = [pytest.mark.vm, pytest.mark.slow]

VICTIM, ATTACKER = "victim", "attacker"
BUDGET = "64M"
ATTACKER_CAP = 40 << 20
# The victim's workload: usemem passes of 96 MiB in a 64M cgroup (1.5x), looped.
WORKLOAD_MIB = 96
WORKLOAD_CGROUP_MAX = "64M"
USEMEM_LOG = "/tmp/usemem.jsonl"
STOP_FILE = "/tmp/usemem.stop"
DONE_FILE = "/tmp/usemem.done"
USEMEM_PID = "/tmp/usemem.pid"
# Exit status of a pass the test stopped (SIGTERM) at the end.
STOPPED = 128 + 15
USEMEM_LOOP = f"""
rm -f {USEMEM_LOG} {STOP_FILE} {DONE_FILE}
seed=1
while [ ! -e {STOP_FILE} ]; do
    python3 -m tmem_workloads.usemem --mib {WORKLOAD_MIB} --seed $seed >> {USEMEM_LOG} 2>&1 &
    echo $! > {USEMEM_PID}
    wait $! || echo '{{"verified": false, "exit": '$?', "seed": '$seed'}}' >> {USEMEM_LOG}
    seed=$((seed + 1))
done
touch {DONE_FILE}
"""
# While the channel is gone: a short workload of its own whose pages must all go
# to the fallback disk and come back from it (24 MiB in a 12M cgroup).
PROBE_MIB = 24
PROBE_CGROUP_MAX = "12M"
HOSTILE = "python3 -m tmem_workloads.hostile --seconds 6 --flood-mib 80"
RECONNECT_TIMEOUT_S = 60.0
# SIGSTOP of tmemd: longer than the agent's request timeout (5 s), well within
# the time its reads wait for tmemd to come back.
STOPPED_S = 12.0
# How long the victim's swap-ins of tmem pages wait for tmemd (--read-wait). While
# the channel is gone or tmemd stopped, any guest command this test runs over SSH
# may fault in pages (sshd's, its shell's) that only tmemd has: it waits, and the
# outage lasts as long as the test's commands in it (the probe workload's 20-30 s
# under TCG). The default 30 s is too close to that; an outage past --read-wait
# ends in EIO, i.e. SIGBUS for whoever faulted (docs/RELIABILITY.md).
READ_WAIT_S = 120


@pytest.fixture(scope="module")
def tmemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TmemdProcess]:
    with TmemdProcess(tmp_path_factory.mktemp("tmemd"), budget=BUDGET,
                      guests=(VICTIM, f"{ATTACKER}:cap={ATTACKER_CAP}")) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def guests(tmemd: TmemdProcess, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[Guest, Guest]]:
    victim = Guest(VmConfig(name=VICTIM, memory_mib=256, accel="tcg", swap="hostcache",
                            swap_mib=512, tmem_socket=tmemd.abi_socket(VICTIM),
                            run_dir=tmp_path_factory.mktemp(VICTIM)))
    attacker = Guest(VmConfig(name=ATTACKER, memory_mib=256, accel="tcg", swap="none",
                              tmem_socket=tmemd.abi_socket(ATTACKER),
                              run_dir=tmp_path_factory.mktemp(ATTACKER)))
    try:
        for guest in (victim, attacker):
            guest.start()  # both boot at once
        for guest in (victim, attacker):
            guest.wait_ready()
        # Only the workloads swap: the test's own SSH commands during the unplug
        # and the stop must not wait for pages only tmemd has (one run waited more
        # than 60 s on a `cat` whose bash was in tmem).
        with system_kept_out_of_swap(victim):
            yield victim, attacker
        for guest in (victim, attacker):
            guest.shutdown()
    finally:
        for guest in (victim, attacker):
            guest.kill()


def swap_stats(guest: Guest) -> dict[str, Any]:
    stats: dict[str, Any] = agent_stats(guest)["swap"]
    return stats


def wait_for_session(guest: Guest, connections: int) -> dict[str, Any]:
    """Wait until the agent's session is up for at least its `connections`-th time."""
    deadline = time.monotonic() + RECONNECT_TIMEOUT_S
    while True:
        stats = swap_stats(guest)
        if stats["session_up"] and stats["connections"] >= connections:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"agent not reconnected: {stats}\n{agent_log(guest)}")
        time.sleep(1.0)


def usemem_results(guest: Guest) -> list[dict[str, Any]]:
    lines = guest.ssh(f"cat {USEMEM_LOG}", check=False).stdout.splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def wait_for_passes(guest: Guest, passes: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while len(usemem_results(guest)) < passes:
        if time.monotonic() > deadline:
            raise AssertionError(f"fewer than {passes} usemem passes in {timeout:.0f} s")
        time.sleep(2.0)


def store_clients(tmemd: TmemdProcess) -> dict[str, Any]:
    with tmemd.control() as control:
        clients: dict[str, Any] = control.request("stats")["store"]["clients"]
    return clients


def test_victim_keeps_verifying_through_attacks_unplug_and_crash(
        guests: tuple[Guest, Guest], tmemd: TmemdProcess) -> None:
    victim, attacker = guests
    tmemd_pid = tmemd.pid
    agent = start_agent(victim, f"--swap pipelined --read-wait {READ_WAIT_S}")
    victim.ssh("cat > /tmp/usemem-loop.sh", input=USEMEM_LOOP.encode())
    victim.ssh(f"setsid -f {in_cgroup('sh /tmp/usemem-loop.sh', WORKLOAD_CGROUP_MAX)}"
               " > /dev/null 2>&1 < /dev/null")
    try:
        # 1. The attacker, while the victim swaps.
        hostile = attacker.ssh(HOSTILE, timeout=300, check=False)
        assert hostile.exit_status == 0, hostile.stdout + hostile.stderr
        report = json.loads(hostile.stdout)
        assert tmemd.alive() and tmemd.pid == tmemd_pid
        assert report["malformed_rounds"] > 0 and report["bad_replies"] == []
        assert set(report["forged_statuses"]) == {"INVALID"}
        assert report["forged_pages_seen"] == report["stats_pools_seen"] == 0
        clients = store_clients(tmemd)
        assert clients[ATTACKER]["stored_bytes"] <= ATTACKER_CAP
        assert clients[ATTACKER]["refusals"] == report["flood_pages_refused"] > 0
        assert clients[VICTIM]["pages"] > 0 and clients[VICTIM]["evictions"] == 0
        after_attack = wait_for_session(victim, 1)
        print(f"\nhostile: {json.dumps(report)}\nvictim after the attack: "
              f"{after_attack['counters']}")
        with tmemd.control() as control:
            control.request("flush", guest=ATTACKER)

        # 2. The victim's channel unplugged and plugged back while it swaps: a
        # workload started meanwhile swaps to the fallback disk and verifies.
        before_unplug = swap_stats(victim)
        victim.remove_tmem_channel()
        ports = victim.ssh("cat /sys/class/virtio-ports/*/name", check=False).stdout.split()
        assert PORT_NAME not in ports
        # The baseline for "no puts while the channel is gone": the looping workload
        # went on putting pages until the port went away.
        unplugged = swap_stats(victim)
        probe = run_in_cgroup(victim, f"python3 -m tmem_workloads.usemem --mib {PROBE_MIB} --seed 99",
                              PROBE_CGROUP_MAX, timeout=120, cgroup="probe")
        gone = swap_stats(victim)
        victim.add_tmem_channel()
        replugged = wait_for_session(victim, before_unplug["connections"] + 1)
        assert probe.exit_status == 0 and json.loads(probe.stdout)["verified"], probe
        assert gone["session_up"] is False
        assert gone["counters"]["puts"] == unplugged["counters"]["puts"], (unplugged, gone)
        assert gone["counters"]["disk_writes"] - unplugged["counters"]["disk_writes"] \
            >= (PROBE_MIB // 3 << 20) // 4096, gone
        print(f"channel gone: {gone['counters']}")

        # 3. tmemd stopped (SIGSTOP) for longer than the agent's request timeout:
        # the agent gives up on it, then comes back to the same tmemd. Nothing asks
        # the guest anything meanwhile (see READ_WAIT_S): the stop lasts STOPPED_S.
        os.kill(tmemd.pid, signal.SIGSTOP)
        try:
            time.sleep(STOPPED_S)
        finally:
            os.kill(tmemd.pid, signal.SIGCONT)
        resumed = wait_for_session(victim, replugged["connections"] + 1)
        assert resumed["session_timeouts"] > replugged["session_timeouts"], resumed
        assert tmemd.pid == tmemd_pid
        print(f"tmemd stopped {STOPPED_S:.0f} s: {resumed['counters']}")

        # 4. tmemd killed mid-workload and restarted: the journal keeps the pages.
        tmemd.crash_and_restart(downtime=2.0)
        restarted = wait_for_session(victim, resumed["connections"] + 1)
        # A whole pass after the restart (the one running may be verifying only:
        # clean swapped-in pages are dropped without a write, so no puts).
        passes_so_far = len(usemem_results(victim))
        wait_for_passes(victim, passes_so_far + 2)
        final = swap_stats(victim)
        assert final["counters"]["puts"] > restarted["counters"]["puts"], final
        assert final["counters"]["hits"] > restarted["counters"]["hits"], final
    finally:
        victim.ssh(f"touch {STOP_FILE}; kill $(cat {USEMEM_PID}); for i in $(seq 120); do"
                   f" test -e {DONE_FILE} && exit 0; sleep 1; done; exit 1", timeout=150,
                   check=False)
        results = [r for r in usemem_results(victim) if r.get("exit") != STOPPED]
        # Diagnostics that a failed guest command cannot swallow.
        print(f"agent log:\n{agent_log(victim, 80)}")
        print(f"agent: {victim.ssh('python3 -m tmem_guest stats', check=False).stdout}")
        stop_agent(victim, agent)
    print(f"usemem passes: {[(r.get('verified'), r.get('total_s')) for r in results]}")
    assert len(results) >= 1 and all(result["verified"] for result in results), results
    assert final["counters"]["lost_pages"] == 0 and final["counters"]["errors"] == 0, final
