"""Frontswap via NBD: the agent serves /dev/nbdN itself and the guest swaps onto it.

The kernel's NBD client talks to one end of a socketpair (set up with the NBD
ioctls, no nbd-client, no handshake); the agent decodes requests with
`tmem_wire.nbd.TransmissionDecoder` on the other end. Each 4 KiB block is a
swap slot. A WRITE offers its pages to the guest's persistent tmem pool; what
tmem refuses (cap, budget, channel down) goes to the fallback disk at the same
offset; `SlotMap` records which of the two holds each slot. A READ takes each
page from where the map says; a page tmem has lost is answered with EIO, never
with stale data. TRIM (swapon --discard frees whole clusters) becomes FLUSH.
Keys and these rules, shared with tmemd's NBD export: `tmem_wire.frontswap`.

Reliability (docs/AGENT.md, "Outages and drain"): a PUT or FLUSH sent without a
reply may or may not have been applied, so its slot is marked unsure and its key
flushed once the session is back (`reconcile`); `drain` moves every page tmem
holds to the fallback disk when tmemd asks (tmemctl drain). Both exclude the NBD
I/O path per stripe of slots (`StripeLocks`), so a write racing either one wins.

Modes: `sync` (one page per round trip, as the 2011 hypercall ABI), `batched`
(one PUT_BATCH/GET_BATCH frame per NBD request), `pipelined` (batched, with
several NBD requests served at once by worker threads).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tmem_guest.counters import Counters
from tmem_guest.session import ChannelDown, Session, SessionPool
from tmem_guest.slots import SlotMap, SlotMarks
from tmem_guest.system import aligned_buffer
from tmem_wire import nbd
from tmem_wire.abi import WHOLE_OBJECT, Oid
from tmem_wire.agent import AGENT_MODES
from tmem_wire.frontswap import (
    LOST_PAGE_ERROR, PAGE_SHIFT, PAGE_SIZE, Where, contiguous_runs, frontswap_area_oids, frontswap_keys,
    older_copy_is_stale,
)

log = logging.getLogger("tmem_guest.swap")

# Linux NBD ioctls (include/uapi/linux/nbd.h).
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_FLAGS = 0xAB0A

# Requests are capped at 256 KiB (max_sectors_kb, set below): 64 pages, one
# PUT_BATCH frame of the session's MAX_FRAME_PAGES; the per-worker buffers are sized
# for that. Fewer, bigger swap-out requests: each costs the agent a fixed amount of
# Python on an emulated vCPU (QEMU's NBD client, tmem-blk, writes ~62 pages per
# request, docs/PROTOTYPE.md).
MAX_REQUEST_BYTES = 256 * 1024
# A bigger request (should max_sectors_kb not stick) gets a one-off buffer rather
# than a protocol error; beyond this the kernel is misbehaving.
MAX_WRITE_PAYLOAD = 32 * 1024 * 1024
# FLUSH frames for a large discard are cut into batches of this many pages.
FLUSH_BATCH_PAGES = 256
# How long a READ of a slot that lives in tmem waits for a lost channel to return
# before it fails with EIO (the page is safe in tmemd meanwhile): start --read-wait.
READ_RECONNECT_WAIT_S = 30.0
# SwapStore.try_read's answer when a page only tmemd has cannot be fetched now (not
# an NBD error: nothing is answered yet).
SESSION_DOWN = -1
# Slots are locked in aligned stripes of this many, over this many locks: an NBD
# request (<= 64 slots) takes two or three, a drain or reconcile step one.
STRIPE_SLOTS = 32
STRIPE_LOCKS = 64


class FallbackDisk:
    """The virtio-blk disk that holds refused pages, opened O_DIRECT.

    O_DIRECT keeps swap-out from allocating guest page cache under memory
    pressure; it needs page-aligned buffers, which `aligned_buffer` provides.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        self.size_bytes = os.lseek(self.fd, 0, os.SEEK_END)

    def write(self, offset: int, data: memoryview) -> None:
        while data:
            written = os.pwritev(self.fd, [data], offset)
            data, offset = data[written:], offset + written

    def read_into(self, offset: int, into: memoryview) -> None:
        while into:
            count = os.preadv(self.fd, [into], offset)
            if count == 0:
                raise OSError(f"{self.path}: short read at {offset}")
            into, offset = into[count:], offset + count

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


