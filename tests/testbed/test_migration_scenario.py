"""A migration scenario's file and report without a guest: [migration] is checked
strictly, and the report's table and two sentences come from the samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tmem_host.testbed import report
from tmem_host.testbed.records import MigrationRecord, RunRecord, Sample
from tmem_host.testbed.scenario import MigrationSpec, ScenarioError, load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[2]


def data(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"modes": ["bigmem", "tmem-blk"], "workload": {"kind": "usemem", "ratio": 1.25},
                            "migration": {"at": 0.4}}
    base.update(changes)
    return base


def test_the_migration_table_is_checked() -> None:
    assert parse_scenario(data(), "m.toml").migration == MigrationSpec(at=0.4, compare=True)
    assert parse_scenario({**data(), "migration": {}}, "m.toml").migration == MigrationSpec(at=0.5)
    assert parse_scenario(data(migration={"after_s": 5, "compare": False}), "m.toml").migration == \
        MigrationSpec(at=None, after_s=5.0, compare=False)
    assert parse_scenario({"modes": ["bigmem"]}, "m.toml").migration is None
    problems = {
        "guests.count: a migration scenario migrates one guest": data(guests={"count": 2}),
        "workload.kind: a migration scenario runs usemem": data(workload={"kind": "stress-vm"}),
        "modes[1]: mode 'zswap' is not migrated": data(modes=["bigmem", "zswap"]),
        "migration.after_s: must be a number > 0": data(migration={"after_s": 0}),
        "migration.at: must be a fraction": data(migration={"at": 1.0}),
        "migration.at: needs compare = true": data(migration={"compare": False}),
        "migration.at: give either at or after_s": data(migration={"at": 0.5, "after_s": 3}),
        "migration.compare: must be true or false": data(migration={"compare": "yes"}),
        "migration.when: unknown key": data(migration={"when": 3}),
    }
    for problem, scenario in problems.items():
        with pytest.raises(ScenarioError, match=problem.replace("[", "\\[").replace("]", "\\]")):
            parse_scenario(scenario, "m.toml")


def test_the_scenario_file_compares_the_issue_modes() -> None:
    scenario = load_scenario(REPO / "scenarios" / "migrate.toml")
    assert set(scenario.modes) == {"bigmem", "disk-hostcache", "tmem-blk", "tmem-remote", "tmem-agent"}
    assert scenario.repetitions >= 3 and scenario.migration is not None and scenario.migration.compare


def sample(mode: str, wall: float, migration: MigrationRecord | None) -> Sample:
    return {"mode": mode, "repetition": 0, "guest": "g0", "ok": True, "verified": True, "error": None,
            "wall_s": wall, "migrated": migration is not None, "migration": migration}


def moved(ram_mib: int, stopped: float, handoff_mib: int = 0, served: int = 0) -> MigrationRecord:
    return {"total_ms": 900, "downtime_ms": 300, "ram_bytes": ram_mib << 20, "handoff_s": stopped,
            "handoff_bytes": handoff_mib << 20, "served_from_tmem": served, "started_s": 5.0}


def test_the_report_has_the_migration_table_and_two_sentences() -> None:
    scenario = parse_scenario(data(), "m.toml").to_json()
    run: RunRecord = {"schema": 1, "id": "x", "scenario": scenario, "metadata": {
        "started": "", "host_cpu": "", "host_load": [], "host_kernel": "", "qemu_version": "",
        "image_hash": "", "guest_kernel": ""}, "samples": [
        sample("bigmem", 10.0, None), sample("bigmem", 11.0, moved(400, 0.5)),
        sample("tmem-blk", 20.0, None), sample("tmem-blk", 25.0, moved(100, 1.5, 30, 5000)),
    ]}
    rows = report.migration_rows(run)
    assert rows == [
        ["bigmem", "1", "10.0", "11.0", "1.10x", "5.0", "900", "300", "400", "0.50", "0.0", "0"],
        ["tmem-blk", "1", "20.0", "25.0", "1.25x", "5.0", "900", "300", "100", "1.50", "30.0", "5000"],
    ]
    sentences = report.migration_sentences(run)
    assert sentences.startswith("Migrating mid-workload cost 1.10x to 1.25x of the unmigrated wall time")
    assert "the guest stood still 0.50 s (bigmem) to 1.50 s (tmem-blk)" in sentences
    assert "QEMU sent 100-100 MiB of RAM for the swapping modes against 400 MiB for bigmem (4.0x)" in sentences
    assert "tmemd handed them over in 30 MiB (tmem-blk)." in sentences
    markdown = report.render_markdown(run)
    assert "## Live migration" in markdown and sentences in markdown
    # The summary keeps migrated runs apart, and compares against the unmigrated baseline.
    keys = [row.key for row in report.summarize_run(run)]
    assert keys == ["bigmem", "bigmem migrated", "tmem-blk", "tmem-blk migrated"]
    assert report.migration_rows({**run, "scenario": parse_scenario({"modes": ["bigmem"]}, "s").to_json()}) == []
