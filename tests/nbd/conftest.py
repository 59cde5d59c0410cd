"""Fixtures for the NBD export tests: a real tmemd and real NBD clients (qemu-io, libnbd)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.replies import NbdExportStats

CAPPED_GUEST = "small"
CAP_BYTES = 256 * 1024


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install the packages in ci/system-packages.txt")
    return path


def nbd_uri(daemon: TmemdProcess, guest: str, export: str | None = None) -> str:
    return f"nbd+unix:///{guest if export is None else export}?socket={daemon.nbd_socket(guest)}"


def run_tool(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    require_tool(args[0])
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n"
                             f"stdout: {result.stdout}\nstderr: {result.stderr}")
    return result


def qemu_io(daemon: TmemdProcess, guest: str, *commands: str,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run qemu-io commands against a guest's export; it exits 1 if any failed."""
    args = ["qemu-io", "-f", "raw", nbd_uri(daemon, guest)]
    for command in commands:
        args += ["-c", command]
    result = run_tool(*args, check=check)
    if check:
        assert "verification failed" not in result.stdout, result.stdout
    return result


def export_stats(daemon: TmemdProcess, guest: str) -> NbdExportStats:
    with daemon.control() as control:
        return control.stats()["nbd"][guest]


@pytest.fixture
def tmemd(start_tmemd: StartTmemd) -> TmemdProcess:
    """Overrides the suite's tmemd: guests g1, g2 and one capped at 256 KiB, 64 MiB exports."""
    return start_tmemd(guests=("g1", "g2", f"{CAPPED_GUEST}:cap={CAP_BYTES}"), budget="64M",
                       extra_args=("--nbd-size", "64M"))