# A READ reply is sent as one contiguous buffer: the 16-byte reply header sits just
# before the page-aligned payload (O_DIRECT reads land there), so one send() carries both.
REPLY_PAYLOAD_OFFSET = PAGE_SIZE
REPLY_HEADER_OFFSET = REPLY_PAYLOAD_OFFSET - nbd.SIMPLE_REPLY_HEADER.size


@dataclass(slots=True)
class Scratch:
    """A worker's preallocated buffers: the request header, the WRITE payload (read
    from the socket straight into page-aligned memory, which O_DIRECT writes from
    as is) and the reply (header + READ payload). Nothing is allocated per request."""

    request: bytearray
    request_view: memoryview
    payload: memoryview
    reply: memoryview

    @classmethod
    def allocate(cls) -> Scratch:
        request = bytearray(nbd.REQUEST_HEADER.size)
        return cls(
            request, memoryview(request), memoryview(aligned_buffer(MAX_REQUEST_BYTES)),
            memoryview(aligned_buffer(REPLY_PAYLOAD_OFFSET + MAX_REQUEST_BYTES)),
        )

    def payload_buffer(self, length: int) -> memoryview:
        """WRITE payload space; a request beyond the negotiated maximum gets a one-off buffer."""
        if length <= MAX_REQUEST_BYTES:
            return self.payload[:length]
        return memoryview(aligned_buffer(length))

    def reply_buffer(self, length: int) -> memoryview:
        """Reply header + READ payload space, the payload page-aligned at REPLY_PAYLOAD_OFFSET."""
        if length <= MAX_REQUEST_BYTES:
            return self.reply[: REPLY_PAYLOAD_OFFSET + length]
        return memoryview(aligned_buffer(REPLY_PAYLOAD_OFFSET + length))


class StripeLocks:
    """Locks over aligned stripes of STRIPE_SLOTS slots. The NBD I/O path holds the
    stripes of a request while it serves it, the drain and reconcile steps the
    stripe they work on: neither sees the other's slots half-updated. Locks are
    taken in ascending index order, so holders of several never deadlock."""

    def __init__(self, count: int = STRIPE_LOCKS) -> None:
        self._locks = [threading.Lock() for _ in range(count)]

    def indices(self, first_slot: int, slot_count: int) -> list[int]:
        first, last = first_slot // STRIPE_SLOTS, (first_slot + max(slot_count, 1) - 1) // STRIPE_SLOTS
        count = len(self._locks)
        if last - first + 1 >= count:
            return list(range(count))
        return sorted({stripe % count for stripe in range(first, last + 1)})

    def acquire(self, first_slot: int, slot_count: int) -> list[int]:
        held = self.indices(first_slot, slot_count)
        for index in held:
            self._locks[index].acquire()
        return held

    def release(self, held: list[int]) -> None:
        for index in reversed(held):
            self._locks[index].release()


# Readahead: a small READ whose pages all live in tmem also fetches up to this many
# following tmem slots in the same GET_BATCH, into a window the next READs are served
# from. Swap-in arrives as <= 8-page READs (vm.page-cluster = 3), mostly in slot
# order; each costs the agent a round trip of ms under TCG, the window turns four
# of them into one. `start --readahead`; 0 turns it off.
READAHEAD_PAGES = 24
# The window is filled only by READs up to this size, so that one GET_BATCH
# (<= 32 pages, one frame) carries the request and the readahead.
READAHEAD_GET_PAGES = 32


class ReadaheadWindow:
    """Pages of consecutive slots fetched ahead of the READs that will want them.

    Correctness: a slot's window copy is what tmem held when the window was filled
    under the stripe locks of those slots (SwapStore.try_read holds them for the request
    and its readahead); a WRITE or TRIM of a slot forgets it under the same locks,
    so the window never holds a page older than the slot's last write. One fill at
    a time owns the buffer; a READ that finds it busy reads from tmem as usual."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self._buffer = memoryview(aligned_buffer(max(pages, 1) << PAGE_SHIFT))
        self._valid = bytearray(pages)
        self._first = 0
        self._filling = False
        self._lock = threading.Lock()

    def take(self, slots: range, into: memoryview) -> bool:
        """Copy `slots` into `into` if the window holds every one of them."""
        with self._lock:
            start, stop = slots.start - self._first, slots.stop - self._first
            if start < 0 or stop > self.pages or self._valid.count(1, start, stop) != stop - start:
                return False
            into[:] = self._buffer[start << PAGE_SHIFT : stop << PAGE_SHIFT]
            return True

    def forget(self, slots: range) -> None:
        """The slots' contents change (WRITE, TRIM): drop any copy of them."""
        with self._lock:
            start, stop = max(slots.start - self._first, 0), min(slots.stop - self._first, self.pages)
            if start < stop:
                self._valid[start:stop] = bytes(stop - start)

    def begin_fill(self, first: int, count: int) -> list[memoryview] | None:
        """Page buffers for slots first..first+count, or None if another fill owns the window."""
        with self._lock:
            if self._filling:
                return None
            self._filling = True
            self._valid[:] = bytes(self.pages)
            self._first = first
        return [self._buffer[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT] for i in range(count)]

    def end_fill(self, found: Sequence[bool]) -> None:
        with self._lock:
            self._valid[: len(found)] = bytes(found)
            self._filling = False


