"""Frontswap key mapping and the per-slot location map (pure, stdlib only).

The mapping is Linux drivers/xen/tmem.c's frontswap one (SWIZ_BITS = 4): a swap
slot `offset` (page number on the swap device) of swap area `swap_type` becomes
object id `(swap_type << 4) | (offset & 15)` and page index `offset >> 4`. The
low bits of the offset pick one of 16 objects per area, so that consecutive
slots spread over objects (Xen's per-object radix trees stay shallow) while a
whole area can still be flushed object by object.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SWIZ_BITS = 4
SWIZ_MASK = (1 << SWIZ_BITS) - 1

from tmem_wire.abi import Oid


def frontswap_key(swap_type: int, offset: int) -> tuple[Oid, int]:
    """Return (oid, index) for swap slot `offset` of swap area `swap_type`."""
    if swap_type < 0 or offset < 0:
        raise ValueError(f"negative swap type or offset: {swap_type}, {offset}")
    return ((swap_type << SWIZ_BITS) | (offset & SWIZ_MASK), 0, 0), offset >> SWIZ_BITS


def frontswap_keys(swap_type: int, offsets: Iterable[int]) -> list[tuple[Oid, int]]:
    """frontswap_key of each offset: one comprehension, no call per page (the agent's
    per-request cost is Python work on an emulated vCPU)."""
    if swap_type < 0:
        raise ValueError(f"negative swap type {swap_type}")
    area = swap_type << SWIZ_BITS
    return [((area | (offset & SWIZ_MASK), 0, 0), offset >> SWIZ_BITS) for offset in offsets]


def frontswap_offset(oid: Oid, index: int) -> int:
    """Inverse of frontswap_key: the slot offset a (oid, index) pair names."""
    return (index << SWIZ_BITS) | (oid[0] & SWIZ_MASK)


def frontswap_area_oids(swap_type: int) -> list[Oid]:
    """The 16 object ids that hold every page of swap area `swap_type`."""
    return [((swap_type << SWIZ_BITS) | low, 0, 0) for low in range(1 << SWIZ_BITS)]


def page_span(offset: int, length: int) -> range:
    """Page numbers a byte range [offset, offset + length) touches."""
    if length <= 0:
        return range(offset >> PAGE_SHIFT, offset >> PAGE_SHIFT)
    return range(offset >> PAGE_SHIFT, ((offset + length - 1) >> PAGE_SHIFT) + 1)


class Where(enum.IntEnum):
    """Where the current copy of a swap slot lives."""

    NOWHERE = 0  # never written, or discarded: reads return the disk's bytes
    TMEM = 1  # in the guest's persistent tmem pool
    DISK = 2  # on the fallback disk, at the same offset


class SlotMap:
    """One byte per swap slot saying where its page lives.

    A byte rather than a bit per slot: concurrent NBD requests (pipelined mode)
    update neighbouring slots from different threads, and a single-byte store is
    atomic under the GIL where a read-modify-write of a shared bit byte is not.
    256 KiB per GiB of swap.
    """

    __slots__ = ("_where", "slot_count")

    def __init__(self, slot_count: int) -> None:
        if slot_count <= 0:
            raise ValueError("a swap device needs at least one slot")
        self.slot_count = slot_count
        self._where = bytearray(slot_count)

    def get(self, slot: int) -> Where:
        return Where(self._where[slot])

    def set(self, slot: int, where: Where) -> None:
        self._where[slot] = where

    def set_range(self, slots: range, where: Where) -> None:
        self._where[slots.start : slots.stop] = bytes([where]) * len(slots)

    def all_in(self, slots: range, where: Where) -> bool:
        """True if every slot of the contiguous range lives in `where` (one C-level count)."""
        return self._where.count(where, slots.start, slots.stop) == len(slots)

    def run_in(self, start: int, limit: int, where: Where) -> int:
        """How many consecutive slots from `start` (at most `limit`, within the map) live in `where`."""
        stop = min(start + limit, self.slot_count)
        table = self._where
        end = stop
        for other in Where:
            if other is not where:
                found = table.find(other, start, end)
                if found >= 0:
                    end = found
        return max(end - start, 0)

    def slots_in(self, slots: Iterable[int], where: Where) -> Iterator[int]:
        """The slots among `slots` whose page lives in `where`."""
        table = self._where
        return (slot for slot in slots if table[slot] == where)

    def count(self, where: Where) -> int:
        return self._where.count(where)

    def next_in(self, where: Where, start: int) -> int:
        """The first slot from `start` on whose page lives in `where`, or -1 (a memchr)."""
        return self._where.find(where, start)


class SlotMarks:
    """One byte per slot: marked or not (a byte for the same reason as SlotMap).

    The swap frontend marks slots whose tmem state is unknown: a PUT or FLUSH sent
    without a reply (timeout, channel lost) may or may not have taken effect."""

    __slots__ = ("_marks",)

    def __init__(self, slot_count: int) -> None:
        self._marks = bytearray(slot_count)

    def mark(self, slots: Iterable[int]) -> None:
        marks = self._marks
        for slot in slots:
            marks[slot] = 1

    def clear(self, slot: int) -> None:
        self._marks[slot] = 0

    def is_marked(self, slot: int) -> bool:
        return bool(self._marks[slot])

    def next_marked(self, start: int) -> int:
        """The first marked slot from `start` on, or -1."""
        return self._marks.find(1, start)

    def count(self) -> int:
        return self._marks.count(1)
