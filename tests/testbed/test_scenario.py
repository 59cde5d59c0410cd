"""Scenario validation: good files resolve with defaults; every mistake is one line
naming the file and the key."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tmem_host.testbed.scenario import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parents[2]

GOOD = """
name = "small"
modes = ["disk-hdd", "tmem-blk"]
repetitions = 2
[guests]
memory_mib = 256
[host]
budget = "512M"
[workload]
kind = "usemem"
ratio = 1.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


def test_good_scenario_resolves_defaults(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, GOOD))
    assert scenario.name == "small"
    assert scenario.modes == ("disk-hdd", "tmem-blk")
    assert scenario.baseline == "disk-hdd"  # the first mode unless named
    assert scenario.budget_bytes == 512 << 20
    assert scenario.params == {"ratio": 1.5, "order": "sequential", "passes": 1}
    assert scenario.guests.count == 1 and scenario.guests.weight(0) == 100 and scenario.guests.cap(0) == 0
    assert scenario.to_json()["params"]["ratio"] == 1.5
    assert scenario.calibrate  # the guest CPU is timed unless the file says not to
    quick = load_scenario(write(tmp_path, GOOD.replace("repetitions = 2", "repetitions = 2\ncalibrate = false")))
    assert not quick.calibrate and quick.to_json()["calibrate"] is False


@pytest.mark.parametrize("path", sorted((REPO / "scenarios").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_scenarios_are_valid(path: Path) -> None:
    load_scenario(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('ratio = 1.5', 'ratio = "x"'), "scenario.toml: workload.ratio: must be a number > 0, got 'x'"),
        (('ratio = 1.5', 'ratio = 0'), "scenario.toml: workload.ratio: must be a number > 0, got 0"),
        (('"tmem-blk"]', '"tmem-blkk"]'), "scenario.toml: modes[1]: unknown mode 'tmem-blkk'"),
        (('repetitions = 2', 'repetitions = 0'), "scenario.toml: repetitions: must be between 1 and 50, got 0"),
        (('budget = "512M"', 'budget = "lots"'), "scenario.toml: host.budget: not a size: 'lots'"),
        (('memory_mib = 256', 'memory_mib = 256\nmemroy = 1'), "scenario.toml: guests.memroy: unknown key"),
        (('kind = "usemem"', 'kind = "contention"'), "scenario.toml: guests.count: workload 'contention' needs at least 2"),
        (('memory_mib = 256', 'memory_mib = 256\nweights = [1, 2]'), "scenario.toml: guests.weights: must have one entry per guest (1), got 2"),
        (('repetitions = 2', 'repetitions = 2\nbaseline = "zswap"'), "scenario.toml: baseline: must be one of the scenario's modes"),
        (('[workload]', '[workload'), "scenario.toml: not valid TOML"),
        (('repetitions = 2', 'repetitions = 2\ncalibrate = "no"'), "scenario.toml: calibrate: must be true or false"),
        (('kind = "usemem"', 'kind = "pagecache"'), "scenario.toml: modes[1]: mode 'tmem-blk' does not apply to workload 'pagecache'; its modes are bigmem, disk-hdd, disk-hostcache, tmem-agent"),
        (('kind = "usemem"', 'kind = "usemem"\norder = "backwards"'), "scenario.toml: workload.order: must be one of sequential, random; got 'backwards'"),
    ],
)
def test_mistakes_are_one_line_with_file_and_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in GOOD
    with pytest.raises(ScenarioError) as raised:
        load_scenario(write(tmp_path, GOOD.replace(old, new)))
    text = str(raised.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="missing.toml: cannot read"):
        load_scenario(tmp_path / "missing.toml")


DENSITY = """
modes = ["static", "balloon", "tmem", "tmem-balloon"]
[guests]
count = 4
[host]
budget = "768M"
[workload]
kind = "density"
"""


