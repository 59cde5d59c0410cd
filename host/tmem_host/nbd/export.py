"""tmemd's NBD export: a guest's swap disk with frontswap semantics.

QEMU's NBD client attaches the export as a virtio-blk disk and the guest swaps
on it. Each 4 KiB slot of the disk is a frontswap page: a WRITE puts the pages
into the guest's persistent pool; a page the store refuses goes to a sparse
fallback file at the same offset; a bitmap says which of the two holds each
slot. A READ gets from tmem or reads the fallback (zeros if never written).
TRIM and WRITE_ZEROES flush slots and punch holes in the fallback; FLUSH is
fdatasync of the fallback. Key mapping and rules: tmem_wire.frontswap, docs/NBD.md.

The store is synchronous and single-threaded, so requests are served in the
order they arrive, and the replies to everything one ``data_received`` brought
leave in one transport write, up to a bound on the replies in flight
(``NbdConnection``).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import time
from collections import Counter
from pathlib import Path
from collections.abc import Callable
from typing import Final, Literal, cast

from tmem_host.limits import (
    Admission, ConnectionKind, ConnectionLimiter, DurableReplies, ReplyFlow, widen_socket_buffers,
)
from tmem_host.nbd import slotmap
from tmem_host.replies import NbdExportStats
from tmem_host.statefiles import (
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate, open_state_file,
    unsupported,
)
from tmem_host.store import Client, Store
from tmem_host.waiting import all_done
from tmem_wire import nbd
from tmem_wire.abi import Oid, Status
from tmem_wire.frontswap import (
    LOST_PAGE_ERROR, PAGE_SHIFT, PAGE_SIZE, contiguous_runs, frontswap_keys, frontswap_offset,
)

log = logging.getLogger("tmemd.nbd")

# The export is swap area 0 of tmem_wire.frontswap's key mapping.
SWAP_TYPE: Final = 0
# The advertised maximum payload of a READ or WRITE. QEMU's NBD client honours
# it (it splits larger requests) and Linux swaps in requests of at most 512 KiB,
# so 4 MiB costs guests nothing, and it bounds what one request makes tmemd
# buffer (a WRITE's payload, a READ's reply) to an eighth of the NBD default of
# 32 MiB (docs/NBD.md, "Protocol subset").
MAX_PAYLOAD: Final = 4 * 1024 * 1024
TRANSMISSION_FLAGS: Final = (
    nbd.TransmissionFlag.HAS_FLAGS
    | nbd.TransmissionFlag.SEND_FLUSH
    | nbd.TransmissionFlag.SEND_TRIM
    | nbd.TransmissionFlag.SEND_WRITE_ZEROES
    | nbd.TransmissionFlag.SEND_FAST_ZERO
    # All state is the export's, served by one thread: every connection sees
    # every other's completed writes, and FLUSH covers them all.
    | nbd.TransmissionFlag.CAN_MULTI_CONN
)
ALLOWED_COMMAND_FLAGS: Final = {
    nbd.Command.WRITE_ZEROES: nbd.CommandFlag.NO_HOLE | nbd.CommandFlag.FAST_ZERO,
}
_COMMANDS: Final = {int(command): command for command in nbd.Command}
# Histogram buckets of request sizes, in pages: 1, 2-3, 4-7, ... 256+.
HISTOGRAM_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: The store label of the export's pool: how a restarted tmemd finds it again.
EXPORT_POOL_LABEL: Final = "nbd"
ExportStart = Literal["new", "resume", "lost"]


# The label of each power of two's bucket, by bit length (1 -> "1", 2-3 -> "2", ...).
_BUCKET_LABELS: Final = tuple(str(bucket) for bucket in HISTOGRAM_BUCKETS[:-1]) + (f"{HISTOGRAM_BUCKETS[-1]}+",)


def size_bucket(pages: int) -> str:
    """The histogram bucket of a request of ``pages`` pages (at least 1)."""
    return _BUCKET_LABELS[min(pages.bit_length(), len(_BUCKET_LABELS)) - 1]


def lost_map_path(fallback: Path) -> Path:
    """A disk's lost slots, kept across restarts while there are any: NAME.fallback.lost."""
    return fallback.with_name(fallback.name + ".lost")


class SlotEraser:
    """Makes a range of the fallback file read as zeros. Sparse: punches a hole
    (the blocks go back to the file system). Preallocated: keeps the blocks
    (ZERO_RANGE; a hole punched and allocated again where the file system lacks
    it), so the guest's reservation stays its own. Writes zeros where neither works."""

    def __init__(self, keep_blocks: bool,
                 pwrite: Callable[[int, bytes, int], object] = os.pwrite) -> None:
        self.keep_blocks = keep_blocks
        self._fallocate_works = True
        self._pwrite = pwrite  # (fd, data, offset): the zeros, where fallocate cannot

    def erase(self, fd: int, offset: int, length: int) -> None:
        if self._fallocate_works:
            try:
                if self.keep_blocks:
                    self._zero_range(fd, offset, length)
                else:
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as error:
                if not unsupported(error):
                    raise
                self._fallocate_works = False  # this file system cannot: zeros from now on
        zeros = bytes(min(length, MAX_PAYLOAD))
        done = 0
        while done < length:
            step = min(length - done, len(zeros))
            self._pwrite(fd, zeros[:step], offset + done)
            done += step

    @staticmethod
    def _zero_range(fd: int, offset: int, length: int) -> None:
        try:
            fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as error:
            if not unsupported(error):  # e.g. tmpfs: punch, then allocate again
                raise
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            fallocate(fd, 0, offset, length)


