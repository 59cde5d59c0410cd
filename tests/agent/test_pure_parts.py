"""Host-side tests of the agent's pure parts: key mapping, slot map, run splitting, histogram."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tmem_guest.counters import Counters, LatencyHistogram, StatsPublisher, read_all
from tmem_guest.keys import (
    SlotMap,
    Where,
    frontswap_area_oids,
    frontswap_key,
    frontswap_keys,
    frontswap_offset,
    page_span,
)
from tmem_guest.swap import contiguous_runs


def test_frontswap_key_matches_xen_tmem_c() -> None:
    # drivers/xen/tmem.c: oid = (type << 4) | (offset & 15), index = offset >> 4.
    assert frontswap_key(0, 0) == ((0, 0, 0), 0)
    assert frontswap_key(0, 15) == ((15, 0, 0), 0)
    assert frontswap_key(0, 16) == ((0, 0, 0), 1)
    assert frontswap_key(2, 0x1234) == (((2 << 4) | 4, 0, 0), 0x123)


@given(st.integers(0, 31), st.integers(0, 1 << 40))
def test_frontswap_key_is_invertible_and_stays_in_its_area(swap_type: int, offset: int) -> None:
    oid, index = frontswap_key(swap_type, offset)
    assert frontswap_offset(oid, index) == offset
    assert oid in frontswap_area_oids(swap_type)


@given(st.integers(0, 31), st.integers(0, 1 << 40), st.integers(0, 64))
def test_frontswap_keys_of_a_run_are_each_slots_key(swap_type: int, first: int, count: int) -> None:
    offsets = range(first, first + count)
    assert frontswap_keys(swap_type, offsets) == [frontswap_key(swap_type, offset) for offset in offsets]


def test_page_span() -> None:
    assert page_span(0, 4096) == range(0, 1)
    assert page_span(4095, 2) == range(0, 2)
    assert page_span(8192, 0) == range(2, 2)


def test_slot_map_records_where_each_slot_lives() -> None:
    slots = SlotMap(64)
    assert slots.get(5) is Where.NOWHERE
    slots.set(5, Where.TMEM)
    slots.set(6, Where.DISK)
    slots.set_range(range(10, 20), Where.TMEM)
    assert list(slots.slots_in(range(0, 64), Where.TMEM)) == [5, *range(10, 20)]
    assert slots.count(Where.DISK) == 1
    assert slots.all_in(range(10, 20), Where.TMEM) and slots.all_in(range(5, 6), Where.TMEM)
    assert not slots.all_in(range(5, 7), Where.TMEM) and not slots.all_in(range(9, 20), Where.TMEM)
    slots.set_range(range(0, 64), Where.NOWHERE)
    assert slots.count(Where.NOWHERE) == 64


@given(st.lists(st.integers(0, 200), unique=True))
def test_contiguous_runs_cover_exactly_the_positions(positions: list[int]) -> None:
    positions.sort()
    runs = contiguous_runs(positions)
    assert [p for first, count in runs for p in range(first, first + count)] == positions
    assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:]))  # maximal runs


def test_latency_histogram_percentiles() -> None:
    histogram = LatencyHistogram()
    for microseconds in [100] * 98 + [5000, 70000]:
        histogram.add(microseconds)
    assert histogram.percentile_us(0.5) == 128
    assert histogram.percentile_us(0.99) == 8192
    assert histogram.as_dict()["max_us"] == 70000


def test_published_stats_round_trip(tmp_path: Path) -> None:
    counters = Counters("swap", "batched")
    counters.add(puts=3, hits=2)
    counters.observe("put", 0.001)
    publisher = StatsPublisher("swap", counters.snapshot, directory=tmp_path, interval=60)
    publisher.start()
    publisher.stop()
    stats = read_all(tmp_path)
    assert stats["swap"] == json.loads((tmp_path / "swap.json").read_text())
    assert json.loads((tmp_path / "swap.json").read_text())["counters"]["puts"] == 3
