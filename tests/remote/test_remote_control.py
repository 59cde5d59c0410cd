"""The remote tier's control commands and tmemctl against a real Redis Cluster:
`remote` shows a guest's pages in memory and in the cluster (and what the
cluster really holds); `remote-drain` moves them home or to the fallback disk
and they read back exactly; `remote-forget` deletes orphans but never pages a
served guest still references; `forget` deletes a guest's namespace."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
import redis

from tmem_host.daemon.control import ControlError
from tmem_host.daemon.process import TmemdProcess
from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.tier import GuestRemote, RemoteSettings, is_page_key, page_key
from tmem_host.replies import (
    ForgetReply, RemoteDrainReply, RemoteForgetReply, RemoteGuestReply, StatsReply,
)
from tmem_host.nbd.client import NbdClient
from tmem_host.waiting import wait_until

from ..daemon.test_control import assert_shape, ok, tmemctl
from .test_tier import read_errors, wait_for_demoter, write_slots

# 8 MiB through a 4 MiB budget: about half of it goes to the cluster.
SLOTS = range(0, 2048)


@pytest.fixture
def tmemd_remote(tmp_path: Path, redis_cluster: LocalCluster) -> Iterator[TmemdProcess]:
    with TmemdProcess(tmp_path / "run", budget="4M", guests=("g1", "g2"), nbd_size="32M",
                      extra_args=["--remote", redis_cluster.seed_spec]) as tmemd:
        yield tmemd
    redis_cluster.flushall()


def remote(tmemd: TmemdProcess, guest: str = "g1") -> RemoteGuestReply:
    with tmemd.control() as control:
        reply: RemoteGuestReply = control.request("remote", guest=guest)
    return reply


def cluster_keys(cluster: LocalCluster, uuid: str | UUID) -> list[bytes]:
    """The namespace's page keys, asking every master directly (not through tmemd)."""
    pattern = b"tmem:{%b:*" % UUID(str(uuid)).hex.encode()
    keys: list[bytes] = []
    for node in cluster.masters():
        client = redis.Redis(host="127.0.0.1", port=node.port)
        try:
            keys += [key for key in client.scan_iter(match=pattern, count=1000) if is_page_key(key)]
        finally:
            client.close()
    return keys


def fill(tmemd: TmemdProcess, guest: str = "g1") -> RemoteGuestReply:
    """Write SLOTS through the guest's NBD export (then disconnect): its figures."""
    with NbdClient(tmemd.nbd_socket(guest), guest) as client:
        write_slots(client, SLOTS)
    # Demotion goes on making room in memory after the writes: wait until it has
    # nothing left to do and the cluster holds just the guest's remote pages.
    demote_above = RemoteSettings(seeds=()).demote_above

    def resting() -> bool:
        with tmemd.control() as control:
            store = control.stats()["store"]
        figures = remote(tmemd, guest)
        return (store["used_bytes"] <= store["budget_bytes"] * demote_above
                and figures["cluster_keys"] == figures["remote_pages"])

    assert wait_until(resting, 15, interval=0.2)
    figures = remote(tmemd, guest)
    assert figures["remote_pages"] > 0
    return figures


def reads_back(tmemd: TmemdProcess, guest: str = "g1") -> bool:
    with NbdClient(tmemd.nbd_socket(guest), guest) as client:
        return read_errors(client, SLOTS) == []


def test_remote_shows_a_guests_pages_in_memory_and_in_the_cluster(
        tmemd_remote: TmemdProcess, redis_cluster: LocalCluster) -> None:
    figures = fill(tmemd_remote)
    assert_shape(figures, RemoteGuestReply)
    assert figures["guest"] == "g1" and figures["reachable"] is True
    assert figures["local_pages"] + figures["remote_pages"] == len(SLOTS)
    cluster_count = figures["cluster_keys"]
    assert cluster_count is not None and cluster_count >= figures["remote_pages"]
    assert figures["cluster_error"] is None
    assert len(cluster_keys(redis_cluster, figures["uuid"])) >= figures["remote_pages"]
    assert sum(figures["rtt_us_histogram"].values()) > 0

    text = ok(tmemctl(tmemd_remote, "remote", "g1"))
    assert "remote pages" in text and str(figures["remote_pages"]) in text
    assert figures["uuid"] in text and "round trips" in text
    # Its counters, read around and ahead included, one row each.
    assert "read ahead" in text and "prefetched" in text and "demoted" in text
    assert json.loads(ok(tmemctl(tmemd_remote, "remote", "g1", "--json")))["guest"] == "g1"
    stats = ok(tmemctl(tmemd_remote, "stats"))
    assert "remote tier" in stats and "reachable yes" in stats
    # The remote table's row: pages in memory and in the cluster, its rtt summary.
    g1_row = next(line for line in stats.splitlines() if line.startswith("│ g1 ") and " us" in line)
    assert f" {figures['local_pages']} " in g1_row and f" {figures['remote_pages']} " in g1_row
    top = ok(tmemctl(tmemd_remote, "top", "--once", "--interval", "0.2"))
    assert "remote gets/s" in top
    with tmemd_remote.control() as control:
        assert_shape(control.stats(), StatsReply)
        with pytest.raises(ControlError, match="no guest 'g9'"):
            control.request("remote", guest="g9")


