"""The calibration benchmark: fixed work, timed, the same code in guest and host."""

from __future__ import annotations

import json
import subprocess
import sys

from tmem_workloads import cpubench


def test_the_work_is_deterministic_and_sized_by_scale() -> None:
    assert cpubench.python_work(1000) == cpubench.python_work(1000) != cpubench.python_work(999)
    small, large = cpubench.lz4_work(64), cpubench.lz4_work(128)
    assert 0 < small < 64 * 4096 and large == 2 * small  # usemem's mix compresses; 64 templates repeat


def test_the_command_prints_one_result_line() -> None:
    completed = subprocess.run([sys.executable, "-m", "tmem_workloads.cpubench", "--scale", "0.01",
                                "--trials", "2"], capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout)
    assert result["python_rounds"] == 10_000 and result["lz4_pages"] == 327
    assert result["python_s"] > 0 and result["lz4_s"] > 0
