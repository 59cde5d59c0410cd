"""Bitmaps of an export's slots (one bit per 4 KiB page: bit ``n`` is bit ``n & 7``
of byte ``n >> 3``), read and changed a range at a time.

A swap disk's TRIMs cover hundreds of thousands of slots of which a few are set;
a bit at a time in Python that cost about 0.15 µs a slot of tmemd's event loop
(docs/PERFORMANCE.md). Here zero bytes are skipped by the regular-expression
engine and whole bytes are cleared by slice assignment.
"""

from __future__ import annotations

import re
from typing import Final

_NONZERO: Final = re.compile(rb"[^\x00]+")
# The set bits of each byte value, lowest first.
_BITS: Final = tuple(tuple(bit for bit in range(8) if value >> bit & 1) for value in range(256))


def mark(bitmap: bytearray, slot: int, value: bool) -> None:
    """Set (``value``) or clear one slot's bit."""
    if value:
        bitmap[slot >> 3] |= 1 << (slot & 7)
    else:
        bitmap[slot >> 3] &= ~(1 << (slot & 7)) & 0xFF


def set_slots(bitmap: bytearray | bytes, first: int, count: int) -> list[int]:
    """The slots in [first, first + count) whose bit is set, in order."""
    if count <= 0:
        return []
    end = first + count
    low = first >> 3
    chunk = bytearray(bitmap[low:(end + 7) >> 3])
    chunk[0] &= 0xFF << (first & 7) & 0xFF
    if end & 7:
        chunk[-1] &= (1 << (end & 7)) - 1
    slots: list[int] = []
    for run in _NONZERO.finditer(chunk):
        for offset in range(run.start(), run.end()):
            base = (low + offset) << 3
            slots.extend(base + bit for bit in _BITS[chunk[offset]])
    return slots


def fill(bitmap: bytearray, first: int, count: int, value: bool) -> None:
    """Set (``value``) or clear every bit of [first, first + count)."""
    if count <= 0:
        return
    end = first + count
    whole_from, whole_to = (first + 7) >> 3, end >> 3
    if whole_from < whole_to:
        bitmap[whole_from:whole_to] = (b"\xff" if value else b"\x00") * (whole_to - whole_from)
        edges = [*range(first, whole_from << 3), *range(whole_to << 3, end)]
    else:
        edges = list(range(first, end))
    for slot in edges:
        mark(bitmap, slot, value)
