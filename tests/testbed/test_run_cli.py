"""`tmem-testbed run` end to end: the smoke scenario boots real TCG guests, and the
exit codes say what went wrong (2 scenario, 3 infrastructure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from tmem_host.testbed.records import RunRecord
from tmem_host.testbed.report import CPU_MARK, cpu_flagged

REPO = Path(__file__).resolve().parents[2]


def run_testbed(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tmem_host.cli", *args], capture_output=True, text=True,
        cwd=REPO, env=env, timeout=timeout, check=False,
    )


def run_passing_scenario(scenario: Path, results_root: Path) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]:
    """Run a scenario that must pass; returns the command's result, its results
    folder (results/latest, resolved) and its run.json."""
    result = run_testbed("run", str(scenario), "--results", str(results_root), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    results = (results_root / "latest").resolve()
    return result, results, json.loads((results / "run.json").read_text())


def run_passing_text(text: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]:
    """run_passing_scenario of a scenario given as TOML text."""
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(text)
    return run_passing_scenario(scenario, tmp_path / "results")


def test_scenario_error_exits_2_with_one_line(tmp_path: Path) -> None:
    scenario = tmp_path / "typo.toml"
    scenario.write_text('modes = ["disk-hdd"]\n[workload]\nratio = -1\n')
    result = run_testbed("run", str(scenario), "--results", str(tmp_path / "results"))
    assert result.returncode == 2
    assert result.stderr.strip() == "tmem-testbed: typo.toml: workload.ratio: must be a number > 0, got -1"
    assert not (tmp_path / "results").exists()


def test_missing_qemu_is_an_infrastructure_error_exit_3(tmp_path: Path) -> None:
    # A PATH without QEMU: the launcher refuses before booting; the run records it.
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    result = run_testbed("run", str(REPO / "scenarios" / "smoke.toml"), "--results", str(tmp_path), env=env)
    assert result.returncode == 3, result.stderr
    run = json.loads((tmp_path / "latest" / "run.json").read_text())
    assert run["samples"] and all(not s["ok"] and s["verified"] is None for s in run["samples"])
    assert "qemu-system-x86_64 not found" in run["samples"][0]["error"]


def test_list_names_every_mode() -> None:
    result = run_testbed("list", "--json")
    listing = json.loads(result.stdout)
    assert set(listing["modes"]) == {"bigmem", "disk-hdd", "disk-hostcache", "zswap", "tmem-blk", "tmem-agent",
                                     "tmem-agent-sync", "tmem-nocompress", "tmem-nojournal", "tmem-remote", "tmem-cache", "tmem-cache-around",
                                     "tmem-cache-shared",
                                     "static", "balloon", "tmem", "tmem-balloon"}
    assert "usemem" in listing["workloads"]
    assert listing["workloads"]["pagecache"]["modes"] == ["bigmem", "disk-hdd", "disk-hostcache", "tmem-agent",
                                                           "tmem-cache", "tmem-cache-around", "tmem-cache-shared"]
    assert listing["workloads"]["density"]["modes"] == ["static", "balloon", "tmem", "tmem-balloon"]
    assert "static" not in listing["workloads"]["usemem"]["modes"]


@pytest.mark.vm
@pytest.mark.slow
def test_smoke_scenario_end_to_end(tmp_path: Path) -> None:
    result, results, run = run_passing_scenario(REPO / "scenarios" / "smoke.toml", tmp_path)
    assert run["metadata"]["accelerator"] in ("tcg", "kvm")
    assert run["metadata"]["guest_kernel"].endswith("-amd64")
    modes = {sample["mode"]: sample for sample in run["samples"]}
    assert set(modes) == {"disk-hostcache", "tmem-blk"}
    for sample in modes.values():
        assert sample["ok"] and sample["verified"] and sample["wall_s"] > 0
        assert sample["workload"]["bad_pages"] == 0
        # 1.25x of RAM cannot fit: the guest must have swapped out and back in.
        assert sample["vmstat"]["pswpout"] > 10_000 and sample["vmstat"]["pswpin"] > 1_000
        assert sample["host"]["qemu_cpu_s"] > 0 and sample["timeline"]
    # The guest CPU against the host's, measured once per run.
    calibration = run["metadata"]["calibration"]
    assert calibration["python_factor"] > 0 and calibration["lz4_factor"] is not None
    assert calibration["guest"]["python_rounds"] == calibration["host"]["python_rounds"]
    # Host memory by component: disk-hostcache's swap sits in the host page cache
    # (its swap image), tmem-blk's in tmemd; both boot from the cached root image.
    swapped_bytes = modes["disk-hostcache"]["vmstat"]["pswpout"] * 4096
    cached = modes["disk-hostcache"]["host_memory"]
    assert cached["guest_file_cache"] > swapped_bytes * 0.5 and cached["tmemd_rss"] == 0
    blk = modes["tmem-blk"]["host_memory"]
    assert blk["tmemd_rss"] > 16 << 20 and blk["guest_file_cache"] < cached["guest_file_cache"]
    assert blk["root_image_cache"] > 0 and blk["total"] >= blk["qemu_rss"] + blk["tmemd_rss"]
    tmem = modes["tmem-blk"]["tmemd"]
    assert tmem["puts"] >= modes["tmem-blk"]["vmstat"]["pswpout"] * 0.9
    assert tmem["hits"] > 1_000 and tmem["refusals"] == 0
    assert modes["disk-hostcache"]["tmemd"] is None
    report = (results / "report.md").read_text()
    assert "| tmem-blk | 1/1 |" in report and "accelerator (as QMP reports it)" in report
    assert report.startswith(f"# tmem-testbed: smoke ({run['metadata']['accelerator'].upper()}, guest CPU ")
    assert "## Host memory" in report and "was the fastest of the 2 memory-starved modes" in report
    assert (results / "report.html").stat().st_size > 10_000
    assert {p.name for p in (results / "plots").iterdir()} >= {"runtime.png", "swap_io.png", "tmem_hits.png"}
    assert "disk-hostcache" in result.stdout  # the closing summary table


TINY_PAGECACHE = """
name = "tiny-pagecache"
modes = ["disk-hdd", "tmem-agent"]
calibrate = false  # saves about 5 s a run; the smoke test checks calibration
repetitions = 1
[guests]
memory_mib = 256
[host]
budget = "256M"
[workload]
kind = "pagecache"
ratio = 1.5
reader_mib = 32
file_mib = 2
[timeouts]
workload_s = 300
"""


@pytest.mark.vm
@pytest.mark.slow
def test_pagecache_scenario_end_to_end(tmp_path: Path) -> None:
    _, results, run = run_passing_text(TINY_PAGECACHE, tmp_path)
    modes = {sample["mode"]: sample for sample in run["samples"]}
    assert set(modes) == {"disk-hdd", "tmem-agent"}
    set_pages = 48 * 256  # 1.5 x 32 MiB
    for sample in modes.values():
        workload = sample["workload"]
        assert sample["ok"] and sample["verified"] and workload["verified"] and workload["bad_pages"] == 0
        assert workload["bytes"] == 2 * set_pages * 4096 and len(workload["pass_s"]) == 2
        assert sample["wall_s"] == workload["total_s"] > 0
    assert modes["disk-hdd"]["tmemd"] is None and modes["disk-hdd"]["agent"] is None
    agent = modes["tmem-agent"]
    first, second = agent["workload"]["pass_tmemd"]
    # The first pass fills tmem; the second pass is served from it.
    assert first["puts"] >= set_pages * 0.9 and second["hits"] >= set_pages * 0.5, (first, second)
    cache = agent["agent"]["cache"]["counters"]
    assert cache["hits"] == agent["tmemd"]["hits"] and cache["errors"] == 0
    report = (results / "report.md").read_text()
    # Not calibrated (calibrate = false): no guest CPU factor, so no mark on the
    # agent's row, which spends guest CPU (the smoke scenario calibrates).
    assert "calibration" not in run["metadata"] and "guest CPU" not in report.splitlines()[0]
    assert not cpu_flagged(cast(RunRecord, run), "tmem-agent") and CPU_MARK not in report
    assert "| disk-hdd | 1/1 |" in report and "| tmem-agent | 1/1 |" in report
    assert f"| tmem-agent | {' / '.join(f'{t:.1f}' for t in agent['workload']['pass_s'])} | {first['hits']} / {second['hits']} |" in report
    assert "| disk-hdd | " in report.split("## Passes")[1] and "| - / - |" in report


TINY_SHARED_IMAGE = """
name = "tiny-shared-image"
modes = ["tmem-cache", "tmem-cache-around", "tmem-cache-shared"]
calibrate = false  # saves about 5 s a run; the smoke test checks calibration
repetitions = 1
[guests]
count = 2
memory_mib = 192
[host]
budget = "256M"
[workload]
kind = "pagecache"
shared_image = true
order = "random"
reads = 3072
ratio = 3
reader_mib = 16
file_mib = 2
[timeouts]
workload_s = 300
"""


@pytest.mark.vm
@pytest.mark.slow
def test_random_reads_through_cached_disks_private_and_shared_end_to_end(tmp_path: Path) -> None:
    # Two guests read one base image through tmemd's cached disks, one after the
    # other: with private pools (writes fill them, or only reads do), then with
    # one shared pool.
    _, results, run = run_passing_text(TINY_SHARED_IMAGE, tmp_path)
    samples = {(sample["mode"], sample["guest"]): sample for sample in run["samples"]}
    assert len(samples) == 6
    for sample in samples.values():
        workload = sample["workload"]
        assert sample["ok"] and sample["verified"] and workload["verified"] and workload["bad_pages"] == 0
        assert workload["order"] == "random" and workload["bytes"] == 2 * 3072 * 4096
        disk = sample["tmemd"]["cached_disk"]
        assert disk["direct_io"] and disk["fallback_errors"] == 0 and disk["protocol_errors"] == 0
    # The first guest wrote the set through its export, and the writes filled its
    # cache (write-allocate): both its passes hit what it wrote. The ~2,700
    # distinct pages a pass reads do not fit its reader's 16 MiB cgroup.
    first = samples[("tmem-cache", "g0")]
    disk = first["tmemd"]["cached_disk"]
    assert disk["write_allocate"] and disk["pages_written"] >= 24 * 256
    assert disk["pages_written_cached"] >= 24 * 256
    for one_pass in first["workload"]["pass_tmemd"]:
        assert one_pass["hits"] > 0.9 * one_pass["gets"] > 1_000, one_pass
    # Write-around: the first pass put the pages it read, the second one hit them.
    around = samples[("tmem-cache-around", "g0")]
    assert around["tmemd"]["cached_disk"]["pages_written_cached"] == 0
    one, two = around["workload"]["pass_tmemd"]
    assert one["puts"] > 1_500 and two["hits"] > 1_000 and two["hits"] > 2 * one["hits"], (one, two)
    # The second guest: a private pool starts empty (its hits are pages read twice
    # in the pass), the shared one holds what g0 wrote: nearly every get hits.
    private = samples[("tmem-cache", "g1")]["workload"]["pass_tmemd"][0]
    shared = samples[("tmem-cache-shared", "g1")]["workload"]["pass_tmemd"][0]
    assert private["hits"] < 0.3 * private["gets"] and shared["hits"] > 0.9 * shared["gets"] > 1_500, \
        (private, shared)
    # A record is one page and one NBD READ of one page: the file system's blocks
    # are pages (with 1 KiB blocks QEMU widened each read to two aligned pages).
    for mode in ("tmem-cache", "tmem-cache-shared"):
        reader = samples[(mode, "g1")]["tmemd"]["cached_disk"]  # g1 only reads
        assert reader["writes"] == 0 and reader["request_pages_histogram"]["1"] > 0.95 * reader["reads"], reader
    assert samples[("tmem-cache-shared", "g1")]["tmemd"]["cached_disk"]["shared_pool"] is not None
    assert samples[("tmem-cache", "g1")]["tmemd"]["cached_disk"]["shared_pool"] is None
    report = (results / "report.md").read_text()
    assert "| tmem-cache-shared/g1 | " in report and "g1's first pass took" in report


CONTENTION = """
name = "contention-tiny"
modes = ["tmem-blk"]
calibrate = false  # saves about 5 s a run; the smoke test checks calibration
repetitions = 1
[guests]
count = 2
memory_mib = 192
weights = [100, 300]
caps = ["0", "48M"]
[host]
budget = "512M"
[workload]
kind = "contention"
ratio = 1.0
bursts = 2
# Random order (the workload's default) took 394 s here: each guest re-faulted
# its swap page by page. The rules under test are the same in either order.
order = "sequential"
"""


@pytest.mark.vm
@pytest.mark.slow
def test_two_guests_under_one_budget_report_where_the_memory_went(tmp_path: Path) -> None:
    scenario = tmp_path / "contention.toml"
    scenario.write_text(CONTENTION)
    _, results, run = run_passing_scenario(scenario, tmp_path / "results")
    guests = {sample["guest"]: sample for sample in run["samples"]}
    assert set(guests) == {"g0", "g1"} and all(s["verified"] for s in guests.values())
    assert all(len(s["workload"]["bursts"]) == 2 for s in guests.values())  # both bursts ran
    free, capped = guests["g0"]["tmemd"], guests["g1"]["tmemd"]
    # Both swapped through tmemd at once; the capped guest was held to its cap and
    # its refused pages went to the export's fallback file, the other was not refused.
    assert free["puts"] > 10_000 and capped["puts"] > 10_000
    assert free["refusals"] == 0 and capped["refusals"] > 1_000
    # The capped guest never held more than its cap; the other put more than that.
    # (At the end tmemd holds little of either: the guests discarded the swap
    # clusters their workloads freed.)
    assert capped["stored_bytes"] <= 48 << 20 < free["puts"] * 4096
    assert capped["nbd"]["pages_refused_fallback"] == capped["refusals"]
    assert free["nbd"]["trims"] > 1 and free["nbd"]["pages_discarded"] > 0
    report = (results / "report.md").read_text()
    assert "| tmem-blk/g0 | 1/1 |" in report and "| tmem-blk/g1 | 1/1 |" in report


TINY_MIGRATE = """
name = "tiny-migrate"
modes = ["bigmem", "tmem-remote"]
calibrate = false  # saves about 5 s a run; the smoke test checks calibration
baseline = "bigmem"
repetitions = 1
[guests]
memory_mib = 192
swap_mib = 512
[host]
budget = "512M"
[workload]
kind = "usemem"
ratio = 1.25
[migration]
# A quarter into the unmigrated run's time: the migrated run must still be going
# (a pre-check once ran the unmigrated one slower, under other load, and the
# migrated one ended before 0.4 of it).
at = 0.25
[timeouts]
workload_s = 300
"""


@pytest.mark.vm
@pytest.mark.slow
def test_migration_scenario_end_to_end(tmp_path: Path) -> None:
    result, results, run = run_passing_text(TINY_MIGRATE, tmp_path)
    samples = {(s["mode"], s.get("migrated")): s for s in run["samples"]}
    assert set(samples) == {(mode, migrated) for mode in ("bigmem", "tmem-remote") for migrated in (False, True)}
    for (mode, migrated), sample in samples.items():
        assert sample["ok"] and sample["verified"] and sample["workload"]["bad_pages"] == 0, sample
        assert (sample["migration"] is not None) == migrated
    bigmem, remote = samples["bigmem", True]["migration"], samples["tmem-remote", True]["migration"]
    assert bigmem["ram_bytes"] > 0 and bigmem["handoff_bytes"] == 0 and bigmem["served_from_tmem"] == 0
    assert remote["handoff_bytes"] > 0 and remote["total_ms"] > 0 and remote["handoff_s"] > 0
    assert samples["tmem-remote", True]["tmemd"]["puts"] > 0  # tmemd b took the guest's pages after the switch
    report = (results / "report.md").read_text()
    assert "## Live migration" in report and "| tmem-remote | 1 |" in report
    assert "Migrating mid-workload cost" in report and "QEMU sent" in report
    assert "live migration mid-workload" in result.stdout  # the terminal's table


TINY_DENSITY = """
name = "tiny-density"
modes = ["tmem-balloon"]
calibrate = false  # saves about 5 s a run; the smoke test checks calibration
repetitions = 1
[guests]
count = 2
swap_mib = 512
[host]
budget = "448M"
[workload]
kind = "density"
hungry_mib = 224
phases = 1
stagger_s = 25
floor_mib = 128
tmem_share = 0.4
[timeouts]
workload_s = 400
"""


@pytest.mark.vm
@pytest.mark.slow
def test_density_scenario_moves_memory_within_the_budget(tmp_path: Path) -> None:
    # Two guests under one 448 MiB budget; g1 idles while g0 is hungry, then the
    # other way round. The balancer (real QMP balloon statistics and targets)
    # moves RAM to the hungry guest; with tmem, tmemd's budget is what the
    # guests do not hold.
    _, results, run = run_passing_text(TINY_DENSITY, tmp_path)
    alone = [s for s in run["samples"] if s["mode"] == "alone"]
    assert len(alone) == 1 and alone[0]["verified"] and alone[0]["wall_s"] > 0
    mib = 1 << 20
    for mode in ("tmem-balloon",):  # the policy with both the balancer and tmemd (the others: make testbed)
        samples = {s["guest"]: s for s in run["samples"] if s["mode"] == mode}
        assert set(samples) == {"g0", "g1"} and all(s["verified"] for s in samples.values())
        record = samples["g0"]["density"]
        assert record["balloon_moves"] > 0
        # Both signals were read: the swap counters (QMP) and PSI, streamed over SSH.
        assert record["hunger"]["swap"] + record["hunger"]["stall"] > 0
        assert len(record["stall_s"]) == 2 and max(record["stall_s"]) > 0
        assert record["committed_peak_bytes"] <= record["budget_bytes"] == 448 * mib
        ticks = record["monitor"]
        # g0, hungry first, held more than it started with at some point; so did g1 later.
        assert max(tick[3] for tick in ticks) > record["start_mib"] * mib
        assert max(tick[4] for tick in ticks) > record["start_mib"] * mib
        for tick in ticks:
            assert tick[3] + tick[4] + tick[1] <= 448 * mib + mib  # guests' RAM + tmemd used
    tmem_ticks = next(s for s in run["samples"] if s["mode"] == "tmem-balloon" and s.get("density"))
    budgets = {tick[2] for tick in tmem_ticks["density"]["monitor"]}
    assert len(budgets) > 1  # tmemd's budget followed the guests' RAM
    assert all(tick[1] <= tick[2] + mib for tick in tmem_ticks["density"]["monitor"])
    report = (results / "report.md").read_text()
    assert "## Density" in report and "| tmem-balloon | 1/1 |" in report
    assert "held its budget" in report
    assert (results / "plots" / "density_budget.png").stat().st_size > 1000


# The application workloads' smoke runs: one mode, tiny data, the whole pipeline.
TINY_KV = """
name = "tiny-kv"
modes = ["tmem-blk"]
calibrate = false  # saves about 5 s a run; the smoke test checks calibration
repetitions = 1
[guests]
memory_mib = 256
workload_memory_mib = 64
[host]
budget = "512M"
[workload]
kind = "kv"
ratio = 0.4
requests = 2000
clients = 2
[timeouts]
workload_s = 400
"""


@pytest.mark.vm
@pytest.mark.slow
def test_kv_scenario_end_to_end(tmp_path: Path) -> None:
    # redis-server in the guest holds 102 MiB in a 64 MiB cgroup; redis-benchmark on
    # the host reaches it through a forwarded port; every value verified.
    _, results, run = run_passing_text(TINY_KV, tmp_path)
    (sample,) = run["samples"]
    workload = sample["workload"]
    keys = (102 << 20) // 4000
    assert sample["ok"] and workload["verified"] and workload["bad_keys"] == 0
    assert workload["keys"] == workload["dbsize"] == keys and workload["used_memory"] > 100 << 20
    latency = workload["latency"]
    assert latency["requests"] == 2000 and latency["requests_per_s"] > 0
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["p999_ms"] <= latency["max_ms"]
    assert sample["wall_s"] == workload["total_s"] == pytest.approx(workload["load_s"] + workload["bench_s"], abs=0.01)
    # The set did not fit the cgroup: redis swapped through tmem, and came back.
    assert sample["vmstat"]["pswpout"] > 5_000 and sample["tmemd"]["puts"] > 5_000
    assert sample["tmemd"]["hits"] > 0
    report = (results / "report.md").read_text()
    assert "## Application" in report and f"| tmem-blk | 1 | {latency['requests_per_s']:.0f} |" in report


TINY_BUILD = """
name = "tiny-build"
modes = ["tmem-blk"]
calibrate = false  # saves about 5 s a run; the smoke test checks calibration
repetitions = 1
[guests]
memory_mib = 256
workload_memory_mib = 32
[host]
budget = "512M"
[workload]
kind = "build"
cflags = "-O0"
[timeouts]
workload_s = 900
"""


@pytest.mark.vm
@pytest.mark.slow
def test_build_scenario_end_to_end(tmp_path: Path) -> None:
    # gcc builds Lua at -O0 in a 32 MiB cgroup (cc1 swaps; about 50 s under TCG
    # here), the built lua's answer is checked.
    _, results, run = run_passing_text(TINY_BUILD, tmp_path)
    (sample,) = run["samples"]
    workload = sample["workload"]
    assert sample["ok"] and workload["verified"] and workload["build_exit"] == 0
    assert workload["answer"] == workload["expected"] == "2262 21171191"
    assert workload["objects"] >= 30 and workload["jobs"] == 1 and workload["cflags"] == "-O0"
    assert sample["wall_s"] == workload["total_s"] > workload["build_s"] > 0
    assert sample["vmstat"]["pswpout"] > 1_000 and sample["tmemd"]["puts"] > 1_000
    assert "| tmem-blk | 1 |" in (results / "report.md").read_text()


TINY_COMMAND = """
name = "tiny-command"
modes = ["tmem-blk"]
calibrate = false  # saves about 5 s a run; the smoke test checks calibration
repetitions = 1
[guests]
memory_mib = 256
workload_memory_mib = 64
[host]
budget = "512M"
[workload]
kind = "command"
setup = "mkdir -p /root/cmd && echo ready > /root/cmd/state"
run = "stress-ng --vm 1 --vm-bytes 96M --vm-keep --verify --vm-method write64 --timeout 8s --metrics-brief 2>&1 && grep -qx ready /root/cmd/state"
verify = "! dmesg | grep -q 'I/O error'"
metric = '\\]\\s+vm\\s+(\\d+)\\s'
metric_name = "bogo ops"
[timeouts]
workload_s = 300
"""


@pytest.mark.vm
@pytest.mark.slow
def test_command_scenario_end_to_end(tmp_path: Path) -> None:
    _, results, run = run_passing_text(TINY_COMMAND, tmp_path)
    (sample,) = run["samples"]
    workload = sample["workload"]
    assert sample["ok"] and workload["verified"] and workload["run_exit"] == workload["verify_exit"] == 0
    assert workload["metric_name"] == "bogo ops" and workload["metric"] > 0, workload["output_tail"]
    assert sample["vmstat"]["pswpout"] > 1_000  # 96 MiB in a 64 MiB cgroup
    assert "| mode | runs | bogo ops | run s |" in (results / "report.md").read_text()
    # A verify command that fails makes the sample fail verification (exit 1). Its
    # run needs no swapping: what fails here is the verify step, after a run that passed.
    failing = "\n".join(
        'run = "grep -qx ready /root/cmd/state"' if line.startswith("run = ")
        else line.replace('verify = "', 'verify = "false && ') if line.startswith("verify = ") else line
        for line in TINY_COMMAND.splitlines())
    assert 'verify = "false && ' in failing
    scenario = tmp_path / "failing.toml"
    scenario.write_text(failing.replace("tiny-command", "tiny-command-failing"))
    result = run_testbed("run", str(scenario), "--results", str(tmp_path / "failing"), timeout=900)
    assert result.returncode == 1, result.stderr[-2000:]
    (sample,) = json.loads((tmp_path / "failing" / "latest" / "run.json").read_text())["samples"]
    assert sample["workload"]["run_exit"] == 0 and sample["workload"]["verify_exit"] == 1 and not sample["verified"]
