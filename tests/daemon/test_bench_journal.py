"""`make bench`'s journal rows on a few pages: the three durability levels through
real tmemds, then compaction (at once and in steps on an event loop) and replay of
an in-process journal."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmem_host import bench
from tmem_host.daemon.process import StartTmemd


def test_journal_suite_names_every_row_and_the_longest_compaction_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_tmemd: StartTmemd) -> None:
    monkeypatch.setattr(bench, "COMPACTION_PAGES", 3000)
    pages = bench.mixed_pages(bench.BATCH_PAGES * bench.BATCH_DEPTH)
    keys = [((number >> 10, 0, 0), number & 1023) for number in range(len(pages))]
    daemon = start_tmemd(guests=(bench.BENCH_GUEST,), budget="64M")
    ctx = bench.BenchContext(pages, keys, tmp_path, daemon, quick=True, budget="64M")
    rows = bench.journal_suite(ctx)
    assert [row.name for row in rows] == [
        "tmemd PUT_BATCH durability none", "tmemd PUT_BATCH durability journal",
        "tmemd PUT_BATCH durability fsync", "journal compaction 3k pages",
        "journal compaction 3k pages, in steps", "journal replay 3k pages"]
    assert all(row.seconds > 0 for row in rows)
    longest = ctx.notes["journal_compaction_longest_step_ms"]
    in_steps = rows[4]
    # A step holds the loop for part of the compaction, never more than all of it.
    assert isinstance(longest, float) and 0 < longest <= in_steps.seconds * 1000
