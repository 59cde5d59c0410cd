"""JournaledStore: the Store, with every persistent-pool mutation appended to a
per-guest journal before the caller replies (docs/RELIABILITY.md).

Both frontends (the ABI session and the NBD export) call the store, so the hook
is here, once. ``add_client`` replays ``STATE_DIR/NAME.journal`` first, so a
restarted tmemd has the guest's persistent pools back under the same ids. What
a journal survives is its durability level:

- ``journal``: a request's records leave in one ``writev`` before the store call
  returns; they are then in the host page cache and survive a kill -9 of tmemd,
  not a host crash.
- ``fsync``: the same, and ``make_durable()`` (which the frontends call before
  they send the replies of what they read in one go) fdatasyncs every journal
  written since: one sync per guest per batch of requests (group commit).
- ``none``: nothing is written while tmemd runs, so a kill -9 loses the pages;
  a graceful stop (``detach_client``) writes a checkpoint in the journal's
  format, which the next start replays and deletes.

Ephemeral pools are never journaled. A graceful stop keeps every journal
(``detach_client``); only ``remove_client`` (tmemctl forget) deletes one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from uuid import UUID

from tmem_wire.abi import WHOLE_OBJECT, Buffer, Key, Oid, Status

from tmem_host.failpoints import failpoint
from tmem_host.replies import JournalStats
from tmem_host.statefiles import (
    FALLOC_FL_KEEP_SIZE, fallocate, fsync_dir, open_state_file, unsupported,
)
from tmem_host.store import DEFAULT_WEIGHT, Client, EncodedPages, Pool, Store
from tmem_host.store.store import DedupBlob, stored_form
from tmem_host.store.tier import RemotePage

from . import codec
from ._records import batch_records, flush_records, object_records

log = logging.getLogger("tmemd.journal")

#: Compact once the journal is larger than twice its live records plus this.
DEFAULT_COMPACT_FLOOR: Final = 64 << 20
JOURNAL_SUFFIX: Final = ".journal"
DURABILITY_LEVELS: Final = ("none", "journal", "fsync")
_READ_CHUNK: Final = 1 << 20
_IOV_MAX: Final = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# Records per write while compacting: bounds the memory of one write, and (in
# the background) how long one step holds the event loop.
_COMPACT_RECORDS_PER_WRITE: Final = 1024
# The journal appended while a background compaction ran is copied behind it in
# steps of this much; the last step (at most this much) swaps the files.
_TAIL_STEP_BYTES: Final = 8 << 20
_DONE: Final = object()
_PERSISTENT_CHANGES: Final = (Status.OK, Status.REFUSED, Status.FROZEN)


def journal_path(state_dir: Path, guest: str) -> Path:
    return state_dir / f"{guest}{JOURNAL_SUFFIX}"


@dataclass
class ReplayResult:
    records: int = 0
    pages: int = 0  # pages restored (live after the replay)
    truncated_bytes: int = 0  # a torn or corrupt tail cut off
    seconds: float = 0.0
    error: str = ""  # why the tail was cut, if it was corrupt rather than torn


class GuestJournal:
    """One guest's append-only journal file.

    ``reserve_bytes``: disk blocks kept allocated past the journal's end
    (fallocate KEEP_SIZE), so that appends up to that much more never fail because
    another guest's files filled the disk (docs/RELIABILITY.md, "Disk space")."""

    def __init__(self, path: Path, compact_floor: int, *, durability: str = "journal",
                 reserve_bytes: int = 0) -> None:
        if durability not in DURABILITY_LEVELS:
            raise ValueError(f"durability must be one of {DURABILITY_LEVELS}")
        self.path = path
        self.compact_floor = compact_floor
        self.durability = durability
        self.reserve_bytes = reserve_bytes
        # An earlier run of this guest left it (even one that wrote no record).
        self.existed = path.exists() or path.is_symlink()
        # A crash during compaction leaves the temporary file; the journal is intact.
        self.tmp_path.unlink(missing_ok=True)
        self.fd = open_state_file(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
        if durability == "fsync" and not self.existed:
            fsync_dir(path.parent)
        self.size_bytes = os.fstat(self.fd).st_size
        self.reserved_to = 0  # the end of the blocks reserved for appends
        self.next_reserve_at = 0
        # Appending: "none" writes only the checkpoint of a graceful stop.
        self.appending = durability != "none"
        self.broken = False
        # Records written since the last fdatasync (durability fsync).
        self.unsynced = False
        # JournaledStore.deferred(): records held back until the block ends.
        self.held: list[Buffer] | None = None
        self.held_records = 0
        self.writes = 0
        self.records = 0
        self.syncs = 0
        self.write_errors = 0
        self.compactions = 0
        self.last_compaction_s = 0.0
        # The longest the last compaction held its caller (the event loop) at once.
        self.last_compaction_pause_s = 0.0
        # A compaction in steps (start_rewrite), or None.
        self.compacting: _Compaction | None = None
        # The journal a compaction in steps replaced, still open: closing it frees
        # its blocks, which takes a while for a large file (release_old, next step).
        self._old_fd = -1
        self.replay = ReplayResult()
        # The journal was there but corrupt: nothing of the guest was restored.
        self.state_lost = False
        # Records appended behind the damage would never be replayed: the first
        # change after it rewrites the whole journal instead (atomically).
        self.needs_rewrite = False
        #: Per pool id, keys tmemd dropped without the guest flushing them (an
        #: admin flush) and not written since: LOST records, kept by compaction.
        self.lost: dict[int, set[Key]] = {}

    def start_appending(self) -> None:
        """After the replay: reserve room for appends, or (durability none) delete
        the checkpoint just replayed, so that a crash from here on finds no journal
        and the guest's old slots read as lost, never as this older state."""
        if self.appending:
            self._reserve(at_start=True)
            return
        os.close(self.fd)
        self.fd = -1
        self.path.unlink(missing_ok=True)

    def _reserve(self, *, at_start: bool = False) -> None:
        """Keep ``reserve_bytes`` allocated past the end. Best effort: a restart on a
        full disk must still bring the guest back (the blocks an earlier run reserved
        past the end are still the journal's), so no room only costs the guarantee."""
        if self.reserve_bytes <= 0:
            return
        try:
            fallocate(self.fd, FALLOC_FL_KEEP_SIZE, self.size_bytes, self.reserve_bytes)
        except OSError as error:
            if unsupported(error):
                self.reserve_bytes = 0  # this file system cannot: appends share free space
            elif at_start:
                log.error("no room to reserve the journal's disk space: its appends share "
                          "the disk's free space", extra={"journal": str(self.path),
                                                          "reserve_bytes": self.reserve_bytes,
                                                          "error": error.strerror})
            # Again after half a reserve more of appends, not on every one.
            self.next_reserve_at = self.size_bytes + (self.reserve_bytes >> 1)
            return
        self.reserved_to = self.size_bytes + self.reserve_bytes
        self.next_reserve_at = self.size_bytes + (self.reserve_bytes >> 1)

    def mark_lost(self, pool_id: int, pool: Pool) -> None:
        """Every page of the pool is about to be dropped by an admin flush."""
        keys = {(oid, index) for oid, index, _ in Store.stored_pages(pool)}
        if keys:
            self.lost.setdefault(pool_id, set()).update(keys)

    def found(self, pool_id: int, keys: Sequence[Key]) -> None:
        """The guest wrote or flushed these keys: they are its own again."""
        lost = self.lost.get(pool_id)
        if lost:
            for oid, index in keys:
                if index == WHOLE_OBJECT:
                    lost.difference_update([key for key in lost if key[0] == oid])
                else:
                    lost.discard((oid, index))

    @property
    def tmp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def append(self, pieces: Sequence[Buffer], records: int) -> None:
        """Write the pieces of ``records`` records in one system call (short
        writes finished). A failure cuts the partial record off and retires the
        journal: the guest's pages stay in memory, unprotected, and a later
        restart restores nothing of it (it never replays stale pages)."""
        if self.broken or not pieces or not self.appending:
            return
        if self.held is not None:
            self.held += pieces
            self.held_records += records
            return
        try:
            written = _write_all(self.fd, pieces)
        except OSError as error:
            self.write_errors += 1
            self._retire(str(error))
            return
        self.size_bytes += written
        self.writes += 1
        self.records += records
        self.unsynced = self.durability == "fsync"
        if self.reserve_bytes and self.size_bytes > self.next_reserve_at:
            self._reserve()

    def sync(self) -> None:
        """fdatasync what was appended (durability fsync); a failure retires the
        journal like a failed write: its records may not be on the disk."""
        self.unsynced = False
        if self.broken:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as error:
            self.write_errors += 1
            self._retire(f"fdatasync: {error}")
            return
        self.syncs += 1

    def _retire(self, reason: str) -> None:
        self.broken = True
        self.abort_rewrite()
        log.error("journal write failed: this guest's persistent pages no longer survive "
                  "a tmemd crash", extra={"journal": str(self.path), "error": reason})
        # Deleted at once, so that no restart replays it: it misses this request's
        # flushes, and replaying it could bring back an older copy of a page. The
        # unlink needs no free space and gives back what the journal held (a kept
        # copy would keep a full disk full); the guest's NBD fallback file, left
        # without a journal, reads as lost after a restart.
        try:
            self.path.unlink(missing_ok=True)
            if self.durability == "fsync":
                fsync_dir(self.path.parent)
        except OSError as error:
            log.error("cannot retire the journal", extra={"journal": str(self.path),
                                                          "error": str(error)})

    def read_records(self) -> tuple[list[codec.Record], ReplayResult]:
        """Every valid record from the start; a torn or corrupt tail is cut off."""
        result = ReplayResult()
        decoder = codec.JournalDecoder()
        records: list[codec.Record] = []
        offset = 0
        try:
            while chunk := os.pread(self.fd, _READ_CHUNK, offset):
                offset += len(chunk)
                decoder.feed(chunk)
                while not isinstance(record := decoder.next_record(), codec.NeedData):
                    records.append(record)
        except codec.JournalError as error:
            result.error = str(error)
        if decoder.consumed < self.size_bytes:
            result.truncated_bytes = self.size_bytes - decoder.consumed
            # A torn tail is cut off. Damage is left in place until the journal is
            # rewritten: cut off, the valid part before it would look like the
            # whole journal to the next start and bring back older copies.
            if not result.error:
                os.ftruncate(self.fd, decoder.consumed)
                self.size_bytes = decoder.consumed
        result.records = len(records)
        return records, result

    def rewrite(self, pools: list[tuple[int, Pool]]) -> None:
        """Compaction at once: the live persistent pages into NAME.journal.tmp,
        then an atomic os.replace; a crash before the replace leaves the old
        journal. A compaction in steps under way is given up first."""
        self.abort_rewrite()
        compaction = self._begin(pools, write_behind=False)
        try:
            for _ in compaction.steps:
                pass
        except BaseException:
            self._give_up(compaction)
            raise
        self._finish(compaction)
        self.last_compaction_pause_s = self.last_compaction_s

    def start_rewrite(self, pools: list[tuple[int, Pool]]) -> None:
        """Compaction in steps (rewrite_step), the journal appended to meanwhile.

        The new file gets every live page as the step that writes its object finds
        it, then, copied byte for byte, everything appended to the old journal
        since this call. Every change after this call is in that copy, in order,
        and each record sets a key's (or pool's) state outright, so a replay of
        the new file ends where a replay of the old one does, whatever the steps
        found. A crash before the swap leaves the old journal, whole."""
        self.abort_rewrite()
        self.compacting = self._begin(pools, write_behind=True)
        self.last_compaction_pause_s = 0.0

    def rewrite_step(self) -> bool:
        """One step of the compaction start_rewrite began: at most a write's worth
        of records, or of the journal appended since. True when it is done (the
        files swapped). OSError: given up, the old journal intact."""
        compaction = self.compacting
        assert compaction is not None, "no compaction under way"
        started = time.perf_counter()
        try:
            if next(compaction.steps, _DONE) is _DONE:  # every object written: the tail
                self._copy_tail(compaction, _TAIL_STEP_BYTES)
                left = self.size_bytes - compaction.tail_copied_to
                # Copied on while it shrinks; once it is small, or the guest appends
                # as fast as it is copied, the rest goes in this step.
                if left > _TAIL_STEP_BYTES and left < compaction.tail_left:
                    compaction.tail_left = left
                    return False
                self._copy_tail(compaction, None)
                self.compacting = None
                self._finish(compaction, keep_old=True)
                return True
            return False
        except BaseException:
            self.abort_rewrite()
            raise
        finally:
            self.last_compaction_pause_s = max(self.last_compaction_pause_s,
                                               time.perf_counter() - started)

    def release_old(self) -> None:
        """Close the journal the last compaction in steps replaced (idempotent)."""
        old_fd, self._old_fd = self._old_fd, -1
        if old_fd >= 0:
            os.close(old_fd)

    def abort_rewrite(self) -> None:
        """Give up a compaction in steps, if one is under way (idempotent)."""
        compaction, self.compacting = self.compacting, None
        if compaction is not None:
            self._give_up(compaction)

    def _begin(self, pools: list[tuple[int, Pool]], *, write_behind: bool) -> _Compaction:
        fd = open_state_file(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        compaction = _Compaction(fd, time.perf_counter(), tail_copied_to=self.size_bytes,
                                 write_behind=write_behind)
        compaction.steps = self._write_live(compaction, pools)
        return compaction

    def _write_live(self, compaction: _Compaction,
                    pools: list[tuple[int, Pool]]) -> Generator[None, None, None]:
        """Write the pools' pages, yielding after each write. The object ids, and
        the indexes of an object larger than a write, are listed when its turn
        comes: between yields the store may change (keys listed and flushed since
        are skipped; keys added since are in the tail, like every change)."""
        pieces: list[Buffer] = []
        count = 0
        for pool_id, pool in pools:
            pieces.append(codec.encode(codec.NewPoolRecord(pool_id, pool.page_shift, pool.label)))
            special = _special_record(pool_id)
            for oid in list(pool.objects):
                pages = pool.objects.get(oid)
                if not pages:
                    continue
                room = _COMPACT_RECORDS_PER_WRITE - count
                if len(pages) <= room:  # the whole object in one call: nothing changes during it
                    records, added, _ = object_records(pool_id, oid, pages, special, 0, room)
                    pieces.append(records)
                    count += added
                else:
                    indexes = list(pages)
                    for start in range(0, len(indexes), _COMPACT_RECORDS_PER_WRITE):
                        chunk = indexes[start:start + _COMPACT_RECORDS_PER_WRITE]
                        # The pages as they are now (None: flushed since listed, skipped).
                        now = dict(zip(chunk, map(pages.get, chunk)))
                        records, added, _ = object_records(pool_id, oid, now, special, 0, len(now))
                        pieces.append(records)
                        count += added
                        if count >= _COMPACT_RECORDS_PER_WRITE:
                            compaction.write(pieces)
                            pieces, count = [], 0
                            yield
                        pages = pool.objects.get(oid) or {}
                if count >= _COMPACT_RECORDS_PER_WRITE:
                    compaction.write(pieces)
                    pieces, count = [], 0
                    yield
        # LOST records as they are now: an admin flush or a write since the start
        # is in the tail too, and replays the same way after them.
        for pool_id, _pool in pools:
            pieces += [codec.encode(codec.LostRecord(pool_id, oid, index))
                       for oid, index in self.lost.get(pool_id, ())]
        compaction.write(pieces)

    def _copy_tail(self, compaction: _Compaction, limit: int | None) -> None:
        """Copy what was appended to the journal since the compaction began (up to
        ``limit`` bytes of it) behind the new file's records."""
        end = self.size_bytes if limit is None else min(self.size_bytes,
                                                         compaction.tail_copied_to + limit)
        while compaction.tail_copied_to < end:
            want = end - compaction.tail_copied_to
            try:
                copied = os.copy_file_range(self.fd, compaction.fd, want, compaction.tail_copied_to)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                chunk = os.pread(self.fd, min(want, _READ_CHUNK), compaction.tail_copied_to)
                copied = _write_all(compaction.fd, [chunk]) if chunk else 0
            if copied <= 0:
                raise OSError(errno.EIO, "the journal ended before its recorded size")
            compaction.tail_copied_to += copied
            compaction.size += copied

    def _finish(self, compaction: _Compaction, *, keep_old: bool = False) -> None:
        try:
            if self.durability != "journal":  # a checkpoint, or fsync: on the disk first
                os.fdatasync(compaction.fd)
        except BaseException:
            self._give_up(compaction)
            raise
        os.close(compaction.fd)
        os.replace(self.tmp_path, self.path)
        if self.durability != "journal":
            fsync_dir(self.path.parent)
        try:
            new_fd = open_state_file(self.path, os.O_RDWR | os.O_APPEND)
        except OSError as error:
            # The new journal is in place and cannot be appended to, while appends
            # to the old file would never be replayed: retired, like a failed write.
            self.write_errors += 1
            self._retire(f"reopening the compacted journal: {error}")
            return
        self.release_old()
        if keep_old:
            self._old_fd = self.fd
        elif self.fd >= 0:
            os.close(self.fd)
        self.fd = new_fd
        self.size_bytes = compaction.size
        self.unsynced = False  # the new file is on the disk as far as durability asks
        self.reserved_to = self.next_reserve_at = 0
        if self.appending:
            self._reserve()
        self.compactions += 1
        self.last_compaction_s = time.perf_counter() - compaction.started

    def _give_up(self, compaction: _Compaction) -> None:
        compaction.steps.close()
        with contextlib.suppress(OSError):
            os.close(compaction.fd)
        self.tmp_path.unlink(missing_ok=True)

    def close(self, *, delete: bool) -> None:
        self.abort_rewrite()
        self.release_old()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if delete:
            self.path.unlink(missing_ok=True)
            self.tmp_path.unlink(missing_ok=True)


@dataclass(eq=False)
class _Compaction:
    """A compaction under way: the new file, the records still to write into it
    (a generator, one write per step), and how far the old journal's tail has
    been copied behind them."""
    fd: int
    started: float
    tail_copied_to: int  # an offset in the old journal
    # In steps: each write's pages are sent to the disk as it is made (and leave
    # the page cache), so that the rename at the end (ext4 writes out a file
    # renamed over another) has little left to write while it holds the loop.
    write_behind: bool
    size: int = 0  # of the new file
    tail_left: int = 1 << 62  # what was left of the tail after the last step that copied it
    # The records still to write (GuestJournal._write_live), one write per step.
    steps: Generator[None, None, None] = field(init=False)

    def write(self, pieces: Sequence[Buffer]) -> None:
        start = self.size
        self.size += _write_all(self.fd, pieces)
        if self.write_behind and self.size > start:
            os.posix_fadvise(self.fd, start, self.size - start, os.POSIX_FADV_DONTNEED)


def _write_all(fd: int, pieces: Sequence[Buffer]) -> int:
    if len(pieces) > _IOV_MAX:
        pieces = [b"".join(pieces)]
    total = sum(len(piece) for piece in pieces)
    written = os.writev(fd, pieces)
    if written < total:  # a regular file writes short only on a signal or a full disk
        rest = memoryview(b"".join(pieces))[written:]
        while rest:
            step = os.write(fd, rest)
            rest = rest[step:]
    return total


def _live_pools(client: Client) -> list[tuple[int, Pool]]:
    return [(pool_id, pool) for pool_id, pool in enumerate(client.pools)
            if pool is not None and pool.persistent]


def _special_record(pool_id: int) -> Callable[[Oid, int, object], bytes]:
    """The record of a page the C record builder leaves to Python: a dedup blob's
    stored form (it builds a remote page's REMOTE record itself)."""
    def record(oid: Oid, index: int, value: object) -> bytes:
        assert isinstance(value, DedupBlob)
        return b"".join(codec.put_record(pool_id, oid, index, stored_form(value)))
    return record


def _stored_form(pool: Pool, oid: Oid, index: int) -> int | bytes | RemotePage:
    return stored_form(pool.objects[oid][index])


class JournaledStore(Store):
    """A Store whose persistent pools survive a restart of tmemd through per-guest
    journals in ``state_dir`` (at the given durability level). ``add_client``
    replays; ``detach_client`` keeps the journal (a graceful stop);
    ``remove_client`` deletes it (the guest's data is discarded for good)."""

    def __init__(self, budget_bytes: int, compress: bool = True, *, state_dir: Path,
                 compact_floor: int = DEFAULT_COMPACT_FLOOR, durability: str = "journal",
                 reserve_bytes: int = 0) -> None:
        super().__init__(budget_bytes, compress)
        if durability not in DURABILITY_LEVELS:
            raise ValueError(f"durability must be one of {DURABILITY_LEVELS}")
        self.state_dir = Path(state_dir)
        self.compact_floor = compact_floor
        self.durability = durability
        self.reserve_bytes = reserve_bytes
        self._journals: dict[str, GuestJournal] = {}
        # Journals written since the last make_durable() (durability fsync).
        self._unsynced: set[GuestJournal] = set()

    # -- clients -------------------------------------------------------------

    def add_client(
        self,
        name: str,
        weight: int = DEFAULT_WEIGHT,
        cap_bytes: int | None = None,
        dedup: bool = False,
        shared_uuids: frozenset[UUID] = frozenset(),
    ) -> Client:
        """Add the client and restore its persistent pools from its journal."""
        client = super().add_client(name, weight, cap_bytes, dedup, shared_uuids)
        journal: GuestJournal | None = None
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            journal = GuestJournal(journal_path(self.state_dir, name), self.compact_floor,
                                   durability=self.durability, reserve_bytes=self.reserve_bytes)
            # Not registered yet: the replay's own store calls write no records.
            journal.replay = self._replay(client, journal)
            if journal.replay.error:
                self._discard_damaged(client, journal)
            journal.start_appending()
        except BaseException:
            if journal is not None:
                journal.close(delete=False)
            super().remove_client(client)
            raise
        self._journals[name] = journal
        if journal.replay.records:
            log.info("journal replayed", extra={
                "guest": name, "records": journal.replay.records, "pages": journal.replay.pages,
                "truncated_bytes": journal.replay.truncated_bytes,
                "seconds": round(journal.replay.seconds, 3)})
        return client

    def _discard_damaged(self, client: Client, journal: GuestJournal) -> None:
        """A corrupt record (not a torn tail) hides what came after it: any page
        restored from before it may have been rewritten or flushed since. Restore
        nothing, so every page of the guest reads as lost, never as an old copy."""
        log.error("journal corrupt: none of its pages are restored (they read as lost)",
                  extra={"guest": client.name, "error": journal.replay.error})
        for pool_id, _pool in _live_pools(client):
            super().destroy_pool(client, pool_id)
        journal.lost.clear()
        journal.replay.pages = 0
        journal.state_lost = True
        # Left as it is until the first change rewrites it: a crash before then
        # finds the same damage, not an empty journal that vouches for nothing.
        journal.needs_rewrite = True

    def detach_client(self, client: Client | str) -> None:
        """Forget the client in memory and keep its journal for the next start
        (a graceful stop). Durability none writes its checkpoint now."""
        client = self._resolve(client)
        journal = self._journals.pop(client.name, None)
        if journal is not None:
            self._unsynced.discard(journal)
            if not journal.appending and not journal.broken:
                try:
                    journal.rewrite(_live_pools(client))
                except OSError as error:  # the next start finds no checkpoint: lost, not stale
                    log.error("cannot write the checkpoint: the guest's pages are lost",
                              extra={"guest": client.name, "error": str(error)})
            journal.close(delete=False)
        # Forgotten without destroying its pools: nothing more is journaled.
        self._forget_client(client)

    def remove_client(self, client: Client | str) -> None:
        """Forget the client and delete its journal: its pages are gone for good."""
        client = self._resolve(client)
        journal = self._journals.pop(client.name, None)
        if journal is not None:
            self._unsynced.discard(journal)
        super().remove_client(client)
        if journal is not None:
            journal.close(delete=True)
        else:
            journal_path(self.state_dir, client.name).unlink(missing_ok=True)

    def resumed(self, client: Client | str) -> bool:
        """Whether the client's journal (or checkpoint) was there at its start and
        vouches for its state: what it held then is back."""
        journal = self.journal(client)
        return journal is not None and journal.existed and not journal.state_lost

    def make_durable(self, *, tier: bool = True) -> asyncio.Future[None] | None:
        """Durability fsync: fdatasync every journal written since the last call.
        The frontends call it before sending replies, once per batch they read,
        and again when the tier's future it returns completes (until None)."""
        if self._unsynced:
            for journal in self._unsynced:
                journal.sync()
            self._unsynced.clear()
        return super().make_durable(tier=tier)

    # The remote tier moves pages between memory and the cluster: each move is
    # one record (REMOTE or PUT), so a replay finds every page where it is.

    def demote(self, pool: Pool, oid: Oid, index: int, expected: bytes, page: RemotePage) -> bool:
        if not super().demote(pool, oid, index, expected, page):
            return False
        self._journal_page(pool, oid, index)
        return True

    def promote(self, pool: Pool, oid: Oid, index: int, page: RemotePage) -> bool:
        if not super().promote(pool, oid, index, page):
            return False
        self._journal_page(pool, oid, index)
        return True

    def strand(self, pool: Pool, oid: Oid, index: int, page: RemotePage) -> int | bytes | None:
        stored = super().strand(pool, oid, index, page)
        if stored is not None:
            self._journal_page(pool, oid, index)
        return stored

    def _journal_page(self, pool: Pool, oid: Oid, index: int) -> None:
        client = pool.owner
        if pool not in client.pools or self._clients.get(client.name) is not client:
            return  # the guest left memory meanwhile
        pool_id = client.pools.index(pool)
        found = self._journal_for(client, pool_id)
        if found is not None and found[0].appending:
            self._commit(client, found[0], codec.put_record(
                pool_id, oid, index, _stored_form(pool, oid, index)), 1)

    def journal(self, client: Client | str) -> GuestJournal | None:
        return self._journals.get(self._resolve(client).name)

    def lost_keys(self, client: Client | str, pool_id: int) -> frozenset[Key]:
        """Keys of the pool tmemd dropped (an admin flush) that the guest has not
        written or flushed since: a frontend must fail reads of them, not serve
        an older copy from elsewhere."""
        journal = self.journal(client)
        return frozenset(journal.lost.get(pool_id, ())) if journal is not None else frozenset()

    def durability_stats(self, client: Client | str) -> JournalStats | None:
        return self.journal_stats(client)

    def journal_stats(self, client: Client | str) -> JournalStats:
        client = self._resolve(client)
        journal = self._journals[client.name]
        return {
            "path": str(journal.path),
            "durability": journal.durability,
            "syncs": journal.syncs,
            "reserved_bytes": max(0, journal.reserved_to - journal.size_bytes),
            "size_bytes": journal.size_bytes,
            "live_bytes": self._live_bytes(client),
            "broken": journal.broken,
            "writes": journal.writes,
            "records": journal.records,
            "write_errors": journal.write_errors,
            "compactions": journal.compactions,
            "last_compaction_s": round(journal.last_compaction_s, 4),
            "last_compaction_pause_s": round(journal.last_compaction_pause_s, 4),
            "compacting": journal.compacting is not None,
            "replayed_records": journal.replay.records,
            "replayed_pages": journal.replay.pages,
            "replay_truncated_bytes": journal.replay.truncated_bytes,
            "replay_s": round(journal.replay.seconds, 4),
        }

    # -- the replay ----------------------------------------------------------

    def _replay(self, client: Client, journal: GuestJournal) -> ReplayResult:
        started = time.perf_counter()
        records, result = journal.read_records()
        for number, record in enumerate(records):
            try:
                self._apply(client, journal, record)
            except ValueError as error:  # a record that contradicts the ones before
                result.error = f"record {number}: {error}"
                break
        result.pages = sum(pool.pages for _, pool in _live_pools(client))
        result.seconds = time.perf_counter() - started
        return result

    def _apply(self, client: Client, journal: GuestJournal, record: codec.Record) -> None:
        """Redo one record (with the store's own methods: nothing is journaled)."""
        if isinstance(record, codec.PutRecord):
            self.restore_page(client, record.pool_id, record.oid, record.index, record.stored)
            journal.found(record.pool_id, [(record.oid, record.index)])
        elif isinstance(record, codec.RemoteRecord):
            self.restore_remote_page(client, record.pool_id, record.oid, record.index,
                                     record.version, record.nbytes)
            journal.found(record.pool_id, [(record.oid, record.index)])
        elif isinstance(record, codec.NewPoolRecord):
            self.restore_pool(client, record.pool_id, record.page_shift, record.label)
        elif isinstance(record, codec.FlushPageRecord):
            self._expect_ok(super().flush_page(client, record.pool_id, record.oid, record.index))
            journal.found(record.pool_id, [(record.oid, record.index)])
        elif isinstance(record, codec.FlushObjectRecord):
            self._expect_ok(super().flush_object(client, record.pool_id, record.oid))
            journal.found(record.pool_id, [(record.oid, WHOLE_OBJECT)])
        elif isinstance(record, codec.FlushPoolRecord):
            pool = client.pools[record.pool_id] if 0 <= record.pool_id < len(client.pools) else None
            if pool is not None:
                journal.mark_lost(record.pool_id, pool)
            self._expect_ok(super().flush_pool(client, record.pool_id))
        elif isinstance(record, codec.LostRecord):
            journal.lost.setdefault(record.pool_id, set()).add((record.oid, record.index))
        else:
            self._expect_ok(super().destroy_pool(client, record.pool_id))
            journal.lost.pop(record.pool_id, None)

    @staticmethod
    def _expect_ok(status: Status) -> None:
        if status != Status.OK:
            raise ValueError(f"replayed operation gave {status.name}")

    # -- the hooks -------------------------------------------------------------

    def _journal_for(self, client: Client, pool_id: int) -> tuple[GuestJournal, Pool] | None:
        """The client's journal and pool, if the pool is persistent and journaled."""
        journal = self._journals.get(client.name)
        if journal is None or journal.broken or not 0 <= pool_id < len(client.pools):
            return None
        pool = client.pools[pool_id]
        if pool is None or not pool.persistent:
            return None
        return journal, pool

    def _rewrite_now(self, client: Client, journal: GuestJournal) -> None:
        """Write the client's whole state as a new journal; if that fails, retire it."""
        if journal.broken:
            return
        try:
            self.compact(client)
        except OSError as error:
            journal.write_errors += 1
            journal._retire(f"rewrite: {error}")
            return
        journal.needs_rewrite = False

    def _commit(self, client: Client, journal: GuestJournal, pieces: Sequence[Buffer],
                records: int) -> None:
        if journal.needs_rewrite and journal.held is None and journal.appending:
            self._rewrite_now(client, journal)  # this change included: it is in memory
            return
        journal.append(pieces, records)
        if journal.held is not None:  # deferred(): checked when the records are written
            return
        if journal.unsynced:
            self._unsynced.add(journal)
        if (journal.size_bytes > journal.compact_floor and not journal.broken
                and journal.compacting is None
                and journal.size_bytes > 2 * self._live_bytes(client) + journal.compact_floor):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            try:
                if loop is None:  # no event loop to step it (a tool, a test): at once
                    self.compact(client)
                else:
                    # In steps, the guests served between them: at once, a large
                    # journal would hold every guest's requests for as long as it takes.
                    self.compact_in_steps(client)
            except OSError as error:
                self._compaction_failed(client, journal, error)

    def compact_in_steps(self, client: Client | str) -> None:
        """Start compacting the client's journal in steps on the running event loop
        (one step per pass of the loop; GuestJournal.start_rewrite)."""
        client = self._resolve(client)
        journal = self._journals[client.name]
        loop = asyncio.get_running_loop()
        journal.start_rewrite(_live_pools(client))
        loop.call_soon(self._compaction_step, client, journal)

    def _compaction_step(self, client: Client, journal: GuestJournal) -> None:
        if self._journals.get(client.name) is not journal or journal.compacting is None:
            return  # the guest left, or the compaction was given up (or done at once)
        compaction = journal.compacting
        try:
            done = journal.rewrite_step()
        except OSError as error:
            self._compaction_failed(client, journal, error)
            return
        if not done:
            failpoint("journal-compaction-step")  # tests: a kill -9 between two steps
            asyncio.get_running_loop().call_soon(self._compaction_step, client, journal)
            return
        asyncio.get_running_loop().call_soon(journal.release_old)
        log.info("journal compacted", extra={
            "guest": client.name, "before_bytes": compaction.tail_copied_to,
            "after_bytes": journal.size_bytes,
            "seconds": round(journal.last_compaction_s, 3),
            "longest_step_s": round(journal.last_compaction_pause_s, 4)})

    @staticmethod
    def _compaction_failed(client: Client, journal: GuestJournal, error: OSError) -> None:
        # E.g. no room for the copy: the journal is intact.
        journal.compact_floor *= 2  # back off instead of retrying every request
        log.error("journal compaction failed", extra={
            "guest": client.name, "error": str(error), "next_floor_bytes": journal.compact_floor})

    @contextlib.contextmanager
    def deferred(self, client: Client) -> Iterator[None]:
        """Hold the client's records back until the block ends, then write them in
        one writev, before the caller replies. The NBD export writes refused pages
        to its fallback file inside the block, so a crash leaves the journal from
        before the request (the slot reads its last acknowledged copy) or after
        it, never a flushed tmem copy with the fallback not yet written."""
        journal = self._journals.get(client.name)
        if journal is None or journal.held is not None:
            yield
            return
        journal.held = []
        try:
            yield
        finally:
            pieces, records = journal.held, journal.held_records
            journal.held, journal.held_records = None, 0
            self._commit(client, journal, pieces, records)

    def compact(self, client: Client | str) -> None:
        """Rewrite the client's journal from its live persistent pages."""
        client = self._resolve(client)
        journal = self._journals[client.name]
        before = journal.size_bytes
        if journal.held is not None:  # inside deferred(): the held records are older
            raise RuntimeError("compact() inside deferred()")
        journal.rewrite(_live_pools(client))
        log.info("journal compacted", extra={"guest": client.name, "before_bytes": before,
                                             "after_bytes": journal.size_bytes,
                                             "seconds": round(journal.last_compaction_s, 3)})

    @staticmethod
    def _live_bytes(client: Client) -> int:
        """What a compacted journal would hold: one PUT per live page and one
        NEW_POOL per pool (fill pages counted as data-free, a few bytes short)."""
        live = 0
        for _, pool in _live_pools(client):
            live += (pool.data_bytes + pool.pages * codec.PUT_RECORD_OVERHEAD
                     + codec.HEADER_SIZE + 3 + len(pool.label))
        return live

    def new_pool(
        self,
        client: Client,
        persistent: bool,
        page_shift: int = 12,
        shared_uuid: UUID | None = None,
        inclusive_gets: bool = False,
        label: str = "",
    ) -> tuple[Status, int, bool]:
        status, pool_id, shared = super().new_pool(client, persistent, page_shift, shared_uuid,
                                                   inclusive_gets, label)
        if status == Status.OK and (found := self._journal_for(client, pool_id)) is not None:
            journal, pool = found
            if pool.owner is client and not shared:
                self._commit(client, journal, [codec.encode(
                    codec.NewPoolRecord(pool_id, page_shift, label))], 1)
        return status, pool_id, shared

    def destroy_pool(self, client: Client, pool_id: int) -> Status:
        found = self._journal_for(client, pool_id)
        status = super().destroy_pool(client, pool_id)
        if found is not None and status == Status.OK:
            found[0].lost.pop(pool_id, None)
            self._commit(client, found[0], [codec.encode(codec.DestroyPoolRecord(pool_id))], 1)
        return status

    # flush_pool and flush_client are admin operations (no ABI op reaches them):
    # the guest did not flush those pages, so they are also recorded as lost.

    def flush_pool(self, client: Client, pool_id: int) -> Status:
        found = self._journal_for(client, pool_id)
        if found is not None:
            found[0].mark_lost(pool_id, found[1])
        status = super().flush_pool(client, pool_id)
        if found is not None and status == Status.OK:
            self._commit(client, found[0], [codec.encode(codec.FlushPoolRecord(pool_id))], 1)
        return status

    def flush_client(self, client: Client | str) -> int:
        client = self._resolve(client)
        journal = self._journals.get(client.name)
        pools = [(pool_id, pool) for pool_id, pool in _live_pools(client) if pool.owner is client]
        if journal is not None and not journal.broken:
            for pool_id, pool in pools:
                journal.mark_lost(pool_id, pool)
        flushed = super().flush_client(client)
        if journal is not None and not journal.broken and pools:
            self._commit(client, journal, [codec.encode(codec.FlushPoolRecord(pool_id))
                                           for pool_id, _ in pools], len(pools))
        return flushed

    def put(self, client: Client, pool_id: int, oid: Oid, index: int, data: Buffer) -> Status:
        status = super().put(client, pool_id, oid, index, data)
        if status in _PERSISTENT_CHANGES and (found := self._journal_for(client, pool_id)):
            journal, pool = found
            if status == Status.OK:
                pieces = codec.put_record(pool_id, oid, index, _stored_form(pool, oid, index))
            else:  # the store dropped the old copy: so must a replay
                pieces = [codec.encode(codec.FlushPageRecord(pool_id, oid, index))]
            journal.found(pool_id, [(oid, index)])
            self._commit(client, journal, pieces, 1)
        return status

    def put_many(self, client: Client, pool_id: int, keys: Sequence[Key],
                 pages: Sequence[Buffer], encoded: EncodedPages | None = None) -> list[Status]:
        statuses = super().put_many(client, pool_id, keys, pages, encoded)
        found = self._journal_for(client, pool_id)
        if found is None:
            return statuses
        journal, pool = found
        if not journal.appending:  # durability none: only the lost keys to keep
            journal.found(pool_id, keys)
            return statuses
        # PUTs of what the pool holds now for the keys put, FLUSH_PAGEs for the
        # refused ones (the store dropped their older copies: so must a replay),
        # in one C call (_records.c: the codec's bytes, without a Python call per page).
        blob, records = batch_records(pool_id, keys, statuses, pool.objects, Status.OK, Status.INVALID,
                                      _special_record(pool_id))
        journal.found(pool_id, keys)
        self._commit(client, journal, [blob], records)
        return statuses

    def flush_page(self, client: Client, pool_id: int, oid: Oid, index: int) -> Status:
        status = super().flush_page(client, pool_id, oid, index)
        if status == Status.OK and (found := self._journal_for(client, pool_id)) is not None:
            found[0].found(pool_id, [(oid, index)])
            self._commit(client, found[0], [codec.encode(codec.FlushPageRecord(pool_id, oid, index))], 1)
        return status

    def flush_many(self, client: Client, pool_id: int, keys: Sequence[Key]) -> list[Status]:
        # flush_object goes through here too (the store implements it with flush_many).
        statuses = super().flush_many(client, pool_id, keys)
        found = self._journal_for(client, pool_id)
        if found is not None and keys:
            # A FLUSH_PAGE (FLUSH_OBJECT for WHOLE_OBJECT) per key, in one C call.
            blob, records = flush_records(pool_id, keys)
            found[0].found(pool_id, keys)
            self._commit(client, found[0], [blob], records)
        return statuses
