"""The page-cache workload's reader, on the host: sequential and random passes
verify every page and name the ones that are wrong."""

from __future__ import annotations

from pathlib import Path

from tmem_workloads import pagecache
from tmem_workloads.usemem import PAGE_SIZE


def test_random_passes_read_the_same_pages_and_verify_them(tmp_path: Path) -> None:
    prepared = pagecache.prepare(tmp_path, 3, file_mib=1, seed=7, drop_caches=False)
    assert prepared["files"] == 3
    result = pagecache.read(tmp_path, 3, file_mib=1, seed=7, passes=2, order="random", reads=500)
    assert result["verified"] and result["bytes"] == 2 * 500 * PAGE_SIZE and result["reads"] == 500
    whole = pagecache.read(tmp_path, 3, file_mib=1, seed=7, passes=1)
    assert whole["verified"] and whole["bytes"] == 3 << 20


def test_a_wrong_page_is_named_by_both_orders(tmp_path: Path) -> None:
    pagecache.prepare(tmp_path, 1, file_mib=1, seed=3, drop_caches=False)
    # Page 5 of the only file holds page 6's content: stale or misplaced data.
    path = tmp_path / pagecache.file_name(0)
    with path.open("r+b") as handle:
        handle.seek(6 * PAGE_SIZE)
        other = handle.read(PAGE_SIZE)
        handle.seek(5 * PAGE_SIZE)
        handle.write(other)
    sequential = pagecache.read(tmp_path, 1, file_mib=1, seed=3, passes=1)
    assert sequential["first_bad_pages"] == ["f0000:5"]
    # 256 pages, 4096 random reads: page 5 is read, and only it is wrong; the
    # second pass reads the same pages, so it finds it as often as the first.
    random_read = pagecache.read(tmp_path, 1, file_mib=1, seed=3, passes=2, order="random", reads=4096)
    named = random_read["first_bad_pages"]
    assert isinstance(named, list) and named and set(named) == {"f0000:5"}
    bad_pages = random_read["bad_pages"]
    assert not random_read["verified"] and isinstance(bad_pages, int) and bad_pages % 2 == 0
