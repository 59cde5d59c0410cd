"""The FUSE cleancache's tmem side (tmem_guest.readthrough) on the host, against an
in-memory stand-in for the session: reads, fills, and the rule that no moment
exists where tmem holds a page older than the file, with writes landing between
a read and its fill (the guest run of the whole mount:
tests/agent/test_guest_cache.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tmem_guest.counters import Counters
from tmem_guest.readthrough import PageCacheBridge, PutPages, object_id
from tmem_guest.session import ChannelDown, SessionPool
from tmem_wire.abi import WHOLE_OBJECT, Buffer, Key

PAGE = 4096


class PoolInMemory:
    """What the bridge uses of a Session: GET/PUT/FLUSH_BATCH on one dict. A put
    can be held (``hold_puts``) until ``release_puts``."""

    def __init__(self) -> None:
        self.pages: dict[Key, bytes] = {}
        self.is_up = True
        self.hold_puts = False
        self.put_started = threading.Event()
        self._release = threading.Event()
        self.down_on_flush = False
        self.asked: list[Key] = []  # every key a GET_BATCH asked for
        self.refuse_puts = False
        self.reply_later = False  # posted puts' replies wait in `replies`
        self.replies: list[Callable[[], None]] = []

    def release_puts(self) -> None:
        self._release.set()

    def get_batch(self, pool: SessionPool, keys: Sequence[Key], into: Sequence[memoryview]) -> list[bool]:
        found = []
        self.asked += keys
        for key, view in zip(keys, into):
            page = self.pages.get(key)
            if page is not None:
                view[:] = page
            found.append(page is not None)
        return found

    def put_batch(self, pool: SessionPool, keys: Sequence[Key], pages: Sequence[Buffer]) -> list[bool]:
        contents = [bytes(page) for page in pages]  # what the frame carries, taken when sent
        self.put_started.set()
        if self.hold_puts:
            assert self._release.wait(10)
        if self.refuse_puts:
            return [False] * len(keys)
        self.pages.update(zip(keys, contents))
        return [True] * len(keys)

    def post_put_batch(self, pool: SessionPool, keys: Sequence[Key], pages: Sequence[Buffer],
                       on_accepted: Callable[[Sequence[Key], list[bool] | None], None]) -> None:
        """As the session's: the frame (and its place in the channel's order) is
        taken now; the reply comes later, here at once or when ``reply_later``."""
        accepted = self.put_batch(pool, keys, pages)
        if self.reply_later:
            self.replies.append(lambda: on_accepted(keys, accepted))
        else:
            on_accepted(keys, accepted)

    def flush_batch(self, pool: SessionPool, keys: Sequence[Key]) -> None:
        if self.down_on_flush:
            raise ChannelDown("gone")
        for key in keys:
            if key[1] == WHOLE_OBJECT:
                for cached in [cached for cached in self.pages if cached[0] == key[0]]:
                    del self.pages[cached]
            else:
                self.pages.pop(key, None)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[PageCacheBridge, PoolInMemory, int, int]]:
    path = tmp_path / "file"
    path.write_bytes(b"A" * (4 * PAGE))
    fd = os.open(path, os.O_RDWR)
    tmem = PoolInMemory()
    bridge = PageCacheBridge(tmem, SessionPool(persistent=False, page_shift=12, pool_id=1),  # type: ignore[arg-type]
                             Counters("cache", "test"))
    try:
        yield bridge, tmem, fd, os.fstat(fd).st_ino
    finally:
        os.close(fd)


def write(bridge: PageCacheBridge, fd: int, inode: int, offset: int, data: bytes) -> None:
    """What CacheFs does for a write through the mount."""
    bridge.begin_change(inode)
    try:
        os.pwrite(fd, data, offset)
        bridge.invalidate_pages(inode, range(offset // PAGE, (offset + len(data) + PAGE - 1) // PAGE))
    finally:
        bridge.end_change(inode)


def test_a_miss_is_filled_and_the_next_read_is_a_hit(
        setup: tuple[PageCacheBridge, PoolInMemory, int, int]) -> None:
    bridge, tmem, fd, inode = setup
    data, fill = bridge.read_through(fd, inode, PAGE, 2 * PAGE)
    assert data == b"A" * 2 * PAGE and fill is not None
    assert tmem.pages == {}  # the fill puts
    fill()
    assert set(tmem.pages) == {(object_id(inode), 1), (object_id(inode), 2)}
    again, no_fill = bridge.read_through(fd, inode, PAGE + 100, 50)
    assert again == b"A" * 50 and no_fill is None
    assert bridge.counters["hits"] == 1 and bridge.counters["disk_reads"] == 2
    # read() is both: a miss there is put before it returns.
    assert bridge.read(fd, inode, 3 * PAGE, PAGE) == b"A" * PAGE and (object_id(inode), 3) in tmem.pages


def test_a_fill_after_a_write_puts_nothing(setup: tuple[PageCacheBridge, PoolInMemory, int, int]) -> None:
    bridge, tmem, fd, inode = setup
    _, fill = bridge.read_through(fd, inode, 0, PAGE)
    write(bridge, fd, inode, 0, b"B" * PAGE)  # lands between the read and its fill
    assert fill is not None
    fill()
    assert tmem.pages == {} and bridge.counters["fills_skipped"] == 1
    assert bridge.read_through(fd, inode, 0, PAGE)[0] == b"B" * PAGE


def test_a_read_during_a_write_hands_back_no_fill(setup: tuple[PageCacheBridge, PoolInMemory, int, int]) -> None:
    bridge, _, fd, inode = setup
    bridge.begin_change(inode)
    assert bridge.read_through(fd, inode, 0, PAGE)[1] is None
    bridge.end_change(inode)
    assert bridge.read_through(fd, inode, 0, PAGE)[1] is not None


def test_a_write_waits_for_a_put_in_flight_then_flushes_it(
        setup: tuple[PageCacheBridge, PoolInMemory, int, int]) -> None:
    # The fill checked the generation and its put is on the wire when the write
    # begins: the write must not change the file until the put is done, so that
    # its invalidation comes after the put and removes it.
    bridge, tmem, fd, inode = setup
    _, fill = bridge.read_through(fd, inode, 0, PAGE)
    assert fill is not None
    tmem.hold_puts = True
    filler = threading.Thread(target=fill)
    filler.start()
    assert tmem.put_started.wait(10)
    writer = threading.Thread(target=write, args=(bridge, fd, inode, 0, b"C" * PAGE))
    writer.start()
    writer.join(0.3)
    assert writer.is_alive() and os.pread(fd, PAGE, 0) == b"A" * PAGE  # waiting on the put
    tmem.release_puts()
    filler.join(10)
    writer.join(10)
    assert not writer.is_alive() and tmem.pages == {}
    assert bridge.read_through(fd, inode, 0, PAGE)[0] == b"C" * PAGE


def test_an_invalidation_that_cannot_reach_tmemd_distrusts_the_pool(
        setup: tuple[PageCacheBridge, PoolInMemory, int, int]) -> None:
    bridge, tmem, fd, inode = setup
    _, fill = bridge.read_through(fd, inode, 0, PAGE)
    assert fill is not None
    fill()
    tmem.down_on_flush = True
    write(bridge, fd, inode, 0, b"D" * PAGE)
    assert bridge.pool.untrusted
    # Treated as empty: the old page still in tmem is never asked for.
    data, no_fill = bridge.read_through(fd, inode, 0, PAGE)
    assert data == b"D" * PAGE and no_fill is None


def test_pages_never_put_are_read_without_asking_tmem(
        setup: tuple[PageCacheBridge, PoolInMemory, int, int]) -> None:
    bridge, tmem, fd, inode = setup
    key = (object_id(inode), 1)
    assert bridge.read(fd, inode, PAGE, PAGE) == b"A" * PAGE  # cold: no GET, then filled
    assert tmem.asked == [] and key in tmem.pages
    assert bridge.counters["misses"] == bridge.counters["misses_known"] == 1
    assert bridge.read(fd, inode, 0, 2 * PAGE) == b"A" * 2 * PAGE  # only page 1 may be in tmem
    assert tmem.asked == [key] and bridge.counters["hits"] == 1
    # Evicted behind the mount's back: asked, missed, read from the file.
    tmem.pages.clear()
    tmem.asked.clear()
    os.pwrite(fd, b"E" * PAGE, PAGE)  # (not through the mount: what the file holds now)
    assert bridge.read(fd, inode, PAGE, PAGE) == b"E" * PAGE and tmem.asked == [key]


def test_a_refused_fill_and_a_replaced_file_are_not_asked_for(
        setup: tuple[PageCacheBridge, PoolInMemory, int, int]) -> None:
    bridge, tmem, fd, inode = setup
    tmem.refuse_puts = True
    bridge.read(fd, inode, 0, PAGE)
    bridge.read(fd, inode, 0, PAGE)
    assert tmem.asked == [] and bridge.counters["put_refusals"] == 2
    tmem.refuse_puts = False
    bridge.read(fd, inode, 0, PAGE)
    bridge.read(fd, inode, 0, PAGE)
    assert tmem.asked == [(object_id(inode), 0)]
    bridge.invalidate_file(inode)  # the inode number may now name another file
    bridge.read(fd, inode, 0, PAGE)
    assert tmem.asked == [(object_id(inode), 0)] and bridge.counters["misses_known"] == 4


def test_put_pages_marks_bits_across_chunks_and_sparse_pages_cost_little() -> None:
    pages = PutPages()
    chunk = 1 << PutPages.CHUNK_SHIFT
    marked = [0, 7, 8, chunk - 1, chunk, 5 * chunk + 3]
    pages.mark(42, marked)
    assert [page for page in range(6 * chunk) if pages.may_hold(42, page)] == marked
    assert not pages.may_hold(43, 0) and not pages.may_hold(42, 10 * chunk)
    pages.mark(43, [(1 << 40) + 9])  # far into a sparse file: one small chunk
    assert pages.may_hold(43, (1 << 40) + 9) and not pages.may_hold(43, (1 << 40) + 8)
    assert len(pages._files[43][(1 << 40) >> PutPages.CHUNK_SHIFT]) == 2
    pages.forget(42)
    assert not any(pages.may_hold(42, page) for page in marked)


def test_a_fill_returns_before_its_reply_and_the_reply_marks_the_pages(
        setup: tuple[PageCacheBridge, PoolInMemory, int, int]) -> None:
    bridge, tmem, fd, inode = setup
    tmem.reply_later = True
    assert bridge.read(fd, inode, 0, PAGE) == b"A" * PAGE
    assert (object_id(inode), 0) in tmem.pages and bridge.counters["puts"] == 0
    bridge.read(fd, inode, 0, PAGE)  # the reply has not come: not asked for, filled again
    assert tmem.asked == []
    for reply in tmem.replies:
        reply()
    assert bridge.counters["puts"] == 2
    assert bridge.read(fd, inode, 0, PAGE) == b"A" * PAGE and tmem.asked == [(object_id(inode), 0)]
