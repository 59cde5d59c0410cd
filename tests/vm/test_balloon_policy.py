"""The balloon policy (sans-IO): memory moves to swapping guests and back from
idle ones, and the targets plus a shared pool never exceed the budget."""

from __future__ import annotations

from dataclasses import replace

from tmem_host.testbed.psi import PressureTotals, parse_pressure
from tmem_host.vm.balloon import MIB, BalloonLimits, BalloonPolicy, BalloonStats

LIMITS = BalloonLimits(budget=1024 * MIB, floor=128 * MIB, ceiling=640 * MIB, reserve=64 * MIB,
                       hungry_swap_rate=256 * 1024, step=128 * MIB, hold_ticks=2)


def stats(actual_mib: int, used_mib: int | None, swapped_mib: int = 0, ceiling_mib: int = 640) -> BalloonStats:
    """A guest holding ``actual_mib`` that uses ``used_mib`` itself (the rest free),
    booted with ``ceiling_mib`` (MemTotal keeps the balloon's pages: deflate-on-oom)."""
    known = used_mib is not None
    return BalloonStats(actual=actual_mib * MIB, total=ceiling_mib * MIB if known else None,
                        free=(actual_mib - used_mib) * MIB if used_mib is not None else None,
                        caches=0 if known else None, swap_in=0, swap_out=swapped_mib * MIB, major_faults=0)


def policy() -> BalloonPolicy:
    return BalloonPolicy(LIMITS, {name: 256 * MIB for name in ("g0", "g1", "g2", "g3")})


def test_used_leaves_out_free_memory_page_cache_and_the_balloon() -> None:
    sample = BalloonStats(actual=300 * MIB, total=500 * MIB, free=100 * MIB, caches=50 * MIB,
                          swap_in=0, swap_out=0, major_faults=0)
    assert sample.used(boot=512 * MIB) == (500 - 100 - 50 - 212) * MIB
    assert stats(256, None).used(640 * MIB) is None


