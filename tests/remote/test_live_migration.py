"""A running TCG guest live-migrated between two tmemds mid-workload, on the block
path and on the agent path (docs/REMOTE.md, "Live migration"): host a's QEMU
swaps through host a's tmemd, host b's QEMU waits with -incoming wired to host b's;
QMP migrate, then the handoff (a fences the guest's namespace and writes its
state, remote pages by key), the restore on b (it takes the namespace over), and
the destination runs on. The checksummed workload must verify every page, some
of them served by b from the cluster and from what a handed over."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.remote.cluster import LocalCluster
from tmem_host.replies import NbdExportStats
from tmem_host.vm.guestops import (
    agent_log, agent_stats, detached_output, enable_disk_swap, in_cgroup, install_guest_code, io_errors,
    start_agent, start_detached,
)
from tmem_host.vm.launcher import Guest, VmConfig, create_root_overlay
from tmem_host.waiting import wait_until

from ..daemon.test_control import ok, tmemctl
from .test_remote_control import remote

GUEST_MEMORY_MIB = 256
WORKLOAD_MIB = 384  # 1.5x the guest's RAM: a large part swaps out, and back in to verify
# The agent's workload runs in a memory cgroup (docs/AGENT.md: the guard against
# reclaim deadlocks of a user-space swap device), as in tests/agent.
AGENT_WORKLOAD_MIB = 96
AGENT_CGROUP_MAX = "64M"
AGENT_REQUEST_TIMEOUT_S = 5


def export_stats(daemon: TmemdProcess) -> NbdExportStats:
    with daemon.control() as control:
        return control.stats()["nbd"]["g1"]


def persistent_pages(daemon: TmemdProcess) -> int:
    with daemon.control() as control:
        return sum(pool["pages"] for pool in control.guests()[0]["pools"] if "PERSISTENT" in pool["flags"])


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.parametrize("path", ["block", "agent"])
def test_a_guest_migrated_mid_workload_verifies_every_page(
        tmp_path: Path, redis_cluster: LocalCluster, path: str) -> None:
    """Block path: the guest swaps on its host's NBD export. Agent path: the agent
    in the guest serves its swap device over the tmem channel, with a fallback disk
    both QEMUs share; after the switch its session finds host b and resumes its pool."""
    hosts = {name: TmemdProcess(tmp_path / name, budget="16M", guests=("g1",), nbd_size="1G",
                                extra_args=["--remote", redis_cluster.seed_spec, "--host-id", name])
             for name in ("a", "b")}
    handoff = tmp_path / "g1.handoff"
    agent = path == "agent"
    try:
        a, b = hosts["a"].start(), hosts["b"].start()
        config = VmConfig(name="g1", memory_mib=GUEST_MEMORY_MIB, share_agent=False, run_dir=tmp_path / "vm-a",
                          root_overlay=create_root_overlay(tmp_path / "root.qcow2"))
        if agent:
            config = replace(config, swap="hostcache", swap_mib=1024, tmem_socket=a.abi_socket("g1"),
                             shared_disk_dir=tmp_path / "disks")
            workload = in_cgroup(f"python3 -m tmem_workloads.usemem --mib {AGENT_WORKLOAD_MIB}",
                                 AGENT_CGROUP_MAX)
        else:
            config = replace(config, swap="nbd", nbd_socket=a.nbd_socket("g1"), nbd_export="g1")
            workload = f"python3 -m tmem_workloads.usemem --mib {WORKLOAD_MIB}"
        with Guest(config) as source:
            install_guest_code(source)
            if agent:
                start_agent(source, f"--swap pipelined --request-timeout {AGENT_REQUEST_TIMEOUT_S}")
            else:
                enable_disk_swap(source)
            start_detached(source, workload)
            # Mid-workload: pages in a's memory and in the cluster.
            assert wait_until(lambda: persistent_pages(a) > 4000 and remote(a)["remote_pages"] > 0,
                              300, interval=1.0), remote(a)
            incoming = replace(config, run_dir=tmp_path / "vm-b", incoming=f"unix:{tmp_path / 'migrate.sock'}",
                               ssh_key_from=source.key_path)
            if agent:
                incoming.tmem_socket = b.abi_socket("g1")
            else:
                incoming.nbd_socket = b.nbd_socket("g1")
            destination = Guest(incoming)
            destination.start()
            try:
                migration = source.migrate_to(destination)
                source.kill()  # stopped after the switch; its connections to a close
                line = ok(tmemctl(a, "handoff", "g1", str(handoff)))
                # The destination QEMU waits, connected and idle: the restore takes it.
                restored = ok(tmemctl(b, "restore", str(handoff)))
                destination.resume_migrated()
                assert wait_until(lambda: detached_output(destination) is not None, 600, interval=2.0)
                output = detached_output(destination) or ""
                errors = io_errors(destination)
                swap = agent_stats(destination)["swap"] if agent else {}
                log = agent_log(destination, 60) if agent else ""
            finally:
                destination.shutdown()
        # What both sides saw, should the guest not verify: each tmemd's remote
        # counters (first: CI shows the head and the tail of a long failure), the
        # agent's, the handoff and restore replies and the tail of b's log.
        counters = {key: value for key, value in swap.items() if key != "latency"}
        diagnosis = (f"{output}\nb: {json.dumps(remote(b))}\na: {json.dumps(remote(a))}\n{errors}\n"
                     f"agent: {json.dumps(counters)}\nagent log:\n{log}\nhandoff: {line}restore: "
                     f"{restored}b's log:\n{b.log_tail(30)}")
        assert output.strip().endswith("}"), diagnosis
        usemem = json.loads(output.strip().splitlines()[-1])
        assert usemem["verified"], diagnosis
        assert errors == [], diagnosis
        figures = remote(b)
        assert figures["get_errors"] == figures["get_missing"] == 0, figures
        assert remote(a)["fenced"] and not figures["fenced"]
        if agent:
            counters = swap["counters"]
            assert counters["lost_pages"] == 0 and counters["errors"] == 0, counters
            assert swap["pools_resumed"] >= 1 and swap["pool_id"] is not None, swap
            with b.control() as control:
                pool = next(pool for pool in control.guests()[0]["pools"] if pool["pool_id"] == swap["pool_id"])
            assert pool["gets"] > 0, pool  # b served the agent's swap-ins
        else:
            served = export_stats(b)
            assert served["pages_read_tmem"] > 0 and served["read_errors"] == 0, served
        print(f"\n{path} path, live migration mid-usemem: total {migration.get('total-time')} ms, "
              f"downtime {migration.get('downtime')} ms, RAM {migration.get('ram', {}).get('transferred', 0) >> 20} "
              f"MiB; {line.strip()}; b: {figures['gets']} pages read from the cluster")
    finally:
        for daemon in hosts.values():
            daemon.terminate()
        redis_cluster.flushall()


@pytest.mark.vm
@pytest.mark.slow
def test_a_guest_saved_to_a_file_mid_workload_resumes_on_a_new_tmemd_with_another_budget(
        tmp_path: Path) -> None:
    """QEMU's migration to a file, `tmemctl save` of the stopped guest, its host's
    tmemd replaced by another (its own run dir, a smaller budget, no cluster),
    `tmemctl restore`, and a QEMU resumed from the file: every page verifies."""
    state, pools = tmp_path / "vm.state", tmp_path / "g1.tmemsave"
    with TmemdProcess(tmp_path / "old", budget="512M", guests=("g1",), nbd_size="1G") as old:
        config = VmConfig(name="g1", memory_mib=GUEST_MEMORY_MIB, share_agent=False, run_dir=tmp_path / "vm-a",
                          root_overlay=create_root_overlay(tmp_path / "root.qcow2"), swap="nbd",
                          nbd_socket=old.nbd_socket("g1"), nbd_export="g1")
        with Guest(config) as guest:
            install_guest_code(guest)
            enable_disk_swap(guest)
            start_detached(guest, f"python3 -m tmem_workloads.usemem --mib {WORKLOAD_MIB}")
            assert wait_until(lambda: persistent_pages(old) > 8000, 300, interval=1.0)
            guest.migrate(f"exec:cat > {state}")
            guest.kill()
        saved = ok(tmemctl(old, "save", "g1", str(pools)))
    # The host's tmemd is replaced: a new run dir and state, a quarter of the budget.
    with TmemdProcess(tmp_path / "new", budget="128M", guests=("g1",), nbd_size="1G") as new:
        restored = ok(tmemctl(new, "restore", str(pools)))
        resumed = Guest(replace(config, run_dir=tmp_path / "vm-b", nbd_socket=new.nbd_socket("g1"),
                                incoming=f"exec:cat {state}", ssh_key_from=tmp_path / "vm-a" / "ssh_key"))
        resumed.start()
        try:
            resumed.resume_migrated()
            assert wait_until(lambda: detached_output(resumed) is not None, 600, interval=2.0)
            output = detached_output(resumed) or ""
            errors = io_errors(resumed)
        finally:
            resumed.shutdown()
        served = export_stats(new)
    usemem = json.loads(output.strip().splitlines()[-1])
    assert usemem["verified"], output
    assert errors == [] and served["pages_read_tmem"] > 0 and served["read_errors"] == 0, (errors, served)
    print(f"\nsaved mid-usemem: {saved.strip()}\n{restored.strip()}; the new tmemd read "
          f"{served['pages_read_tmem']} pages from tmem")
