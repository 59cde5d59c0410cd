"""JournaledStore against real journal files: what a second store replays from the
first one's state dir is exactly the first one's persistent pools (ids, pages,
accounting), never a page that was flushed, refused or overwritten."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tmem_host.journal.journaled import JournaledStore, journal_path
from tmem_host.store import Client, Store
from tmem_wire.abi import WHOLE_OBJECT, Status

PAGE = 4096


def page(number: int, version: int = 0) -> bytes:
    """Mixed content: same-filled, compressible and incompressible pages."""
    kind = number % 3
    if kind == 0:
        return (number * 1000 + version).to_bytes(8, "little") * (PAGE // 8)
    if kind == 1:
        return (f"page {number} version {version} " * 300).encode()[:PAGE]
    return random.Random(number * 7 + version).randbytes(PAGE)


def reopen(state_dir: Path, name: str = "g1", **client_args: object) -> tuple[JournaledStore, Client]:
    """A new store on the same state dir: what tmemd does after a kill -9."""
    store = JournaledStore(1 << 30, state_dir=state_dir)
    return store, store.add_client(name, **client_args)  # type: ignore[arg-type]


def contents(store: Store, client: Client) -> dict[tuple[int, tuple[int, int, int], int], bytes]:
    found = {}
    for pool_id, pool in enumerate(client.pools):
        if pool is not None:
            for oid, index, _ in list(Store.stored_pages(pool)):
                status, data = store.get(client, pool_id, oid, index)
                assert status == Status.OK and data is not None
                found[(pool_id, oid, index)] = data
    return found


def test_persistent_pools_come_back_with_ids_pages_and_accounting(tmp_path: Path) -> None:
    store, client = reopen(tmp_path)
    _, eph, _ = store.new_pool(client, persistent=False)
    _, p1, _ = store.new_pool(client, persistent=True)
    _, p2, _ = store.new_pool(client, persistent=True, label="nbd")
    _, gone, _ = store.new_pool(client, persistent=True)
    assert (eph, p1, p2, gone) == (0, 1, 2, 3)
    for number in range(300):
        assert store.put(client, p1, (number % 5, 0, 0), number, page(number)) == Status.OK
    keys = [((9, 9, 9), index) for index in range(64)]
    assert store.put_many(client, p2, keys, [page(i) for i in range(64)]) == [Status.OK] * 64
    store.put(client, eph, (1, 0, 0), 0, page(1))
    store.put(client, gone, (1, 0, 0), 0, page(2))
    store.flush_page(client, p1, (0, 0, 0), 0)
    store.flush_object(client, p1, (1, 0, 0))
    store.flush_many(client, p2, [((9, 9, 9), 3), ((9, 9, 9), 4)])
    store.put(client, p1, (2, 0, 0), 2, page(2, version=1))  # an overwrite
    assert store.destroy_pool(client, gone) == Status.OK
    expected = contents(store, client)
    expected = {key: data for key, data in expected.items() if key[0] != eph}
    persistent_bytes = client.stored_bytes - client.ephemeral_bytes

    again, restored = reopen(tmp_path)
    assert contents(again, restored) == expected
    assert [pool is not None for pool in restored.pools[:4]] == [False, True, True, False]
    assert restored.pools[2] is not None and restored.pools[2].label == "nbd"
    assert again.get(restored, p1, (0, 0, 0), 0)[0] == Status.MISS
    assert again.get(restored, p1, (1, 0, 0), 1)[0] == Status.MISS
    assert again.get(restored, p1, (2, 0, 0), 2) == (Status.OK, page(2, version=1))
    assert restored.stored_bytes == again.used_bytes == persistent_bytes
    assert again.stats()["clients"]["g1"]["pages"] == len(expected)
    # A new pool takes the lowest free id, around the restored ones.
    assert again.new_pool(restored, persistent=False)[1] == 0
    assert again.new_pool(restored, persistent=True)[1] == 3


def test_a_refused_or_frozen_put_erases_the_older_copy_in_the_journal(tmp_path: Path) -> None:
    store = JournaledStore(1 << 30, state_dir=tmp_path)
    client = store.add_client("g1", cap_bytes=PAGE * 4)
    _, pool, _ = store.new_pool(client, persistent=True)
    incompressible = [random.Random(n).randbytes(PAGE) for n in range(6)]
    keys = [((0, 0, 0), n) for n in range(6)]
    assert store.put_many(client, pool, keys[:2], incompressible[:2]) == [Status.OK] * 2
    statuses = store.put_many(client, pool, keys, incompressible[::-1])
    assert Status.REFUSED in statuses
    store.freeze(client)
    assert store.put(client, pool, (0, 0, 0), 0, page(5)) == Status.FROZEN
    expected = contents(store, client)

    again, restored = reopen(tmp_path, cap_bytes=PAGE * 4)
    assert contents(again, restored) == expected
    for (oid, index), status in zip(keys, statuses):
        if status != Status.OK or index == 0:
            assert again.get(restored, pool, oid, index)[0] == Status.MISS


def test_dedup_and_fill_pages_replay_with_the_same_accounting(tmp_path: Path) -> None:
    store, client = reopen(tmp_path, dedup=True)
    _, pool, _ = store.new_pool(client, persistent=True)
    same = page(2)
    for index in range(10):
        store.put(client, pool, (0, 0, 0), index, same if index % 2 else page(index * 3))
    before = store.stats()["clients"]["g1"]
    again, restored = reopen(tmp_path, dedup=True)
    after = again.stats()["clients"]["g1"]
    assert contents(again, restored) == contents(store, client)
    for key in ("pages", "stored_bytes", "raw_bytes", "dedup_blobs"):
        assert after[key] == before[key], key


def test_a_torn_tail_is_cut_and_everything_before_it_restored(tmp_path: Path) -> None:
    store, client = reopen(tmp_path)
    _, pool, _ = store.new_pool(client, persistent=True)
    for index in range(20):
        store.put(client, pool, (0, 0, 0), index, page(index + 1))
    path = journal_path(tmp_path, "g1")
    size = path.stat().st_size
    os.truncate(path, size - 100)  # the last PUT, cut mid-record by a crash
    again, restored = reopen(tmp_path)
    journal = again.journal(restored)
    assert journal is not None and journal.replay.truncated_bytes > 0
    restored_pool = restored.pools[pool]
    assert restored_pool is not None and restored_pool.pages == 19
    assert again.get(restored, pool, (0, 0, 0), 19)[0] == Status.MISS
    assert path.stat().st_size == journal.size_bytes < size - 100
    # Appends continue from the cut: a third start sees them.
    again.put(restored, pool, (0, 0, 0), 19, page(99))
    third, restored3 = reopen(tmp_path)
    assert third.get(restored3, pool, (0, 0, 0), 19) == (Status.OK, page(99))


def test_compaction_keeps_content_and_shrinks_the_file(tmp_path: Path) -> None:
    store = JournaledStore(1 << 30, state_dir=tmp_path, compact_floor=256 << 10)
    client = store.add_client("g1")
    _, pool, _ = store.new_pool(client, persistent=True)
    _, other, _ = store.new_pool(client, persistent=True, label="nbd")
    store.put(client, other, (5, 0, 0), 1, page(2))
    keys = [((n % 16, 0, 0), n // 16) for n in range(64)]
    for version in range(40):  # the same 64 keys rewritten: mostly dead records
        store.put_many(client, pool, keys, [page(n, version) for n in range(64)])
        store.flush_many(client, pool, [((3, 0, 0), WHOLE_OBJECT)])
    journal = store.journal(client)
    assert journal is not None and journal.compactions > 0
    stats = store.journal_stats(client)
    assert stats["size_bytes"] < 2 * stats["live_bytes"] + (256 << 10)
    assert journal_path(tmp_path, "g1").stat().st_size == stats["size_bytes"]
    expected = contents(store, client)
    again, restored = reopen(tmp_path)
    assert contents(again, restored) == expected and len(expected) == 61
    other_pool = restored.pools[other]
    assert other_pool is not None and other_pool.label == "nbd"


def test_a_crash_during_compaction_leaves_the_old_journal(tmp_path: Path) -> None:
    store, client = reopen(tmp_path)
    _, pool, _ = store.new_pool(client, persistent=True)
    for index in range(50):
        store.put(client, pool, (0, 0, 0), index, page(index))
    expected = contents(store, client)
    path = journal_path(tmp_path, "g1")
    # What a kill -9 halfway through a compaction leaves: a partial NAME.journal.tmp
    # next to the intact journal (os.replace never ran).
    store.compact(client)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(path.read_bytes()[:1000])
    store.put(client, pool, (0, 0, 0), 0, page(0, version=5))
    expected[(pool, (0, 0, 0), 0)] = page(0, version=5)
    again, restored = reopen(tmp_path)
    assert contents(again, restored) == expected
    assert not tmp.exists()


def test_remove_client_deletes_its_journal(tmp_path: Path) -> None:
    store, client = reopen(tmp_path)
    _, pool, _ = store.new_pool(client, persistent=True)
    store.put(client, pool, (0, 0, 0), 0, page(1))
    store.remove_client(client)
    assert not journal_path(tmp_path, "g1").exists()
    again, restored = reopen(tmp_path)
    assert all(each is None for each in restored.pools)


def test_ephemeral_pools_write_no_records(tmp_path: Path) -> None:
    store, client = reopen(tmp_path)
    _, pool, _ = store.new_pool(client, persistent=False)
    store.put_many(client, pool, [((0, 0, 0), n) for n in range(32)], [page(n) for n in range(32)])
    store.get(client, pool, (0, 0, 0), 1)
    store.flush_many(client, pool, [((0, 0, 0), 2)])
    store.destroy_pool(client, pool)
    assert journal_path(tmp_path, "g1").stat().st_size == 0


@pytest.mark.parametrize("damage_at", [0.3, 0.7])
def test_corruption_in_the_middle_restores_nothing(tmp_path: Path, damage_at: float) -> None:
    store, client = reopen(tmp_path)
    _, pool, _ = store.new_pool(client, persistent=True)
    for index in range(40):
        store.put(client, pool, (0, 0, 0), index, page(3 * index + 2))  # incompressible
    path = journal_path(tmp_path, "g1")
    data = bytearray(path.read_bytes())
    data[int(len(data) * damage_at)] ^= 0xFF
    path.write_bytes(bytes(data))
    # What came after the damage may have rewritten or flushed any page before it:
    # nothing is restored, and the guest is not resumed (its reads fail as lost).
    again, restored = reopen(tmp_path)
    journal = again.journal(restored)
    assert journal is not None and journal.replay.error and journal.state_lost
    assert all(each is None for each in restored.pools) and not again.resumed(restored)
    # The journal was rewritten empty: the next start restores nothing either, and
    # does not claim the old state (it was not there to vouch for).
    third, restored3 = reopen(tmp_path)
    assert contents(third, restored3) == {}


def test_deferred_records_reach_the_file_when_the_block_ends(tmp_path: Path) -> None:
    store, client = reopen(tmp_path)
    _, pool, _ = store.new_pool(client, persistent=True)
    store.put(client, pool, (0, 0, 0), 0, page(1))
    path = journal_path(tmp_path, "g1")
    size = path.stat().st_size
    with store.deferred(client):
        store.put_many(client, pool, [((0, 0, 0), 0), ((0, 0, 0), 1)], [page(2), page(3)])
        store.flush_page(client, pool, (0, 0, 0), 1)
        assert path.stat().st_size == size
        # A crash here: a restart sees the pool as it was before the block.
        mid, restored = reopen(tmp_path)
        assert contents(mid, restored) == {(pool, (0, 0, 0), 0): page(1)}
    journal = store.journal(client)
    assert journal is not None and journal.writes == 3  # NEW_POOL, PUT, the block's one write
    again, restored = reopen(tmp_path)
    assert contents(again, restored) == {(pool, (0, 0, 0), 0): page(2)}


def test_a_failed_compaction_keeps_the_journal_and_backs_off(tmp_path: Path) -> None:
    store = JournaledStore(1 << 30, state_dir=tmp_path, compact_floor=64 << 10)
    client = store.add_client("g1")
    _, pool, _ = store.new_pool(client, persistent=True)
    path = journal_path(tmp_path, "g1")
    path.with_name(path.name + ".tmp").mkdir()  # where the copy would go: not writable
    for version in range(30):
        statuses = store.put_many(client, pool, [((0, 0, 0), n) for n in range(16)],
                                  [page(3 * n + 2, version) for n in range(16)])
        assert statuses == [Status.OK] * 16
    journal = store.journal(client)
    assert journal is not None and journal.compactions == 0 and journal.compact_floor > 64 << 10
    expected = contents(store, client)
    path.with_name(path.name + ".tmp").rmdir()
    again, restored = reopen(tmp_path)
    assert contents(again, restored) == expected


def test_a_failed_write_retires_the_journal_and_the_store_carries_on(tmp_path: Path) -> None:
    store, client = reopen(tmp_path)
    _, pool, _ = store.new_pool(client, persistent=True)
    assert store.put(client, pool, (0, 0, 0), 0, page(1)) == Status.OK
    journal = store.journal(client)
    assert journal is not None
    # The journal's descriptor turns read-only: the next append fails (EBADF), as a
    # full disk or an I/O error would fail it.
    read_only = os.open(journal.path, os.O_RDONLY)
    os.dup2(read_only, journal.fd)
    os.close(read_only)
    assert store.put(client, pool, (0, 0, 0), 1, page(2)) == Status.OK
    assert store.get(client, pool, (0, 0, 0), 1) == (Status.OK, page(2))
    stats = store.journal_stats(client)
    assert stats["broken"] and stats["write_errors"] == 1
    # Deleted, not kept: a copy would keep a full disk full, and must never be replayed.
    assert list(tmp_path.iterdir()) == []
    # Not replayed: a restart knows nothing of the guest's pages (and the NBD
    # export starts 'lost', tests/nbd/test_crash.py), rather than an old state.
    again, restored = reopen(tmp_path)
    assert all(each is None for each in restored.pools)


def test_an_admin_flush_is_remembered_as_lost_until_the_guest_writes(tmp_path: Path) -> None:
    store = JournaledStore(1 << 30, state_dir=tmp_path, compact_floor=64 << 10)
    client = store.add_client("g1")
    _, pool, _ = store.new_pool(client, persistent=True, label="nbd")
    keys = [((n % 16, 0, 0), n // 16) for n in range(40)]
    store.put_many(client, pool, keys, [page(n) for n in range(40)])
    store.flush_client(client)  # what tmemctl flush does
    assert store.lost_keys(client, pool) == frozenset(keys)
    store.put(client, pool, *keys[0], page(99))  # written again: the guest's own
    store.flush_many(client, pool, [keys[1]])  # flushed by the guest: no longer lost
    store.flush_object(client, pool, keys[2][0])  # the object of keys 2, 18, 34
    expected_lost = frozenset(keys[3:]) - {keys[18], keys[34]}
    assert store.lost_keys(client, pool) == expected_lost
    again, restored = reopen(tmp_path)
    assert again.lost_keys(restored, pool) == expected_lost
    # Compaction keeps them (LOST records): rewrite, then a third start.
    again.compact(restored)
    third, restored3 = reopen(tmp_path)
    assert third.lost_keys(restored3, pool) == expected_lost
    assert contents(third, restored3) == {(pool, keys[0][0], keys[0][1]): page(99)}
    assert third.destroy_pool(restored3, pool) == Status.OK
    assert third.lost_keys(restored3, pool) == frozenset()
