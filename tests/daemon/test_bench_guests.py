"""`make bench`'s several-guests row on a few pages: four client processes put
into one tmemd at once, every page lands in its own guest's pool, and the row
names the aggregate against one guest."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tmem_host import bench
from tmem_host.daemon.process import TmemdProcess
from tmem_host.testbed.hostmetrics import HostCpu


def test_guests_suite_puts_from_four_processes_at_once(tmp_path: Path) -> None:
    pages = bench.mixed_pages(bench.GUEST_COUNT * bench.BATCH_PAGES * bench.BATCH_DEPTH)
    keys = [((number >> 10, 0, 0), number & 1023) for number in range(len(pages))]
    # The suite starts its own tmemd; the context's (never started) is not used.
    ctx = bench.BenchContext(pages, keys, tmp_path, TmemdProcess(tmp_path / "unused"), quick=True, budget="64M")
    alone, together = bench.guests_suite(ctx)
    assert alone.name == "tmemd PUT_BATCH one guest (of the 4-guest tmemd)"
    assert together.name == "tmemd PUT_BATCH 4 guests at once (aggregate)"
    assert alone.pages == together.pages == len(pages) and alone.seconds > 0 and together.seconds > 0
    ratio = ctx.notes["guests_aggregate_vs_one"]
    assert isinstance(ratio, float) and ratio == round(together.pages_per_s / alone.pages_per_s, 3)
    # The CPU the runs took, from /proc (in clock ticks: a run this short may see
    # none): never more than the whole host, and the ceiling is what one guest left idle.
    for label in ("one", "four"):
        busy, cores = ctx.notes[f"guests_{label}_host_busy"], ctx.notes[f"guests_{label}_tmemd_cores"]
        assert isinstance(busy, float) and 0 <= busy <= 1
        assert isinstance(cores, float) and 0 <= cores <= (os.cpu_count() or 1) + 0.5
    one_busy = ctx.notes["guests_one_host_busy"]
    assert isinstance(one_busy, float)
    assert ctx.notes["guests_cpu_ceiling_vs_one"] == round(1 / max(0.01, one_busy), 3)


def test_host_cpu_counts_a_busy_core() -> None:
    # A second of this process spinning shows as busy CPU of the host (at least
    # most of one core's share; other processes may add to it).
    earlier = HostCpu.now()
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        pass
    busy = HostCpu.now().busy_since(earlier)
    assert 0.8 / (os.cpu_count() or 1) <= busy <= 1.0


PUT_AS_GUEST = bench._put_as_guest


def _fail_as_one_guest(socket_path: Path, *args: Any) -> None:
    """The third guest's client dies before it starts; the others put as usual."""
    if socket_path.name.startswith(f"{bench.BENCH_GUEST}2."):
        raise SystemExit(3)
    PUT_AS_GUEST(socket_path, *args)


def test_a_guest_client_that_dies_fails_the_row_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The clients are forked: they run the patched function. The others, waiting
    # to start together, give up instead of waiting for the one that died.
    monkeypatch.setattr(bench, "_put_as_guest", _fail_as_one_guest)
    pages = bench.mixed_pages(bench.GUEST_COUNT * bench.BATCH_PAGES)
    keys = [((0, 0, 0), number) for number in range(len(pages))]
    ctx = bench.BenchContext(pages, keys, tmp_path, TmemdProcess(tmp_path / "unused"), quick=True, budget="64M")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"a guest's client failed or hung: exit codes .*3"):
        bench.guests_suite(ctx)
    assert time.monotonic() - started < 30
