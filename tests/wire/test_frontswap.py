"""tmem_wire.frontswap: the swizzle and its inverse, the swap area's objects, page_span
and the per-slot rules both frontswap frontends (tmemd's NBD export, the agent) follow.

Profiles: tests/wire/conftest.py (TMEM_WIRE_PROFILE=wire-thorough for long runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tmem_wire import abi, nbd
from tmem_wire.frontswap import (
    LOST_PAGE_ERROR, PAGE_SHIFT, PAGE_SIZE, SWIZ_BITS, SWIZ_MASK, Where, frontswap_area_oids,
    frontswap_key, frontswap_keys, frontswap_offset, older_copy_is_stale, page_span,
)

PROFILE = settings.get_profile(os.environ.get("TMEM_WIRE_PROFILE", "wire-fast"))
WIRE_ROOT = Path(__file__).resolve().parents[2] / "wire"

# Linux has at most 32 swap areas (MAX_SWAPFILES); offsets are up to 64-bit here.
swap_types = st.integers(0, 31)
offsets = st.integers(0, 2**64 - 1)
EDGE_OFFSETS = (0, 1, 15, 16, 17, 255, 256, 2**32 - 1, 2**32, 2**60, 2**64 - 1)


def test_the_page_and_the_swizzle() -> None:
    assert (PAGE_SHIFT, PAGE_SIZE) == (12, 4096)
    assert PAGE_SHIFT == abi.MIN_PAGE_SHIFT  # one source: the ABI's smallest pool page
    assert (SWIZ_BITS, SWIZ_MASK) == (4, 0xF)


def test_frontswap_key_matches_xen_tmem_c() -> None:
    # drivers/xen/tmem.c: oid = (type << 4) | (offset & 15), index = offset >> 4.
    assert frontswap_key(0, 0) == ((0, 0, 0), 0)
    assert frontswap_key(0, 15) == ((15, 0, 0), 0)
    assert frontswap_key(0, 16) == ((0, 0, 0), 1)
    assert frontswap_key(0, 0x1234) == ((0x4, 0, 0), 0x123)
    assert frontswap_key(2, 0x1234) == (((2 << 4) | 4, 0, 0), 0x123)
    assert frontswap_key(31, 2**64 - 1) == (((31 << 4) | 15, 0, 0), 2**60 - 1)


@pytest.mark.parametrize("swap_type", [0, 1, 31])
@pytest.mark.parametrize("offset", EDGE_OFFSETS)
def test_edge_offsets_invert(swap_type: int, offset: int) -> None:
    oid, index = frontswap_key(swap_type, offset)
    assert frontswap_offset(oid, index) == offset
    assert frontswap_keys(swap_type, [offset]) == [(oid, index)]


def test_negative_types_and_offsets_are_refused() -> None:
    with pytest.raises(ValueError):
        frontswap_key(-1, 0)
    with pytest.raises(ValueError):
        frontswap_key(0, -1)
    with pytest.raises(ValueError):
        frontswap_keys(-1, [0])


@settings(PROFILE)
@given(swap_types, offsets)
def test_frontswap_key_is_invertible_and_stays_in_its_area(swap_type: int, offset: int) -> None:
    oid, index = frontswap_key(swap_type, offset)
    assert frontswap_offset(oid, index) == offset
    assert oid in frontswap_area_oids(swap_type)
    assert oid[0] >> SWIZ_BITS == swap_type and oid[1:] == (0, 0)
    assert 0 <= index < 2**64  # a valid ABI page index


@settings(PROFILE)
@given(swap_types, st.integers(0, 2**40), st.integers(0, 64))
def test_frontswap_keys_of_a_run_are_each_slots_key(swap_type: int, first: int, count: int) -> None:
    run = range(first, first + count)
    assert frontswap_keys(swap_type, run) == [frontswap_key(swap_type, offset) for offset in run]


@settings(PROFILE)
@given(swap_types, st.integers(0, 2**40))
def test_sixteen_consecutive_slots_use_each_of_the_areas_objects_once(swap_type: int, first: int) -> None:
    oids = [oid for oid, _ in frontswap_keys(swap_type, range(first, first + 16))]
    assert sorted(oids) == sorted(frontswap_area_oids(swap_type))


def test_the_areas_16_oids_cover_every_slot_and_no_other_areas() -> None:
    for swap_type in (0, 1, 31):
        area = frontswap_area_oids(swap_type)
        assert len(area) == len(set(area)) == 16
        # Flushing the 16 objects flushes every slot of the area: each key's oid is one
        # of them, and no two slots share a key.
        keys = frontswap_keys(swap_type, range(4096))
        assert {oid for oid, _ in keys} == set(area)
        assert len(set(keys)) == 4096
    areas = [set(frontswap_area_oids(swap_type)) for swap_type in range(32)]
    assert sum(map(len, areas)) == len(set().union(*areas))  # areas never share an object


def test_page_span() -> None:
    assert page_span(0, 4096) == range(0, 1)
    assert page_span(4095, 2) == range(0, 2)
    assert page_span(8192, 0) == range(2, 2)
    assert page_span(8192, -1) == range(2, 2)
    assert page_span(4096, 8192) == range(1, 3)
    assert page_span(4097, 8192) == range(1, 4)


@settings(PROFILE)
@given(st.integers(0, 2**48), st.integers(1, 1 << 22))
def test_page_span_is_exactly_the_pages_touched(offset: int, length: int) -> None:
    pages = page_span(offset, length)
    assert pages.start == offset // PAGE_SIZE
    assert pages.stop - 1 == (offset + length - 1) // PAGE_SIZE
    assert pages.start * PAGE_SIZE <= offset and offset + length <= pages.stop * PAGE_SIZE


def test_where_values_are_the_slot_map_bytes() -> None:
    # tmem_guest.slots.SlotMap stores these values, one byte per slot; 0 is a fresh slot.
    assert [(where.name, int(where)) for where in Where] == [("NOWHERE", 0), ("TMEM", 1), ("DISK", 2)]


@pytest.mark.parametrize("before", list(Where))
@pytest.mark.parametrize("accepted", [True, False])
def test_a_refused_write_leaves_no_older_tmem_copy(before: Where, accepted: bool) -> None:
    # Only a refused put over a tmem copy leaves one to be dropped: the page went to
    # the fallback disk at the same offset, and the tmem copy is older.
    assert older_copy_is_stale(before, accepted) == (not accepted and before is Where.TMEM)


def test_a_page_tmem_lost_reads_as_an_error() -> None:
    assert LOST_PAGE_ERROR == nbd.Error.EIO


def test_the_module_is_stdlib_only() -> None:
    # The guest's python3 has nothing but the stdlib and the injected tmem_wire.
    code = ("import sys, tmem_wire.frontswap\n"
            "ours = {name.split('.')[0] for name in sys.modules} - set(sys.stdlib_module_names)\n"
            "assert ours <= {'tmem_wire', '__main__'}, ours\n")
    subprocess.run([sys.executable, "-S", "-c", code], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(WIRE_ROOT)})
