"""Memory pressure (PSI) from inside running guests, streamed to the host.

The density scenario's balancer reads two signals of a guest's hunger: the
balloon driver's swap counters (QMP) and the guest kernel's pressure stall
information, /proc/pressure/memory: the share of wall time in which some task
waited for memory (reclaim, swap-in, thrashing). PSI sees a guest that stalls
without swapping much (refaulting page cache, direct reclaim) and one whose swap
is fast enough to look idle by the counters.

A thread per guest reads the file over SSH every second (one `cat`, about the
cost of the runner's own polls) and keeps the latest cumulative totals. A first
version streamed it from a shell loop over one long-lived SSH channel; with a
ballooned guest swapping through tmemd that made the guest's sshd stop answering
new sessions for a minute (the density smoke run, three times in three), which
one command per read does not.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tmem_host.testbed.hostmetrics import SamplerThread
from tmem_host.vm import launcher
from tmem_host.vm.launcher import Guest

PRESSURE_FILE = "/proc/pressure/memory"
# A read that takes longer than this is given up (the guest is stalled); the next
# one follows after the interval.
READ_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class PressureTotals:
    """Cumulative stall time since the guest booted, microseconds."""

    some_us: int  # at least one task waited for memory
    full_us: int  # every non-idle task did


def parse_pressure(text: str) -> PressureTotals | None:
    """The totals of one reading of /proc/pressure/memory ("some avg10=.. total=N"
    and "full ..." lines); None unless both lines are whole."""
    totals: dict[str, int] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(part.split("=", 1) for part in rest.split() if "=" in part)
        if kind in ("some", "full") and fields.get("total", "").isdigit():
            totals[kind] = int(fields["total"])
    if set(totals) != {"some", "full"}:
        return None
    return PressureTotals(some_us=totals["some"], full_us=totals["full"])


@dataclass
class PressureStream(SamplerThread):
    """Reads a guest's memory pressure every ``interval_s`` while entered;
    ``latest`` is the newest reading (None before the first), ``first`` the first."""

    guest: Guest
    interval_s: float = 1.0
    latest: PressureTotals | None = None
    first: PressureTotals | None = None
    stalled_reads: int = 0  # reads the guest did not answer within READ_TIMEOUT_S
    _lock: threading.Lock = field(default_factory=threading.Lock)
    thread_name = "psi-reader"

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    text = self.guest.ssh(f"cat {PRESSURE_FILE}", timeout=READ_TIMEOUT_S).stdout
                except launcher.SshTimeoutError:
                    # Too stalled to answer: the balancer goes on with the last reading.
                    self.stalled_reads += 1
                    text = ""
                totals = parse_pressure(text)
                if totals is not None:
                    with self._lock:
                        self.latest = totals
                        self.first = self.first or totals
                self._stop.wait(self.interval_s)
        except BaseException as error:  # handed to the owner on exit
            self._error = error

    def stall_us(self) -> int | None:
        """The latest cumulative "some" stall, microseconds."""
        with self._lock:
            return self.latest.some_us if self.latest is not None else None
