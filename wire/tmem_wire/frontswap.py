"""Frontswap over a block device: the page, the keys and the per-slot rules (pure, stdlib only).

Both frontswap frontends follow these: tmemd's NBD export
(``tmem_host.nbd.export``, docs/NBD.md) and the guest agent's NBD server
(``tmem_guest.swap``, docs/AGENT.md). A *slot* (an *offset*, as Linux calls it)
is a page number on the swap device: byte offset ``slot << PAGE_SHIFT``.

Keys. Linux drivers/xen/tmem.c's frontswap mapping (``SWIZ_BITS`` = 4): slot
``offset`` of swap area ``swap_type`` is object id
``((swap_type << 4) | (offset & 15), 0, 0)``, page index ``offset >> 4``
(``frontswap_key``; ``frontswap_offset`` is its inverse). The low bits of the
offset pick one of 16 objects per area, so that consecutive slots spread over
objects (Xen's per-object radix trees stay shallow) while a whole area can
still be flushed object by object (``frontswap_area_oids``). tmemd's export is
swap area 0; the agent's is ``--swap-type`` (0).

Rules. Each slot's current copy lives in one place (``Where``): nowhere (never
written, or discarded), in the guest's persistent tmem pool, or on the fallback
disk at the slot's own offset.

- WRITE: each page is put into tmem; accepted, the slot is TMEM (an older disk
  copy is superseded). Refused (cap, budget, frozen, channel down), the page
  goes to the fallback disk at the same offset and the slot is DISK; an older
  tmem copy of the slot is stale and must be gone (``older_copy_is_stale``).
  tmemd's store drops it as part of the refused put; the agent flushes it,
  because its PUT may never have reached tmemd.
- READ: a TMEM slot is got from tmem; any other slot reads the fallback disk
  (zeros where never written). A TMEM slot that tmem no longer has (an admin
  flush, a pool gone, a restart without a journal) fails the read with
  ``LOST_PAGE_ERROR`` (EIO): never the fallback's older bytes, never zeros,
  which the guest would take for its swap page.
- TRIM (discard): the slots are flushed from tmem and become NOWHERE.

The agent records all three states (``tmem_guest.slots.SlotMap``, one byte per
slot for its threads); the export, one thread, keeps one bit per slot (TMEM or
not: NOWHERE and DISK both read the fallback file) plus a bitmap of lost slots.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Final

from tmem_wire.abi import MIN_PAGE_SHIFT, Key, Oid
from tmem_wire.nbd import Error

__all__ = [
    "LOST_PAGE_ERROR", "PAGE_SHIFT", "PAGE_SIZE", "SWIZ_BITS", "SWIZ_MASK", "Where",
    "frontswap_area_oids", "frontswap_key", "frontswap_keys", "frontswap_offset",
    "older_copy_is_stale", "page_span",
]

#: The frontswap page (a swap slot, a guest page): the ABI's smallest pool page, 4 KiB.
PAGE_SHIFT: Final = MIN_PAGE_SHIFT
PAGE_SIZE: Final = 1 << PAGE_SHIFT
SWIZ_BITS: Final = 4
SWIZ_MASK: Final = (1 << SWIZ_BITS) - 1

#: What a READ of a slot tmem lost answers: an error, never stale bytes or zeros.
LOST_PAGE_ERROR: Final = Error.EIO


def frontswap_key(swap_type: int, offset: int) -> Key:
    """Return (oid, index) for swap slot `offset` of swap area `swap_type`."""
    if swap_type < 0 or offset < 0:
        raise ValueError(f"negative swap type or offset: {swap_type}, {offset}")
    return ((swap_type << SWIZ_BITS) | (offset & SWIZ_MASK), 0, 0), offset >> SWIZ_BITS


def frontswap_keys(swap_type: int, offsets: Iterable[int]) -> list[Key]:
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


def contiguous_runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """Split sorted positions into (first, count) runs of consecutive values: the
    pages one I/O can move (a run of refused slots, of misses)."""
    runs: list[tuple[int, int]] = []
    for position in positions:
        if runs and runs[-1][0] + runs[-1][1] == position:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((position, 1))
    return runs


def older_copy_is_stale(before: Where, accepted: bool) -> bool:
    """Whether a WRITE leaves an older tmem copy of the slot that must be gone: the
    put was refused and the slot's previous copy was in tmem."""
    return not accepted and before is Where.TMEM
