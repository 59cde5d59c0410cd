"""Host-side memory balancing with virtio-balloon: the policy (sans-IO) and the
QMP calls that feed and apply it.

The policy sees, every tick, each guest's balloon statistics (what its driver
reports through QEMU's stats polling: MemAvailable, swap and fault counters, and
the guest kernel's memory pressure stall time where the caller streams it) and
the memory a shared pool outside the guests holds (tmemd's used bytes, 0 without
one), and returns new balloon targets whose sum, plus that pool, stays within
the host's budget. It moves memory to guests that swap or run out of room and
takes it back from guests with memory to spare, as a host does when it packs
more guests into the same RAM (the density scenario, docs/TESTBED.md).

QMP: `balloon` sets a target (the guest's logical RAM, bytes), `query-balloon`
reads what the guest has (`actual`), and the stats are QOM properties of the
device (`guest-stats-polling-interval`, `guest-stats`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

MIB = 1 << 20
BALLOON_PATH = "/machine/peripheral/balloon0"  # launcher.BALLOON_DEVICE_ID


class QmpTarget(Protocol):
    """What the QMP helpers need of a guest (launcher.Guest)."""

    def qmp(self, command: str, arguments: Mapping[str, object] | None = None,
            **keyword_arguments: object) -> Any: ...


@dataclass(frozen=True, slots=True)
class BalloonStats:
    """One guest's balloon statistics; counters cumulative since its boot, bytes.
    None: the driver has not reported that one yet."""

    actual: int  # the RAM the guest has now (query-balloon)
    total: int | None  # MemTotal: with deflate-on-oom, the balloon's pages still count
    free: int | None  # MemFree
    caches: int | None  # the page cache (reclaimable)
    swap_in: int
    swap_out: int
    major_faults: int
    # The guest kernel's memory pressure: cumulative "some" stall, microseconds
    # (/proc/pressure/memory, streamed from the guest: testbed.psi); None: unknown.
    stall_us: int | None = None

    def used(self, boot: int) -> int | None:
        """What the guest itself uses (anonymous memory, the kernel): not free, not
        page cache, not the balloon (``boot`` less ``actual``)."""
        if self.total is None or self.free is None or self.caches is None:
            return None
        return max(0, self.total - self.free - self.caches - (boot - self.actual))


def enable_stats(guest: QmpTarget, interval_s: int = 1) -> None:
    """Ask the guest's balloon driver for statistics every ``interval_s`` seconds."""
    guest.qmp("qom-set", path=BALLOON_PATH, property="guest-stats-polling-interval", value=interval_s)


def read_stats(guest: QmpTarget) -> BalloonStats:
    actual = int(guest.qmp("query-balloon")["actual"])
    reply = guest.qmp("qom-get", path=BALLOON_PATH, property="guest-stats")
    stats: Mapping[str, int] = reply.get("stats", {})

    def gauge(name: str) -> int | None:
        value = int(stats.get(name, -1))  # -1: the driver has not reported it
        return value if value >= 0 else None

    return BalloonStats(actual=actual, total=gauge("stat-total-memory"), free=gauge("stat-free-memory"),
                        caches=gauge("stat-disk-caches"), swap_in=gauge("stat-swap-in") or 0,
                        swap_out=gauge("stat-swap-out") or 0, major_faults=gauge("stat-major-faults") or 0)


def set_target(guest: QmpTarget, target_bytes: int) -> None:
    guest.qmp("balloon", value=target_bytes)


@dataclass(frozen=True, slots=True)
class BalloonLimits:
    budget: int  # host memory for the guests' RAM (plus a pool decide() is told of), bytes
    floor: int  # no guest below this (its kernel, sshd, the workload's start)
    ceiling: int  # no guest above this (the RAM it booted with)
    # Room an idle guest keeps above what it uses itself (BalloonStats.used): the
    # kernel's watermarks (the image's min_free_kbytes and watermark_scale_factor
    # keep tens of MiB free in a small guest) and a start for its next phase.
    reserve: int = 64 * MIB
    # Swap traffic (in + out, bytes per second) that makes a guest hungry.
    hungry_swap_rate: int = 256 * 1024
    # This share of the tick's wall time in which some task of the guest waited
    # for memory (PSI "some") holds a guest: it is not squeezed while it stalls.
    hungry_stall_share: float = 0.10
    # At most this much moves to or from one guest per tick (balloon speed).
    step: int = 128 * MIB
    # A guest that was hungry within this many ticks is not squeezed.
    hold_ticks: int = 3


