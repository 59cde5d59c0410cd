"""The density scenario: N guests share one host memory budget M for their RAM
plus tmem, and each alternates memory-hungry phases with quiet ones. The policies
(modes static, balloon, tmem, tmem-balloon) differ only in how M is shared:

    static        each guest boots with M/N and swaps to the hdd disk
    balloon       each boots with room to grow (its ceiling) and is ballooned to
                  M/N; the balancer (tmem_host.vm.balloon) moves RAM to hungry
                  guests, the guests' targets never summing above M
    tmem          each boots with (1 - tmem_share) M / N; tmemd's budget is the rest
    tmem-balloon  as balloon, from (1 - tmem_share) M / N each; the guests grow
                  into what tmemd does not use, and tmemd's budget is always what
                  the guests do not hold or have been promised (Xen's setup:
                  ballooning, and tmem for what the guests' RAM cannot hold)

The monitor records every second what each guest holds (balloon actual, or its
RAM) and tmemd's used bytes and budget: a policy held its budget when their sum
never exceeded M. A guest's hungry phase is a verified usemem of hungry_mib, or
an application: gcc building Lua 5.4 and checking the built interpreter
(phase = "build", tmem_workloads.build), whose peak is about hungry_mib; or
redis-server holding hungry_mib of values, loaded, benchmarked with
redis-benchmark's GETs and read back, all inside the guest (phase = "kv",
tmem_workloads.kv). The alone reference runs the same phase in one guest with
enough RAM.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from tmem_host.daemon.control import ControlClient
from tmem_host.daemon.process import TmemdProcess
from tmem_host.testbed.hostmetrics import SamplerThread
from tmem_host.testbed.modes import Mode
from tmem_host.testbed.psi import PressureStream
from tmem_host.testbed.scenario import Scenario
from tmem_host.vm import balloon, launcher
from tmem_host.vm.balloon import MIB

# The alone reference's RAM above the phase's working set (runner.BIGMEM_HEADROOM_MIB).
ALONE_HEADROOM_MIB = 192
# How often the monitor samples (and the balancer acts).
TICK_S = 1.0
# The runner asks each guest whether its phases are done this often, waiting at
# most POLL_TIMEOUT_S for an answer: a guest squeezed to its floor while tmemd is
# full swaps at the fallback's pace and its sshd may stall for a minute. It is
# asked again next round (the run's deadline is the workload timeout); a poll that
# waits delays noticing the others by as much, so done times are good to POLL_S
# plus POLL_TIMEOUT_S at worst, and the density record counts such polls.
POLL_S = 2.0
POLL_TIMEOUT_S = 5.0
# Ballooned guests reach their first target before the workload starts, or fail.
SETTLE_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class DensityPlan:
    """How a policy sizes the guests and tmemd under the scenario's budget."""

    boot_mib: int  # each guest's RAM at boot (-m): its ceiling when ballooned
    start_mib: int  # each guest's balloon target before the workload (= boot_mib without one)
    floor_mib: int  # no guest is ballooned below this
    tmemd_budget: int  # bytes, 0 without tmemd (at the start: tmem-balloon's moves)
    budget: int  # M, bytes