class IopsThrottle:
    """A disk's operations per second as QEMU's throttling.iops-total imposes them
    on the testbed's hdd disk, so that tmemd's fallback and cached-disk images cost
    what the hdd costs the disk modes: QEMU's leaky bucket (util/throttle.c). Each
    operation adds one to the bucket, which leaks ``iops`` a second; an operation
    waits while the bucket holds more than a burst of ``iops`` / 10 (QEMU's default
    when no -max is set), so a client slower than ``iops`` is never delayed and a
    faster one gets ``iops`` on average. (sans-IO: the caller gives the clock and
    waits the delay.)"""

    def __init__(self, iops: int) -> None:
        if iops <= 0:
            raise ValueError("iops must be > 0")
        self.iops = float(iops)
        self.burst = self.iops / 10
        self._level = 0.0
        self._leaked_at: float | None = None

    def charge(self, operations: int, now: float) -> float:
        """Seconds ``operations`` more, issued at ``now``, wait before they are done."""
        if self._leaked_at is not None:
            self._level = max(0.0, self._level - (now - self._leaked_at) * self.iops)
        self._leaked_at = now
        if operations <= 0:
            return 0.0
        wait = max(0.0, self._level - self.burst) / self.iops
        self._level += operations
        return wait


class DiskExport:
    """What every export of tmemd shares: its connections, the checks every request
    passes, the throttle of the disk behind it, its counters. A subclass serves
    the valid requests (``_read``, ``_write``, ``_discard``, ``_flush``) and says
    which keys a READ may have to fetch from the remote tier (``_fetch_keys``)."""

    def __init__(self, store: Store, client: Client, *, name: str, size_bytes: int,
                 description: str, backing_iops: int = 0) -> None:
        if size_bytes <= 0 or size_bytes % PAGE_SIZE:
            raise ValueError(f"export size must be a positive multiple of {PAGE_SIZE}")
        self.store = store
        self.client = client
        self.name = name
        self.size_bytes = size_bytes
        self.description = description
        self.slots = size_bytes // PAGE_SIZE
        self._pool_id: int | None = None
        self._throttle = IopsThrottle(backing_iops) if backing_iops > 0 else None
        self._fallback_operations = 0  # disk operations not yet charged to the throttle
        self._connections: set[NbdConnection] = set()
        self._closed = False
        self.counters: Counter[str] = Counter()
        self.request_pages: Counter[str] = Counter()

    def connection(self) -> asyncio.Protocol:
        """Protocol factory for ``loop.create_unix_server``."""
        return NbdConnection(self)

    @property
    def connected(self) -> int:
        """Live client connections."""
        return len(self._connections)

    def _abort_connections(self) -> None:
        self._closed = True
        for connection in list(self._connections):
            connection.abort("export closed")

    def _attach(self, connection: NbdConnection) -> None:
        self._connections.add(connection)
        self.counters["connections_total"] += 1

    def _detach(self, connection: NbdConnection) -> None:
        self._connections.discard(connection)

    def fallback_delay(self) -> float:
        """Seconds the replies just built wait for the disk's throttle (0 without
        one): the operations on the disk behind the export since the last call."""
        operations, self._fallback_operations = self._fallback_operations, 0
        if self._throttle is None or not operations:
            return 0.0
        delay = self._throttle.charge(operations, time.monotonic())
        self.counters["fallback_throttled_us"] += int(delay * 1e6)
        return delay

    def _valid_read(self, request: nbd.Request) -> bool:
        return (request.command == nbd.Command.READ
                and not (request.offset | request.length) & (PAGE_SIZE - 1)
                and request.offset + request.length <= self.size_bytes
                and request.length <= MAX_PAYLOAD)

    def prefetch(self, request: nbd.Request, *, again: bool = False) -> asyncio.Future[None] | None:
        """Before serving a READ: a future if some of its pages must first be read
        back from the remote tier (None: all in memory, or not a valid READ).
        ``again``: its fetch is done (Store.fetch)."""
        pool_id = self._pool_id
        if pool_id is None or not self._valid_read(request) or not self.store.may_fetch(self.client, pool_id):
            return None
        keys = self._fetch_keys(request.offset >> PAGE_SHIFT, request.length >> PAGE_SHIFT)
        return self.store.fetch(self.client, pool_id, keys, again=again) if keys else None

    def _invalid(self, request: nbd.Request, why: str,
                 error: int = nbd.Error.EINVAL) -> tuple[int, bytes | bytearray]:
        self.counters["invalid_requests"] += 1
        log.debug("invalid NBD request", extra={"guest": self.name, "why": why, "command": request.command,
                                                "flags": request.flags, "offset": request.offset,
                                                "length": request.length})
        return error, b""

    def serve(self, request: nbd.Request) -> tuple[int, bytes | bytearray]:
        """Serve one request: (NBD error, READ payload)."""
        self.counters["requests"] += 1
        command = _COMMANDS.get(request.command)  # a dict: Command(...) costs a microsecond
        if command is None:
            return self._invalid(request, "unknown command")
        allowed = ALLOWED_COMMAND_FLAGS.get(command, 0)
        if request.flags & ~allowed:
            return self._invalid(request, "flags")
        if command not in (nbd.Command.READ, nbd.Command.WRITE, nbd.Command.TRIM,
                           nbd.Command.WRITE_ZEROES, nbd.Command.FLUSH):
            return self._invalid(request, "command not served")
        if command is not nbd.Command.FLUSH:
            if request.offset + request.length > self.size_bytes:
                return self._invalid(request, "past the end", nbd.Error.ENOSPC if command is not nbd.Command.READ
                                     else nbd.Error.EINVAL)
            # The advertised minimum block is a page: clients that asked honour it,
            # and a page is never half-written behind a client's back. The maximum
            # bounds payloads only: a TRIM or WRITE_ZEROES may span the whole export
            # (swapon --discard trims the whole swap area in one request).
            carries_payload = command in (nbd.Command.READ, nbd.Command.WRITE)
            if ((request.offset | request.length) & (PAGE_SIZE - 1) and command is not nbd.Command.TRIM) or (
                    carries_payload and request.length > MAX_PAYLOAD):
                return self._invalid(request, "alignment or size")
        first_slot = request.offset >> PAGE_SHIFT
        pages = request.length >> PAGE_SHIFT
        if command is nbd.Command.TRIM and (request.offset | request.length) & (PAGE_SIZE - 1):
            # Advisory: the whole pages inside are discarded, the rest keeps its data
            # (mkfs.ext4 trims the first 1 KiB to see whether discards zero).
            first_slot = -(-request.offset // PAGE_SIZE)
            pages = max(0, (request.offset + request.length) // PAGE_SIZE - first_slot)
        try:
            if command is nbd.Command.FLUSH:
                self.counters["flushes"] += 1
                self._flush()
                return nbd.Error.OK, b""
            self.request_pages[size_bucket(max(pages, 1))] += 1
            if command is nbd.Command.READ:
                return self._read(first_slot, pages)
            self.counters["changes"] += 1  # a WRITE, TRIM or WRITE_ZEROES
            if command is nbd.Command.WRITE:
                self._write(first_slot, request.data)
            else:
                self._discard(first_slot, pages, zeroing=command is nbd.Command.WRITE_ZEROES)
        except OSError as exc:  # the disk behind the export failed (disk full, I/O error)
            self.counters["fallback_errors"] += 1
            log.error("NBD backing file error", extra={"guest": self.name, "error": str(exc)})
            return (nbd.Error.ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                    else nbd.Error.EIO), b""
        return nbd.Error.OK, b""

    def _read(self, first_slot: int, pages: int) -> tuple[int, bytes | bytearray]:
        raise NotImplementedError

    def _write(self, first_slot: int, data: bytes) -> None:
        raise NotImplementedError

    def _discard(self, first_slot: int, pages: int, *, zeroing: bool) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        raise NotImplementedError

    def _fetch_keys(self, first_slot: int, pages: int) -> list[tuple[Oid, int]]:
        raise NotImplementedError


class NbdExport(DiskExport):
    """One guest's NBD swap export; state outlives connections (QEMU reconnects)."""

    def __init__(self, store: Store, client: Client, *, name: str, size_bytes: int,
                 fallback_path: str | os.PathLike[str], description: str = "tmem swap",
                 start: ExportStart = "new", preallocate: bool = False,
                 sync_fallback: bool = False, fallback_iops: int = 0) -> None:
        """``start``: ``"new"``, a fresh disk (the fallback file is emptied).
        ``"resume"``: tmemd restarted and replayed the guest's journal; the export
        takes back its pool (labelled EXPORT_POOL_LABEL) and the fallback file as
        they are, and rebuilds the slot bitmap from the pool: a slot in the pool is
        in tmem, any other slot is in the fallback file. ``"lost"``: an earlier tmemd
        died holding this disk (its fallback file is still there) and no journal
        brought its pages back; the disk starts empty, and a READ of a slot not
        written or discarded since then fails with EIO instead of serving zeros,
        because a guest that reconnects would take them for its swap pages.

        ``preallocate``: reserve the whole fallback file's blocks now (OSError if
        the disk has no room), so that refused pages never need space another
        guest's files took. ``sync_fallback`` (durability fsync): fdatasync the
        fallback file after a WRITE's refused pages, before the write's journal
        records, so that after a host crash no record points at a slot whose data
        never reached the disk. ``fallback_iops``: the fallback file answers as a
        disk of that many operations per second would (a request that reads or
        writes it is one operation; its reply waits its turn), so that refused
        pages cost what frontswap's real swap disk costs; 0: as fast as the host's
        page cache."""
        super().__init__(store, client, name=name, size_bytes=size_bytes, description=description,
                         backing_iops=fallback_iops)
        self.fallback_path = Path(fallback_path)
        # Bit set: the slot's page is in tmem; clear: in the fallback file (or never written).
        self._in_tmem = bytearray((self.slots + 7) // 8)
        # Bit set: the slot's page was lost (a crash without a journal, an admin
        # flush before a crash): reads fail until the slot is written or discarded.
        self._lost: bytearray | None = (bytearray(b"\xff" * len(self._in_tmem))
                                        if start == "lost" else None)
        self._sync_fallback = sync_fallback
        self._fallback_fd = open_state_file(self.fallback_path)
        try:
            if start == "resume":
                self._resume()
            else:
                # Whatever an earlier run left in the file is not this guest's swap (or
                # nothing vouches for it).
                os.ftruncate(self._fallback_fd, 0)
                self.lost_map_path.unlink(missing_ok=True)
            if self._lost is not None:
                self._save_lost_map()
            os.ftruncate(self._fallback_fd, size_bytes)
            self.preallocated = preallocate and self._preallocate()
        except BaseException:
            os.close(self._fallback_fd)
            raise
        self._eraser = SlotEraser(keep_blocks=self.preallocated)

    # -- tmemd's interface --

    def _preallocate(self) -> bool:
        """Allocate every block of the fallback file; False where the file system
        cannot (the file stays sparse and shares the disk's free space)."""
        try:
            fallocate(self._fallback_fd, 0, 0, self.size_bytes)
        except OSError as error:
            if unsupported(error):
                log.warning("cannot preallocate the fallback file: it shares the disk's "
                            "free space", extra={"guest": self.name, "error": str(error)})
                return False
            raise OSError(error.errno, f"no room to preallocate the {self.size_bytes}-byte "
                          f"fallback file {self.fallback_path}: {error.strerror} (free "
                          "space, lower --nbd-size, or --no-preallocate)") from None
        return True

    def close(self, *, discard: bool = False) -> None:
        """Stop serving. The pool and the fallback file are kept for the next start
        (the store keeps the pool on disk, if it can) unless ``discard``: then the
        guest's swap disk is gone for good (tmemctl forget)."""
        if self._closed:
            return
        self._abort_connections()
        if discard and self._pool_id is not None:
            self.store.destroy_pool(self.client, self._pool_id)
            self._pool_id = None
        os.close(self._fallback_fd)
        if discard:
            self.fallback_path.unlink(missing_ok=True)
            self.lost_map_path.unlink(missing_ok=True)
        elif self._lost is not None:
            self._save_lost_map()

    def lost_map(self) -> bytes | None:
        """The lost-slot bitmap as it is now (one bit per slot), None if no slot is lost."""
        return bytes(self._lost) if self._lost is not None and any(self._lost) else None

    @property
    def lost_map_path(self) -> Path:
        return lost_map_path(self.fallback_path)

    def _save_lost_map(self) -> None:
        """Write the lost-slot bitmap (atomically), or delete it once nothing is lost.
        Written when the export starts lost and when it closes; a crash in between
        leaves the older map, whose extra bits only make reads fail (never stale)."""
        assert self._lost is not None
        if not any(self._lost):
            self.lost_map_path.unlink(missing_ok=True)
            return
        tmp_path = self.lost_map_path.with_name(self.lost_map_path.name + ".tmp")
        fd = open_state_file(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            view = memoryview(self._lost)
            while view:
                view = view[os.write(fd, view):]
            if self._sync_fallback:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_path, self.lost_map_path)

    def _load_lost_map(self) -> None:
        """The lost slots an earlier run left (a disk that started lost); slots whose
        pages are in the pool were written since, so they are the guest's again."""
        try:
            fd = open_state_file(self.lost_map_path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            saved = os.read(fd, len(self._in_tmem) + 1)
        finally:
            os.close(fd)
        # Another export size: nothing can be vouched for.
        lost = bytearray(saved) if len(saved) == len(self._in_tmem) else (
            bytearray(b"\xff" * len(self._in_tmem)))
        for index, byte in enumerate(self._in_tmem):
            lost[index] &= ~byte & 0xFF
        if self._lost is not None:  # keys an admin flush took (the journal's LOST records)
            for index, byte in enumerate(self._lost):
                lost[index] |= byte
        self._lost = lost

    def _resume(self) -> None:
        try:
            self._resume_pool()
        finally:
            self._load_lost_map()

    def _resume_pool(self) -> None:
        pool_id = self._pool_id = self.store.find_pool(self.client, EXPORT_POOL_LABEL)
        if pool_id is None:
            return
        in_tmem = 0
        for oid, index in self.store.pool_keys(self.client, pool_id):
            slot = frontswap_offset(oid, index)
            if slot < self.slots:
                self._mark(slot, True)
                in_tmem += 1
        # Slots an admin flush took from tmem: the fallback holds an older
        # copy, if any (before the restart they read as EIO; so they still do).
        lost = self.store.lost_keys(self.client, pool_id)
        if lost:
            self._lost = bytearray(len(self._in_tmem))
            for oid, index in lost:
                slot = frontswap_offset(oid, index)
                if slot < self.slots:
                    slotmap.mark(self._lost, slot, True)
        log.info("NBD export resumed", extra={"guest": self.name, "pool_id": pool_id,
                                              "slots_in_tmem": in_tmem, "slots_lost": len(lost)})

    def _tmem_slots(self, from_slot: int, max_pages: int) -> tuple[list[int], int]:
        """Up to ``max_pages`` tmem-held slots from ``from_slot`` on, and the slot
        to continue from (``self.slots`` when done)."""
        if self._pool_id is None:
            return [], self.slots
        slots: list[int] = []
        next_slot = self.slots
        byte_index = from_slot >> 3
        byte = self._in_tmem[byte_index] & (0xFF << (from_slot & 7)) if from_slot < self.slots else 0
        while True:
            while byte:
                if len(slots) == max_pages:
                    next_slot = (byte_index << 3) | ((byte & -byte).bit_length() - 1)
                    break
                slots.append((byte_index << 3) | ((byte & -byte).bit_length() - 1))
                byte &= byte - 1
            byte_index += 1
            if next_slot < self.slots or byte_index >= len(self._in_tmem):
                break
            byte = self._in_tmem[byte_index]
        return slots, next_slot

    def _drain_slots(self, slots: list[int]) -> int:
        """Move these tmem-held slots to the fallback file: per slot, the page is
        written to the fallback at the slot's offset, the slot marked as fallback,
        and only then flushed from tmem (journaled), so a crash in between leaves
        two equal copies and the bitmap rebuilt from the pool still points at a
        current one. A slot tmem lost (or whose remote copy cannot be read) stays
        marked: its reads keep failing rather than serving older content."""
        if not slots or self._pool_id is None:
            return 0
        keys = frontswap_keys(SWAP_TYPE, slots)
        statuses, found = self.store.get_many(self.client, self._pool_id, keys)
        pages = iter(found)
        moved: list[int] = []
        for slot, status in zip(slots, statuses):
            if status != Status.OK:
                continue
            os.pwrite(self._fallback_fd, next(pages), slot << PAGE_SHIFT)
            self._mark(slot, False)
            moved.append(slot)
        if moved:
            self.store.flush_many(self.client, self._pool_id, frontswap_keys(SWAP_TYPE, moved))
        self.counters["pages_drained"] += len(moved)
        return len(moved)

    async def drain(self, pages_per_step: int = 1024) -> int:
        """Write every tmem-held page of this export to its fallback file and flush
        it from tmem, while the export keeps serving: the event loop runs other
        requests between steps of ``pages_per_step`` pages. Returns the pages moved.

        For ``tmemctl drain GUEST``. One pass over the slots: writes that arrive
        meanwhile may put pages into slots already passed; to empty tmem for good,
        freeze the guest's store client first (its puts are then refused and go to
        the fallback file)."""
        moved = 0
        slot = 0
        while slot < self.slots:
            slots, slot = self._tmem_slots(slot, pages_per_step)
            if slots and self._pool_id is not None:  # remote pages: read back first
                await self.store.read_back(self.client, self._pool_id, frontswap_keys(SWAP_TYPE, slots))
            moved += self._drain_slots(slots)
            await asyncio.sleep(0)
        return moved

    def stats(self) -> NbdExportStats:
        in_tmem = sum(byte.bit_count() for byte in self._in_tmem)
        # The counters go by name (COUNTER_NAMES), which mypy cannot follow: the
        # control tests check the reply against NbdExportStats.
        return cast(NbdExportStats, {
            "name": self.name,
            "size_bytes": self.size_bytes,
            "pool_id": self._pool_id,
            "connections": len(self._connections),
            "slots_in_tmem": in_tmem,
            **{key: self.counters[key] for key in COUNTER_NAMES},
            "request_pages_histogram": {label: self.request_pages[label]
                                        for label in HISTOGRAM_LABELS},
        })

    # -- slots --

    def _mark(self, slot: int, in_tmem: bool) -> None:
        slotmap.mark(self._in_tmem, slot, in_tmem)

    def _pool(self) -> int | None:
        """The guest's persistent pool, created on first use (None if the store refuses)."""
        if self._pool_id is None:
            status, pool_id, _shared = self.store.new_pool(self.client, persistent=True,
                                                           page_shift=PAGE_SHIFT,
                                                           label=EXPORT_POOL_LABEL)
            if status != Status.OK:
                self.counters["pool_create_failures"] += 1
                return None
            self._pool_id = pool_id
        return self._pool_id

    # -- requests --

    def _fetch_keys(self, first_slot: int, pages: int) -> list[tuple[Oid, int]]:
        return frontswap_keys(SWAP_TYPE, slotmap.set_slots(self._in_tmem, first_slot, pages))

    def _flush(self) -> None:
        os.fdatasync(self._fallback_fd)

    def _write(self, first_slot: int, data: bytes) -> None:
        # The journal records of this write (PUTs, and the flushes of older tmem
        # copies of refused slots) are written after the fallback file, before
        # the reply: whatever a crash interrupts, a slot reads its last
        # acknowledged copy or this one (docs/RELIABILITY.md).
        with self.store.deferred(self.client):
            if self._write_pages(first_slot, data):
                self._fallback_operations += 1
                if self._sync_fallback:
                    os.fdatasync(self._fallback_fd)

    def _write_pages(self, first_slot: int, data: bytes) -> bool:
        """Put the pages, the refused ones into the fallback file: whether any was."""
        self.counters["writes"] += 1
        pages = len(data) >> PAGE_SHIFT
        self._mark_found(first_slot, pages)
        pool_id = self._pool()
        if pool_id is None:
            statuses = [Status.REFUSED] * pages
        else:
            keys = frontswap_keys(SWAP_TYPE, range(first_slot, first_slot + pages))
            page_data = [data[page << PAGE_SHIFT : (page + 1) << PAGE_SHIFT] for page in range(pages)]
            # The whole request encoded in one call (GIL released once, not per page).
            encoded = self.store.encode_batch(self.client, pool_id, data, PAGE_SIZE)
            # A refused put also drops the slot's older tmem copy (the store's rule).
            statuses = self.store.put_many(self.client, pool_id, keys, page_data, encoded)
        view = memoryview(data)
        refused = [page for page, status in enumerate(statuses) if status != Status.OK]
        # In tmem: any fallback copy is superseded. Refused: the fallback's (below).
        slotmap.fill(self._in_tmem, first_slot, pages, True)
        for page in refused:
            self._mark(first_slot + page, False)
        self.counters["pages_put_tmem"] += pages - len(refused)
        for page, count in contiguous_runs(refused):  # a run of refused pages is one pwrite
            os.pwrite(self._fallback_fd, view[page << PAGE_SHIFT : (page + count) << PAGE_SHIFT],
                      (first_slot + page) << PAGE_SHIFT)
            self.counters["pages_refused_fallback"] += count
        return bool(refused)

    def _read(self, first_slot: int, pages: int) -> tuple[int, bytes | bytearray]:
        self.counters["reads"] += 1
        out = bytearray(pages << PAGE_SHIFT)
        if self._lost is not None and (lost := slotmap.set_slots(self._lost, first_slot, pages)):
            return self._stale(lost[0], "lost before tmemd restarted")
        tmem_pages = [slot - first_slot for slot in slotmap.set_slots(self._in_tmem, first_slot, pages)]
        if tmem_pages:
            if self._pool_id is None:
                return self._stale(first_slot + tmem_pages[0])
            keys = frontswap_keys(SWAP_TYPE, [first_slot + page for page in tmem_pages])
            statuses, found = self.store.get_many(self.client, self._pool_id, keys)
            for page, status in zip(tmem_pages, statuses):
                if status != Status.OK:
                    return self._stale(first_slot + page, status)
            for page, content in zip(tmem_pages, found):
                out[page << PAGE_SHIFT : (page + 1) << PAGE_SHIFT] = content
            self.counters["pages_read_tmem"] += len(tmem_pages)
        held = set(tmem_pages)
        fallback_pages = [page for page in range(pages) if page not in held] if len(held) < pages else []
        for page, count in contiguous_runs(fallback_pages):  # a run of fallback slots is one pread
            chunk = os.pread(self._fallback_fd, count << PAGE_SHIFT, (first_slot + page) << PAGE_SHIFT)
            # The file has the export's size, so a short read cannot happen; were
            # it to, the rest of the bytearray is zeros, as the file would read.
            out[page << PAGE_SHIFT : (page << PAGE_SHIFT) + len(chunk)] = chunk
        self.counters["pages_read_fallback"] += len(fallback_pages)
        self._fallback_operations += bool(fallback_pages)
        return nbd.Error.OK, out

    def _stale(self, slot: int, status: object = None) -> tuple[int, bytes]:
        # The page was put and tmem lost it (an admin flush, the pool destroyed):
        # the fallback holds an older version, if anything. Never serve it.
        self.counters["read_errors"] += 1
        log.error("tmem lost a swap page: failing the read",
                  extra={"guest": self.name, "slot": slot, "status": str(status)})
        return LOST_PAGE_ERROR, b""

    def _mark_found(self, first_slot: int, pages: int) -> None:
        if self._lost is not None:
            slotmap.fill(self._lost, first_slot, pages, False)

    def _discard(self, first_slot: int, pages: int, *, zeroing: bool) -> None:
        self.counters["zeroes" if zeroing else "trims"] += 1
        self.counters["pages_discarded"] += pages
        flushed = slotmap.set_slots(self._in_tmem, first_slot, pages)
        if self._lost is not None:
            # Lost slots are flushed too: the store then knows they are the guest's again.
            flushed = sorted({*flushed, *slotmap.set_slots(self._lost, first_slot, pages)})
        self._mark_found(first_slot, pages)
        if flushed and self._pool_id is not None:
            self.store.flush_many(self.client, self._pool_id, frontswap_keys(SWAP_TYPE, flushed))
        slotmap.fill(self._in_tmem, first_slot, pages, False)
        if pages:
            self._eraser.erase(self._fallback_fd, first_slot << PAGE_SHIFT, pages << PAGE_SHIFT)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


COUNTER_NAMES: Final = (
    "requests", "reads", "writes", "trims", "zeroes", "flushes", "invalid_requests",
    "pages_put_tmem", "pages_refused_fallback", "pages_read_tmem", "pages_read_fallback",
    "pages_discarded", "read_errors", "fallback_errors", "pool_create_failures", "connections_total",
    "protocol_errors", "pages_drained",
    # Passes that stopped with requests left: the client let READ replies pile up.
    "reply_backlogs",
    # Passes that waited for the remote tier (a READ's pages, or its writes landing).
    "store_waits",
    # Time replies waited for the fallback disk's throttle (--fallback-iops), µs.
    "fallback_throttled_us",
)
_REPLY_HEADER_BYTES: Final = nbd.SIMPLE_REPLY_HEADER.size
# READs whose fetches go to the tier together: what QEMU keeps in flight (16) and then some.
MAX_READS_PER_FETCH: Final = 32
# How a serving pass ended: the codec needs data, the session is over, the
# replies in flight reached their bound with requests left in the codec, or a
# READ waits for the remote tier to read its pages back.
_PassOutcome = Literal["drained", "finished", "backlog", "fetching"]
HISTOGRAM_LABELS: Final = tuple(str(b) for b in HISTOGRAM_BUCKETS[:-1]) + (f"{HISTOGRAM_BUCKETS[-1]}+",)


class NbdConnection(asyncio.Protocol):
    """One client connection to an export: handshake, then requests in order.

    Each pass serves the codec's requests until it needs data or the replies in
    flight reach REPLY_BYTES_IN_FLIGHT (a client that sends READs and reads no
    replies); the rest wait in the codec with reading paused (limits.ReplyFlow).
    With a ``limiter``, the connection counts against the guest's NBD socket and
    must finish the handshake in time; once in transmission it never times out.
    """

    def __init__(self, export: DiskExport, limiter: ConnectionLimiter | None = None) -> None:
        self.export = export
        self.codec = nbd.NbdServerConnection(max_payload=MAX_PAYLOAD)
        self.transport: asyncio.Transport | None = None
        self._closing = False
        self._limiter = limiter
        self._admission: Admission | None = None
        self._flow = ReplyFlow(self._serve)
        # A pass stopped on the store (the remote tier): the READ to serve first
        # when it resumes, and the replies built before it (_carried).
        self._resumed: collections.deque[nbd.ClientEvent] = collections.deque()
        # The READs the pending fetch covers; in the pass right after it, their
        # pages are read back (the tier forgets them after that pass).
        self._fetching: list[nbd.Request] = []
        self._fetched: set[int] = set()
        self._fetch_waiter: asyncio.Future[None] | None = None
        self._carried: list[bytes | bytearray] = []
        # Replies held by the slow fallback disk (--fallback-iops).
        self._unsent: list[bytes | bytearray] = []
        # Replies waiting for the store while the connection is served on.
        self._durable = DurableReplies(lambda: export.store.make_durable(tier=False))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses).
        self.transport = transport = cast(asyncio.Transport, transport)
        if self.export._closed:
            transport.abort()
            return
        if self._limiter is not None:
            self._admission = self._limiter.admit(self, transport, ConnectionKind.NBD,
                                                  self.export.name)
            if self._admission is None:
                return  # refused (closed, logged and counted by the limiter)
        self.export._attach(self)
        self._flow.attach(transport)
        self._durable.attach(transport)
        widen_socket_buffers(transport.get_extra_info("socket"))
        transport.write(self.codec.send(nbd.Greeting()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.export._detach(self)
        if self._admission is not None:
            self._admission.release()
        self._flow.detach()
        self._durable.detach()

    def data_received(self, data: bytes) -> None:
        self._feed(data)

    def eof_received(self) -> bool | None:
        self._feed(b"")
        # Replies still waiting for the store keep the transport open until they
        # are sent (DurableReplies closes it then).
        return True if self._durable else None

    # Slow reader: stop taking requests until its replies drain.
    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        if not self._closing:
            self._flow.resume_writing()

    def abort(self, reason: str) -> None:
        self._closing = True
        log.info("closing NBD connection", extra={"guest": self.export.name, "reason": reason})
        if self.transport is not None:
            self.transport.abort()

    # -- the limiter's view (tmem_host.limits.LimitedConnection) --

    @property
    def handshake_done(self) -> bool:
        return self.codec.phase in (nbd.Phase.TRANSMISSION, nbd.Phase.CLOSED)

    @property
    def activity(self) -> int:
        return 0  # never asked: established NBD connections have no idle timeout

    def close_by_limit(self, reason: str) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    # -- serving --

    def _feed(self, data: bytes) -> None:
        if self._closing or self.transport is None:
            return
        try:
            self.codec.receive_data(data)
        except nbd.NbdProtocolError as exc:
            self._protocol_error(exc, [])
            return
        self._serve()

    def _serve(self) -> None:
        """One pass over the codec's events, then one write (see the class doc)."""
        transport = self.transport
        if self._closing or transport is None or self._flow.suspended:
            return
        output, self._carried = self._carried, []
        try:
            outcome = self._serve_events(
                output, self._flow.room() - self._durable.bytes - sum(len(chunk) for chunk in output))
        except nbd.NbdProtocolError as exc:
            self._protocol_error(exc, output)
            return
        if outcome == "fetching":
            assert self._fetch_waiter is not None
            self._carried = output  # sent with the rest of the pass
            self.export.counters["store_waits"] += 1
            self._flow.suspend(self._fetch_waiter, self._serve_fetched)
            self._fetch_waiter = None
            return
        if outcome == "finished":
            # The client is done (EOF, DISC, ABORT): its last replies wait for the
            # store like the rest, then the connection closes.
            self._closing = True
            if output:
                self._durable.add(b"".join(output), self.export.store.make_durable())
            if not self._durable.hold_eof():
                transport.close()
            return
        if self._send(output):
            return  # the replies wait (the slow fallback disk, or too many for the store)
        if outcome == "backlog":
            self.export.counters["reply_backlogs"] += 1
        self._flow.pass_done(outcome == "backlog")

    def _protocol_error(self, exc: nbd.NbdProtocolError, output: list[bytes | bytearray]) -> None:
        self.export.counters["protocol_errors"] += 1
        log.warning("NBD protocol error", extra={"guest": self.export.name, "error": str(exc)})
        self._send(output, wait=False)
        self.abort("protocol error")

    def _send(self, output: list[bytes | bytearray], *, wait: bool = True) -> bool:
        """Send the pass's replies once what they acknowledge is as durable as
        promised (durability fsync: one fdatasync for all of them; the remote tier:
        its writes acknowledged by the cluster), after the earlier ones still
        waiting; the connection is served on meanwhile (DurableReplies). True if
        the pass must stop first: the slow fallback disk holds them, or too many
        replies wait. Not ``wait`` (the connection closes): every reply now,
        whatever the tier does (a page it fails to take stays in memory,
        Store.strand)."""
        if not output or self.transport is None:
            return False
        delay = self.export.fallback_delay()
        if delay > 0 and wait:
            # The fallback disk is slow (--fallback-iops): the replies wait for it.
            self._unsent = output
            slow_disk: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(delay, _set_done, slow_disk)
            self._flow.suspend(slow_disk, self._send_unsent)
            return True
        return self._send_durable(b"".join(output), wait=wait)

    def _send_durable(self, reply: bytes, *, wait: bool = True) -> bool:
        waiter = self.export.store.make_durable()
        if not wait:
            self._durable.send_all(reply)
            return False
        if waiter is not None:
            self.export.counters["store_waits"] += 1
        if not self._durable.add(reply, waiter):
            return False
        self._flow.suspend(self._durable.first_waiting(), self._serve)
        return True

    def _send_unsent(self) -> None:
        """The slow fallback disk's delay is over."""
        output, self._unsent = self._unsent, []
        if self.transport is not None and self._send_durable(b"".join(output)):
            return
        self._serve()

    def _serve_fetched(self) -> None:
        self._fetched = {id(request) for request in self._fetching}
        self._fetching = []
        try:
            self._serve()
        finally:
            self._fetched = set()

    def _prefetch_following(self) -> list[asyncio.Future[None]]:
        """The READs already received right behind one that waits for the tier:
        their fetches join its batch (one round trip per master for all of them).
        They are kept, in order, with the first non-READ, to be served after it."""
        waiters: list[asyncio.Future[None]] = []
        while len(self._resumed) < MAX_READS_PER_FETCH:
            event = self.codec.next_event()
            if event is nbd.NEED_DATA or event is nbd.PAUSED:
                break
            assert not isinstance(event, (nbd.NeedData, nbd.Paused))
            self._resumed.append(event)
            if not isinstance(event, nbd.Request) or event.command != nbd.Command.READ:
                break
            if (waiter := self.export.prefetch(event)) is not None:
                waiters.append(waiter)
                self._fetching.append(event)
        return waiters

    def _serve_events(self, output: list[bytes | bytearray], room: int) -> _PassOutcome:
        """Answer complete events until the codec needs data, the session is over,
        or the replies built fill ``room`` bytes (the reply that does is finished)."""
        codec = self.codec
        export = self.export
        while True:
            event: nbd.ClientEvent | nbd.NeedData | nbd.Paused
            # A READ resumed after its fetch is served as it is now, but for copies
            # gone meanwhile (pages demoted while it waited): a page the tier could
            # not read back fails it (EIO), it is not fetched again.
            resumed = bool(self._resumed)
            event = self._resumed.popleft() if resumed else codec.next_event()
            # Requests a backlog held over to a later pass fetch again if they must.
            fetched = resumed and id(event) in self._fetched
            if event is nbd.NEED_DATA or event is nbd.PAUSED:
                return "drained"
            if isinstance(event, nbd.ConnectionClosed):
                return "finished"
            if isinstance(event, nbd.Request):
                if event.command == nbd.Command.DISC:
                    continue  # the codec reports ConnectionClosed next
                waiter = export.prefetch(event, again=fetched)
                if waiter is not None:
                    if resumed:  # held over by a backlog, or a copy gone: first again, alone
                        self._resumed.appendleft(event)
                        self._fetching = [event]
                        self._fetch_waiter = waiter
                    else:
                        self._resumed.append(event)
                        self._fetching = [event]
                        self._fetch_waiter = all_done([waiter, *self._prefetch_following()])
                    return "fetching"
                error, payload = export.serve(event)
                # The header, then the READ payload as it is: no copy to glue them.
                output.append(codec.send(nbd.SimpleReply(event.handle, error)))
                room -= _REPLY_HEADER_BYTES
                if payload:
                    output.append(payload)
                    room -= len(payload)
                if room <= 0:
                    return "backlog"
            elif isinstance(event, nbd.InfoOption):
                if event.name in ("", export.name):
                    output.append(codec.send(nbd.ExportInfo(
                        name=export.name, size=export.size_bytes,
                        transmission_flags=TRANSMISSION_FLAGS, minimum_block=PAGE_SIZE,
                        preferred_block=PAGE_SIZE, maximum_payload=MAX_PAYLOAD,
                        description=export.description)))
                else:
                    output.append(codec.send(nbd.OptionError(
                        nbd.ReplyType.ERR_UNKNOWN, f"no export {event.name!r} here")))
            elif isinstance(event, nbd.ExportNameOption):
                if event.name not in ("", export.name):
                    raise nbd.NbdProtocolError(f"unknown export {event.name!r}")
                output.append(codec.send(nbd.ExportChosen(export.size_bytes, TRANSMISSION_FLAGS)))
            elif isinstance(event, nbd.ListOption):
                output.append(codec.send(nbd.ExportList((export.name,))))
            elif isinstance(event, nbd.AbortOption):
                output.append(codec.send(nbd.OptionReply(nbd.ReplyType.ACK)))
                return "finished"
            elif isinstance(event, nbd.MalformedOption):
                output.append(codec.send(nbd.OptionError(nbd.ReplyType.ERR_INVALID, event.reason)))
            elif isinstance(event, nbd.OtherOption):
                output.append(codec.send(nbd.OptionError(
                    nbd.ReplyType.ERR_UNSUP, f"option {event.option} not supported")))
            # ClientFlags needs no answer.
