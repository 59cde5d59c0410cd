"""The tmem side of the agent's FUSE cleancache (tmem_guest.cache): reads through
an ephemeral pool, and the invalidations that keep it true. Threads only, no FUSE:
the file system calls it from its worker threads.

Keys: object = (backing inode, 0, 0), index = page number in the file.

A read asks tmem first (one GET_BATCH for the read's pages that may be there:
PutPages). What missed is read from the backing file, and a *fill* posts the PUT
of those pages before the read returns: the frame is on the channel, its reply
is handled later by the session's reader thread. (A fill in a thread of its own
after the reply was measured and was slower: on the guest's one emulated vCPU
the extra thread costs more than the put's round trip it hides; docs/AGENT.md.
Posting needs no thread: the reader wakes for the reply either way.)

Invalidation races: a fill puts what the backing file held when the read ran; a
write through the mount may land between that read and the put. Each inode has a
write generation (a seqlock: odd while a change is in progress), taken before the
read. A fill puts only if the generation is still the one it took, and it checks
and sends the put under the fill lock, which every change takes to begin: so a
change either begins after the put was sent (its invalidation, sent later on the
same channel, flushes what was put, which was the file's content until then) or
before the check (and the fill puts nothing).
No moment exists where tmem holds a page older than the file. An invalidation
that cannot reach tmemd (channel down) marks the pool untrusted: it is treated as
empty and recreated on reconnect.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Final

from tmem_guest.counters import Counters
from tmem_guest.session import ChannelDown, Session, SessionPool
from tmem_wire.abi import WHOLE_OBJECT, Key, Oid
from tmem_wire.frontswap import PAGE_SHIFT, PAGE_SIZE, page_span

log = logging.getLogger("tmem_guest.readthrough")

#: What a read hands back besides its data: the put of the pages it missed.
Fill = Callable[[], None]


def object_id(inode: int) -> Oid:
    return (inode, 0, 0)


class PutPages:
    """The pages of each file that tmem took from this mount: the only ones a GET
    can find. A read of any other page is a miss without a round trip to tmemd
    (on a cold pass, every read). A bit is set once tmem accepted the page and is
    never cleared for a flush or an eviction: such a page costs a GET that
    misses, as it did without this. So the filter can only save GETs that would
    miss; it never decides what data a read returns.

    One bit per page, in chunks of 2^CHUNK_SHIFT pages per file that grow to the
    highest page set (a sparse read far into a file costs part of one chunk, not
    the file). Marks come from one thread, the session's reader, as fills'
    replies arrive; tests from any thread (a stale answer costs a GET that
    misses, or a read of the file for a page tmem held: never other data).
    """

    CHUNK_SHIFT: Final = 15  # 32768 pages (128 MiB of file) a chunk, 4 KiB at most

    def __init__(self) -> None:
        self._files: dict[int, dict[int, bytearray]] = {}

    @classmethod
    def _locate(cls, page: int) -> tuple[int, int, int]:
        """The page's chunk, the byte in that chunk, and the bit in that byte."""
        bit = page & ((1 << cls.CHUNK_SHIFT) - 1)
        return page >> cls.CHUNK_SHIFT, bit >> 3, 1 << (bit & 7)

    def mark(self, inode: int, pages: Sequence[int]) -> None:
        chunks = self._files.setdefault(inode, {})
        for page in pages:
            number, byte, mask = self._locate(page)
            chunk = chunks.setdefault(number, bytearray())
            if len(chunk) <= byte:
                chunk.extend(bytes(byte + 1 - len(chunk)))
            chunk[byte] |= mask

    def may_hold(self, inode: int, page: int) -> bool:
        number, byte, mask = self._locate(page)
        chunk = self._files.get(inode, {}).get(number)
        return chunk is not None and len(chunk) > byte and bool(chunk[byte] & mask)

    def forget(self, inode: int) -> None:
        """The file is gone or replaced: its inode number may come back as another."""
        self._files.pop(inode, None)


