"""The application workloads without a guest: redis-benchmark's output parsed,
the command workload's metric and scenario rules, the build's own answer, the
image's recipe hash with extra packages, and the report's application table."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tmem_host.testbed import commandload, density, report, runner
from tmem_host.testbed.modes import MODES
from tmem_host.testbed.scenario import ScenarioError, parse_scenario
from tmem_host.vm import image
from tmem_workloads import build, kv
from tmem_workloads.usemem import page_templates

RECORDED = Path(__file__).parent / "data" / "run-recorded.json"

# redis-benchmark 7.0 (Debian bookworm's redis-tools), -t get -c 4, as it prints
# to a pipe: its progress line ends in \r before the report.
BENCHMARK_OUTPUT = (
    "GET: rps=0.0 (overall: 41000.0) avg_msec=0.027 (overall: 0.027)\r"
    "                                                                \r"
    "====== GET ======\n"
    "  5000 requests completed in 0.05 seconds\n  4 parallel clients\n  3 bytes payload\n"
    "  keep alive: 1\n  host configuration \"save\": \n  multi-thread: no\n\n"
    "Latency by percentile distribution:\n"
    "0.000% <= 0.015 milliseconds (cumulative count 1214)\n"
    "50.000% <= 0.023 milliseconds (cumulative count 3270)\n"
    "75.000% <= 0.031 milliseconds (cumulative count 4811)\n"
    "96.875% <= 0.039 milliseconds (cumulative count 4867)\n"
    "99.219% <= 0.095 milliseconds (cumulative count 4964)\n"
    "99.805% <= 0.263 milliseconds (cumulative count 4992)\n"
    "99.902% <= 0.463 milliseconds (cumulative count 4996)\n"
    "99.951% <= 0.743 milliseconds (cumulative count 4998)\n"
    "100.000% <= 1.151 milliseconds (cumulative count 5000)\n\n"
    "Cumulative distribution of latencies:\n"
    "99.460% <= 0.103 milliseconds (cumulative count 4973)\n"
    "100.000% <= 1.207 milliseconds (cumulative count 5000)\n\n"
    "Summary:\n"
    "  throughput summary: 104166.66 requests per second\n"
    "  latency summary (msec):\n"
    "          avg       min       p50       p95       p99       max\n"
    "        0.023     0.008     0.023     0.031     0.079     1.151\n"
)


def test_redis_benchmark_figures_whole_and_cut() -> None:
    figures = kv.parse_redis_benchmark(BENCHMARK_OUTPUT, 5000)
    assert figures == {"requests": 5000, "requests_per_s": 104166.66, "avg_ms": 0.023, "p50_ms": 0.023,
                       "p99_ms": 0.079, "p999_ms": 0.463, "max_ms": 1.151}
    # Any part missing (a crashed run, another tool's output) is an error, not zeros.
    for cut in ("Summary:", "Latency by percentile", "throughput summary"):
        with pytest.raises(ValueError, match="not redis-benchmark's output"):
            kv.parse_redis_benchmark(BENCHMARK_OUTPUT.split(cut)[0], 5000)


def test_kv_keys_are_the_ones_redis_benchmark_draws() -> None:
    # -r N makes redis-benchmark GET key:__rand_int__, a 12-digit number below N.
    assert kv.KEY_FORMAT.format(42) == "key:000000000042"
    params = kv.KvParams(mib=64, value_bytes=4000, requests=100, clients=4, seed=1)
    assert params.keys == (64 << 20) // 4000
    values = dict(kv.values(params, 0, 3, page_templates(1)))
    assert len(values) == 3 and len(set(values.values())) == 3  # stamped: no two equal
    assert all(len(value) == 4000 for value in values.values())


def test_command_metric() -> None:
    output = "rows 1000\nqueries per second: 812.5\nqueries per second: 3\n"
    assert commandload.parse_metric(r"queries per second: ([\d.]+)", output) == 3.0  # the last
    assert commandload.parse_metric(r"missing ([\d.]+)", output) is None
    assert commandload.parse_metric(r"rows (\w+)", "rows many") is None  # not a number
    assert commandload.parse_metric("", output) is None


COMMAND: dict[str, Any] = {"modes": ["disk-hdd", "tmem-blk"], "guests": {"memory_mib": 256},
           "workload": {"kind": "command", "setup": "true", "run": "echo ops 12", "verify": "true",
                        "metric": r"ops (\d+)", "metric_name": "ops", "packages": ["sqlite3"]}}


def test_command_scenario_rules() -> None:
    scenario = parse_scenario(COMMAND, "c.toml")
    assert scenario.params["packages"] == ("sqlite3",) and scenario.params["metric_name"] == "ops"
    for key, value, message in [
        ("run", "  ", "c.toml: workload.run: a command workload needs a run command"),
        ("metric", r"ops \d+", "c.toml: workload.metric: must be a regular expression with one group"),
        ("metric", r"ops (\d+", "c.toml: workload.metric: not a regular expression"),
        ("packages", ["sqlite3; rm -rf /"], "c.toml: workload.packages[0]: not a Debian package name"),
    ]:
        data = copy.deepcopy(COMMAND)
        data["workload"][key] = value
        with pytest.raises(ScenarioError) as raised:
            parse_scenario(data, "c.toml")
        assert str(raised.value).startswith(message)


def test_build_and_kv_phases() -> None:
    data = {"modes": ["bigmem", "tmem-blk"], "guests": {"memory_mib": 256, "vcpus": 2, "workload_memory_mib": 48},
            "workload": {"kind": "build", "cflags": "-O0"}}
    scenario = parse_scenario(data, "b.toml")
    (blk,) = runner.workload_phases(scenario, MODES["tmem-blk"], 0, 0)
    assert isinstance(blk, str) and "tmem_workloads.build --cflags=-O0 --jobs 2" in blk and "48M" in blk
    (bigmem,) = runner.workload_phases(scenario, MODES["bigmem"], 0, 0)
    assert isinstance(bigmem, str) and "echo max >" in bigmem
    # bigmem's RAM covers the guest's RAM (the build has no ratio) plus headroom.
    assert runner.guest_memory_mib(scenario, MODES["bigmem"]) == 256 + runner.BIGMEM_HEADROOM_MIB
    server = parse_scenario({**data, "workload": {"kind": "kv", "ratio": 0.5}}, "k.toml")
    (phase,) = runner.workload_phases(server, MODES["tmem-blk"], 0, 0)
    assert callable(phase)  # driven from the host
    assert runner.working_set_mib(server) == 128


def test_a_density_phase_can_be_the_kv_server() -> None:
    workload: dict[str, Any] = {"kind": "density", "phase": "kv", "hungry_mib": 96, "requests": 500, "clients": 2}
    data = {"modes": ["tmem"], "guests": {"count": 2}, "host": {"budget": "512M"}, "workload": workload}
    scenario = parse_scenario(data, "d.toml")
    command = density.phase_command(scenario, 7)
    assert command == ("python3 -m tmem_workloads.kv --start-server --mib 96 --value-bytes 4000 "
                       "--requests 500 --clients 2 --seed 7")
    # Each phase's data set is its work, as usemem's working set is.
    assert density.work_unit(scenario.params) == (96.0, "MiB/min")


def test_the_build_checks_its_answer() -> None:
    # pi(20000) = 2262; the Lua program must print exactly this.
    assert build.expected_answer() == "2262 21171191"
    assert build.expected_answer(30) == "10 129"


def test_extra_packages_are_part_of_the_recipe_hash() -> None:
    plain = image.recipe_hash()
    assert image.recipe_hash(()) == plain
    assert image.recipe_hash(("sqlite3",)) != plain
    assert image.recipe_hash(("sqlite3", "jq")) == image.recipe_hash(("jq", "sqlite3", "jq"))


def test_application_table() -> None:
    run = report.load_run(RECORDED)
    run["scenario"]["workload"] = "kv"
    for sample in run["samples"]:
        sample["workload"] = {"load_s": 10.0, "bench_s": 20.0, "latency": {
            "requests": 100, "requests_per_s": 1000.0 if sample["mode"] == "tmem-blk" else 100.0,
            "avg_ms": 1.0, "p50_ms": 0.5, "p99_ms": 9.0,
            "p999_ms": 20.0 if sample["mode"] == "tmem-blk" else 40.0, "max_ms": 50.0}}
    rows = {row[0]: row for row in report.application_rows(run)}
    assert rows["tmem-blk"] == ["tmem-blk", "3", "1000", "0.50", "9.00", "20.00", "50.00", "10.0", "20.0"]
    assert rows["zswap"][1] == "3"  # the failed run is left out
    markdown = report.render_markdown(run)
    assert "## Application" in markdown and "| mode | runs | GET/s | p50 ms | p99 ms | p99.9 ms |" in markdown
    assert "The server's p99.9 GET latency was lowest with tmem-blk (20.0 ms), then disk-hdd 40.0 ms, zswap 40.0 ms." in markdown
    run["scenario"]["workload"] = "command"
    run["scenario"]["params"] = {"metric_name": "queries/s"}
    for sample in run["samples"]:
        sample["workload"] = {"metric": 7.0, "total_s": 3.0}
    assert report.application_columns(run) == ("mode", "runs", "queries/s", "run s")
    assert json.dumps(report.application_rows(run)).count('"7.0"') == 3