def test_without_a_tier_remote_commands_fail_and_stats_are_unchanged(tmemd: TmemdProcess) -> None:
    with tmemd.control() as control:
        for command in ("remote", "remote-drain", "remote-forget"):
            with pytest.raises(ControlError, match="no remote tier"):
                control.request(command, guest="g1", to="home")
    result = tmemctl(tmemd, "remote", "g1")
    assert result.returncode == 1 and "no remote tier" in result.stderr
    assert "remote" not in ok(tmemctl(tmemd, "stats"))
    assert "remote" not in ok(tmemctl(tmemd, "top", "--once", "--interval", "0.1"))


def test_remote_drain_home_then_remote_forget_deletes_only_orphans(
        tmemd_remote: TmemdProcess, redis_cluster: LocalCluster) -> None:
    figures = fill(tmemd_remote)
    # Pages a served guest references are never deleted.
    result = tmemctl(tmemd_remote, "remote-forget", "g1")
    assert result.returncode == 1
    assert f"has {figures['remote_pages']} page(s) in the cluster" in result.stderr
    assert "remote-drain g1" in result.stderr
    # No room in memory: some stay in the cluster, and tmemctl says so.
    result = tmemctl(tmemd_remote, "remote-drain", "g1", "--to", "home")
    assert result.returncode == 1 and "left in the cluster" in result.stderr

    with tmemd_remote.control() as control:
        control.set_budget("64M")
        reply: RemoteDrainReply = control.request("remote-drain", guest="g1", to="home")
    assert_shape(reply, RemoteDrainReply)
    assert reply["left"] == 0 and reply["to"] == "home"
    assert "none left" in ok(tmemctl(tmemd_remote, "remote-drain", "g1", "--to", "home"))
    after = remote(tmemd_remote)
    assert (after["remote_pages"], after["local_pages"]) == (0, len(SLOTS))
    assert wait_until(lambda: remote(tmemd_remote)["cluster_keys"] == 0, 10)
    assert reads_back(tmemd_remote)
    assert after["get_errors"] == after["get_missing"] == 0

    # An orphan (a delete that never reached the cluster): the cluster holds more
    # than the guest references, and remote-forget deletes it.
    guest = GuestRemote("g1", UUID(after["uuid"]), None, 100)
    orphan = page_key(guest, 0, (1, 0, 0), 0, 1)
    with redis_cluster.master_of(orphan).client() as client:
        client.set(orphan, b"stale")
    shown = remote(tmemd_remote)
    assert (shown["cluster_keys"], shown["remote_pages"]) == (1, 0)
    assert "orphans" in ok(tmemctl(tmemd_remote, "remote", "g1"))
    with tmemd_remote.control() as control:
        forgotten: RemoteForgetReply = control.request("remote-forget", guest="g1")
        assert_shape(forgotten, RemoteForgetReply)
        assert (forgotten["deleted"], forgotten["uuid"]) == (1, after["uuid"])
        with pytest.raises(ControlError, match="served with uuid"):
            control.request("remote-forget", guest="g1", uuid=str(UUID(int=7)))
    assert cluster_keys(redis_cluster, after["uuid"]) == []
    assert remote(tmemd_remote)["limit_bytes"] is None  # its limit is back after the pause
    assert reads_back(tmemd_remote)


def test_remote_drain_to_disk_moves_every_page_to_the_fallback_file(
        tmemd_remote: TmemdProcess, redis_cluster: LocalCluster) -> None:
    figures = fill(tmemd_remote)
    output = ok(tmemctl(tmemd_remote, "remote-drain", "g1", "--to", "disk", "--timeout", "20"))
    assert output.startswith(f"g1: drained {len(SLOTS)} persistent pages in ")
    with tmemd_remote.control() as control:
        stats = control.stats()
    assert stats["nbd"]["g1"]["slots_in_tmem"] == 0
    assert stats["guests"]["g1"]["draining"] is True
    assert remote(tmemd_remote)["remote_pages"] == 0
    assert wait_until(lambda: cluster_keys(redis_cluster, figures["uuid"]) == [], 10)
    assert reads_back(tmemd_remote)
    with tmemd_remote.control() as control:
        reply: RemoteDrainReply = control.request("remote-drain", guest="g1", to="disk")
        assert_shape(reply, RemoteDrainReply)
        assert (reply["left"], reply["persistent_pages"], reply["draining"]) == (0, 0, True)
        with pytest.raises(ControlError, match="'to' must be"):
            control.request("remote-drain", guest="g1", to="mars")
    ok(tmemctl(tmemd_remote, "thaw", "g1"))


