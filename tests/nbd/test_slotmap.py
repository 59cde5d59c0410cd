"""The export's slot bitmaps, a range at a time, against a bit at a time; its
request-size histogram buckets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmem_host.nbd import slotmap
from tmem_host.nbd.export import size_bucket

BITMAP_BYTES = 40  # 320 slots: ranges that start, end and stay inside one byte, and cross many


@st.composite
def bitmaps_and_ranges(draw: st.DrawFn) -> tuple[bytearray, int, int]:
    bitmap = bytearray(draw(st.binary(min_size=BITMAP_BYTES, max_size=BITMAP_BYTES)))
    first = draw(st.integers(0, BITMAP_BYTES * 8))
    count = draw(st.integers(0, BITMAP_BYTES * 8 - first))
    return bitmap, first, count


def bit(bitmap: bytearray, slot: int) -> bool:
    return bool(bitmap[slot >> 3] >> (slot & 7) & 1)


@settings(max_examples=500, deadline=None)
@given(bitmaps_and_ranges())
def test_set_slots_are_the_set_bits_in_the_range(case: tuple[bytearray, int, int]) -> None:
    bitmap, first, count = case
    before = bytes(bitmap)
    assert slotmap.set_slots(bitmap, first, count) == [
        slot for slot in range(first, first + count) if bit(bitmap, slot)]
    assert bitmap == before  # read only


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=BITMAP_BYTES, max_size=BITMAP_BYTES), st.integers(0, BITMAP_BYTES * 8 - 1),
       st.booleans())
def test_mark_changes_one_bit(data: bytes, slot: int, value: bool) -> None:
    bitmap = bytearray(data)
    slotmap.mark(bitmap, slot, value)
    assert bit(bitmap, slot) is value
    assert all(bit(bitmap, other) == bit(bytearray(data), other)
               for other in range(BITMAP_BYTES * 8) if other != slot)


@settings(max_examples=500, deadline=None)
@given(bitmaps_and_ranges(), st.booleans())
def test_fill_changes_the_range_and_nothing_else(case: tuple[bytearray, int, int], value: bool) -> None:
    bitmap, first, count = case
    expected = bytearray(bitmap)
    for slot in range(first, first + count):
        if value:
            expected[slot >> 3] |= 1 << (slot & 7)
        else:
            expected[slot >> 3] &= ~(1 << (slot & 7)) & 0xFF
    slotmap.fill(bitmap, first, count, value)
    assert bitmap == expected


def test_a_range_of_many_zero_bytes() -> None:
    bitmap = bytearray(1 << 15)  # 262,144 slots, as a 1 GiB swap disk has
    for slot in (0, 9, 70_001, 262_143):
        bitmap[slot >> 3] |= 1 << (slot & 7)
    assert slotmap.set_slots(bitmap, 0, 1 << 18) == [0, 9, 70_001, 262_143]
    assert slotmap.set_slots(bitmap, 10, 70_000) == [70_001]  # slots 10 to 70,009
    assert slotmap.set_slots(bitmap, 10, 69_991) == []  # to 70,000
    slotmap.fill(bitmap, 1, (1 << 18) - 2, False)
    assert slotmap.set_slots(bitmap, 0, 1 << 18) == [0, 262_143]


@pytest.mark.parametrize(("pages", "bucket"), [
    (1, "1"), (2, "2"), (3, "2"), (4, "4"), (7, "4"), (8, "8"), (127, "64"), (128, "128"),
    (255, "128"), (256, "256+"), (1 << 20, "256+"),
])
def test_a_request_counts_in_its_power_of_two_bucket(pages: int, bucket: str) -> None:
    assert size_bucket(pages) == bucket