def test_density_policies_and_sizes(tmp_path: Path) -> None:
    from tmem_host.testbed import density
    from tmem_host.testbed.modes import MODES

    scenario = load_scenario(write(tmp_path, DENSITY))
    plans = {mode: density.plan(scenario, MODES[mode]) for mode in scenario.modes}
    assert plans["static"].boot_mib == plans["static"].start_mib == 192  # M/N
    assert plans["balloon"].start_mib == 192 and plans["balloon"].boot_mib == 384  # M less 3 floors
    # tmem: half of M for the guests' RAM (floored at 128 MiB each), tmemd the rest.
    assert plans["tmem"].start_mib == 128 and plans["tmem"].tmemd_budget == (768 - 4 * 128) << 20
    assert plans["tmem-balloon"].boot_mib == 384 and plans["tmem-balloon"].start_mib == 128
    for plan in plans.values():
        assert 4 * plan.start_mib * (1 << 20) + plan.tmemd_budget <= plan.budget
    command = density.guest_command(scenario, 2, 1)
    assert command.startswith("sleep 30 && python3 -m tmem_workloads.usemem --mib 384 --seed 1020 ")
    assert " && sleep 20 && " in command  # two phases, a quiet one between


def test_a_density_phase_can_be_an_application(tmp_path: Path) -> None:
    from tmem_host.testbed import density

    scenario = load_scenario(write(tmp_path, DENSITY.replace('kind = "density"',
                                                             'kind = "density"\nphase = "build"\ncflags = "-O1 -g"')))
    command = density.guest_command(scenario, 1, 0)
    assert command == ("sleep 15 && python3 -m tmem_workloads.build --cflags='-O1 -g' --jobs 1 && sleep 20 && "
                       "python3 -m tmem_workloads.build --cflags='-O1 -g' --jobs 1")
    # What the guest's build module makes of it (a value such as -O2 must not be
    # taken for an option).
    from tmem_workloads import build
    for cflags in ("-O1 -g", "-O2"):
        arguments = build.parse_args(shlex.split(density.build_command(cflags, 1))[3:])
        assert arguments.cflags == cflags and arguments.jobs == 1
    assert density.work_unit(scenario.params) == (1.0, "builds/min")
    assert density.work_unit(load_scenario(write(tmp_path, DENSITY)).params) == (384.0, "MiB/min")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('"static", ', ''), None),
        (('"static", ', '"tmem-blk", '), "modes[0]: mode 'tmem-blk' does not apply to workload 'density'"),
        (('count = 4', 'count = 1'), "guests.count: workload 'density' needs at least 2 guests"),
        (('budget = "768M"', 'budget = "256M"'), "workload.floor_mib: 4 guests of at least 128 MiB do not fit"),
        (('kind = "density"', 'kind = "density"\ntmem_share = 1.5'), "workload.tmem_share: must be a fraction"),
        (('kind = "density"', 'kind = "density"\nvariant = "busy"'), "workload.variant: must be one of staggered, steady"),
        (('kind = "density"', 'kind = "density"\nphase = "memcached"'), "workload.phase: must be one of usemem, build, kv"),
    ],
)
def test_density_mistakes(tmp_path: Path, edit: tuple[str, str], message: str | None) -> None:
    text = DENSITY.replace(*edit)
    if message is None:
        load_scenario(write(tmp_path, text))
        return
    with pytest.raises(ScenarioError) as raised:
        load_scenario(write(tmp_path, text))
    assert str(raised.value).startswith(f"scenario.toml: {message}")


SHARED_IMAGE = (REPO / "scenarios" / "shared-image.toml").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (('modes = ["tmem-cache", "tmem-cache-shared"]', 'modes = ["tmem-cache", "disk-hdd"]'),
         "modes[1]: mode 'disk-hdd' gives each guest a disk of its own; shared_image needs"),
        (("count = 2", "count = 1"), "guests.count: shared_image needs at least 2 guests"),
        (("shared_image = true", "shared_image = false"),
         "modes[1]: mode 'tmem-cache-shared' shares one image's pool: it needs workload.shared_image = true"),
        (("shared_image = true", 'shared_image = "yes"'), "workload.shared_image: must be true or false"),
    ],
)
def test_shared_image_mistakes(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        load_scenario(write(tmp_path, SHARED_IMAGE.replace(*edit)))
    assert str(raised.value).startswith(f"scenario.toml: {message}")


def test_swap_workloads_refuse_density_policies(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="mode 'static' does not apply to workload 'usemem'"):
        load_scenario(write(tmp_path, GOOD.replace('"tmem-blk"]', '"static"]')))
