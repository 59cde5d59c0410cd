"""Snapshot the guest's memory counters as one JSON line (stdlib only).

The testbed takes one before and one after a workload and reports the deltas:
/proc/vmstat (pswpin, pswpout, pgmajfault, workingset_refault_*), memory
pressure from /proc/pressure/memory (PSI some/full, total stall in us), and a
few /proc/meminfo fields.

    python3 -m tmem_guest.snapshot
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VMSTAT_FIELDS = (
    "pswpin",
    "pswpout",
    "pgmajfault",
    "pgfault",
    "workingset_refault_anon",
    "workingset_refault_file",
    "pgsteal_kswapd",
    "pgsteal_direct",
    "pgscan_kswapd",
    "pgscan_direct",
    "oom_kill",
)
MEMINFO_FIELDS = ("MemTotal", "MemFree", "MemAvailable", "Cached", "SwapTotal", "SwapFree", "SwapCached")


def read_vmstat(text: str) -> dict[str, int]:
    values = dict(line.split() for line in text.splitlines() if line.strip())
    return {name: int(values[name]) for name in VMSTAT_FIELDS if name in values}


def read_psi(text: str) -> dict[str, float]:
    """'some avg10=0.00 avg60=0.00 avg300=0.00 total=123' lines -> flat dict."""
    result: dict[str, float] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, value = pair.partition("=")
            result[f"{kind}_{key}" + ("_us" if key == "total" else "")] = float(value)
    return result


def read_meminfo(text: str) -> dict[str, int]:
    result = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in MEMINFO_FIELDS:
            result[name] = int(rest.split()[0]) * 1024
    return result


def snapshot(proc: Path = Path("/proc")) -> dict[str, object]:
    psi_path = proc / "pressure" / "memory"
    return {
        "vmstat": read_vmstat((proc / "vmstat").read_text()),
        "psi": read_psi(psi_path.read_text()) if psi_path.exists() else {},
        "meminfo": read_meminfo((proc / "meminfo").read_text()),
    }


def main() -> int:
    print(json.dumps(snapshot()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
