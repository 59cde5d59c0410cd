"""The command workload: your own application as a testbed workload.

A scenario's ``[workload] kind = "command"`` names shell commands run in every
guest:

- ``setup``: once, before the measurement (not timed, outside the cgroup): make a
  data set, start a server;
- ``run``: the measured part, timed by the host, in the workload's memory
  cgroup (memory.max = guests.workload_memory_mib; none for bigmem);
- ``verify``: after run; exit status 0 means the results were right. A run that
  exits non-zero, or a verify that does, fails the sample (verified: false);
- ``metric``: a regular expression with one group, searched in run's output;
  the number it captures in its last match is recorded as ``metric_name`` (for
  example the operations per second a benchmark prints at the end);
- ``packages``: Debian packages the image needs for all this (part of the
  image's recipe hash: the runner builds that image once and caches it).

scenarios/command-sqlite.toml is an example.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tmem_host.vm import guestops
from tmem_host.vm.launcher import Guest

OUTPUT_TAIL_CHARS = 1500


class CommandError(Exception):
    """The setup command failed: the workload could not be prepared."""


@dataclass(frozen=True, slots=True)
class CommandSpec:
    setup: str
    run: str
    verify: str
    metric: str  # a regular expression with one group, or "" for none
    metric_name: str

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CommandSpec:
        return cls(str(params["setup"]), str(params["run"]), str(params["verify"]), str(params["metric"]),
                   str(params["metric_name"]))


def parse_metric(pattern: str, output: str) -> float | None:
    """The number the pattern's group captures in its last match in ``output`` (a
    benchmark's final figure), or None."""
    if not pattern:
        return None
    matches = list(re.finditer(pattern, output, re.MULTILINE))
    if not matches:
        return None
    match = matches[-1]
    try:
        return float(match.group(1))
    except (TypeError, ValueError):
        return None


def setup(guest: Guest, spec: CommandSpec, timeout_s: float) -> None:
    if not spec.setup.strip():
        return
    result = guest.ssh(spec.setup, timeout=timeout_s, check=False)
    if result.exit_status != 0:
        tail = (result.stdout + result.stderr).strip()[-300:]
        raise CommandError(f"the setup command exited {result.exit_status} in {guest.config.name}: {tail}")


def run(guest: Guest, spec: CommandSpec, memory_max: str, timeout_s: float) -> dict[str, Any]:
    """Run, then verify; the workload's result (JSON-ready)."""
    started = time.monotonic()
    ran = guestops.run_in_cgroup(guest, spec.run, memory_max, timeout_s)
    total_s = time.monotonic() - started
    output = ran.stdout + ran.stderr
    verify_exit = 0
    verify_tail = ""
    if ran.exit_status == 0 and spec.verify.strip():
        checked = guest.ssh(spec.verify, timeout=timeout_s, check=False)
        verify_exit = checked.exit_status
        verify_tail = (checked.stdout + checked.stderr)[-OUTPUT_TAIL_CHARS:]
    metric = parse_metric(spec.metric, output)
    result: dict[str, Any] = {
        "total_s": round(total_s, 3), "run_exit": ran.exit_status, "verify_exit": verify_exit,
        "verified": ran.exit_status == 0 and verify_exit == 0,
        "metric_name": spec.metric_name, "metric": metric,
        "output_tail": output[-OUTPUT_TAIL_CHARS:],
    }
    if spec.metric and metric is None:
        result["metric_error"] = f"no match for {spec.metric!r} in run's output"
    if verify_tail:
        result["verify_tail"] = verify_tail
    return result