class SwapStore:
    """The page logic behind the NBD device: tmem first, fallback disk second."""

    def __init__(
        self,
        session: Session,
        pool: SessionPool,
        disk: FallbackDisk,
        counters: Counters,
        *,
        batched: bool,
        swap_type: int = 0,
        slot_count: int | None = None,
        read_wait: float = READ_RECONNECT_WAIT_S,
        readahead: int = READAHEAD_PAGES,
    ) -> None:
        self.session = session
        self.pool = pool
        self.disk = disk
        self.counters = counters
        self.batched = batched
        self.swap_type = swap_type
        self.read_wait = read_wait
        self.slots = SlotMap(slot_count or disk.size_bytes >> PAGE_SHIFT)
        # Slots whose key may hold a page the map does not point at (a PUT or FLUSH
        # without reply): flushed by reconcile() once the session is back.
        self.unsure = SlotMarks(self.slots.slot_count)
        self.locks = StripeLocks()
        # One page per round trip (sync) gains nothing from fetching ahead.
        self.readahead = ReadaheadWindow(readahead) if readahead > 0 and batched else None
        self._drain_buffer: memoryview | None = None  # one stripe, allocated by the first drain
        self._swept = False  # the drain's final whole-area flush is done for this drain request

    @property
    def size_bytes(self) -> int:
        return self.slots.slot_count << PAGE_SHIFT

    def _keys(self, slots: Sequence[int]) -> list[tuple[Oid, int]]:
        return frontswap_keys(self.swap_type, slots)

    def _check_range(self, offset: int, length: int) -> range | None:
        if offset % PAGE_SIZE or length % PAGE_SIZE or offset + length > self.size_bytes:
            return None
        return range(offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT)

    # -- tmem operations, one frame per page (sync) or per request (batched) --

    def _put(self, keys: list[tuple[Oid, int]], pages: list[memoryview]) -> list[bool]:
        started = time.monotonic()
        if self.batched:
            accepted = self.session.put_batch(self.pool, keys, pages)
        else:
            accepted = [self.session.put(self.pool, oid, index, page) for (oid, index), page in zip(keys, pages)]
        self.counters.observe("put_batch" if self.batched else "put", time.monotonic() - started)
        return accepted

    def _get(self, keys: list[tuple[Oid, int]], into: list[memoryview]) -> list[bool]:
        started = time.monotonic()
        if self.batched:
            found = self.session.get_batch(self.pool, keys, into)
        else:
            found = [self.session.get(self.pool, oid, index, page) for (oid, index), page in zip(keys, into)]
        self.counters.observe("get_batch" if self.batched else "get", time.monotonic() - started)
        return found

    def _flush(self, keys: list[tuple[Oid, int]]) -> None:
        for start in range(0, len(keys), FLUSH_BATCH_PAGES):
            chunk = keys[start : start + FLUSH_BATCH_PAGES]
            if self.batched:
                self.session.flush_batch(self.pool, chunk)
            else:
                for oid, index in chunk:
                    self.session.flush_page(self.pool, oid, index)
            self.counters.add(flushes=len(chunk))

    # -- NBD commands --

    def _holding(self, offset: int, length: int) -> list[int]:
        return self.locks.acquire(offset >> PAGE_SHIFT, length >> PAGE_SHIFT)

    def write(self, offset: int, data: memoryview) -> int:
        """`data` must be page-aligned memory (a Scratch payload): refused pages go
        from it to the O_DIRECT disk without a copy."""
        held = self._holding(offset, len(data))
        try:
            return self._write(offset, data)
        finally:
            self.locks.release(held)

    def _write(self, offset: int, data: memoryview) -> int:
        slots = self._check_range(offset, len(data))
        if slots is None:
            return nbd.Error.EINVAL
        if self.readahead is not None:
            self.readahead.forget(slots)
        pages = [data[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT] for i in range(len(slots))]
        keys = self._keys(slots)
        offered = 0
        accepted = [False] * len(slots)
        if self.session.is_up:
            try:
                accepted = self._put(keys, pages)
                offered = len(slots)
            except ChannelDown:
                # Sent without a reply: tmemd may still apply it (a stopped tmemd, once
                # continued). The pages go to disk and the map says DISK, so reads are
                # right either way; reconcile() flushes the keys later.
                self.counters.add(channel_down=1)
                self.unsure.mark(slots)
        refused = [i for i, ok in enumerate(accepted) if not ok]
        stale = [keys[i] for i in refused if older_copy_is_stale(self.slots.get(slots[i]), accepted=False)]
        if not refused:
            self.slots.set_range(slots, Where.TMEM)
        for i, ok in enumerate(accepted if refused else ()):
            if ok:
                self.slots.set(slots[i], Where.TMEM)
        if refused:
            for first, count in contiguous_runs(refused):
                self.disk.write(offset + (first << PAGE_SHIFT), data[first << PAGE_SHIFT : (first + count) << PAGE_SHIFT])
            for i in refused:
                self.slots.set(slots[i], Where.DISK)
        if stale:
            # The slot's older page is still in tmem: free it, the disk copy is current.
            try:
                self._flush(stale)
            except ChannelDown:
                self.counters.add(channel_down=1)
                self.unsure.mark(slots[i] for i in refused)
        put_pages = len(slots) - len(refused)
        self.counters.add(
            puts=offered,
            put_refusals=len(refused),
            bytes_put=put_pages << PAGE_SHIFT,
            disk_writes=len(refused),
        )
        return nbd.Error.OK

    def read(self, offset: int, length: int, into: memoryview, deadline: float | None = None) -> int:
        """try_read, waiting (no lock held) for the session whenever it needs tmemd,
        until `deadline` (time.monotonic(); by default read_wait from now); EIO when
        tmemd did not come back in time (the page may still be in tmemd: the process
        faulting it gets SIGBUS, never wrong data)."""
        if deadline is None:
            deadline = time.monotonic() + self.read_wait
        retried = False
        while (error := self.try_read(offset, length, into)) == SESSION_DOWN:
            if retried and self.session.is_up:
                time.sleep(0.05)  # back and gone again at once: do not spin
            retried = True
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.session.wait_up(remaining):
                self.counters.add(errors=1)
                log.error("READ at %d: tmemd not back within %.0f s, answering EIO", offset, self.read_wait)
                return nbd.Error.EIO
        return error

    def try_read(self, offset: int, length: int, into: memoryview) -> int:
        """One attempt at a READ under its stripe locks: the NBD error, or SESSION_DOWN
        when a page only tmemd has cannot be fetched now. Then no lock is held: the
        caller waits for the session and tries again, and WRITEs and TRIMs of the
        stripe (the fallback disk is what frees guest memory) go on meanwhile."""
        # The readahead slots are locked with the request's: no WRITE of theirs can
        # slip between the GET and the window fill. Nothing is fetched ahead for a
        # session that is down.
        ahead = self._readahead_pages(offset, length) if self.session.is_up else 0
        held = self._holding(offset, length + (ahead << PAGE_SHIFT))
        try:
            return self._read(offset, length, into, ahead)
        finally:
            self.locks.release(held)

    def _readahead_pages(self, offset: int, length: int) -> int:
        """How many slots after a READ it may fetch ahead (0 without a window, for big
        READs, at the device's end)."""
        if self.readahead is None or length % PAGE_SIZE or offset % PAGE_SIZE:
            return 0
        pages, stop = length >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        return max(min(self.readahead.pages, READAHEAD_GET_PAGES - pages, self.slots.slot_count - stop), 0)

    def _read(self, offset: int, length: int, into: memoryview, ahead: int = 0) -> int:
        slots = self._check_range(offset, length)
        if slots is None:
            return nbd.Error.EINVAL
        if self.readahead is not None and self.readahead.take(slots, into):
            self.counters.add(readahead_hits=len(slots))
            return nbd.Error.OK
        if self.slots.all_in(slots, Where.TMEM):  # the common case: no per-slot lookups
            from_tmem, from_disk = list(range(len(slots))), []
            ahead = self.slots.run_in(slots.stop, ahead, Where.TMEM)
            window_pages = self.readahead.begin_fill(slots.stop, ahead) if self.readahead and ahead else None
            if window_pages is not None:
                assert self.readahead is not None
                found_ahead: list[bool] = []
                try:
                    error, found_ahead = self._read_from_tmem(offset, slots, from_tmem, into, window_pages)
                    return error
                finally:
                    self.readahead.end_fill(found_ahead)
        else:
            from_tmem = [i for i, slot in enumerate(slots) if self.slots.get(slot) is Where.TMEM]
            from_disk = [i for i, slot in enumerate(slots) if self.slots.get(slot) is not Where.TMEM]
        for first, count in contiguous_runs(from_disk):
            self.disk.read_into(offset + (first << PAGE_SHIFT), into[first << PAGE_SHIFT : (first + count) << PAGE_SHIFT])
        self.counters.add(disk_reads=len(from_disk))
        if not from_tmem:
            return nbd.Error.OK
        return self._read_from_tmem(offset, slots, from_tmem, into, [])[0]

    def _read_from_tmem(
        self, offset: int, slots: range, from_tmem: list[int], into: memoryview, window_pages: list[memoryview]
    ) -> tuple[int, list[bool]]:
        """GET the request's tmem pages (positions `from_tmem`) into `into`, and the
        readahead slots that follow the request into `window_pages`, in one batch.
        Returns the NBD error (or SESSION_DOWN) and which readahead pages came."""
        wanted = [slots[i] for i in from_tmem]
        keys = self._keys([*wanted, *range(slots.stop, slots.stop + len(window_pages))])
        pages = [into[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT] for i in from_tmem] + window_pages
        try:
            found = self._get(keys, pages)
        except ChannelDown:
            # The pages are safe in tmemd (or its journal) while the channel is down.
            self.counters.add(channel_down=1)
            return SESSION_DOWN, []
        hits = sum(found)
        self.counters.add(gets=len(keys), hits=hits, misses=len(keys) - hits, bytes_got=hits << PAGE_SHIFT)
        lost = len(wanted) - sum(found[: len(wanted)])
        if lost:
            # Only tmem had these pages: answering anything but an error would be stale data.
            self.counters.add(lost_pages=lost, errors=1)
            log.error("tmem lost %d swap page(s) at offset %d", lost, offset)
            return LOST_PAGE_ERROR, found[len(wanted) :]
        return nbd.Error.OK, found[len(wanted) :]

    def trim(self, offset: int, length: int) -> int:
        held = self._holding(offset, length)
        try:
            return self._trim(offset, length)
        finally:
            self.locks.release(held)

    def _trim(self, offset: int, length: int) -> int:
        slots = self._check_range(offset, length)
        if slots is None:
            return nbd.Error.EINVAL
        if self.readahead is not None:
            self.readahead.forget(slots)
        in_tmem = list(self.slots.slots_in(slots, Where.TMEM))
        self.slots.set_range(slots, Where.NOWHERE)
        if in_tmem:
            try:
                self._flush(self._keys(in_tmem))
            except ChannelDown:
                # The copies stay in tmemd, the map no longer points at them: flushed by reconcile().
                self.counters.add(channel_down=1)
                self.unsure.mark(in_tmem)
        return nbd.Error.OK

    def flush(self) -> int:
        self.disk.sync()
        return nbd.Error.OK

    # -- reliability: unsure keys, drain --

    def _stripes_from(self, first_slot: int) -> tuple[list[int], range]:
        """Lock the stripe holding `first_slot`; (held locks, the stripe's slots)."""
        start = first_slot - first_slot % STRIPE_SLOTS
        stripe = range(start, min(start + STRIPE_SLOTS, self.slots.slot_count))
        return self.locks.acquire(start, len(stripe)), stripe

    def reconcile(self) -> int:
        """Flush the keys of unsure slots whose map entry does not point at tmem (a
        slot now TMEM had a later PUT accepted, applied after the unsure request:
        its key holds the current page). Returns the keys flushed; raises
        ChannelDown if the session drops again (the marks stay)."""
        flushed = 0
        slot = self.unsure.next_marked(0)
        while slot >= 0:
            held, stripe = self._stripes_from(slot)
            try:
                marked = [s for s in stripe if self.unsure.is_marked(s)]
                orphans = [s for s in marked if self.slots.get(s) is not Where.TMEM]
                if orphans:
                    self._flush(self._keys(orphans))
                for s in marked:
                    self.unsure.clear(s)
                flushed += len(orphans)
            finally:
                self.locks.release(held)
            slot = self.unsure.next_marked(stripe.stop)
        if flushed:
            self.counters.add(unsure_flushed=flushed)
            log.info("flushed %d key(s) an outage left unsure", flushed)
        return flushed

    def drain(self) -> int:
        """Move every page the map places in tmem to the fallback disk, stripe by
        stripe: GET, write at the slot's offset, map DISK, then FLUSH (so a slot
        always has a current copy where the map says). A page tmem lost stays
        TMEM: reading it keeps failing rather than serving the disk's older bytes.
        Returns the pages moved; raises ChannelDown if the session drops."""
        if self._drain_buffer is None:
            self._drain_buffer = memoryview(aligned_buffer(STRIPE_SLOTS * PAGE_SIZE))
        buffer = self._drain_buffer
        moved = 0
        slot = self.slots.next_in(Where.TMEM, 0)
        while slot >= 0:
            held, stripe = self._stripes_from(slot)
            try:
                moved += self._drain_stripe(stripe, buffer)
            finally:
                self.locks.release(held)
            slot = self.slots.next_in(Where.TMEM, stripe.stop)
        if moved or not self._swept:
            self._sweep()
        if moved:
            self.counters.add(drained_pages=moved)
            log.info("drained %d page(s) from tmem to the fallback disk", moved)
        return moved

    def _drain_stripe(self, stripe: range, buffer: memoryview) -> int:
        in_tmem = list(self.slots.slots_in(stripe, Where.TMEM))
        if not in_tmem:
            return 0
        # Each page lands at its slot's place in the buffer: runs of slots are runs of buffer.
        views = [buffer[(s - stripe.start) << PAGE_SHIFT : (s - stripe.start + 1) << PAGE_SHIFT] for s in in_tmem]
        found = self._get(self._keys(in_tmem), views)
        hits = [s for s, ok in zip(in_tmem, found) if ok]
        if len(hits) < len(in_tmem):
            # Counted in lost_pages when the kernel reads them (EIO), not on every drain pass.
            log.error("drain: tmem lost %d swap page(s) in slots %d..%d", len(in_tmem) - len(hits),
                      stripe.start, stripe.stop - 1)
        for first, count in contiguous_runs(hits):
            start = (first - stripe.start) << PAGE_SHIFT
            self.disk.write(first << PAGE_SHIFT, buffer[start : start + (count << PAGE_SHIFT)])
        for s in hits:
            self.slots.set(s, Where.DISK)
        self.counters.add(disk_writes=len(hits), gets=len(in_tmem), hits=len(hits))
        try:
            self._flush(self._keys(hits))
        except ChannelDown:
            self.unsure.mark(hits)  # the map is already right; the copies go later
            raise
        return len(hits)

    def _sweep(self) -> None:
        """With no slot left in tmem, flush the swap area's 16 whole objects: pages the
        map never pointed at (a PUT applied after it was given up, before reconcile)
        leave too, so tmemd reaches 0 pages. All stripes are held: no write can put
        a page in meanwhile."""
        held = self.locks.acquire(0, self.slots.slot_count)
        try:
            if self.slots.next_in(Where.TMEM, 0) >= 0:
                return  # lost pages stay mapped (EIO on read); their keys hold nothing anyway
            keys = [(oid, WHOLE_OBJECT) for oid in frontswap_area_oids(self.swap_type)]
            if self.batched:
                self.session.flush_batch(self.pool, keys)
            else:
                for oid, _ in keys:
                    self.session.flush_object(self.pool, oid)
            self._swept = True
        finally:
            self.locks.release(held)

    def maintain(self, stopping: threading.Event, interval: float = 1.0) -> None:
        """The swap frontend's housekeeping thread: once the session is up, flush
        the keys an outage left unsure, and drain when tmemd asks (Flag.DRAIN)."""
        session = self.session
        while not stopping.is_set():
            requested = session.drain_requested.wait(interval)
            if not session.draining:
                self._swept = False  # the next drain request sweeps again
            if not session.is_up:
                stopping.wait(interval)
                continue
            try:
                if self.unsure.next_marked(0) >= 0:
                    self.reconcile()
                if requested:
                    session.drain_requested.clear()
                    self.drain()
            except ChannelDown:
                self.counters.add(channel_down=1)
            except OSError as error:
                log.error("swap maintenance: %s", error)
                stopping.wait(interval)


