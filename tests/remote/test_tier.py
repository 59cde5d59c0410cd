"""tmemd's remote tier against a real Redis Cluster (3 masters, 3 replicas on
loopback): pages that do not fit in memory go to the cluster and come back
exactly; a batch is one round trip per node; a damaged, foreign, older or
missing copy is an error, never data; quotas; a kill -9 of tmemd finds its
remote pages again; a cluster that may evict is refused."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from tmem_host.daemon.process import TmemdProcess
from tmem_host.nbd.client import ClientRequest, NbdClient
from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.tier import VALUE_HEADER, decode_value, is_page_key
from tmem_host.replies import RemoteStats
from tmem_host.waiting import wait_until
from tmem_wire import nbd

from .test_values import reference_tmr1

PAGE = 4096
SLOTS_PER_REQUEST = 64


def page_content(slot: int, generation: int = 0) -> bytes:
    """Half-compressible and unique per slot and generation: a wrong page is caught."""
    rng = random.Random(slot * 1000 + generation)
    head = rng.randbytes(PAGE // 2)
    return head + bytes([slot & 0xFF, generation & 0xFF]) * (PAGE // 4)


def write_slots(client: NbdClient, slots: range, generation: int = 0) -> None:
    requests = []
    for first in range(slots.start, slots.stop, SLOTS_PER_REQUEST):
        last = min(first + SLOTS_PER_REQUEST, slots.stop)
        data = b"".join(page_content(slot, generation) for slot in range(first, last))
        requests.append(ClientRequest(nbd.Command.WRITE, first * PAGE, len(data), data))
    for reply in client.run(requests, depth=4):
        assert reply.error == 0


def read_errors(client: NbdClient, slots: range, generation: int = 0) -> list[int]:
    """The slots that did not read back exactly (an error or other bytes)."""
    bad: list[int] = []
    for first in range(slots.start, slots.stop, SLOTS_PER_REQUEST):
        last = min(first + SLOTS_PER_REQUEST, slots.stop)
        error, data = client.read(first * PAGE, (last - first) * PAGE)
        for slot in range(first, last):
            offset = (slot - first) * PAGE
            if error or data[offset:offset + PAGE] != page_content(slot, generation):
                bad.append(slot)
    return bad


@pytest.fixture(params=[0], ids=["no-read-ahead"])
def tmemd_remote(request: pytest.FixtureRequest, tmp_path: Path,
                 redis_cluster: LocalCluster) -> Iterator[TmemdProcess]:
    """A tmemd whose 4 MiB budget holds a quarter of what the tests write; by default
    without read-ahead, so that the round trips the tests count are their reads'
    own (a test parametrizes ``tmemd_remote`` indirectly for other windows)."""
    with TmemdProcess(tmp_path / "run", budget="4M", guests=("g1", "g2"), nbd_size="32M",
                      extra_args=["--remote", redis_cluster.seed_spec, "--remote-replicas", "1",
                                  "--remote-read-ahead", str(request.param)]) as tmemd:
        yield tmemd
    redis_cluster.flushall()


def remote_totals(tmemd: TmemdProcess) -> RemoteStats:
    with tmemd.control() as control:
        remote = control.stats()["remote"]
    assert remote is not None
    return remote


def wait_for_demoter(tmemd: TmemdProcess) -> None:
    """Until the demoter has stopped moving pages to the cluster after the writes
    (down to its target): no round trip for longer than its 0.5 s wake-up."""
    samples = [remote_totals(tmemd)["round_trips"]]

    def stopped() -> bool:
        samples.append(remote_totals(tmemd)["round_trips"])
        return samples[-1] == samples[-2]

    time.sleep(0.7)
    assert wait_until(stopped, 30, interval=0.7), "the demoter did not stop"


def remote_stats(tmemd: TmemdProcess, guest: str = "g1") -> dict[str, object]:
    return dict(remote_totals(tmemd)["guests"][guest])


def test_pages_beyond_memory_go_to_the_cluster_and_come_back_exactly(
        tmemd_remote: TmemdProcess) -> None:
    slots = range(0, 4096)  # 16 MiB through a 4 MiB budget
    with NbdClient(tmemd_remote.nbd_socket("g1"), "g1") as client:
        write_slots(client, slots)
        stats = remote_stats(tmemd_remote)
        with tmemd_remote.control() as control:
            export = control.stats()["nbd"]["g1"]
        assert export["pages_refused_fallback"] == 0  # nothing went to the disk
        assert export["slots_in_tmem"] == len(slots)
        assert isinstance(stats["remote_pages"], int) and stats["remote_pages"] > len(slots) // 2
        assert read_errors(client, slots) == []
        # Rewritten pages replace their remote copies (new versions, old ones deleted).
        write_slots(client, range(0, 512), generation=1)
        assert read_errors(client, range(0, 512), generation=1) == []
        assert read_errors(client, range(512, 4096)) == []
    stats = remote_stats(tmemd_remote)
    assert stats["get_errors"] == 0 and stats["get_missing"] == 0 and stats["stranded"] == 0


def test_a_64_page_read_is_one_round_trip_per_node(tmemd_remote: TmemdProcess,
                                                   redis_cluster: LocalCluster) -> None:
    with NbdClient(tmemd_remote.nbd_socket("g1"), "g1") as client:
        # 4096 slots through a 4 MiB budget: demotion takes the oldest first, so
        # the first 1024 are all in the cluster.
        write_slots(client, range(0, 4096))

        def round_trips() -> int:
            return remote_totals(tmemd_remote)["round_trips"]

        # The demoter goes on after the writes (down to its target): its pipelines
        # are round trips too. Count from when it has stopped.
        wait_for_demoter(tmemd_remote)

        # 64 aligned slots share one hash tag: one MGET on one node.
        before = round_trips()
        error, _ = client.read(512 * PAGE, 64 * PAGE)
        assert error == 0
        assert round_trips() - before == 1
        # Unaligned: two tags, at most two nodes.
        before = round_trips()
        error, _ = client.read(544 * PAGE, 64 * PAGE)
        assert error == 0
        assert 1 <= round_trips() - before <= 2
        # 16 READs in flight: those waiting in the connection fetch together, one
        # pipeline per master, not one round trip each.
        before = round_trips()
        requests = [ClientRequest(nbd.Command.READ, first * PAGE, 64 * PAGE)
                    for first in range(0, 1024, 64)]
        replies = list(client.run(requests, depth=16))
        assert [reply.error for reply in replies] == [0] * len(requests)
        expected = {b"".join(page_content(slot) for slot in range(first, first + 64))
                    for first in range(0, 1024, 64)}
        assert {reply.data for reply in replies} == expected
        assert round_trips() - before <= 8
        # 256 slots over 4 tags: never more round trips than masters.
        before = round_trips()
        error, _ = client.read(0, 256 * PAGE)
        assert error == 0
        assert round_trips() - before <= len(redis_cluster.masters())


def _raw(node_port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=node_port)  # bytes, not decoded


def _page_keys(cluster: LocalCluster) -> list[tuple[redis.Redis, bytes]]:
    """Every page key of tmemd's, with a raw client of the master holding it. Not
    the fences and owner records: a test that damaged one of those instead of a
    page (as the scan's order once made it) tests nothing it means to."""
    found: list[tuple[redis.Redis, bytes]] = []
    for node in cluster.masters():
        client = _raw(node.port)
        found += [(client, key) for key in client.scan_iter(match=b"tmem:*", count=1000) if is_page_key(key)]
    return found


# Read back in order with read-ahead, the damaged pages are read ahead of their
# gets: still errors, never data.
@pytest.mark.parametrize("tmemd_remote", [0, 2], ids=["no-read-ahead", "read-ahead"], indirect=True)
def test_a_damaged_foreign_or_missing_copy_is_an_error_never_data(
        tmemd_remote: TmemdProcess, redis_cluster: LocalCluster) -> None:
    slots = range(0, 4096)
    with NbdClient(tmemd_remote.nbd_socket("g1"), "g1") as client:
        write_slots(client, slots)
        keys = _page_keys(redis_cluster)
        assert len(keys) >= 2048
        (node_a, key_a), (node_b, key_b), (node_c, key_c) = keys[0], keys[1], keys[2]
        # A flipped bit in the data.
        value = bytearray(cast(bytes, node_a.get(key_a)))
        value[VALUE_HEADER.size + 10] ^= 0x01
        node_a.set(key_a, bytes(value))
        # Another page's value, intact, under this key.
        node_b.set(key_b, cast(bytes, node_c.get(key_c)))
        # A copy gone.
        node_c.delete(key_c)
        bad = read_errors(client, slots)
        assert len(bad) >= 3
        # Every slot of the damaged requests failed as a whole (EIO); the others read back.
        for first in range(0, 4096, SLOTS_PER_REQUEST):
            error, _ = client.read(first * PAGE, SLOTS_PER_REQUEST * PAGE)
            in_bad = any(first <= slot < first + SLOTS_PER_REQUEST for slot in bad)
            assert (error == nbd.Error.EIO) == in_bad
    stats = remote_stats(tmemd_remote)
    assert isinstance(stats["get_errors"], int) and stats["get_errors"] >= 2
    assert isinstance(stats["get_missing"], int) and stats["get_missing"] >= 1


def test_pages_an_older_tmemd_wrote_in_the_first_value_format_read_back(
        tmemd_remote: TmemdProcess, redis_cluster: LocalCluster) -> None:
    """An upgrade keeps the cluster's pages: a third of them rewritten as TMR1 values
    (what tmemd wrote before TMR2, tests/remote/test_values.py's reference) read
    back exactly; one of them damaged is an error, never data."""
    slots = range(0, 4096)
    with NbdClient(tmemd_remote.nbd_socket("g1"), "g1") as client:
        write_slots(client, slots)
        keys = _page_keys(redis_cluster)
        assert len(keys) >= 2048
        for node, key in keys[::3]:
            version = int(key.rsplit(b":", 1)[1], 16)
            stored = decode_value(key, version, cast(bytes, node.get(key)))
            assert stored is not None
            node.set(key, reference_tmr1(key, version, stored))
        damaged_node, damaged_key = keys[3]
        value = bytearray(cast(bytes, damaged_node.get(damaged_key)))
        assert value.startswith(b"TMR1")
        value[-1] ^= 0x80
        damaged_node.set(damaged_key, bytes(value))
        # The damaged page's request fails as a whole (EIO); every other slot reads back.
        bad = read_errors(client, slots)
        assert 1 <= len(bad) <= SLOTS_PER_REQUEST
        assert len({slot // SLOTS_PER_REQUEST for slot in bad}) == 1
    stats = remote_stats(tmemd_remote)
    assert stats["get_errors"] == 1 and stats["get_missing"] == 0


def test_a_guest_beyond_its_remote_cap_goes_to_its_fallback_disk(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    with TmemdProcess(tmp_path / "run", budget="1M", guests=("g1:remote-cap=2M",),
                      nbd_size="32M", extra_args=["--remote", redis_cluster.seed_spec]) as tmemd:
        slots = range(0, 2048)
        with NbdClient(tmemd.nbd_socket("g1"), "g1") as client:
            write_slots(client, slots)
            stats = remote_stats(tmemd)
            with tmemd.control() as control:
                export = control.stats()["nbd"]["g1"]
            assert isinstance(stats["remote_bytes"], int) and 0 < stats["remote_bytes"] <= 2 << 20
            assert stats["limit_bytes"] == 2 << 20
            assert export["pages_refused_fallback"] > 0
            assert read_errors(client, slots) == []
    redis_cluster.flushall()


def test_kill_9_of_tmemd_finds_its_remote_pages_again(tmemd_remote: TmemdProcess) -> None:
    slots = range(0, 2048)
    with NbdClient(tmemd_remote.nbd_socket("g1"), "g1") as client:
        write_slots(client, slots)
    wait_for_demoter(tmemd_remote)  # (else a demotion may land between the count and the kill)
    before = remote_stats(tmemd_remote)
    assert isinstance(before["remote_pages"], int) and before["remote_pages"] > 0
    tmemd_remote.crash_and_restart()
    after = remote_stats(tmemd_remote)
    assert after["remote_pages"] == before["remote_pages"]
    with NbdClient(tmemd_remote.nbd_socket("g1"), "g1") as client:
        assert read_errors(client, slots) == []


def test_tmemd_refuses_a_cluster_that_may_evict_its_pages(tmp_path: Path,
                                                          redis_cluster: LocalCluster) -> None:
    redis_cluster.config_set("maxmemory-policy", "allkeys-lru")
    try:
        run_dir = tmp_path / "run"
        result = subprocess.run(
            [sys.executable, "-m", "tmem_host.daemon.main", "--run-dir", str(run_dir),
             "--budget", "8M", "--guest", "g1", "--nbd-size", "4M", "--journal-reserve", "1M",
             "--remote", redis_cluster.seed_spec, "--log-format", "text"],
            capture_output=True, text=True, timeout=60, env={**os.environ})
    finally:
        redis_cluster.config_set("maxmemory-policy", "noeviction")
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "cannot start" in line]
    assert len(lines) == 1 and "maxmemory-policy allkeys-lru" in lines[0]


def test_a_guests_evicted_ephemeral_pages_come_back_from_the_cluster(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """tmemd with `remote-ephemeral` for one guest: through the ABI, an
    ephemeral pool twice the budget reads back whole (the metadata of a remote
    page stays in memory: ~700 bytes); the other guest's evicted pages are
    dropped as before."""
    from tmem_host.daemon.client import AbiClient
    from tmem_wire.abi import PoolFlag, Status

    pages = [os.urandom(PAGE) for _ in range(1024)]  # 4 MiB through a 2 MiB budget
    keys = [((1, 0, n >> 6), n & 63) for n in range(len(pages))]
    found_pages: dict[str, int] = {}
    with TmemdProcess(tmp_path / "run", budget="2M", guests=("g1:remote-ephemeral", "g2"),
                      extra_args=["--remote", redis_cluster.seed_spec]) as tmemd:
        for guest in ("g1", "g2"):
            with AbiClient.open(tmemd.abi_socket(guest)) as client:
                pool_id, _ = client.new_pool(PoolFlag(0))
                for first in range(0, len(pages), 64):
                    assert client.put_batch(pool_id, keys[first:first + 64],
                                            pages[first:first + 64]) == [Status.OK] * 64
                found = 0
                for first in range(0, len(pages), 64):
                    got = client.get_batch(pool_id, keys[first:first + 64])
                    for data, page in zip(got, pages[first:first + 64]):
                        assert data is None or data == page  # a miss, never wrong data
                        found += data is not None
                found_pages[guest] = found
                client.destroy_pool(pool_id)
        stats = remote_stats(tmemd)
    redis_cluster.flushall()
    assert found_pages["g1"] > len(pages) * 0.9  # exclusive gets: each page read once
    assert found_pages["g2"] < len(pages) * 0.6
    assert isinstance(stats["ephemeral_demoted"], int) and stats["ephemeral_demoted"] > len(pages) // 2
    assert stats["get_errors"] == stats["get_missing"] == 0
