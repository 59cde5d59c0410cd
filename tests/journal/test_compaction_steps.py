"""Compaction in steps (GuestJournal.start_rewrite / rewrite_step): the guest's
pools change between every step, and what a restart replays from the new journal
is exactly the store's state when the files were swapped; a crash or a failure
at any step leaves the old journal, whole."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from tmem_host import statefiles
from tmem_host.journal import journaled
from tmem_host.journal.journaled import GuestJournal, JournaledStore, journal_path
from tmem_host.store import Client
from tmem_wire.abi import WHOLE_OBJECT, Status

from .test_journaled_store import contents, page, reopen

Key = tuple[tuple[int, int, int], int]


@pytest.fixture(autouse=True)
def small_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many steps over a few hundred pages: objects larger than a step, and a tail
    # copied in several steps.
    monkeypatch.setattr(journaled, "_COMPACT_RECORDS_PER_WRITE", 16)
    monkeypatch.setattr(journaled, "_TAIL_STEP_BYTES", 8 << 10)


def under_way(journal: GuestJournal) -> bool:
    """Whether a compaction in steps is under way (a call: the steps change it)."""
    return journal.compacting is not None


def state(store: JournaledStore, client: Client) -> tuple[object, ...]:
    pools = {pool_id: (pool.page_shift, pool.label) for pool_id, pool in enumerate(client.pools)
             if pool is not None and pool.persistent}
    lost = {pool_id: store.lost_keys(client, pool_id) for pool_id in pools}
    pages = {key: data for key, data in contents(store, client).items() if key[0] in pools}
    return pages, pools, {pool_id: keys for pool_id, keys in lost.items() if keys}


def assert_restart_finds_the_state(store: JournaledStore, client: Client, tmp_path: Path) -> None:
    """A graceful stop (no compaction of its own), then a restart on the state dir:
    the pools, pages and lost keys are what the store holds now, and no .tmp is left."""
    expected = state(store, client)
    journal = store.journal(client)
    assert journal is not None
    store.detach_client(client)
    assert not journal.tmp_path.exists()
    again, restored = reopen(tmp_path)
    assert state(again, restored) == expected


def filled_guest(tmp_path: Path, seed: int, pages: int) -> tuple[JournaledStore, Client, Guest, GuestJournal]:
    """A store on tmp_path, a guest with two persistent pools of ``pages`` pages, its journal."""
    store, client = reopen(tmp_path)
    guest = Guest(store, client, seed)
    guest.fill(pages)
    journal = store.journal(client)
    assert journal is not None
    return store, client, guest, journal


class Guest:
    """Random changes, as a guest (and an admin) would make them, between steps."""

    def __init__(self, store: JournaledStore, client: Client, seed: int) -> None:
        self.store, self.client = store, client
        self.random = random.Random(seed)
        self.version = 0
        self.pools = [store.new_pool(client, persistent=True, label=f"p{n}")[1] for n in range(2)]

    def key(self) -> Key:
        return (self.random.randrange(6), 0, 0), self.random.randrange(40)

    def fill(self, pages: int) -> None:
        for pool_id in self.pools:
            keys = [((n % 6, 0, 0), n // 6) for n in range(pages)]
            statuses = self.store.put_many(self.client, pool_id, keys, [page(n) for n in range(pages)])
            assert statuses == [Status.OK] * pages

    def change(self) -> None:
        store, client, rnd = self.store, self.client, self.random
        pool_id = rnd.choice(self.pools)
        self.version += 1
        action = rnd.random()
        if action < 0.45:
            keys = list({self.key() for _ in range(rnd.randrange(1, 12))})
            store.put_many(client, pool_id, keys, [page(rnd.randrange(99), self.version) for _ in keys])
        elif action < 0.6:
            store.put(client, pool_id, *self.key(), page(rnd.randrange(99), self.version))
        elif action < 0.8:
            store.flush_many(client, pool_id, [self.key() for _ in range(rnd.randrange(1, 8))])
        elif action < 0.87:
            store.flush_many(client, pool_id, [((rnd.randrange(6), 0, 0), WHOLE_OBJECT)])
        elif action < 0.9:
            store.flush_pool(client, pool_id)  # an admin flush: its pages become lost
        elif action < 0.92:
            # The pool destroyed and a new one made (it may take the same id).
            store.destroy_pool(client, pool_id)
            self.pools.remove(pool_id)
            status, new_id, _ = store.new_pool(client, persistent=True, label=f"v{self.version}")
            assert status == Status.OK
            self.pools.append(new_id)
        elif action < 0.95:
            _, new_id, _ = store.new_pool(client, persistent=False)  # never journaled
            store.put(client, new_id, *self.key(), page(7))
        else:  # many keys at once, most of them new
            keys = [((rnd.randrange(6), 0, 0), rnd.randrange(100)) for _ in range(40)]
            store.put_many(client, pool_id, keys, [page(rnd.randrange(99), self.version) for _ in keys])


# COMPACTION_SEEDS=1000 for a longer search.
@pytest.mark.parametrize("seed", range(int(os.environ.get("COMPACTION_SEEDS", "12"))))
def test_what_changes_between_steps_is_in_the_new_journal(tmp_path: Path, seed: int) -> None:
    store, client = reopen(tmp_path)
    guest = Guest(store, client, seed)
    journal = store.journal(client)
    assert journal is not None
    for _ in range(30):  # history for the compaction to drop
        guest.change()
    guest.fill(200)
    journal.start_rewrite(journal_pools := journaled._live_pools(client))
    assert journal.compacting is not None and journal_pools
    steps = 0
    while not journal.rewrite_step():
        steps += 1
        for _ in range(random.Random(seed + steps).randrange(4)):
            guest.change()
    assert steps >= 1 and not under_way(journal) and journal.compactions == 1
    assert journal.size_bytes == journal_path(tmp_path, "g1").stat().st_size
    assert_restart_finds_the_state(store, client, tmp_path)  # from the new journal alone


def test_in_steps_without_changes_it_writes_what_compaction_at_once_writes(tmp_path: Path) -> None:
    store, client = reopen(tmp_path)
    guest = Guest(store, client, 1)
    for _ in range(60):  # history to drop
        guest.change()
    guest.fill(200)
    journal = store.journal(client)
    assert journal is not None
    before = journal.size_bytes
    journal.start_rewrite(journaled._live_pools(client))
    steps = 0
    while not journal.rewrite_step():
        steps += 1
    in_steps = journal_path(tmp_path, "g1").read_bytes()
    assert steps > 10 and len(in_steps) == journal.size_bytes < before
    store.compact(client)
    assert journal_path(tmp_path, "g1").read_bytes() == in_steps


@pytest.mark.parametrize("crash_after_steps", [1, 8, 25, 40])
def test_a_crash_at_any_step_leaves_the_old_journal(tmp_path: Path, crash_after_steps: int) -> None:
    store, client, guest, journal = filled_guest(tmp_path, crash_after_steps, 200)
    journal.start_rewrite(journaled._live_pools(client))
    for step in range(crash_after_steps):
        if journal.rewrite_step():
            break
        guest.change()
    expected = state(store, client)
    # kill -9: the files stay as they are (the .tmp too, if the swap has not happened).
    was_compacting = journal.compacting is not None
    os.close(journal.fd)
    if journal.compacting is not None:
        os.close(journal.compacting.fd)
    assert journal.tmp_path.exists() == was_compacting
    again, restored = reopen(tmp_path)
    assert state(again, restored) == expected
    assert not journal.tmp_path.exists()


def test_a_failed_step_gives_up_and_keeps_the_journal(tmp_path: Path) -> None:
    store, client, guest, journal = filled_guest(tmp_path, 3, 200)
    journal.start_rewrite(journaled._live_pools(client))
    assert not journal.rewrite_step()
    guest.change()
    assert journal.compacting is not None
    # The copy's disk fails (its descriptor turns read-only: EBADF on the next write).
    read_only = os.open(journal.path, os.O_RDONLY)
    os.dup2(read_only, journal.compacting.fd)
    os.close(read_only)
    with pytest.raises(OSError):
        while not journal.rewrite_step():
            pass
    assert not under_way(journal) and not journal.tmp_path.exists() and journal.compactions == 0
    guest.change()  # the journal is still written
    expected = state(store, client)
    again, restored = reopen(tmp_path)
    assert state(again, restored) == expected


def test_compact_and_close_give_up_a_compaction_in_steps(tmp_path: Path) -> None:
    store, client, guest, journal = filled_guest(tmp_path, 5, 100)
    journal.start_rewrite(journaled._live_pools(client))
    journal.rewrite_step()
    store.compact(client)  # at once: the steps are given up first
    assert journal.compacting is None and journal.compactions == 1
    journal.start_rewrite(journaled._live_pools(client))
    journal.rewrite_step()
    assert_restart_finds_the_state(store, client, tmp_path)  # the stop gave the steps up


def test_tmemds_event_loop_compacts_in_steps_between_requests(tmp_path: Path) -> None:
    store = JournaledStore(1 << 30, state_dir=tmp_path, compact_floor=64 << 10)
    client = store.add_client("g1")
    guest = Guest(store, client, 11)
    journal = store.journal(client)
    assert journal is not None
    seen_compacting = 0

    async def requests() -> None:
        # Each change is one "request"; the loop runs a step between them.
        nonlocal seen_compacting
        for _ in range(3000):
            guest.change()
            seen_compacting += journal.compacting is not None
            await asyncio.sleep(0)
        while journal.compacting is not None:
            await asyncio.sleep(0)

    guest.fill(200)
    asyncio.run(requests())
    stats = store.journal_stats(client)
    assert stats["compactions"] > 0 and not stats["compacting"] and seen_compacting > 20
    assert 0 < stats["last_compaction_pause_s"] <= stats["last_compaction_s"]
    assert_restart_finds_the_state(store, client, tmp_path)


def test_without_an_event_loop_it_compacts_at_once(tmp_path: Path) -> None:
    store = JournaledStore(1 << 30, state_dir=tmp_path, compact_floor=64 << 10)
    client = store.add_client("g1")
    guest = Guest(store, client, 2)
    guest.fill(200)
    journal = store.journal(client)
    assert journal is not None
    for _ in range(400):
        guest.change()
        assert journal.compacting is None
    assert journal.compactions > 0


def test_a_compacted_journal_that_cannot_be_reopened_retires_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # After the swap the old file is no longer the journal: appending to it would
    # write records no restart replays. So the journal is retired (deleted), as
    # after a failed write, and a restart restores nothing rather than an old state.
    store, client, guest, journal = filled_guest(tmp_path, 4, 100)
    real_open = statefiles.open_state_file

    def no_reopen(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
        if path == journal.path and flags & os.O_APPEND:
            raise OSError(24, "Too many open files")
        return real_open(path, flags)

    journal.start_rewrite(journaled._live_pools(client))
    monkeypatch.setattr(journaled, "open_state_file", no_reopen)
    while not journal.rewrite_step():
        guest.change()
    monkeypatch.setattr(journaled, "open_state_file", real_open)
    assert journal.broken and journal.write_errors == 1 and not journal.path.exists()
    guest.change()  # the store carries on, unjournaled
    again, restored = reopen(tmp_path)
    assert all(pool is None for pool in restored.pools)
