"""Fixtures shared by every test folder: a real tmemd in a temporary run dir."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