class NbdSwapServer:
    """Serves one /dev/nbdN from `store` through a socketpair.

    Workers take turns as the reader (leader/follower): a worker holds the receive
    lock while it reads one request, header then WRITE payload, straight into its
    own Scratch, then serves it and replies; meanwhile the next worker reads. No
    thread hands requests to another and nothing is copied through a decoder.
    `sync` and `batched` have one worker, `pipelined` `depth` of them.

    A READ that needs a page only tmemd has while the session is down is parked:
    its worker releases the stripe locks and goes on to the next request, and one
    more thread (`nbd-parked-reads`, with its own Scratch) answers the parked READs
    in turn when the session is back, or with EIO once one has waited read_wait. The kernel
    takes replies in any order. A worker waiting instead would hold its stripes and
    itself: a few such reads held every worker, the WRITEs that free guest memory
    (to the fallback disk) waited behind them, and an unplugged guest stalled.
    """

    def __init__(self, device: Path, store: SwapStore, *, mode: str, depth: int = 4) -> None:
        if mode not in AGENT_MODES:
            raise ValueError(f"mode must be one of {AGENT_MODES}, not {mode!r}")
        self.device = device
        self.store = store
        self.mode = mode
        self.depth = depth if mode == "pipelined" else 1
        # kernel_end is what NBD_SET_SOCK hands the kernel (host tests speak NBD on it).
        self.kernel_end, self._agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._device_fd = -1
        self._receive_lock = threading.Lock()
        self._send_lock = threading.Lock()
        # READs waiting for the session: (handle, offset, length, arrival), oldest first.
        self._parked: list[tuple[int, int, int, float]] = []
        self._parked_changed = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.finished = threading.Event()

    def start(self) -> None:
        """Attach the socketpair to the device; requests flow once this returns."""
        fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        self._device_fd = fd
        fcntl.ioctl(fd, NBD_CLEAR_SOCK)
        fcntl.ioctl(fd, NBD_SET_BLKSIZE, PAGE_SIZE)
        fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, self.store.slots.slot_count)
        flags = nbd.TransmissionFlag.HAS_FLAGS | nbd.TransmissionFlag.SEND_FLUSH | nbd.TransmissionFlag.SEND_TRIM
        fcntl.ioctl(fd, NBD_SET_FLAGS, int(flags))
        fcntl.ioctl(fd, NBD_SET_SOCK, self.kernel_end.fileno())
        self._set_queue_limit("max_sectors_kb", str(MAX_REQUEST_BYTES // 1024))
        self._spawn(self._do_it, "nbd-do-it")
        self.start_workers()

    def start_workers(self) -> None:
        """Serve requests arriving on kernel_end (start() calls this after the ioctls)."""
        for number in range(self.depth):
            self._spawn(self._worker, f"nbd-worker-{number}")
        self._spawn(self._serve_parked_reads, "nbd-parked-reads")

    @property
    def parked_reads(self) -> int:
        with self._parked_changed:
            return len(self._parked)

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _set_queue_limit(self, name: str, value: str) -> None:
        path = Path("/sys/block") / self.device.name / "queue" / name
        try:
            path.write_text(value)
        except OSError as error:
            log.warning("could not set %s to %s: %s", path, value, error)

    def _do_it(self) -> None:
        # NBD_DO_IT returns only when the device is disconnected; ioctl releases the GIL.
        try:
            fcntl.ioctl(self._device_fd, NBD_DO_IT)
        except OSError as error:
            log.info("NBD_DO_IT ended: %s", error)
        finally:
            self.finished.set()

    def _worker(self) -> None:
        scratch = Scratch.allocate()
        try:
            while self._serve_next(scratch):
                pass
        except (nbd.NbdProtocolError, OSError) as error:
            log.error("NBD connection from the kernel failed: %s", error)
            self._closed = True
        finally:
            if self._closed:
                self.finished.set()
                with self._parked_changed:
                    self._parked_changed.notify()

    def _serve_next(self, scratch: Scratch) -> bool:
        """Read one request and serve it; False at the end."""
        with self._receive_lock:
            if self._closed:
                return False
            request = self._read_request(scratch)
            if request is None:
                self._closed = True
                return False
        self._serve(scratch, *request)
        return True

    def _read_request(self, scratch: Scratch) -> tuple[int, int, int, int, memoryview] | None:
        """(command, handle, offset, length, WRITE payload) of the next request; None at
        the end (EOF or NBD_CMD_DISC, which has no reply)."""
        if not self._receive_exactly(scratch.request_view):
            return None
        _, command, handle, offset, length = nbd.check_request_header(
            nbd.REQUEST_HEADER.unpack_from(scratch.request), MAX_WRITE_PAYLOAD
        )
        if command == nbd.Command.DISC:
            return None
        payload = scratch.payload[:0]
        if command == nbd.Command.WRITE:
            payload = scratch.payload_buffer(length)
            if not self._receive_exactly(payload):
                raise nbd.NbdProtocolError("connection closed in the middle of a WRITE")
        return command, handle, offset, length, payload

    def _receive_exactly(self, into: memoryview) -> bool:
        """Fill `into` from the socket (MSG_WAITALL: one syscall as a rule); False on EOF
        before the first byte."""
        received = self._agent_end.recv_into(into, 0, socket.MSG_WAITALL)
        while received < len(into):
            if received == 0:
                return False
            count = self._agent_end.recv_into(into[received:], 0, socket.MSG_WAITALL)
            if count == 0:
                raise nbd.NbdProtocolError("connection closed in the middle of a message")
            received += count
        return True

    def _serve(self, scratch: Scratch, command: int, handle: int, offset: int, length: int, payload: memoryview) -> None:
        started = time.monotonic()
        reply = scratch.reply
        try:
            if command == nbd.Command.WRITE:
                error = self.store.write(offset, payload)
                operation = "nbd_write"
            elif command == nbd.Command.READ:
                reply = scratch.reply_buffer(length)
                error = self.store.try_read(offset, length, reply[REPLY_PAYLOAD_OFFSET:])
                if error == SESSION_DOWN:
                    self._park(handle, offset, length, started)
                    return
                operation = "nbd_read"
            elif command == nbd.Command.TRIM:
                error = self.store.trim(offset, length)
                operation = "nbd_trim"
            elif command == nbd.Command.FLUSH:
                error = self.store.flush()
                operation = "nbd_flush"
            else:
                error, operation = nbd.Error.EINVAL, "nbd_other"
        except OSError as failure:
            log.error("NBD command %d at %d failed: %s", command, offset, failure)
            error, operation = nbd.Error.EIO, "nbd_failed"
        self._reply(reply, handle, error, length if command == nbd.Command.READ else 0, operation, started)

    def _reply(self, reply: memoryview, handle: int, error: int, payload_length: int,
               operation: str, started: float) -> None:
        """Send the reply in `reply` (header space, then a READ's payload) and count it."""
        counters = self.store.counters
        if error != nbd.Error.OK:
            payload_length = 0
            counters.add(errors=1)
        nbd.pack_simple_reply_into(reply, REPLY_HEADER_OFFSET, handle, error)
        with self._send_lock:
            self._agent_end.sendall(reply[REPLY_HEADER_OFFSET : REPLY_PAYLOAD_OFFSET + payload_length])
        counters.add(requests=1)
        counters.observe(operation, time.monotonic() - started)

    def _park(self, handle: int, offset: int, length: int, arrival: float) -> None:
        with self._parked_changed:
            self._parked.append((handle, offset, length, arrival))
            self._parked_changed.notify()

    def _serve_parked_reads(self) -> None:
        """Answer parked READs, oldest first: each is retried (SwapStore.read) until
        the session is back or it has waited read_wait since it arrived (EIO)."""
        scratch = Scratch.allocate()
        while True:
            with self._parked_changed:
                while not self._parked and not self._closed:
                    self._parked_changed.wait()
                if self._closed:
                    return
                handle, offset, length, arrival = self._parked[0]
            reply = scratch.reply_buffer(length)
            try:
                error = self.store.read(offset, length, reply[REPLY_PAYLOAD_OFFSET:],
                                        deadline=arrival + self.store.read_wait)
            except OSError as failure:
                log.error("parked READ at %d failed: %s", offset, failure)
                error = nbd.Error.EIO
            with self._parked_changed:
                self._parked.pop(0)
            try:
                self._reply(reply, handle, error, length, "nbd_read", arrival)
            except OSError as failure:  # the kernel's end is gone, and the device with it
                log.info("parked READ at %d not answered: %s", offset, failure)
                return

    def close(self) -> None:
        """Close both socket ends (after disconnect, or EOF in host tests)."""
        self.kernel_end.close()
        self._agent_end.close()

    def disconnect(self) -> None:
        """Ask the kernel to drop the device (after swapoff)."""
        if self._device_fd >= 0:
            try:
                fcntl.ioctl(self._device_fd, NBD_DISCONNECT)
            except OSError as error:
                log.warning("NBD_DISCONNECT: %s", error)
