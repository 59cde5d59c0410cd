"""The remote tier when the cluster fails under a verified workload: a master
killed (failover; with --remote-replicas 1 no page is lost), the whole cluster
stopped for less than --remote-wait (reads wait, then succeed) and for longer
(remote reads fail with EIO, new pages go to the fallback disk, tmemd and the
other guest keep working, and the pages come back with the cluster)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.nbd.client import NbdClient
from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.tier import RemoteSettings
from tmem_host.waiting import wait_until
from tmem_wire import nbd

from .test_tier import PAGE, read_errors, remote_stats, write_slots

SLOTS = range(0, 4096)  # 16 MiB through a 4 MiB budget


def start_tmemd(run_dir: Path, cluster: LocalCluster, wait_s: float) -> TmemdProcess:
    return TmemdProcess(run_dir, budget="4M", guests=("g1", "g2"), nbd_size="32M",
                        extra_args=["--remote", cluster.seed_spec, "--remote-replicas", "1",
                                    "--remote-wait", str(wait_s)]).start()


@pytest.fixture
def cluster(breakable_cluster: LocalCluster) -> Iterator[LocalCluster]:
    yield breakable_cluster
    breakable_cluster.flushall()


def demotion_done(tmemd: TmemdProcess) -> bool:
    """tmemd's memory is down to where demotion stops (RemoteSettings.demote_above)."""
    with tmemd.control() as control:
        store = control.stats()["store"]
    return bool(store["used_bytes"] <= store["budget_bytes"] * RemoteSettings(seeds=()).demote_above)


def reachable(tmemd: TmemdProcess) -> bool:
    with tmemd.control() as control:
        remote = control.stats()["remote"]
    return remote is not None and remote["reachable"]


def test_a_master_killed_mid_workload_loses_no_page(tmp_path: Path, cluster: LocalCluster) -> None:
    with start_tmemd(tmp_path / "run", cluster, wait_s=20) as tmemd:
        errors: list[BaseException] = []

        def workload() -> None:
            try:
                with NbdClient(tmemd.nbd_socket("g1"), "g1", timeout=60) as client:
                    for generation in range(3):
                        write_slots(client, SLOTS, generation)
            except BaseException as error:  # reported by the test thread
                errors.append(error)

        writer = threading.Thread(target=workload)
        writer.start()
        assert wait_until(lambda: remote_stats(tmemd)["remote_pages"] != 0, 30)
        victim = cluster.masters()[0]
        assert writer.is_alive()  # the kill lands mid-workload
        cluster.kill(victim)
        cluster.wait_failover(victim)
        # Restarted (as a supervisor would), it rejoins as the new master's replica:
        # until then that shard has no replica and WAIT 1 cannot be met, so its
        # writes wait (and would stay in tmemd's memory after --remote-wait).
        cluster.restart(victim)
        writer.join(120)
        assert not writer.is_alive() and not errors
        with NbdClient(tmemd.nbd_socket("g1"), "g1", timeout=60) as client:
            assert read_errors(client, SLOTS, generation=2) == []
        stats = remote_stats(tmemd)
        assert stats["get_missing"] == 0 and stats["get_errors"] == 0
        with tmemd.control() as control:
            remote = control.stats()["remote"]
        assert remote is not None  # the tier saw the master go (and followed the failover)
        assert remote["connection_errors"] + remote["redirections"] + remote["command_errors"] > 0


def test_a_cluster_stopped_shorter_than_remote_wait_delays_reads(
        tmp_path: Path, cluster: LocalCluster) -> None:
    with start_tmemd(tmp_path / "run", cluster, wait_s=15) as tmemd:
        with NbdClient(tmemd.nbd_socket("g1"), "g1", timeout=60) as client:
            write_slots(client, SLOTS)
            cluster.pause()
            resumed_at = time.monotonic() + 2.0
            threading.Timer(2.0, cluster.resume).start()
            started = time.monotonic()
            assert read_errors(client, range(0, 256)) == []  # the oldest: remote
            assert time.monotonic() >= resumed_at - 0.1 > started  # it waited for the cluster
            assert read_errors(client, SLOTS) == []
        assert reachable(tmemd)


def test_a_cluster_stopped_longer_than_remote_wait_fails_remote_reads_only(
        tmp_path: Path, cluster: LocalCluster) -> None:
    with start_tmemd(tmp_path / "run", cluster, wait_s=2) as tmemd:
        with NbdClient(tmemd.nbd_socket("g1"), "g1", timeout=60) as g1, \
                NbdClient(tmemd.nbd_socket("g2"), "g2", timeout=60) as g2:
            # g2's few pages first: memory then fills with g1's, and demotion takes
            # from the guest using the most memory (g1), so g2's stay in memory.
            write_slots(g2, range(0, 128))
            write_slots(g1, SLOTS)
            assert remote_stats(tmemd, "g2")["remote_pages"] == 0
            # The first slots are the coldest: demoted once demotion has caught up
            # (a loaded machine may leave it behind the writes for a while).
            assert wait_until(lambda: demotion_done(tmemd), 30, interval=0.2)
            cluster.pause()
            try:
                error, _ = g1.read(0, 64 * PAGE)  # remote pages: EIO once the wait is over
                assert error == nbd.Error.EIO
                assert not reachable(tmemd)
                # New pages beyond memory go to the fallback disk and read back.
                with tmemd.control() as control:
                    refused_before = control.stats()["nbd"]["g1"]["pages_refused_fallback"]
                write_slots(g1, range(4096, 4608))
                with tmemd.control() as control:
                    assert control.stats()["nbd"]["g1"]["pages_refused_fallback"] > refused_before
                assert read_errors(g1, range(4096, 4608)) == []
                # The other guest is not held up.
                assert read_errors(g2, range(0, 128)) == []
                write_slots(g2, range(0, 128), generation=1)
                assert read_errors(g2, range(0, 128), generation=1) == []
            finally:
                cluster.resume()
            # The cluster is back: so are the pages it kept.
            assert wait_until(lambda: reachable(tmemd), 15)
            assert read_errors(g1, SLOTS) == []
            assert read_errors(g1, range(4096, 4608)) == []
        stats = remote_stats(tmemd)
        assert isinstance(stats["get_unreachable"], int) and stats["get_unreachable"] > 0