class PageCacheBridge:
    """Read-through fills and invalidations of one mount (thread-safe)."""

    def __init__(self, session: Session, pool: SessionPool, counters: Counters) -> None:
        self.session = session
        self.pool = pool
        self.counters = counters
        self._lock = threading.Lock()  # the generations
        self._fill_lock = threading.Lock()  # a fill's check and put; a change's beginning
        self._generation: defaultdict[int, int] = defaultdict(int)
        self.put_pages = PutPages()

    def _usable(self) -> bool:
        return self.session.is_up and not self.pool.untrusted

    # -- invalidation ----------------------------------------------------------

    def begin_change(self, inode: int) -> None:
        # Waits for a put in progress: it carries the file's content before this change.
        with self._fill_lock, self._lock:
            self._generation[inode] += 1  # odd: a change is in progress

    def end_change(self, inode: int) -> None:
        with self._lock:
            self._generation[inode] += 1

    def generation(self, inode: int) -> int:
        with self._lock:
            return self._generation[inode]

    def _invalidate(self, send: Callable[[], None], count: int) -> None:
        try:
            send()
            self.counters.add(flushes=count)
        except ChannelDown:
            # tmemd may still hold the old pages: never trust this pool again.
            self.pool.untrusted = True
            self.counters.add(channel_down=1)

    def invalidate_pages(self, inode: int, pages: range) -> None:
        if not pages:
            return
        keys: list[Key] = [(object_id(inode), page) for page in pages]
        self._invalidate(lambda: self.session.flush_batch(self.pool, keys), len(keys))

    def invalidate_file(self, inode: int) -> None:
        self.put_pages.forget(inode)
        self._invalidate(lambda: self.session.flush_batch(self.pool, [(object_id(inode), WHOLE_OBJECT)]), 1)

    # -- reads -------------------------------------------------------------------

    def read(self, fd: int, inode: int, offset: int, size: int) -> bytes:
        """The bytes at ``offset``, through tmem: the pages that missed are put."""
        data, fill = self.read_through(fd, inode, offset, size)
        if fill is not None:
            fill()
        return data

    def read_through(self, fd: int, inode: int, offset: int, size: int) -> tuple[bytes, Fill | None]:
        """The bytes at ``offset``, and the fill that puts what missed (None:
        nothing to put). Apart so that tests can change the file in between."""
        started = time.monotonic()
        file_size = os.fstat(fd).st_size
        end = min(offset + size, file_size)
        if offset >= end:
            return b"", None
        pages = page_span(offset, end - offset)
        buffer = bytearray(len(pages) << PAGE_SHIFT)
        view = memoryview(buffer)
        page_views = [view[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT] for i in range(len(pages))]
        keys: list[Key] = [(object_id(inode), page) for page in pages]
        generation = self.generation(inode)
        found = [False] * len(pages)
        asking = [i for i, page in enumerate(pages) if self.put_pages.may_hold(inode, page)]
        if len(asking) < len(pages):
            self.counters.add(misses=len(pages) - len(asking), misses_known=len(pages) - len(asking))
        if asking and self._usable():
            try:
                asked = time.monotonic()
                answers = self.session.get_batch(self.pool, [keys[i] for i in asking],
                                                 [page_views[i] for i in asking])
                self.counters.observe("tmem_get", time.monotonic() - asked)
                for i, hit in zip(asking, answers):
                    found[i] = hit
                hits = sum(answers)
                self.counters.add(gets=len(asking), hits=hits, misses=len(asking) - hits,
                                  bytes_got=hits << PAGE_SHIFT)
            except ChannelDown:
                self.counters.add(channel_down=1)
                found = [False] * len(pages)
        missing = [i for i, hit in enumerate(found) if not hit]
        fill: Fill | None = None
        if missing:
            self._read_backing(fd, pages.start, missing, page_views)
            if generation % 2 == 0 and self._usable():  # odd: a write is in progress
                fill = functools.partial(self._fill, inode, generation, [keys[i] for i in missing],
                                         [page_views[i] for i in missing])
        self.counters.add(requests=1)
        self.counters.observe("fuse_read", time.monotonic() - started)
        first = offset - (pages.start << PAGE_SHIFT)
        return bytes(view[first : first + end - offset]), fill

    def _read_backing(self, fd: int, first_page: int, missing: list[int], page_views: list[memoryview]) -> None:
        started = time.monotonic()
        for i in missing:
            into = page_views[i]
            count = os.preadv(fd, [into], (first_page + i) << PAGE_SHIFT)
            into[count:] = bytes(PAGE_SIZE - count)  # past EOF: zeros, as a page of the file reads
        os.posix_fadvise(fd, (first_page + missing[0]) << PAGE_SHIFT, len(page_views) << PAGE_SHIFT, os.POSIX_FADV_DONTNEED)
        self.counters.add(disk_reads=len(missing))
        self.counters.observe("backing_read", time.monotonic() - started)

    def _fill(self, inode: int, generation: int, keys: list[Key], pages: list[memoryview]) -> None:
        """Post the put of what a read found in the file; its reply is `_filled`'s.
        Posting takes the put's round trip out of the read: the frame carries the
        pages, and it is on the channel before the fill lock is released, so a
        change's FLUSH, sent later, reaches tmemd after it (tmemd applies one
        channel's requests in order)."""
        started = time.monotonic()
        with self._fill_lock:
            if self.generation(inode) != generation or not self._usable():
                self.counters.add(fills_skipped=1)
                return  # the file changed since it was read: what we hold may be old
            try:
                self.session.post_put_batch(self.pool, keys, pages, functools.partial(self._filled, inode))
            except ChannelDown:
                self.counters.add(channel_down=1)
                return
        self.counters.observe("tmem_fill", time.monotonic() - started)

    def _filled(self, inode: int, keys: Sequence[Key], accepted: list[bool] | None) -> None:
        """A fill's reply, on the session's reader thread (None: the session went
        down first; the puts may have landed, and are never asked for)."""
        if accepted is None:
            self.counters.add(channel_down=1)
            return
        taken = sum(accepted)
        self.counters.add(puts=len(keys), put_refusals=len(keys) - taken, bytes_put=taken << PAGE_SHIFT)
        self.put_pages.mark(inode, [key[1] for key, took in zip(keys, accepted) if took])
