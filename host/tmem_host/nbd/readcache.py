"""tmemd's cached disk: a guest's data disk over NBD, with its ephemeral pool as
the read cache (cleancache on the block path: no guest code).

The export serves a disk image tmemd opens (the backing image). A READ takes the
pages its ephemeral pool holds and reads the others from the image; those are
then put into the pool, compressed, in the guest's share of the budget, weighed
against the other guests, and dropped whenever the store needs the room, as
cleancache allows. Gets are inclusive: the guest's page cache holds a page it
read and tmem keeps its copy, because a block device never hears that the guest
dropped a page (the agent's FUSE cleancache does, and puts it then).

Rules (docs/NBD.md, "The cached disk"), each with a test in tests/nbd/test_readcache.py:
- A WRITE, TRIM or WRITE_ZEROES first flushes its pages from the pool, then
  changes the image: a failed write leaves the pages uncached, never an older copy.
- Writes fill the cache only with ``write_allocate`` (guest option
  cached-disk-write-allocate): after the image took the write, its pages are put
  into this export's pool, as cleancache puts a page the guest wrote once it is
  clean and evicted. Requests are served one at a time, so no read of the old
  data can fill the cache between the image's change and the put; a put the
  store refuses leaves the pages uncached (they were flushed first). Without
  it (write-around) what is cached was read.
- A shared pool (``shared_pool``) is read through by every export of the same
  image that joins it; a write by any of them flushes the pages for all, as the
  image changed for all. Only cached disks join it (the store keys shared pools
  by label too): no guest's agent can put a page where a cached disk reads.
- The pool never outlives the export: ephemeral pools are not journaled, and a
  restarted tmemd (or a guest added again) starts with an empty cache, so no
  write it did not see can leave a stale copy behind.
- The image is read and written with O_DIRECT where its file system allows, so
  the cache is tmem's alone: the host page cache does not hold a second copy
  (elsewhere POSIX_FADV_DONTNEED drops what the host cached, after each I/O).

Keys: a block is keyed as tmem_wire.frontswap keys a swap slot (area 0).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final, cast
from uuid import UUID

from tmem_host.replies import CachedDiskStats
from tmem_host.store import Client, Store
from tmem_wire.abi import Buffer, Oid, Status
from tmem_wire import nbd
from tmem_wire.frontswap import PAGE_SHIFT, contiguous_runs, frontswap_keys

from .export import HISTOGRAM_LABELS, MAX_PAYLOAD, DiskExport, SlotEraser

log = logging.getLogger("tmemd.nbd")

#: The store label of the cached disk's ephemeral pool.
READ_CACHE_POOL_LABEL: Final = "readcache"
AREA: Final = 0

CACHED_DISK_COUNTERS: Final = (
    "requests", "reads", "writes", "trims", "zeroes", "flushes", "invalid_requests",
    # Pages a READ found in the pool, read from the image, then put into the pool
    # (or not: the store refused them).
    "pages_read_cache", "pages_read_backing", "pages_cached", "pages_not_cached",
    # Pages a WRITE wrote, those it put into the pool (write_allocate), and pages a
    # WRITE, TRIM or WRITE_ZEROES flushed from the pool.
    "pages_written", "pages_written_cached", "pages_invalidated",
    "fallback_errors", "pool_create_failures", "connections_total", "protocol_errors",
    "reply_backlogs", "store_waits", "fallback_throttled_us",
)


def open_backing(path: Path) -> tuple[int, bool]:
    """The image, read-write, with O_DIRECT if its file system has it:
    (fd, direct)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT), True
    except OSError as error:
        if error.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here (tmpfs)
            raise
    return os.open(path, os.O_RDWR | os.O_CLOEXEC), False


