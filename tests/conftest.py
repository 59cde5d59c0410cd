"""Fixtures shared by every test folder: a real tmemd in a temporary run dir, and
small file systems of their own (to fill)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tmem_host.daemon.process import StartTmemd, TmemdProcess


@pytest.fixture
def start_tmemd(tmp_path: Path) -> Iterator[StartTmemd]:
    """Start tmemd subprocesses (`start_tmemd(guests=..., budget=..., extra_args=...)`);
    each is stopped with SIGTERM at teardown and must exit 0."""
    started: list[TmemdProcess] = []

    def start(*, guests: Sequence[str] = ("g1", "g2"), budget: str = "64M",
              extra_args: Sequence[str] = (), run_dir: Path | None = None) -> TmemdProcess:
        daemon = TmemdProcess(run_dir or tmp_path / f"run{len(started)}", budget=budget,
                              guests=guests, extra_args=extra_args)
        started.append(daemon)
        return daemon.start()

    yield start
    failures = []
    for daemon in started:
        was_alive = daemon.alive()
        code = daemon.terminate()
        if was_alive and code != 0:
            failures.append(f"tmemd exited {code} on SIGTERM\n{daemon.log_tail()}")
    assert not failures, "\n".join(failures)


@pytest.fixture
def tmemd(start_tmemd: StartTmemd) -> TmemdProcess:
    """tmemd with guests g1 and g2 and a 64 MiB budget."""
    return start_tmemd()


@pytest.fixture
def mount_tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """``mount_tmpfs(name, size)``: a tmpfs of that size under tmp_path (a file system
    a test can fill); unmounted at teardown. Skips where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        mount_point = tmp_path / name
        mount_point.mkdir(mode=0o700)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                                 str(mount_point)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)