@dataclass
class BalloonPolicy:
    """Decides balloon targets, tick by tick, from BalloonStats (sans-IO: the
    caller reads the statistics and applies the targets)."""

    limits: BalloonLimits
    targets: dict[str, int]  # the current targets (the guests' boot sizes at first)
    # Guest-ticks found hungry by the swap counters ("swap") and held by a PSI
    # stall alone ("stall").
    hunger: dict[str, int] = field(default_factory=lambda: {"swap": 0, "stall": 0})
    _previous: dict[str, BalloonStats] = field(default_factory=dict)
    _hungry_ago: dict[str, int] = field(default_factory=dict)

    def hungry(self, name: str, stats: BalloonStats, interval_s: float) -> bool:
        """Swapping: the guest needs more memory than it has."""
        before = self._previous.get(name)
        if before is None or interval_s <= 0:
            return False
        swap_rate = (stats.swap_in + stats.swap_out - before.swap_in - before.swap_out) / interval_s
        return swap_rate >= self.limits.hungry_swap_rate

    def stalled(self, name: str, stats: BalloonStats, interval_s: float) -> bool:
        """Stalled on memory (PSI "some" over hungry_stall_share of the tick)."""
        before = self._previous.get(name)
        if before is None or interval_s <= 0 or stats.stall_us is None or before.stall_us is None:
            return False
        return (stats.stall_us - before.stall_us) / (interval_s * 1e6) >= self.limits.hungry_stall_share

    def decide(self, observed: Mapping[str, BalloonStats], pool_bytes: int, interval_s: float,
               pool_hungry: bool = False) -> dict[str, int]:
        """New targets; ``pool_bytes``: what a shared pool counted in the budget holds
        now, which the guests' targets must leave room for (0: none).
        ``pool_hungry``: the pool refused pages since the last tick (it is full):
        it is hungry like a swapping guest and gets a step of room first, before
        any guest grows. Pages it takes are the swapping guests' (compressed, and
        at once, while a balloon deflates in seconds); without this, guests grew
        into all free memory and a full pool sent their swap to the disk."""
        limits = self.limits
        if pool_hungry:
            pool_bytes += limits.step
        hungry = []
        for name, stats in observed.items():
            if self.hungry(name, stats, interval_s):
                self.hunger["swap"] += 1
                self._hungry_ago[name] = 0
                hungry.append(name)
            elif self.stalled(name, stats, interval_s):
                # Stalled without swapping (reclaim, refaults, a balloon inflating
                # into its working set): held, not squeezed further, but not grown
                # either: growing on stalls alone made memory ping-pong between
                # guests whose stalls the balloon itself caused.
                self.hunger["stall"] += 1
                self._hungry_ago[name] = 0
            else:
                self._hungry_ago[name] = self._hungry_ago.get(name, limits.hold_ticks) + 1
        self._previous = dict(observed)
        targets = dict(self.targets)
        # Take back what idle guests do not use themselves, down to that plus the
        # reserve (their page cache goes first; Xen's selfballooning aims at the
        # same: a guest's committed memory).
        for name, stats in observed.items():
            used = stats.used(limits.ceiling)
            if self._hungry_ago[name] <= limits.hold_ticks or used is None:
                continue
            goal = max(limits.floor, used + limits.reserve)
            if targets[name] > goal:
                targets[name] = max(goal, targets[name] - limits.step)
        # Never above the budget: if the pool grew into the guests' share, the
        # most generously sized guests give back first.
        excess = sum(targets.values()) + pool_bytes - limits.budget
        for name in sorted(targets, key=targets.__getitem__, reverse=True):
            if excess <= 0:
                break
            cut = min(excess, targets[name] - limits.floor)
            targets[name] -= cut
            excess -= cut
        # Give the free memory to the hungry guests, evenly: only memory that is
        # free now (a guest still above its new target has not given it back yet),
        # so that the guests never hold more than the budget, not even in passing.
        free = limits.budget - pool_bytes - sum(max(targets[name], observed[name].actual)
                                                 if name in observed else targets[name] for name in targets)
        growing = [name for name in hungry if targets[name] < limits.ceiling]
        while free >= MIB and growing:
            share = free // len(growing)
            for name in list(growing):
                grant = min(share, limits.step, limits.ceiling - targets[name])
                targets[name] += grant
                free -= grant
                if targets[name] >= limits.ceiling or grant < share:
                    growing.remove(name)
            if share < MIB:
                break
        self.targets = {name: value // MIB * MIB for name, value in targets.items()}
        return dict(self.targets)

    def take_back(self, excess: int, before: Mapping[str, int]) -> dict[str, int]:
        """Withdraw up to ``excess`` bytes (whole MiB) of the grants decide() just
        made (targets above ``before``): what the shared pool took while they were
        decided is not free any more. Returns the new targets."""
        for name in sorted(self.targets):
            if excess <= 0:
                break
            grant = self.targets[name] - before.get(name, self.targets[name])
            cut = min(grant, -(-excess // MIB) * MIB)
            if cut > 0:
                self.targets[name] -= cut
                excess -= cut
        return dict(self.targets)
