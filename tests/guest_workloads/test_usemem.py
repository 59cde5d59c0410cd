"""The swap workload's own checker must catch a wrong page (host-side, no guest)."""

from __future__ import annotations

import mmap

from tmem_workloads import usemem


def make_region(pages: int) -> mmap.mmap:
    return mmap.mmap(-1, pages * usemem.PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def test_pages_are_distinct_and_of_every_class() -> None:
    templates = usemem.page_templates(7)
    pages = [usemem.expected_page(templates, 7, n) for n in range(256)]
    assert len(set(pages)) == len(pages)
    assert all(len(page) == usemem.PAGE_SIZE for page in pages)
    assert any(page[16:] == bytes(usemem.PAGE_SIZE - 16) for page in pages)  # zero class present


def test_clean_run_verifies() -> None:
    result = usemem.run(4, seed=5, order="random", passes=2)
    assert result["verified"] is True and result["bad_pages"] == 0 and result["pages"] == 1024


def test_corrupted_stale_and_swapped_pages_are_caught() -> None:
    templates = usemem.page_templates(9)
    region = make_region(64)
    usemem.fill(region, templates, seed=9, order="sequential")
    page = usemem.PAGE_SIZE
    region[3 * page + 100] ^= 0x01  # one flipped bit
    region[10 * page : 11 * page] = bytes(page)  # a page lost to zeroes
    region[20 * page : 21 * page] = usemem.expected_page(templates, 9, 21)  # another page's content
    bad = usemem.verify(region, templates, seed=9, order="sequential", order_seed=0)
    assert bad == [3, 10, 20]