def test_memory_flows_from_idle_guests_to_a_swapping_one() -> None:
    balancer = policy()
    swapped = 0
    for _ in range(8):
        swapped += 64  # g0 swaps 64 MiB a tick: hungry
        observed = {"g0": stats(balancer.targets["g0"] // MIB, balancer.targets["g0"] // MIB, swapped)}
        for name in ("g1", "g2", "g3"):
            observed[name] = stats(balancer.targets[name] // MIB, 80)  # idle, using 80 MiB
        targets = balancer.decide(observed, pool_bytes=0, interval_s=1.0)
        assert sum(targets.values()) <= LIMITS.budget
        assert all(LIMITS.floor <= value <= LIMITS.ceiling for value in targets.values())
    # The idle guests kept what they use plus the reserve; the swapping one got the rest.
    assert all(targets[name] == (80 + 64) * MIB for name in ("g1", "g2", "g3"))
    assert targets["g0"] == LIMITS.budget - 3 * 144 * MIB


def test_an_idle_guest_shrinks_a_step_a_tick_and_not_below_the_floor() -> None:
    balancer = policy()
    observed = {name: stats(256, 20) for name in ("g0", "g1", "g2", "g3")}
    assert balancer.decide(observed, pool_bytes=0, interval_s=1.0) == {name: 128 * MIB for name in observed}
    big = BalloonPolicy(LIMITS, {"g0": 640 * MIB})
    assert big.decide({"g0": stats(640, 20)}, 0, 1.0) == {"g0": 512 * MIB}  # one step of 128


def test_a_guest_that_was_hungry_is_not_squeezed_at_once() -> None:
    balancer = BalloonPolicy(LIMITS, {"g0": 256 * MIB})
    balancer.decide({"g0": stats(256, 250, 0)}, 0, 1.0)
    balancer.decide({"g0": stats(256, 250, 100)}, 0, 1.0)  # swapping: grows a step
    grown = balancer.targets["g0"]
    assert grown == 384 * MIB
    for _ in range(LIMITS.hold_ticks):  # quiet now, using little: held
        assert balancer.decide({"g0": stats(grown // MIB, 50, 100)}, 0, 1.0)["g0"] == grown
    assert balancer.decide({"g0": stats(grown // MIB, 50, 100)}, 0, 1.0)["g0"] < grown


def test_a_full_pool_gets_a_step_of_room_before_a_swapping_guest_grows() -> None:
    # g0 swaps into the pool and the pool refuses pages (full): the pool is hungry
    # too, and its step comes first; the guest grows from what is left.
    def tick(balancer: BalloonPolicy, swapped: int, pool_mib: int, hungry: bool) -> dict[str, int]:
        observed = {"g0": stats(balancer.targets["g0"] // MIB, balancer.targets["g0"] // MIB, swapped),
                    "g1": stats(balancer.targets["g1"] // MIB, 256)}
        return balancer.decide(observed, pool_bytes=pool_mib * MIB, interval_s=1.0, pool_hungry=hungry)

    fed, starved = (BalloonPolicy(LIMITS, {"g0": 256 * MIB, "g1": 256 * MIB}) for _ in range(2))
    for balancer, hungry in ((fed, True), (starved, False)):
        tick(balancer, 0, 384, hungry)
        tick(balancer, 64, 384, hungry)
    # 1024 budget - 384 in the pool - 2 x 256 = 128 free: a full pool keeps it (its
    # budget, what the guests do not hold, grows by that step); otherwise the
    # swapping guest takes it and the pool stays full.
    assert fed.targets == {"g0": 256 * MIB, "g1": 256 * MIB}
    assert starved.targets == {"g0": 384 * MIB, "g1": 256 * MIB}


def test_a_growing_pool_is_paid_for_by_the_largest_guests() -> None:
    balancer = BalloonPolicy(LIMITS, {"g0": 512 * MIB, "g1": 256 * MIB, "g2": 128 * MIB})
    # Each uses its target less the reserve: nothing to take back.
    observed = {"g0": stats(512, 448), "g1": stats(256, 192), "g2": stats(128, 64)}
    balancer.decide(observed, pool_bytes=0, interval_s=1.0)
    targets = balancer.decide(observed, pool_bytes=400 * MIB, interval_s=1.0)
    assert targets == {"g0": 240 * MIB, "g1": 256 * MIB, "g2": 128 * MIB}


def test_no_statistics_yet_means_no_move() -> None:
    balancer = policy()
    observed = {name: stats(256, None) for name in ("g0", "g1", "g2", "g3")}
    assert balancer.decide(observed, 0, 1.0) == {name: 256 * MIB for name in observed}


def test_memory_a_guest_has_not_given_back_yet_is_not_handed_out() -> None:
    limits = BalloonLimits(budget=512 * MIB, floor=128 * MIB, ceiling=512 * MIB, reserve=64 * MIB,
                           hungry_swap_rate=256 * 1024, step=256 * MIB, hold_ticks=2)
    balancer = BalloonPolicy(limits, {"g0": 256 * MIB, "g1": 256 * MIB})
    balancer.decide({"g0": stats(256, 250, 0, 512), "g1": stats(256, 200, 0, 512)}, 0, 1.0)
    # g1, idle, is asked down to 128 MiB but still holds 256: g0 swaps and waits.
    targets = balancer.decide({"g0": stats(256, 250, 100, 512), "g1": stats(256, 64, 0, 512)}, 0, 1.0)
    assert targets["g1"] == 128 * MIB and targets["g0"] == 256 * MIB
    # Once g1's balloon has taken the memory back, g0 gets it.
    targets = balancer.decide({"g0": stats(256, 250, 200, 512), "g1": stats(128, 64, 0, 512)}, 0, 1.0)
    assert targets == {"g0": 384 * MIB, "g1": 128 * MIB}


def test_grants_the_pool_grew_into_meanwhile_are_taken_back() -> None:
    # g0 swaps and is granted what the pool did not hold when its used bytes were
    # read; the pool then turns out to have grown 40.5 MiB into it (under its old
    # budget): 41 MiB of g0's grant goes back, g1 (granted nothing) keeps its target.
    limits = BalloonLimits(budget=512 * MIB, floor=64 * MIB, ceiling=512 * MIB, reserve=64 * MIB,
                           hungry_swap_rate=256 * 1024, step=256 * MIB, hold_ticks=2)
    balancer = BalloonPolicy(limits, {"g0": 128 * MIB, "g1": 128 * MIB})
    balancer.decide({"g0": stats(128, 120, 0, 512), "g1": stats(128, 120, 0, 512)}, 100 * MIB, 1.0)
    before = dict(balancer.targets)
    targets = balancer.decide({"g0": stats(128, 120, 100, 512), "g1": stats(128, 120, 0, 512)}, 100 * MIB, 1.0)
    assert targets == {"g0": 284 * MIB, "g1": 128 * MIB}  # all of 512 - 100 - 128
    assert balancer.take_back(40 * MIB + MIB // 2, before) == {"g0": 243 * MIB, "g1": 128 * MIB}
    assert balancer.targets["g0"] == 243 * MIB
    # Never below where the tick started: nothing was granted, nothing is taken.
    assert balancer.take_back(500 * MIB, balancer.targets) == {"g0": 243 * MIB, "g1": 128 * MIB}


def test_a_guest_stalled_on_memory_is_held_not_squeezed() -> None:
    # PSI: 300 ms of each 1 s tick some task of g0 waited for memory (reclaim,
    # refaults), while its swap counters stayed still; g1 stalled 20 ms (noise).
    # Both use 80 MiB: the idle g1 shrinks a 32 MiB step a tick, the stalled g0
    # only on the first tick (nothing to compare its stall with yet).
    balancer = BalloonPolicy(replace(LIMITS, step=32 * MIB), {name: 256 * MIB for name in ("g0", "g1", "g2", "g3")})
    stalls = {"g0": 0, "g1": 0, "g2": 0, "g3": 0}
    for _ in range(4):
        stalls["g0"] += 300_000
        stalls["g1"] += 20_000
        observed = {name: replace(stats(balancer.targets[name] // MIB, 80), stall_us=stalls[name])
                    for name in stalls}
        targets = balancer.decide(observed, pool_bytes=0, interval_s=1.0)
    assert targets["g0"] == 224 * MIB and targets["g1"] == (80 + 64) * MIB
    assert balancer.hunger == {"swap": 0, "stall": 3}  # the first tick has nothing to compare with
    # Without PSI readings (stall_us None) nothing holds g0: it shrinks like the others.
    blind = policy()
    for _ in range(4):
        targets = blind.decide({name: stats(blind.targets[name] // MIB, 80) for name in stalls},
                               pool_bytes=0, interval_s=1.0)
    assert blind.hunger == {"swap": 0, "stall": 0} and targets["g0"] == (80 + 64) * MIB


def test_pressure_readings_parse_whole_or_not_at_all() -> None:
    reading = ("some avg10=1.50 avg60=0.30 avg300=0.05 total=1234567\n"
               "full avg10=0.50 avg60=0.10 avg300=0.01 total=456789\n")
    assert parse_pressure(reading) == PressureTotals(some_us=1234567, full_us=456789)
    assert parse_pressure(reading.splitlines()[0]) is None  # cut after "some"
    # A reading cut inside a number is not whole either; the stream only parses
    # readings ended by their blank line, so a cut one never reaches the parser.
    assert parse_pressure("some avg10=1.50 total=12\nfull avg10=0.5 total=") is None
    assert parse_pressure("") is None
