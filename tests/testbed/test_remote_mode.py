"""The tmem-remote mode without a guest: the scenario loader takes it, the runner
builds tmemd's arguments (a quarter of the working set, the cluster's seeds), a
real cluster and tmemd started as the runner starts them record the remote
figures, and the report shows local against remote hits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

import pytest
from rich.console import Console

from tmem_host.daemon.process import StartTmemd
from tmem_host.nbd.client import NbdClient
from tmem_host.replies import RemoteGuestStats
from tmem_host.testbed import hostmetrics, report, runner
from tmem_host.testbed.modes import MODES
from tmem_host.testbed.records import RunRecord
from tmem_host.testbed.scenario import ScenarioError, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]
RECORDED = Path(__file__).parent / "data" / "run-recorded.json"
PAGE = 4096


def scenario_data(**workload: Any) -> dict[str, Any]:
    return {"modes": ["tmem-blk", "tmem-remote"], "guests": {"memory_mib": 256},
            "host": {"budget": "1G"}, "workload": {"kind": "usemem", "ratio": 1.25, **workload}}


def test_the_mode_is_tmem_blk_with_a_remote_tier() -> None:
    remote, blk = MODES["tmem-remote"], MODES["tmem-blk"]
    assert remote.remote and not blk.remote
    assert (remote.swap, remote.tmemd, remote.agent, remote.compress, remote.journal) == \
        (blk.swap, blk.tmemd, blk.agent, blk.compress, blk.journal)


def test_swap_workloads_accept_it_and_pagecache_does_not() -> None:
    assert parse_scenario(scenario_data(), "s.toml").modes == ("tmem-blk", "tmem-remote")
    data = scenario_data()
    data["modes"] = ["disk-hdd", "tmem-remote"]
    data["workload"] = {"kind": "pagecache"}
    with pytest.raises(ScenarioError, match="modes\\[1\\]: mode 'tmem-remote' does not apply"):
        parse_scenario(data, "s.toml")


def test_tmemd_arguments_per_mode() -> None:
    scenario = parse_scenario(scenario_data(), "s.toml")
    blk = runner.tmemd_arguments(scenario, MODES["tmem-blk"])
    assert blk.budget == "1G" and blk.guests == ["g0:weight=100"]
    assert blk.extra_args == ["--nbd-size", "1024M", "--fallback-iops", "200"]
    seeds = "127.0.0.1:12000,127.0.0.1:12001,127.0.0.1:12002"
    remote = runner.tmemd_arguments(scenario, MODES["tmem-remote"], seeds)
    # 1.25 x 256 MiB = 320 MiB: a quarter, not the scenario's 1G.
    assert remote.budget == "80M" and remote.guests == blk.guests
    assert remote.extra_args == ["--nbd-size", "1024M", "--fallback-iops", "200", "--remote", seeds, "--remote-replicas", "1"]
    with pytest.raises(ValueError, match="seed nodes"):
        runner.tmemd_arguments(scenario, MODES["tmem-remote"])
    assert runner.tmemd_arguments(scenario, MODES["tmem-nocompress"]).extra_args[-1] == "--no-compress"


def test_remote_budget_covers_the_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = parse_scenario(scenario_data(), "s.toml")
    pages = 320 * 256
    assert runner.remote_budget_bytes(scenario) == 80 << 20
    two = parse_scenario({**scenario_data(), "guests": {"memory_mib": 256, "count": 2}}, "s.toml")
    assert runner.remote_budget_bytes(two) == 160 << 20  # the guests' sets together
    # A tenth of the set would leave too little for the metadata of the rest: the floor wins.
    monkeypatch.setattr(runner, "REMOTE_LOCAL_SHARE", 0.1)
    budget = runner.remote_budget_bytes(scenario)
    assert budget >= pages * runner.REMOTE_PAGE_METADATA_BYTES / runner.REMOTE_METADATA_SHARE
    assert budget == 71 << 20  # 81920 x 450 / 0.5 bytes = 70.3 MiB, in whole MiB


def test_remote_scenario_compares_the_issue_modes() -> None:
    scenario = load_scenario(REPO / "scenarios" / "remote.toml")
    assert scenario.modes == ("disk-hdd", "disk-hostcache", "tmem-blk", "tmem-remote")
    assert scenario.baseline == "disk-hdd" and scenario.params["ratio"] == 1.25
    assert runner.remote_budget_bytes(scenario) == 80 << 20


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH")
def test_a_cluster_and_tmemd_as_the_runner_starts_them(tmp_path: Path, start_tmemd: StartTmemd) -> None:
    # 16 MiB written through a 4 MiB budget (a quarter of a 16 MiB set): most of it
    # goes to the cluster and reads back from there.
    scenario = parse_scenario({**scenario_data(ratio=0.0625), "guests": {"memory_mib": 256, "swap_mib": 64}},
                              "s.toml")
    pages = {slot: os.urandom(PAGE) for slot in range(16 << 8)}
    with runner.local_cluster(tmp_path / "redis") as cluster:
        arguments = runner.tmemd_arguments(scenario, MODES["tmem-remote"], cluster.seed_spec)
        assert arguments.budget == "4M"
        tmemd = start_tmemd(guests=arguments.guests, budget=arguments.budget, extra_args=arguments.extra_args)
        with NbdClient(tmemd.nbd_socket("g0"), "g0") as client:
            for first in range(0, len(pages), 64):
                assert client.write(first * PAGE, b"".join(pages[first + i] for i in range(64))) == 0
            for first in range(0, len(pages), 64):
                error, data = client.read(first * PAGE, 64 * PAGE)
                assert error == 0 and data == b"".join(pages[first + i] for i in range(64))
        with tmemd.control() as control:
            counters = runner._tmemd_counters(control.stats(), "g0")
        tmemd.terminate()
    remote = counters.get("remote")
    assert remote is not None
    assert remote["remote_pages"] > len(pages) // 2 and remote["local_pages"] > 0
    assert remote["remote_pages"] + remote["local_pages"] == counters["pages"] == len(pages)
    # Read back in order: most pages came read ahead of the gets, not for them.
    assert remote["gets"] + remote["read_ahead"] > len(pages) // 2
    assert counters["hits"] >= remote["gets"] and remote["read_ahead"] > 0
    assert remote["get_errors"] == remote["get_missing"] == 0
    assert sum(remote["rtt_us_histogram"].values()) > 0
    # The nodes' logs were collected when the cluster stopped.
    assert sorted(path.name for path in (tmp_path / "redis").iterdir()) == \
        sorted(f"redis-{node.port}.log" for node in cluster.nodes)


def remote_figures(gets: int, remote_pages: int) -> RemoteGuestStats:
    histogram = {"<=100": 0, "<=200": 10, "<=500": 50, "<=1000": 30, ">100000": 0}
    return {"uuid": "u", "epoch": 1, "fenced": False, "limit_bytes": None, "local_pages": 20000, "local_bytes": 60 << 20,
            "remote_pages": remote_pages, "remote_bytes": remote_pages * 2500, "remote_ephemeral_pages": 0,
            "puts": 40000, "demoted": 25000,
            "gets": gets, "get_missing": 0, "get_errors": 0, "get_unreachable": 0, "stranded": 0,
            "refused_quota": 0, "refused_unreachable": 0, "refused_inflight": 0, "refused_full": 0, "refused_unowned": 0,
            "ephemeral_demoted": 0, "ephemeral_missing": 0, "ephemeral_shed": 0, "prefetched": 0, "read_ahead": 0,
            "demotions_refused": 0,
            "rtt_us_histogram": histogram}


def with_remote_mode(run: RunRecord) -> RunRecord:
    """The recorded run plus a tmem-remote mode: its tmem-blk samples, with the
    remote tier's figures (a quarter, then half, ... of the hits from the cluster)."""
    copy: dict[str, Any] = json.loads(json.dumps(run))
    copy["scenario"]["modes"].append("tmem-remote")
    blk = [sample for sample in copy["samples"] if sample["mode"] == "tmem-blk"]
    for number, sample in enumerate(json.loads(json.dumps(blk))):
        sample["mode"] = "tmem-remote"
        sample["wall_s"] += 3
        sample["tmemd"]["remote"] = remote_figures(gets=sample["tmemd"]["hits"] * (1 + number) // 4,
                                                   remote_pages=60000)
        copy["samples"].append(sample)
    return cast(RunRecord, copy)


