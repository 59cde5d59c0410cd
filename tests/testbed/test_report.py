"""Reports rebuilt from a recorded run.json: the numbers in them are the raw data's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import pytest
from rich.console import Console

from tmem_host.testbed import hostmetrics, report, stats
from tmem_host.testbed.records import RunRecord, Sample, TmemdCounters
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
    # What a tmemd has only sometimes (an NBD export, a remote tier, a cached disk) is optional:
    # run.json files from before a key was added still load.
    assert TmemdCounters.__optional_keys__ == {"nbd", "remote", "cached_disk"}


def test_host_memory_by_component_per_mode(results: Path) -> None:
    run = report.load_run(results)
    mib = 1 << 20
    for sample in run["samples"]:
        if not sample.get("ok"):
            continue
        # disk-hdd's swap sits in the host page cache; tmem-blk's in tmemd.
        disk = sample["mode"] != "tmem-blk"
        rows = [[0.0, 0, 200 * mib, 0, 0, 0, 30 * mib],
                [1.0, 0 if disk else 100 * mib, 210 * mib, 0, (300 if disk else 5) * mib, 2 * mib, 30 * mib]]
        sample["timeline"] = rows
        sample["host_memory"] = hostmetrics.component_peaks(rows)
    (results / report.RUN_FILE).write_text(json.dumps(run))
    table = {row[0]: row for row in report.memory_rows(run)}
    assert table["disk-hdd"] == ["disk-hdd", "512", "210", "0", "0", "300", "2", "30"]
    assert table["tmem-blk"] == ["tmem-blk", "317", "210", "100", "0", "5", "2", "30"]
    names = {path.name for path in report.write_reports(results)}
    assert {"host_memory.png", "host_memory_components.png"} <= names
    markdown = (results / "report.md").read_text()
    assert "## Host memory" in markdown and "| tmem-blk | 317 | 210 | 100 |" in markdown


def _calibrated(run: RunRecord, factor: float, accelerator: str = "tcg") -> RunRecord:
    run["metadata"]["accelerator"] = accelerator
    run["metadata"]["calibration"] = {
        "guest": {"python_rounds": 1, "python_s": 0.1 * factor, "lz4_pages": 1, "lz4_s": 0.1 * factor},
        "host": {"python_rounds": 1, "python_s": 0.1, "lz4_pages": 1, "lz4_s": 0.1},
        "python_factor": factor, "lz4_factor": factor,
    }
    return run


def test_the_report_says_what_it_found_and_flags_guest_cpu_rows() -> None:
    run = _calibrated(report.load_run(RECORDED), 2.7)
    sentences = report.finding_sentences(run)
    assert sentences[0].startswith("tmem-blk was the fastest of the 3 memory-starved modes (22.1 s mean, "
                                   "72% less wall time than the baseline disk-hdd; p = ")
    assert sentences[1] == "The rest, in order of wall time against the fastest: zswap 3.55x, disk-hdd 3.62x."
    assert "2.7x slower than the host's on pure Python" in sentences[-1] and "(zswap)" in sentences[-1]
    assert report.title(run).startswith("tmem-testbed: recorded (TCG, guest CPU 2.7x slower")
    markdown = report.render_markdown(run)
    assert "| zswap† | 3/4 |" in markdown and "| tmem-blk | 3/3 |" in markdown
    assert markdown.index(sentences[0]) < markdown.index("| mode |")
    # A guest CPU at the host's speed flags nothing.
    fast = _calibrated(report.load_run(RECORDED), 1.1, "kvm")
    assert "| zswap | 3/4 |" in report.render_markdown(fast)
    assert report.finding_sentences(fast)[-1].endswith("(KVM): no row depends on emulation.")
    # Runs recorded before calibration: no caveat, no marks.
    old = report.load_run(RECORDED)
    assert not any("guest CPU" in sentence for sentence in report.finding_sentences(old))


def _row(mode: str, walls: list[float]) -> report.ModeRow:
    return report.ModeRow(key=mode, mode=mode, samples=len(walls), failures=0, wall=stats.summarize(walls),
                          change_pct=None, welch=None, swap_out_pages=None, swap_in_pages=None, major_faults=None,
                          tmem_hit_ratio=None, compression_ratio=None, tmem_stored_mib=None, tmem_refusals=None)


def test_a_page_cache_run_whose_disk_is_not_the_bottleneck_is_flagged() -> None:
    # pagecache.toml's first runs: bigmem 19.7 s, disk-hdd 22.4 s (1.14x).
    (narrow,) = report.disk_gap_sentences([_row("bigmem", [19.7]), _row("disk-hdd", [22.4])])
    assert narrow.startswith(report.DISK_GAP_MARK) and "1.14x" in narrow and "says little" in narrow
    (wide,) = report.disk_gap_sentences([_row("bigmem", [10.0]), _row("disk-hdd", [45.0, 55.0])])
    assert "5.00x" in wide and report.DISK_GAP_MARK not in wide
    assert report.disk_gap_sentences([_row("disk-hdd", [45.0])]) == []


def test_a_shared_image_run_says_how_much_the_shared_pool_saved_the_last_guest() -> None:
    def sample(mode: str, guest: str, first_pass: float, hits: int) -> dict[str, Any]:
        return {"mode": mode, "guest": guest, "ok": True,
                "workload": {"pass_s": [first_pass], "pass_tmemd": [{"hits": hits}]}}

    run = cast(RunRecord, {
        "scenario": {"guests": {"count": 2}, "params": {"shared_image": True}},
        "samples": [sample("tmem-cache", "g0", 40.0, 0), sample("tmem-cache", "g1", 42.0, 0),
                    sample("tmem-cache-shared", "g0", 41.0, 0), sample("tmem-cache-shared", "g1", 8.0, 5000)],
    })
    (sentence,) = report.shared_pool_sentences(run)
    assert sentence.startswith("g1's first pass took 8.0 s through the shared pool against 42.0 s") and "5.25x" in sentence
    assert "| tmem-cache-shared/g1 | 8.0 | 5000 |" in report.pass_lines(run)


def test_tmemd_cpu_per_page_divides_one_tmemd_over_all_its_guests_pages() -> None:
    def sample(guest: str, repetition: int, puts: int, gets: int, cpu_s: float | None) -> dict[str, Any]:
        return {"mode": "tmem-blk", "guest": guest, "repetition": repetition, "ok": True,
                "tmemd": {"puts": puts, "gets": gets},
                "host": {} if cpu_s is None else {"tmemd_cpu_s": cpu_s}}

    samples = cast(list[Sample], [sample("g0", 0, 30_000, 10_000, 4.0), sample("g1", 0, 50_000, 10_000, 4.0),
                                  sample("g0", 1, 1_000, 0, None), sample("g1", 1, 0, 0, 1.0)])
    # Repetition 0: 4 s over 100,000 pages of both guests; repetition 1: g1 had no
    # page (and g0's CPU time is unknown): nothing to divide.
    assert report.tmemd_us_per_page(samples) == {("tmem-blk", 0): 40.0}


def test_a_density_run_of_builds_counts_builds_per_minute() -> None:
    def guests(mode: str, phase_s: float, makespan: float) -> list[dict[str, Any]]:
        record = {"makespan_s": makespan, "committed_peak_bytes": 500 << 20, "budget_bytes": 512 << 20}
        return [{"mode": mode, "guest": f"g{index}", "repetition": 0, "ok": True,
                 "workload": {"phase_s": [phase_s]}, "tmemd": None,
                 **({"density": record} if index == 0 else {})} for index in range(2)]

    run = cast(RunRecord, {
        "scenario": {"workload": "density", "modes": ["static", "tmem"], "repetitions": 1,
                     "guests": {"count": 2}, "budget_bytes": 512 << 20,
                     "params": {"phase": "build", "hungry_mib": 80}},
        "samples": [{"mode": report.DENSITY_ALONE, "repetition": 0, "ok": True, "wall_s": 100.0},
                    *guests("static", 300.0, 400.0), *guests("tmem", 150.0, 200.0)],
    })
    # Two builds in 400 s and in 200 s; slowdown against the build alone (100 s).
    assert report.density_columns(run)[2] == "work builds/min (mean ± sd)"
    static, tmem = report.density_rows(run)
    assert static[:4] == ["static", "1/1", "0.30 ± 0.00", "baseline"]
    assert tmem[2] == "0.60 ± 0.00" and tmem[3].startswith("+100.0%") and tmem[5] == "1.50x"
    assert report.density_sentences(run)[0].endswith(
        "tmem did the most work: 0.60 verified builds per minute, against static 0.30 (+100% for tmem, "
        "too few runs to test).")


def test_a_density_run_of_kv_phases_reports_the_servers_latency_per_phase() -> None:
    def phase(get_per_s: float, p999: float) -> dict[str, Any]:
        return {"verified": True, "total_s": 50.0, "load_s": 20.0, "bench_s": 30.0, "verify_s": 10.0,
                "latency": {"requests": 100, "requests_per_s": get_per_s, "avg_ms": 1.0, "p50_ms": 1.0,
                            "p99_ms": 9.0, "p999_ms": p999, "max_ms": 50.0}}

    record = {"makespan_s": 100.0, "committed_peak_bytes": 500 << 20, "budget_bytes": 512 << 20}
    alone = {"mode": report.DENSITY_ALONE, "guest": "g0", "repetition": 0, "ok": True, "wall_s": 10.0,
             "workload": phase(6000.0, 2.0)}
    # static: one phase per guest; tmem: g0 ran two phases (its workload's bursts);
    # a guest that failed verification is left out.
    static = [{"mode": "static", "guest": f"g{i}", "repetition": 0, "ok": True, "tmemd": None,
               "workload": {**phase(200.0 + 100 * i, 100.0), "phase_s": [50.0]}, **({"density": record} if i == 0 else {})}
              for i in range(2)]
    tmem = [{"mode": "tmem", "guest": "g0", "repetition": 0, "ok": True, "tmemd": None, "density": record,
             "workload": {**phase(400.0, 60.0), "bursts": [phase(400.0, 60.0), phase(600.0, 80.0)],
                          "phase_s": [50.0, 50.0]}},
            {"mode": "tmem", "guest": "g1", "repetition": 0, "ok": False, "tmemd": None,
             "workload": {**phase(1.0, 1.0), "phase_s": [50.0]}}]
    run = cast(RunRecord, {
        "scenario": {"workload": "density", "name": "density-kv", "modes": ["static", "tmem"], "repetitions": 1,
                     "guests": {"count": 2}, "budget_bytes": 512 << 20, "baseline": "static",
                     "params": {"phase": "kv", "hungry_mib": 100}},
        "samples": [alone, *static, *tmem], "metadata": {},
    })
    assert report.application_columns(run)[:4] == ("policy", "phases", "GET/s", "p50 ms")
    rows = {row[0]: row for row in report.application_rows(run)}
    assert list(rows) == ["alone", "static", "tmem"]
    assert rows["alone"][:3] == ["alone", "1", "6000"] and rows["static"][:3] == ["static", "2", "250"]
    assert rows["tmem"] == ["tmem", "2", "500", "1.00", "9.00", "70.00", "50.00", "20.0", "30.0", "10.0"]
    sentences = report.finding_sentences(run)
    assert "The server's p99.9 GET latency was lowest with tmem (70.0 ms), then static 100.0 ms." in sentences
    markdown = "\n".join(report.application_lines(run))
    assert "| policy | phases | GET/s |" in markdown and "Means per hungry phase" in markdown
    # A usemem density run has no application table.
    run["scenario"]["params"]["phase"] = "usemem"
    assert report.application_rows(run) == [] and report.application_lines(run) == []
