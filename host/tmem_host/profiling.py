"""Where a running tmemd spends its time: py-spy (a sampling profiler, PyPI) reads
the process's Python stacks from outside, without changing or restarting it.

`sampled()` records while a block runs (py-spy's raw format: one line per distinct
stack, `frame;frame;...;frame count`, outermost first) and `Profile` folds those
stacks into the functions that hold the samples: self (the frame on top) and total
(anywhere on the stack). Idle samples (a thread waiting in epoll or on a lock) are kept,
so `busy_share` says how much of its threads' time tmemd worked at all.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Samples a second: enough for a few-second profile, little overhead on tmemd.
DEFAULT_RATE = 250
# py-spy attaches in well under this; a sampler that did not start is an error,
# not an empty profile.
ATTACH_S = 0.5
# A frame as py-spy writes it: "function (path/to/file.py:123)"; the line is
# dropped so that one function's lines add up.
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
# What comes before a module's path: the checkout, site-packages, the stdlib.
_MODULE_ROOT = re.compile(r"^.*/(?:(?=tmem_host/|tmem_wire/)|site-packages/|lib/python3\.\d+/)")
# Where a thread waits: the sample is idle when one of these is on top (the event
# loop's own _run_once on top is the loop working, not waiting).
IDLE_FUNCTIONS = frozenset({"select", "poll", "epoll", "wait"})


class ProfilerError(Exception):
    """py-spy is missing, could not attach, or wrote no samples."""


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    # The module, not the machine's path: tmem_host/store/store.py, lz4/block.py,
    # asyncio/events.py (py-spy shortens most paths so already).
    path = _MODULE_ROOT.sub("", match["file"])
    return f"{match['function']} ({path})"


def _bare_function(frame: str) -> str:
    """"EpollSelector.select (selectors.py)" -> "select"."""
    return frame.split(" (", 1)[0].rsplit(".", 1)[-1]


@dataclass(frozen=True)
class FunctionShare:
    function: str
    self_share: float  # of all samples, idle included
    total_share: float


class Profile:
    """Stacks and their sample counts, from py-spy's raw output."""

    def __init__(self, stacks: Counter[tuple[str, ...]]) -> None:
        self.stacks = stacks
        self.samples = sum(stacks.values())

    @classmethod
    def load(cls, path: Path) -> Profile:
        stacks: Counter[tuple[str, ...]] = Counter()
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            stacks[tuple(_frame_name(frame) for frame in stack.split(";"))] += int(count)
        return cls(stacks)

    def _idle(self, stack: tuple[str, ...]) -> bool:
        return _bare_function(stack[-1]) in IDLE_FUNCTIONS

    @property
    def busy_share(self) -> float:
        if not self.samples:
            return 0.0
        return sum(count for stack, count in self.stacks.items() if not self._idle(stack)) / self.samples

    def top(self, count: int = 15) -> list[FunctionShare]:
        """The functions with the most samples on top (idle waiting left out)."""
        own: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for stack, samples in self.stacks.items():
            if self._idle(stack):
                continue
            own[stack[-1]] += samples
            for function in set(stack):
                total[function] += samples
        scale = 1 / max(1, self.samples)
        return [FunctionShare(function, samples * scale, total[function] * scale)
                for function, samples in own.most_common(count)]

    def total_share(self, function: str) -> float:
        """The share of samples with ``function`` (a method of any class) anywhere on the stack."""
        samples = sum(count for stack, count in self.stacks.items()
                      if any(_bare_function(frame) == function for frame in stack))
        return samples / max(1, self.samples)


def py_spy() -> str:
    # The virtual environment's, when tmemd runs from it without it on PATH.
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        raise ProfilerError("py-spy is missing: `make deps` installs it (the dev extra)")
    return binary


@contextmanager
def sampled(pid: int, output: Path, *, rate: int = DEFAULT_RATE) -> Iterator[None]:
    """py-spy samples process ``pid`` (every thread, idle ones too) while the
    block runs; its raw stacks are in ``output`` afterwards (ProfilerError if
    py-spy failed or took no sample)."""
    output.unlink(missing_ok=True)
    log = output.with_suffix(".log")
    with log.open("wb") as log_file:
        sampler = subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--rate", str(rate), "--idle",
             "--format", "raw", "--output", str(output)],
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # py-spy says nothing when it has attached: give it a moment, and fail
        # early if it exited (no permission to ptrace, no such process).
        time.sleep(ATTACH_S)
        if sampler.poll() is not None:
            raise ProfilerError(f"py-spy exited ({sampler.returncode}): {log.read_text()[-500:]}")
        yield
    finally:
        if sampler.poll() is None:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                sampler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sampler.kill()
                sampler.wait()
    if not output.exists() or not output.read_text().strip():
        raise ProfilerError(f"py-spy wrote no samples: {log.read_text()[-500:]}")