def plan(scenario: Scenario, mode: Mode) -> DensityPlan:
    params = scenario.params
    total_mib = scenario.budget_bytes // MIB
    count = scenario.guests.count
    floor = int(params["floor_mib"])
    guests_mib = int(total_mib * (1 - float(params["tmem_share"]))) if mode.tmemd else total_mib
    start = max(floor, guests_mib // count)
    boot = start
    if mode.balloon:
        # Room for a hungry phase alone, but no more than M leaves beside the
        # others' floors.
        boot = max(start, min(total_mib - (count - 1) * floor, int(params["hungry_mib"]) + ALONE_HEADROOM_MIB))
    tmemd_budget = (total_mib - count * start) * MIB if mode.tmemd else 0
    return DensityPlan(boot_mib=boot, start_mib=start, floor_mib=floor, tmemd_budget=tmemd_budget,
                       budget=scenario.budget_bytes)


def phase_command(scenario: Scenario, seed: int) -> str:
    """One hungry phase: a guest command that prints one JSON line with total_s
    and verified. A build phase has no seed: every build is the same work."""
    params = scenario.params
    if params["phase"] == "build":
        return build_command(str(params["cflags"]), int(params["jobs"]))
    if params["phase"] == "kv":
        return (f"python3 -m tmem_workloads.kv --start-server --mib {int(params['hungry_mib'])} "
                f"--value-bytes {int(params['value_bytes'])} --requests {int(params['requests'])} "
                f"--clients {int(params['clients'])} --seed {seed}")
    return (f"python3 -m tmem_workloads.usemem --mib {int(params['hungry_mib'])} --seed {seed} "
            f"--order {params['order']} --passes 1")


def build_command(cflags: str, jobs: int) -> str:
    """The build workload's guest command (also density's build phase)."""
    # --cflags=: argparse takes a value such as -O2 for an option of its own.
    return f"python3 -m tmem_workloads.build --cflags={shlex.quote(cflags)} --jobs {jobs}"


def work_unit(params: Mapping[str, object]) -> tuple[float, str]:
    """What one completed phase counts as work, and the unit of work per minute:
    a usemem phase its working set (MiB), a kv phase its data set (MiB, each
    value written, benchmarked and read back), a build phase one build."""
    if params.get("phase") == "build":
        return 1.0, "builds/min"
    return float(str(params.get("hungry_mib", 0))), "MiB/min"


def guest_command(scenario: Scenario, index: int, repetition: int) -> str:
    """Guest ``index``'s part: its stagger, then hungry phases with quiet ones between
    (steady: back to back, all guests at once). A failed phase ends the script."""
    params = scenario.params
    steady = params["variant"] == "steady"
    stagger = 0 if steady else int(params["stagger_s"]) * index
    quiet = 0 if steady else int(params["quiet_s"])
    seed = 1000 * repetition + 10 * index
    phases = [phase_command(scenario, seed + phase) for phase in range(int(params["phases"]))]
    return f"sleep {stagger} && " + f" && sleep {quiet} && ".join(phases)


def settle(guests: Sequence[launcher.Guest], start_mib: int, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
    """Balloon every guest to ``start_mib`` and wait until each holds no more."""
    for guest in guests:
        balloon.enable_stats(guest)
        balloon.set_target(guest, start_mib * MIB)
    deadline = time.monotonic() + timeout_s
    for guest in guests:
        while int(guest.qmp("query-balloon")["actual"]) > start_mib * MIB:
            if time.monotonic() > deadline:
                raise launcher.QemuError(f"{guest.config.name}: the balloon did not reach {start_mib} MiB "
                                         f"in {timeout_s:.0f} s")
            time.sleep(0.5)


def release(guests: Sequence[launcher.Guest], boot_mib: int) -> None:
    """The measurement is over: every balloon deflates to the guest's boot size, so
    that the last readings (over SSH) do not wait on a guest squeezed to its floor
    that swaps at the fallback disk's pace (tmemd full, --fallback-iops)."""
    for guest in guests:
        balloon.set_target(guest, boot_mib * MIB)


# A monitor row: seconds, tmemd's used bytes and budget, then each guest's actual
# RAM and then each guest's target (bytes; a guest without a balloon: its RAM twice).
@dataclass
class DensityMonitor(SamplerThread):
    """Samples every TICK_S what the guests and tmemd hold; with a balloon, runs the
    balancer and applies its targets, and (with tmemd too) gives tmemd the rest of
    the budget. A thread this context manager owns and joins; an error in it is
    raised again on exit."""

    guests: Sequence[launcher.Guest]
    mode: Mode
    plan: DensityPlan
    tmemd: TmemdProcess | None
    # Each guest's memory pressure (PSI), streamed: the balancer's second signal.
    pressure: Mapping[str, PressureStream] = field(default_factory=dict)
    rows: list[list[float]] = field(default_factory=list)
    moves: int = 0  # balloon targets changed
    _refusals: int = 0  # tmemd's refused puts at the last tick
    thread_name = "density-monitor"

    def __post_init__(self) -> None:
        limits = balloon.BalloonLimits(budget=self.plan.budget, floor=self.plan.floor_mib * MIB,
                                       ceiling=self.plan.boot_mib * MIB)
        self.policy = balloon.BalloonPolicy(
            limits, {guest.config.name: self.plan.start_mib * MIB for guest in self.guests})

    def _tick(self, control: ControlClient | None, started: float, last: float) -> float:
        now = time.monotonic()
        used = budget = 0
        pool_hungry = False
        if control is not None:
            store = control.stats()["store"]
            used, budget = store["used_bytes"], store["budget_bytes"]
            # tmemd refused pages since the last tick: it is full, and hungry too.
            pool_hungry = store["refusals"] > self._refusals
            self._refusals = store["refusals"]
        names = [guest.config.name for guest in self.guests]
        if self.mode.balloon:
            observed = {guest.config.name: self._observe(guest) for guest in self.guests}
            actual = [observed[name].actual for name in names]
            before = dict(self.policy.targets)
            # tmemd's used bytes are spoken for: the guests grow into the rest.
            targets = self.policy.decide(observed, used, now - last, pool_hungry)
            if control is not None:
                budget = self._tmemd_budget(targets, observed, used)
                control.set_budget(budget)
                # tmemd may have grown, under its old budget, into what decide() just
                # granted (its used bytes were read before the guests were): those
                # grants are taken back, or guests and tmemd would hold more than M.
                grown = control.stats()["store"]["used_bytes"]
                if grown > budget:
                    targets = self.policy.take_back(grown - budget, before)
                    budget = self._tmemd_budget(targets, observed, grown)
                    control.set_budget(budget)
            for guest in self.guests:
                if targets[guest.config.name] != before[guest.config.name]:
                    balloon.set_target(guest, targets[guest.config.name])
                    self.moves += 1
            wanted = [targets[name] for name in names]
        else:
            actual = wanted = [guest.config.memory_mib * MIB for guest in self.guests]
        self.rows.append([round(now - started, 2), used, budget, *actual, *wanted])
        return now

    def _tmemd_budget(self, targets: Mapping[str, int], observed: Mapping[str, balloon.BalloonStats],
                      used: int) -> int:
        """What the guests neither hold nor were promised (never below what tmemd holds)."""
        holding = sum(max(targets[name], stats.actual) for name, stats in observed.items())
        return max(used, self.plan.budget - holding)

    def _observe(self, guest: launcher.Guest) -> balloon.BalloonStats:
        stats = balloon.read_stats(guest)
        stream = self.pressure.get(guest.config.name)
        return replace(stats, stall_us=stream.stall_us()) if stream is not None else stats

    def _run(self) -> None:
        try:
            control = self.tmemd.control() if self.tmemd is not None else None
            try:
                started = last = time.monotonic()
                while True:
                    last = self._tick(control, started, last)
                    if self._stop.wait(TICK_S):
                        return
            finally:
                if control is not None:
                    control.close()
        except BaseException as error:  # handed to the owner on exit
            self._error = error


def committed_peak(rows: Sequence[Sequence[float]], guests: int) -> int:
    """The most the guests held plus tmemd's used bytes at one tick."""
    return int(max((sum(row[3:3 + guests]) + row[1] for row in rows), default=0))


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index, (sum x)^2 / (n sum x^2): 1 when all equal, 1/n when
    one gets everything."""
    if not values or not any(values):
        return None
    return sum(values) ** 2 / (len(values) * sum(value * value for value in values))
