"""Host-side tests of the agent's pure parts: slot map, run splitting, histogram (the key
mapping and the frontswap rules: tests/wire/test_frontswap.py)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tmem_guest import __main__ as agent_main
from tmem_guest import system
from tmem_guest.counters import Counters, LatencyHistogram, StatsPublisher, read_all
from tmem_guest.slots import SlotMap, SlotMarks
from tmem_wire.frontswap import Where, contiguous_runs


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


def test_slot_marks_mark_clear_and_find() -> None:
    marks = SlotMarks(64)
    assert marks.next_marked(0) == -1 and marks.count() == 0
    marks.mark([3, 40, 41])
    assert marks.is_marked(40) and not marks.is_marked(4)
    assert marks.next_marked(0) == 3 and marks.next_marked(4) == 40 and marks.count() == 3
    marks.clear(3)
    assert marks.next_marked(0) == 40 and marks.count() == 2


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


def test_find_disk_command_prints_the_device_or_one_error_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # `python3 -m tmem_guest find-disk SERIAL`: what the host runs in a guest
    # (tmem_host.vm.guestops.disk_by_serial), against a made-up /sys/block.
    (tmp_path / "vda").mkdir()
    (tmp_path / "vda" / "serial").write_text("tmem-root\n")
    (tmp_path / "vdb").mkdir()
    (tmp_path / "vdb" / "serial").write_text("tmem-swap\n")
    monkeypatch.setattr(system, "find_disk_by_serial",
                        lambda serial, real=system.find_disk_by_serial: real(serial, tmp_path))
    assert agent_main.main(["find-disk", "tmem-swap"]) == 0
    assert capsys.readouterr().out == "/dev/vdb\n"
    assert agent_main.main(["find-disk", "tmem-data"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"tmem_guest: no disk with serial 'tmem-data' under {tmp_path}\n"


def _mountinfo_for(path: Path, fstype: str, tmp_path: Path) -> Path:
    """A one-line /proc/self/mountinfo that puts `path`'s device under `fstype`."""
    device = path.stat().st_dev
    mountinfo = tmp_path / f"mountinfo-{fstype}"
    mountinfo.write_text(f"36 25 {os.major(device)}:{os.minor(device)} / /somewhere rw,relatime shared:1 - "
                         f"{fstype} {fstype} rw\n")
    return mountinfo


@pytest.mark.parametrize("fstype, swap_backed", [("tmpfs", True), ("devtmpfs", True), ("ext4", False), ("ramfs", False)])
def test_swap_backed_outputs_are_regular_files_on_shmem_file_systems(
        tmp_path: Path, fstype: str, swap_backed: bool) -> None:
    log_file = tmp_path / "agent.log"
    with open(log_file, "w") as log, open(os.devnull, "w") as null:
        found = system.swap_backed_outputs((log.fileno(), null.fileno()), _mountinfo_for(log_file, fstype, tmp_path))
        # /dev/null is a character device: never a page that can swap out.
        assert found == ([f"fd {log.fileno()}: {log_file} on {fstype} /somewhere"] if swap_backed else [])
        read_end, write_end = os.pipe()
        try:
            assert system.swap_backed_outputs((write_end, 999), _mountinfo_for(log_file, "tmpfs", tmp_path)) == []
        finally:
            os.close(read_end)
            os.close(write_end)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_a_file_in_dev_shm_is_found_with_the_real_mountinfo() -> None:
    with tempfile.NamedTemporaryFile(dir="/dev/shm") as log:
        assert system.swap_backed_outputs((log.fileno(),)) == [f"fd {log.fileno()}: {log.name} on tmpfs /dev/shm"]


def test_the_swap_agent_refuses_to_start_logging_to_a_swap_backed_file(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(system, "swap_backed_outputs", lambda: ["fd 2: /run/tmem-agent/agent.log on tmpfs /run"])
    monkeypatch.setattr(system, "reexec_with_allocator_settings", lambda *_: pytest.fail("started anyway"))
    assert agent_main.main(["start", "--swap", "batched"]) == 2
    error = capsys.readouterr().err
    assert "refusing to serve swap" in error and "/run/tmem-agent/agent.log on tmpfs" in error
