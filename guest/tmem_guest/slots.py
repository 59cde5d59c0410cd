"""The agent's per-slot maps of its swap device (pure, stdlib only).

`SlotMap` records where each slot's current copy lives (`tmem_wire.frontswap.Where`;
the rules are that module's), `SlotMarks` which slots' tmem state is unsure.
tmemd's NBD export follows the same rules with a bitmap of its own: it is served
by one thread and keeps one bit per slot (TMEM or not) and a lost-slot bitmap that
it saves to disk, where the agent's threads need a byte per slot (below).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tmem_wire.frontswap import Where


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
