"""The agent's reliability in a real 256 MiB TCG guest (one boot for the module):
`tmemctl drain` with the guest running and holding its pages, and a workload that
verifies every page through a SIGSTOP of tmemd longer than the agent's request
timeout, a graceful restart and a kill -9 of tmemd, each restarted from its
journal (docs/AGENT.md, "Outages and drain")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import GUEST_NAME, agent_log, agent_stats, run_in_cgroup, start_agent, stop_agent
from .test_guest_swap import FILL_WAIT_VERIFY, WORKLOAD_CGROUP_MAX, WORKLOAD_MIB, WORKLOAD_TIMEOUT_S
from tmem_host.ctl.main import guest_persistent_pages
from tmem_host.daemon.process import TmemdProcess
from tmem_host.vm.launcher import CommandResult, Guest, SshTimeoutError

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REQUEST_TIMEOUT_S = 2.0
STOPPED_S = 3 * REQUEST_TIMEOUT_S  # tmemd stays stopped well past the agent's timeout
AGENT_ARGUMENTS = f"--swap pipelined --request-timeout {REQUEST_TIMEOUT_S:g}"
MIN_TMEM_PAGES = 3_000


def persistent_pages(tmemd: TmemdProcess) -> int:
    with tmemd.control() as control:
        return guest_persistent_pages(control, GUEST_NAME)


def wait_for_swap_stats(guest: Guest, condition: Callable[[dict[str, Any]], bool],
                        timeout: float = WORKLOAD_TIMEOUT_S) -> dict[str, Any]:
    """Poll the agent's swap stats until `condition` holds for them; return them."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            swap: dict[str, Any] = agent_stats(guest)["swap"]
        except SshTimeoutError as error:
            raise AssertionError(f"the guest stopped answering: {error}\n"
                                 f"{stuck_guest_report(guest)}") from None
        if condition(swap):
            return swap
        if time.monotonic() > deadline:
            raise AssertionError(f"agent stats never satisfied the condition: {json.dumps(swap)}\n"
                                 f"{stuck_guest_report(guest)}")
        time.sleep(0.5)


def stuck_guest_report(guest: Guest) -> str:
    """What a guest that stopped making progress is blocked on: the kernel's blocked
    tasks with their stacks (SysRq-W on the console, which works when SSH does not),
    then the agent's log if SSH still answers."""
    report = f"blocked tasks (SysRq-W):\n{guest.sysrq('w')}"
    try:
        return f"{report}\nagent log:\n{agent_log(guest)}"
    except Exception as error:  # noqa: BLE001 - a stuck guest: say so, keep the dump
        return f"{report}\nagent log: unreadable ({error})"


class InBackground:
    """COMMAND run in the workload cgroup on its own SSH channel, by a thread this
    object owns: `result()` joins it and returns the command's result or raises
    what the thread raised (never an unhandled thread exception)."""

    def __init__(self, guest: Guest, command: str) -> None:
        self._result: CommandResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(guest, command), name=f"background: {command}")
        self._thread.start()

    def _run(self, guest: Guest, command: str) -> None:
        try:
            self._result = run_in_cgroup(guest, command, WORKLOAD_CGROUP_MAX, WORKLOAD_TIMEOUT_S, check=False)
        except BaseException as error:  # handed to result()'s caller
            self._error = error

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = WORKLOAD_TIMEOUT_S + 30) -> CommandResult:
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise AssertionError(f"{self._thread.name} still running after {timeout:.0f} s")
        return self._result