def test_the_report_shows_local_and_remote_hits(tmp_path: Path) -> None:
    run = with_remote_mode(report.load_run(RECORDED))
    rows = {row.key: row for row in report.summarize_run(run)}
    assert rows["tmem-blk"].remote is None and rows["disk-hdd"].remote is None
    remote = rows["tmem-remote"].remote
    assert remote is not None and remote.remote_share is not None
    figures = [(tmemd["hits"], tmemd["remote"]["gets"], tmemd["raw_bytes"], tmemd["stored_bytes"])
               for s in run["samples"] if s["mode"] == "tmem-remote" and (tmemd := cast(Any, s.get("tmemd")))]
    assert remote.remote_hits == pytest.approx(sum(g for _, g, _, _ in figures) / len(figures))
    assert remote.local_hits == pytest.approx(sum(h - g for h, g, _, _ in figures) / len(figures))
    assert remote.remote_share == pytest.approx(sum(g / h for h, g, _, _ in figures) / len(figures))
    assert remote.round_trips == 90 and remote.rtt_median == "<=500" and remote.remote_pages == 60000
    # Compression counts the bytes in the cluster as stored too (raw counts their pages).
    assert rows["tmem-remote"].compression_ratio == pytest.approx(
        sum(raw / (stored + 60000 * 2500) for _, _, raw, stored in figures) / len(figures))
    cells = report.row_cells(rows["tmem-remote"], "disk-hdd", remote=True)
    assert cells[-2:] == [f"{remote.remote_hits:.0f}", f"{remote.remote_share * 100:.1f}%"]

    (tmp_path / report.RUN_FILE).write_text(json.dumps(run))
    report.write_reports(tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    header = "| " + " | ".join(report.COLUMNS + report.REMOTE_COLUMNS) + " |"
    assert header in markdown and "remote % = their share of the tmem hits" in markdown
    # tmemd µs/page: 9.5 s of tmemd CPU over its puts and gets (61 µs each).
    assert "| tmem-blk | 3/3 | 22.1 ± 2.0 | -72.4%** | 90001 | 60001 | 7000 | 120 | 0 | 100.0% | 3.08x | 61 | - | - |" \
        in markdown
    assert "## Remote tier" in markdown
    assert f"| tmem-remote | 20000 | 60000 | {remote.local_hits:.0f} | {remote.remote_hits:.0f} |" in markdown
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Remote tier</h2>" in page and "<th>remote %</th>" in page and "&lt;=500 µs" in page
    console = Console(record=True, width=220)
    console.print(report.summary_table(run))
    table = report.remote_table(run)
    assert table is not None
    console.print(table)
    text = console.export_text()
    assert "remote %" in text and "round trip median" in text and "<=500 µs" in text


def test_runs_without_the_remote_tier_report_as_before(tmp_path: Path) -> None:
    run = report.load_run(RECORDED)
    assert not any("remote" in (s.get("tmemd") or {}) for s in run["samples"])
    assert all(row.remote is None for row in report.summarize_run(run))
    assert report.columns(report.summarize_run(run)) == report.COLUMNS
    assert report.remote_table(run) is None and report.remote_lines(run) == []
    shutil.copy(RECORDED, tmp_path / report.RUN_FILE)
    report.write_reports(tmp_path)
    assert "remote" not in (tmp_path / "report.md").read_text()
    assert "Remote tier" not in (tmp_path / "report.html").read_text()


def test_host_usage_sums_a_role_over_its_processes() -> None:
    # The cluster's six nodes are one role ("redis"); a role with a process gone has no figure.
    me = os.getpid()
    before = {me: hostmetrics.process_usage(me)}
    usage = runner._usage_since([me, me], before)
    now = hostmetrics.process_usage(me)
    assert usage is not None and now is not None
    assert usage[0] >= 0 and usage[1] == 2 * now.peak_rss_bytes
    assert runner._usage_since([], before) is None
    assert runner._usage_since([me, 2**22 + 1], {**before, 2**22 + 1: None}) is None