class CachedDiskExport(DiskExport):
    """A guest's data disk: a backing image read through its ephemeral pool."""

    def __init__(self, store: Store, client: Client, *, name: str, backing_path: str | os.PathLike[str],
                 backing_iops: int = 0, shared_pool: UUID | None = None,
                 images: CachedImages | None = None, write_allocate: bool = False) -> None:
        """``backing_path``: the disk image (a regular file, a whole number of
        pages); ``backing_iops``: it answers as a disk of that many operations
        per second would (0: as fast as the host's disk). ``shared_pool``: read
        through the shared ephemeral pool of this UUID (the client must be
        authorised for it), with the other exports of the same image that join
        it: a page one guest read is a hit for the next. The caller makes sure
        that every member serves the same image (tmemd checks the inode).
        ``images``: tmemd's registry of the cached disks open per image: a change
        through this export flushes the pages from every cache of the same image
        (without one, only from its own). ``write_allocate``: a WRITE's pages
        are put into the cache once the image has them (else only reads fill it)."""
        self.backing_path = Path(backing_path)
        self.write_allocate = write_allocate
        fd, self.direct = open_backing(self.backing_path)
        try:
            info = os.fstat(fd)
            size = info.st_size
            super().__init__(store, client, name=name, size_bytes=size,
                             description="tmem cached disk", backing_iops=backing_iops)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        #: The image's identity (st_dev, st_ino): what cached disks of one image share.
        self.image_inode = (info.st_dev, info.st_ino)
        self._images = images if images is not None else CachedImages()
        # O_DIRECT wants aligned memory: one page-aligned buffer, reused (one
        # request is served at a time).
        self._buffer = mmap.mmap(-1, MAX_PAYLOAD)
        self._eraser = SlotEraser(keep_blocks=False, pwrite=lambda _fd, data, offset: self._pwrite(offset, data))
        # Whatever this guest's pool held is from before this export opened the
        # image: gone (a restarted tmemd has none: ephemeral pools are not journaled).
        stale = store.find_pool(client, READ_CACHE_POOL_LABEL)
        if stale is not None:
            store.destroy_pool(client, stale)
        status, pool_id, shared = store.new_pool(client, persistent=False, page_shift=PAGE_SHIFT,
                                                 shared_uuid=shared_pool, inclusive_gets=True,
                                                 label=READ_CACHE_POOL_LABEL)
        self.shared_pool = shared_pool if shared else None
        if shared_pool is not None and not shared:
            log.warning("cached disk: the shared pool was refused, the cache is private",
                        extra={"guest": name, "uuid": str(shared_pool)})
        if status == Status.OK:
            self._pool_id = pool_id
            self._images.join(self)
        else:  # served uncached
            self.counters["pool_create_failures"] += 1
            log.warning("no read cache pool: the disk is served uncached",
                        extra={"guest": name, "status": str(status)})

    def close(self, *, discard: bool = False) -> None:
        """Stop serving and drop the cache (the image is the guest's: it stays)."""
        if self._closed:
            return
        self._abort_connections()
        self._images.leave(self)
        if self._pool_id is not None:
            self.store.destroy_pool(self.client, self._pool_id)
            self._pool_id = None
        os.close(self._fd)
        self._buffer.close()

    def stats(self) -> CachedDiskStats:
        pool = (self.store.pool_stats(self.client, self._pool_id)
                if self._pool_id is not None else [])
        return cast(CachedDiskStats, {
            "name": self.name,
            "backing": os.fspath(self.backing_path),
            "size_bytes": self.size_bytes,
            "direct_io": self.direct,
            "shared_pool": None if self.shared_pool is None else str(self.shared_pool),
            "write_allocate": self.write_allocate,
            "pool_id": self._pool_id,
            "connections": len(self._connections),
            "pages_cached_now": pool[0].pages if pool else 0,
            **{key: self.counters[key] for key in CACHED_DISK_COUNTERS},
            "request_pages_histogram": {label: self.request_pages[label] for label in HISTOGRAM_LABELS},
        })

    # -- the image --

    def _pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the image from ``offset`` (zeros past its end)."""
        view = memoryview(self._buffer)[:length]
        try:
            done = 0
            while done < length:
                count = os.preadv(self._fd, [view[done:]], offset + done)
                if count == 0:  # cannot happen (the size is fixed), but never loop
                    view[done:] = bytes(length - done)
                    break
                done += count
            if not self.direct:
                os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
            return bytes(view)
        finally:
            view.release()

    def _pwrite(self, offset: int, data: bytes | memoryview) -> None:
        length = len(data)
        view = memoryview(self._buffer)[:length]
        try:
            view[:] = data
            done = 0
            while done < length:
                done += os.pwritev(self._fd, [view[done:]], offset + done)
        finally:
            view.release()
        if not self.direct:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)

    # -- requests (DiskExport checked them) --

    def _fetch_keys(self, first_slot: int, pages: int) -> list[tuple[Oid, int]]:
        # Pages demoted to the remote tier (a guest with remote-ephemeral) come
        # back before the get; the store fetches only those.
        return frontswap_keys(AREA, range(first_slot, first_slot + pages))

    def _read(self, first_slot: int, pages: int) -> tuple[int, bytes | bytearray]:
        self.counters["reads"] += 1
        out = bytearray(pages << PAGE_SHIFT)
        found = [False] * pages
        pool_id = self._pool_id
        if pool_id is not None:
            keys = frontswap_keys(AREA, range(first_slot, first_slot + pages))
            statuses, contents = self.store.get_many(self.client, pool_id, keys)
            hits = iter(contents)
            for page, status in enumerate(statuses):
                if status == Status.OK:
                    out[page << PAGE_SHIFT : (page + 1) << PAGE_SHIFT] = next(hits)
                    found[page] = True
        self.counters["pages_read_cache"] += sum(found)
        missed: list[int] = []
        missed_data: list[bytes] = []
        misses = [page for page in range(pages) if not found[page]]
        for page, count in contiguous_runs(misses):  # a run of misses is one read of the image
            chunk = self._pread((first_slot + page) << PAGE_SHIFT, count << PAGE_SHIFT)
            out[page << PAGE_SHIFT : (page + count) << PAGE_SHIFT] = chunk
            for index in range(count):
                missed.append(first_slot + page + index)
                missed_data.append(chunk[index << PAGE_SHIFT : (index + 1) << PAGE_SHIFT])
        if missed:
            self._fallback_operations += 1
            self.counters["pages_read_backing"] += len(missed)
            cached = self._cache(missed, missed_data)
            self.counters["pages_cached"] += cached
            self.counters["pages_not_cached"] += len(missed) - cached
        return nbd.Error.OK, out

    def _cache(self, slots: list[int], pages: Sequence[Buffer]) -> int:
        """Put what the image holds at ``slots`` into the pool: how many it took."""
        if self._pool_id is None:
            return 0
        statuses = self.store.put_many(self.client, self._pool_id, frontswap_keys(AREA, slots), pages)
        return sum(status == Status.OK for status in statuses)

    def _invalidate(self, first_slot: int, pages: int) -> None:
        """Flush the pages from every cache of this image (another guest's cached
        disk of the same image would otherwise serve what was there before)."""
        if not pages:
            return
        for export in self._images.of(self):
            export._flush_own(first_slot, pages)

    def _flush_own(self, first_slot: int, pages: int) -> None:
        if self._pool_id is None:
            return
        statuses = self.store.flush_many(self.client, self._pool_id,
                                         frontswap_keys(AREA, range(first_slot, first_slot + pages)))
        self.counters["pages_invalidated"] += sum(status == Status.OK for status in statuses)

    def _write(self, first_slot: int, data: bytes) -> None:
        self.counters["writes"] += 1
        self._invalidate(first_slot, len(data) >> PAGE_SHIFT)  # before the image changes
        self._fallback_operations += 1
        self._pwrite(first_slot << PAGE_SHIFT, data)
        pages = len(data) >> PAGE_SHIFT
        self.counters["pages_written"] += pages
        if self.write_allocate:
            view = memoryview(data)
            self.counters["pages_written_cached"] += self._cache(
                list(range(first_slot, first_slot + pages)),
                [view[page << PAGE_SHIFT : (page + 1) << PAGE_SHIFT] for page in range(pages)])

    def _discard(self, first_slot: int, pages: int, *, zeroing: bool) -> None:
        self.counters["zeroes" if zeroing else "trims"] += 1
        self._invalidate(first_slot, pages)
        # Both read as zeros after (a hole either way): a TRIM need not promise
        # it, but no read after one finds the old data, in the cache or the image.
        if pages:
            self._eraser.erase(self._fd, first_slot << PAGE_SHIFT, pages << PAGE_SHIFT)

    def _flush(self) -> None:
        os.fdatasync(self._fd)


class CachedImages:
    """The cached disks open per image, by inode: a write through one of them
    flushes the image's pages from all their pools (a shared pool is flushed once
    per member: the later flushes find nothing)."""

    def __init__(self) -> None:
        self._by_inode: dict[tuple[int, int], list[CachedDiskExport]] = {}

    def join(self, export: CachedDiskExport) -> None:
        self._by_inode.setdefault(export.image_inode, []).append(export)

    def leave(self, export: CachedDiskExport) -> None:
        key = export.image_inode
        exports = self._by_inode.get(key, [])
        if export in exports:
            exports.remove(export)
        if not exports:
            self._by_inode.pop(key, None)

    def of(self, export: CachedDiskExport) -> list[CachedDiskExport]:
        """Every cached disk of ``export``'s image (itself included, if it caches)."""
        return list(self._by_inode.get(export.image_inode, ()))