def test_drain_moves_the_running_guests_pages_to_its_disk_and_they_verify(guest: Guest, tmemd: TmemdProcess) -> None:
    agent = start_agent(guest, AGENT_ARGUMENTS)
    try:
        guest.ssh("rm -f /tmp/filled /tmp/go; cat > /tmp/fill_wait_verify.py",
                  input=FILL_WAIT_VERIFY.format(mib=WORKLOAD_MIB).encode())
        verifier = InBackground(guest, "python3 /tmp/fill_wait_verify.py")
        guest.ssh("for i in $(seq 600); do test -f /tmp/filled && exit 0; sleep 0.5; done; exit 1", timeout=330)
        held = persistent_pages(tmemd)
        assert held > MIN_TMEM_PAGES, held  # the filled memory sits in tmem, its owner alive
        drain = subprocess.run([sys.executable, "-m", "tmem_host.ctl.main", "--run-dir", str(tmemd.run_dir),
                                "drain", GUEST_NAME, "--timeout", "120"], capture_output=True, text=True, timeout=180)
        assert drain.returncode == 0, drain.stderr
        assert drain.stdout.startswith(f"{GUEST_NAME}: drained "), drain.stdout
        print(f"\n{drain.stdout.strip()} ({held} persistent pages before)")
        assert persistent_pages(tmemd) == 0
        drained = wait_for_swap_stats(guest, lambda swap: swap["slots_in_tmem"] == 0 and swap["draining"], 30)
        guest.ssh("touch /tmp/go")  # verify: every page now comes from the fallback disk
        result = verifier.result()
        after = agent_stats(guest)["swap"]
    finally:
        with tmemd.control() as control:
            control.request("thaw", guest=GUEST_NAME)
        stop_agent(guest, agent)
    assert result.exit_status == 0 and "bad pages 0" in result.stdout, result
    counters = after["counters"]
    assert drained["counters"]["drained_pages"] >= 0.9 * held, drained["counters"]
    assert counters["lost_pages"] == 0 and counters["errors"] == 0, counters
    assert counters["disk_reads"] > MIN_TMEM_PAGES // 2, counters


def test_workload_verifies_through_a_stopped_tmemd_a_graceful_restart_and_a_kill_9(guest: Guest, tmemd: TmemdProcess) -> None:
    agent = start_agent(guest, AGENT_ARGUMENTS)
    try:
        workload = InBackground(guest, f"python3 -m tmem_workloads.usemem --mib {WORKLOAD_MIB}")
        wait_for_swap_stats(guest, lambda swap: swap["counters"]["puts"] > MIN_TMEM_PAGES)
        before_stop = agent_stats(guest)["swap"]
        # Nothing is asked of the guest meanwhile: its commands may need pages only
        # tmem has, and their swap-ins wait for tmemd.
        os.kill(tmemd.pid, signal.SIGSTOP)
        try:
            time.sleep(STOPPED_S)
        finally:
            os.kill(tmemd.pid, signal.SIGCONT)
        resumed = wait_for_swap_stats(guest, lambda swap: swap["session_up"], 60)
        # Mid-workload again (tmem traffic since): a graceful restart (SIGTERM keeps the
        # journal), then a kill -9; each new tmemd brings the pool back.
        for restart in (tmemd.restart, tmemd.crash_and_restart):
            since = agent_stats(guest)["swap"]["counters"]
            moved = since["puts"] + since["gets"]
            wait_for_swap_stats(guest, lambda swap: not workload.is_alive()
                                or swap["counters"]["puts"] + swap["counters"]["gets"] > moved + 500)
            restart()
        result = workload.result()
        after = wait_for_swap_stats(guest, lambda swap: swap["session_up"] and swap["pools_resumed"] >= 2, 60)
    finally:
        stop_agent(guest, agent)
    assert result.exit_status == 0, result
    usemem = json.loads(result.stdout.strip().splitlines()[-1])
    assert usemem["verified"], usemem
    counters = after["counters"]
    print(f"\nSIGSTOP {STOPPED_S:g} s + graceful restart + kill -9: usemem {usemem['total_s']} s; session_timeouts"
          f" {after['session_timeouts']}, connections {after['connections']}, counters {json.dumps(counters)}")
    assert resumed["session_timeouts"] >= 1 and resumed["connections"] >= 2, resumed  # the stop was noticed
    # Requests were given up and took the fallback path: a write to the disk, or (if the
    # single-threaded workload was faulting a page in) a read waiting for tmemd.
    assert counters["channel_down"] >= 1, counters
    assert after["connections"] >= 4 and after["pool_id"] == before_stop["pool_id"], after
    assert counters["lost_pages"] == 0 and counters["errors"] == 0, counters
    assert counters["hits"] > MIN_TMEM_PAGES, counters  # pages came back from tmem, across both outages
