"""`make bench`'s remote suite on a few pages: it runs end to end (its own cluster
and tmemd), the pages go to the cluster, and it names its rows and notes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tmem_host import bench
from tmem_host.daemon.process import TmemdProcess


@pytest.mark.slow
def test_remote_suite_puts_the_pages_in_the_cluster(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (Debian package redis-server)")
    pages = bench.mixed_pages(2 * bench.BATCH_PAGES * bench.BATCH_DEPTH)
    # The suite starts its own tmemd; the context's (never started) is not used.
    ctx = bench.BenchContext(pages, [], tmp_path, TmemdProcess(tmp_path / "unused"),
                             quick=True, budget="64M")
    rows = bench.remote_suite(ctx)
    names = [row.name for row in rows]
    assert names[:2] == ["tmemd remote PUT_BATCH 64p x4", "tmemd remote GET_BATCH 64p x4"]
    assert len(rows) == 8 and all(row.pages == len(pages) and row.seconds > 0 for row in rows)
    # The filler stops short of the local fraction by less than one of its pages:
    # the first small compressed page or two may still fit in memory.
    fraction = ctx.notes["remote_fraction"]
    assert isinstance(fraction, float) and fraction >= 0.99
    for note in ("tmemd_remote_put_vs_fastest_raw_set", "tmemd_remote_get_vs_fastest_raw_get"):
        ratio = ctx.notes[note]
        assert isinstance(ratio, float) and ratio > 0
    assert any((tmp_path / "remote-logs").glob("redis-*.log"))
