"""`make profile`: py-spy samples a real tmemd on each hot path, and the stacks
fold into the functions that hold the time."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tmem_host import bench
from tmem_host.daemon.process import StartTmemd
from tmem_host.profiling import Profile, ProfilerError, py_spy, sampled


def test_stacks_fold_into_self_and_total_shares_with_idle_samples_apart(tmp_path: Path) -> None:
    raw = tmp_path / "stacks.txt"
    raw.write_text(
        "<module> (/usr/lib/python3.11/asyncio/runners.py:118);_run_once (/usr/lib/python3.11/"
        "asyncio/base_events.py:1898);EpollSelector.select (/usr/lib/python3.11/selectors.py:468) 50\n"
        "<module> (/usr/lib/python3.11/asyncio/runners.py:118);Store.put_many (/x/host/tmem_host/store/"
        "store.py:300);compress (/x/.venv/lib/python3.11/site-packages/lz4/block.py:1) 30\n"
        "<module> (/usr/lib/python3.11/asyncio/runners.py:118);Store.put_many (/x/host/tmem_host/store/"
        "store.py:310) 20\n")
    profile = Profile.load(raw)
    assert profile.samples == 100 and profile.busy_share == pytest.approx(0.5)
    top = profile.top()
    assert [(share.function, share.self_share, share.total_share) for share in top] == [
        ("compress (lz4/block.py)", 0.3, 0.3),
        ("Store.put_many (tmem_host/store/store.py)", 0.2, 0.5),  # its two lines are one function
    ]
    assert profile.total_share("put_many") == pytest.approx(0.5)
    assert Profile(Counter()).busy_share == 0.0


def test_a_sampler_that_cannot_attach_is_an_error_not_an_empty_profile(tmp_path: Path) -> None:
    with pytest.raises(ProfilerError):
        with sampled(2 ** 22 + 12345, tmp_path / "none.txt"):  # above pid_max: no such process
            pass


@pytest.mark.slow
def test_each_hot_path_of_a_real_tmemd_is_sampled_where_it_works(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    py_spy()  # installed with the dev extra
    daemon = start_tmemd(guests=(bench.BENCH_GUEST,))
    pages = bench.mixed_pages(bench.BATCH_PAGES * bench.BATCH_DEPTH * 2)
    keys = [((number >> 10, 0, 0), number & 1023) for number in range(len(pages))]
    ctx = bench.BenchContext(pages, keys, tmp_path, daemon, quick=True, budget="64M")
    results = bench.profile_paths(ctx, tmp_path / "profiles", seconds=1.5)
    assert [result.name.split(" ")[:2] for result in results] == [
        ["PUT_BATCH", "64p"], ["GET_BATCH", "64p"], ["NBD", "WRITE"], ["NBD", "READ"]]
    for result in results:
        assert result.pages_per_s > 0 and result.stacks_path.exists()
        assert result.profile.samples > 50 and result.profile.busy_share > 0.1
    put, get, write, read = (result.profile for result in results)
    # Each path shows the code that serves it: the store's batched put and get
    # (from the ABI session and from the NBD export), the page codec. PUT_BATCH's
    # lz4 runs on the encoder's native threads, which py-spy does not see: the
    # session taking their forms (or waiting for them) is what shows; gets decode
    # a batch in one call (decode_pages).
    assert put.total_share("put_many") > 0.01 and get.total_share("get_many") > 0.01
    assert put.total_share("_encoded") > 0 and get.total_share("decode_pages") > 0
    assert write.total_share("put_many") > 0.01 and read.total_share("get_many") > 0.01
    assert put.total_share("get_many") == 0 and get.total_share("put_many") == 0
    assert bench.render_profiles(results)
