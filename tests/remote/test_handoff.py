"""Handing a guest from one tmemd to another on one cluster (docs/REMOTE.md,
"Handing a guest off"): two tmemd processes with their own run dirs, host ids and
budgets. The remote pages stay where they are; the destination owns the guest
from its restore on, and the source can no longer delete its keys. A kill -9 of
the source or of the destination at each step loses no page and serves none stale:
the reads either return the guest's data or fail, and the documented recovery
(remote-claim, restore again, restore --replace) brings every page back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tmem_host.daemon.process import TmemdProcess
from tmem_host.failpoints import ENVIRONMENT
from tmem_host.nbd.client import NbdClient
from tmem_host.remote.cluster import LocalCluster
from tmem_host.waiting import wait_until

from ..daemon.test_control import ok, tmemctl
from .test_remote_control import remote
from .test_tier import read_errors, write_slots

# 8 MiB through a 4 MiB budget: about half of it goes to the cluster; a remote
# cap sends some of the rest to the fallback file.
SLOTS = range(0, 2048)
GUEST = "g1:remote-cap=1M"


@pytest.fixture
def hosts(tmp_path: Path, redis_cluster: LocalCluster) -> Iterator[dict[str, TmemdProcess]]:
    """Host a (its g1 filled) and host b (g1 configured, not owned), not started."""
    daemons = {name: TmemdProcess(tmp_path / name, budget="4M", guests=(GUEST,), nbd_size="32M",
                                  extra_args=["--remote", redis_cluster.seed_spec, "--host-id", name])
               for name in ("a", "b")}
    try:
        yield daemons
    finally:
        for daemon in daemons.values():
            if daemon.alive():
                daemon.terminate()
        redis_cluster.flushall()


def fill(daemon: TmemdProcess, generation: int = 0) -> None:
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        write_slots(client, SLOTS, generation)
    figures = remote(daemon)
    assert figures["remote_pages"] > 0 and figures["refused_quota"] > 0, figures


def errors(daemon: TmemdProcess, generation: int = 0) -> list[int]:
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        return read_errors(client, SLOTS, generation)


def with_failpoint(daemon: TmemdProcess, name: str) -> TmemdProcess:
    daemon.environment = {ENVIRONMENT: name}
    return daemon.start()


def restarted(daemon: TmemdProcess) -> TmemdProcess:
    """Start a daemon a failpoint killed again, without the failpoint."""
    assert wait_until(lambda: not daemon.alive(), 10)
    daemon.kill()  # reaps it and closes its pipes
    daemon.environment = {}
    return daemon.start()


def test_a_handed_off_guest_reads_back_on_the_destination_and_the_source_cannot_delete(
        hosts: dict[str, TmemdProcess], tmp_path: Path) -> None:
    a, b = hosts["a"].start(), hosts["b"].start()
    fill(a)
    assert remote(b)["fenced"]  # a owns g1: b leaves it alone
    handoff = tmp_path / "g1.handoff"
    line = ok(tmemctl(a, "handoff", "g1", str(handoff)))
    in_cluster = remote(a)["remote_pages"]
    assert line.startswith("g1: handed off ") and f"({in_cluster} of them by their keys in the cluster)" in line, line
    assert remote(a)["fenced"]
    # The remote pages are named, not copied: the file is far smaller than the disk.
    assert handoff.stat().st_size < len(SLOTS) * 4096 - in_cluster * 2048
    assert "g1: restored " in ok(tmemctl(b, "restore", str(handoff)))
    figures = remote(b)
    assert figures["epoch"] is not None and not figures["fenced"]
    assert figures["remote_pages"] == in_cluster
    assert errors(b) == []
    # The source forgets the guest: nothing of it is deleted in the cluster.
    assert "; 0 keys deleted in the cluster" in ok(tmemctl(a, "forget", "g1"))
    assert errors(b) == []
    # The destination owns the namespace: it writes there, and reads back.
    fill(b, generation=1)
    assert errors(b, generation=1) == []


def test_a_source_killed_after_fencing_keeps_its_pages_and_takes_the_guest_back(
        hosts: dict[str, TmemdProcess], tmp_path: Path) -> None:
    a = with_failpoint(hosts["a"], "handoff-relinquished")
    fill(a)
    failed = tmemctl(a, "handoff", "g1", str(tmp_path / "never"))
    assert failed.returncode != 0 and not (tmp_path / "never").exists()
    restarted(a)
    # Handed off to nobody: a does not claim it back by itself, but reads every page.
    assert remote(a)["fenced"]
    assert errors(a) == []
    ok(tmemctl(a, "remote-claim", "g1"))
    assert not remote(a)["fenced"]
    fill(a, generation=1)
    assert errors(a, generation=1) == []


@pytest.mark.parametrize("failpoint", ["restore-claimed", "restore-fallback-written",
                                       "restore-journal-written"])
def test_a_destination_killed_mid_restore_serves_nothing_stale_and_restores_again(
        hosts: dict[str, TmemdProcess], tmp_path: Path, failpoint: str) -> None:
    a = hosts["a"].start()
    fill(a)
    handoff = tmp_path / "g1.handoff"
    ok(tmemctl(a, "handoff", "g1", str(handoff)))
    b = with_failpoint(hosts["b"], failpoint)
    assert tmemctl(b, "restore", str(handoff)).returncode != 0
    restarted(b)
    bad = errors(b)
    if failpoint == "restore-claimed":  # nothing installed yet: b's g1 is still a blank disk
        with NbdClient(b.nbd_socket("g1"), "g1") as client:
            assert client.read(0, 4096)[1] == bytes(4096)
    elif failpoint == "restore-fallback-written":  # every slot fails until the journal is in
        assert bad == list(SLOTS)
    else:  # the journal's pages read; the fallback file's slots fail until restored again
        assert 0 < len(bad) < len(SLOTS)
    ok(tmemctl(b, "restore", str(handoff), *(["--replace"] if failpoint == "restore-journal-written"
                                              else [])))
    assert errors(b) == []
    assert not remote(b)["fenced"]