def test_forget_deletes_a_guests_namespace_served_or_not(
        tmemd_remote: TmemdProcess, redis_cluster: LocalCluster) -> None:
    g1 = fill(tmemd_remote, "g1")
    g2 = fill(tmemd_remote, "g2")
    with tmemd_remote.control() as control:
        reply: ForgetReply = control.request("forget", guest="g1")
        assert_shape(reply, ForgetReply)
        assert reply["configured"] is True and reply["remote_keys_deleted"] >= 0
        assert cluster_keys(redis_cluster, g1["uuid"]) == []
        assert remote(tmemd_remote, "g1")["remote_pages"] == 0
        # A guest tmemd no longer serves: its journal still names its remote
        # pages, so only forget (both at once) may delete them.
        control.request("remove-guest", guest="g2")
        assert cluster_keys(redis_cluster, g2["uuid"])
        with pytest.raises(ControlError, match="has a journal"):
            control.request("remote-forget", guest="g2")
    output = ok(tmemctl(tmemd_remote, "forget", "g2"))
    assert "keys deleted in the cluster" in output
    assert cluster_keys(redis_cluster, g2["uuid"]) == []
    # Not served and no journal: its namespace goes by name (or --uuid).
    assert "deleted 0 keys of namespace " + g2["uuid"] in ok(
        tmemctl(tmemd_remote, "remote-forget", "g2"))
    other = UUID(int=42)
    assert str(other) in ok(tmemctl(tmemd_remote, "remote-forget", "g2", "--uuid", str(other)))
    # g1 starts afresh and uses the cluster again.
    fill(tmemd_remote, "g1")
    assert reads_back(tmemd_remote, "g1")


def test_save_reads_remote_pages_back_and_restore_takes_the_guest_over(
        tmemd_remote: TmemdProcess, tmp_path: Path, redis_cluster: LocalCluster) -> None:
    with NbdClient(tmemd_remote.nbd_socket("g1"), "g1") as client:
        write_slots(client, SLOTS)
    wait_for_demoter(tmemd_remote)  # (CI once saw it move 256 more pages before the save)
    in_cluster = remote(tmemd_remote)["remote_pages"]
    assert in_cluster > len(SLOTS) // 4, in_cluster
    saved = tmp_path / "g1.tmemsave"
    line = ok(tmemctl(tmemd_remote, "save", "g1", str(saved)))
    assert f"({in_cluster} read back from the cluster)" in line, line
    # Another tmemd, no remote tier, a budget that holds the whole disk.
    with TmemdProcess(tmp_path / "elsewhere", budget="24M", guests=("g1",), nbd_size="32M") as target:
        assert "g1: restored " in ok(tmemctl(target, "restore", str(saved)))
        with NbdClient(target.nbd_socket("g1"), "g1") as client:
            assert read_errors(client, SLOTS) == []
    # Another host on the same cluster: the restore takes the guest's namespace over,
    # and the tmemd it was saved from can no longer delete its keys.
    uuid = remote(tmemd_remote)["uuid"]
    with TmemdProcess(tmp_path / "host-b", budget="4M", guests=("g1",), nbd_size="32M",
                      extra_args=["--remote", redis_cluster.seed_spec, "--host-id", "b"]) as target:
        assert remote(target)["fenced"]  # host a owns it: b leaves it alone until the restore
        assert "g1: restored " in ok(tmemctl(target, "restore", str(saved)))
        figures = remote(target)
        assert figures["epoch"] is not None and not figures["fenced"]
        assert wait_until(lambda: remote(target)["remote_pages"] > 0, 15)  # demoted: b writes there
        # The old host forgets the guest: its deletes of the guest's pages and of the
        # namespace are refused by the cluster (FENCED), not by its own good timing.
        forget = tmemctl(tmemd_remote, "forget", "g1")
        assert forget.returncode == 1 and "keys in the cluster remain" in forget.stderr, forget
        assert remote(tmemd_remote)["fenced"]
        with NbdClient(target.nbd_socket("g1"), "g1") as client:
            assert read_errors(client, SLOTS) == []
        assert remote(target)["uuid"] == uuid
