"""Host-side cost of a run: CPU time and resident memory of tmemd and each QEMU,
read from /proc, plus a sampled timeline of their RSS (the "host memory over
time" plot)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    cpu_s: float  # user + system
    rss_bytes: int
    peak_rss_bytes: int  # VmHWM: the high-water mark since the process started


def process_usage(pid: int) -> ProcessUsage | None:
    """None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat_file:
            stat = stat_file.read()
        with open(f"/proc/{pid}/status") as status_file:
            status = status_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields after the parenthesised command name, which may contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    memory = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            memory[name] = int(rest.split()[0]) * 1024
    return ProcessUsage(
        cpu_s=(utime + stime) / _CLOCK_TICKS,
        rss_bytes=memory.get("VmRSS", 0),
        peak_rss_bytes=memory.get("VmHWM", 0),
    )


@dataclass
class RssTimeline:
    """Samples the RSS of named processes every `interval` seconds in a thread.

    `processes` maps a role ("tmemd", "qemu") to pids; the timeline holds
    [seconds since start, tmemd RSS, QEMU RSS summed over guests] rows.
    """

    processes: Mapping[str, list[int]]
    interval: float = 0.5
    points: list[list[float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _rss(self, role: str) -> int:
        total = 0
        for pid in self.processes.get(role, []):
            usage = process_usage(pid)
            total += usage.rss_bytes if usage else 0
        return total

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            self.points.append([round(time.monotonic() - started, 2), self._rss("tmemd"), self._rss("qemu")])
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssTimeline:
        self._thread = threading.Thread(target=self._run, name="rss-timeline", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
