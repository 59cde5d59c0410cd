"""Reports rebuilt from a recorded run.json: the numbers in them are the raw data's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from tmem_host.testbed import report
from tmem_host.testbed.records import Sample, TmemdCounters
from tmem_host.testbed.runner import TMEMD_COUNTERS

RECORDED = Path(__file__).parent / "data" / "run-recorded.json"


@pytest.fixture
def results(tmp_path: Path) -> Path:
    shutil.copy(RECORDED, tmp_path / report.RUN_FILE)
    return tmp_path


def test_summary_rows_follow_the_samples() -> None:
    rows = {row.key: row for row in report.summarize_run(report.load_run(RECORDED))}
    assert list(rows) == ["disk-hdd", "zswap", "tmem-blk"]  # scenario order
    hdd, zswap, blk = rows["disk-hdd"], rows["zswap"], rows["tmem-blk"]
    assert hdd.wall is not None and hdd.wall.mean == pytest.approx(80.0667, abs=1e-3)
    assert hdd.change_pct == 0.0 and hdd.welch is None
    assert blk.wall is not None and blk.change_pct == pytest.approx((22.1 - 80.0667) / 80.0667 * 100, abs=0.01)
    assert blk.mark == "**"  # 20-24 s against 79-81 s is no noise
    assert zswap.failures == 1 and zswap.samples == 4 and zswap.mark == ""  # failed run excluded, overlap
    assert blk.tmem_hit_ratio == 1.0
    assert blk.compression_ratio == pytest.approx(370 / 120)
    assert hdd.tmem_hit_ratio is None


def test_reports_are_written_and_carry_the_numbers(results: Path) -> None:
    written = report.write_reports(results)
    names = {path.name for path in written}
    assert {"report.md", "report.html", "runtime.png", "swap_io.png", "tmem_hits.png", "host_memory.png"} <= names
    markdown = (results / "report.md").read_text()
    assert "| tmem-blk | 3/3 | 22.1 ± 2.0 | -72.4%** | 90001 | 60001 | 7000 | 120 | 0 | 100.0% | 3.08x |" in markdown
    assert "| zswap | 3/4 |" in markdown
    assert "verification failed: 3 bad pages" in markdown
    assert "accelerator (as QMP reports it): tcg" in markdown
    page = (results / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "-72.4%**" in page
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes().startswith(b"\x89PNG")


def test_report_is_reproducible_from_raw_data(results: Path) -> None:
    report.write_reports(results)
    first = (results / "report.md").read_text()
    report.write_reports(results)
    assert (results / "report.md").read_text() == first


def test_rich_summary_and_compare(tmp_path: Path) -> None:
    run_a = report.load_run(RECORDED)
    run_b = json.loads(json.dumps(run_a))
    run_b["id"] = "B"
    for sample in run_b["samples"]:
        if sample["mode"] == "tmem-blk":
            sample["wall_s"] = sample["wall_s"] * 2
    console = Console(record=True, width=160)
    console.print(report.summary_table(run_a))
    console.print(report.compare_table(run_a, run_b))
    text = console.export_text()
    assert "-72.4%**" in text
    assert "+100.0%" in text  # tmem-blk doubled in B
    assert "+0.0%" in text  # disk-hdd unchanged


def test_recorded_samples_use_only_the_keys_their_records_declare() -> None:
    # The runner records TMEMD_COUNTERS (by name) as a sample's TmemdCounters.
    assert set(TMEMD_COUNTERS) == TmemdCounters.__required_keys__
    for sample in report.load_run(RECORDED)["samples"]:
        assert Sample.__required_keys__ <= sample.keys() <= Sample.__required_keys__ | Sample.__optional_keys__
        assert (sample.get("tmemd") or {}).keys() <= TmemdCounters.__required_keys__ | {"nbd"}
    # What a tmemd has only sometimes (an NBD export, a remote tier) is optional:
    # run.json files from before a key was added still load.
    assert TmemdCounters.__optional_keys__ == {"nbd", "remote"}
