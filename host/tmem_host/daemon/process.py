"""Run a real tmemd as a child process: for the tests, the bench and the fuzzer.

The daemon's stderr (its log) goes to `RUN_DIR/tmemd.log`; its stdout carries
only the ready line, which `start()` waits for.
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tmem_host.daemon.control import ControlClient
from tmem_host.daemon.runtime import abi_socket_path, nbd_socket_path, disk_socket_path
from tmem_host.daemon.server import READY_LINE
from tmem_host.testbed.hostmetrics import process_usage
from tmem_host.waiting import wait_until

LOG_FILE_NAME = "tmemd.log"


class TmemdFailed(RuntimeError):
    """tmemd exited or never became ready; the message carries its log tail."""


class TmemdProcess:
    def __init__(
        self,
        run_dir: Path,
        *,
        budget: str = "256M",
        guests: Sequence[str] = ("g1", "g2"),
        extra_args: Sequence[str] = (),
        rlimit_nofile: int | None = None,
        nbd_size: str = "64M",
        journal_reserve: str = "4M",
        environment: Mapping[str, str] | None = None,
    ) -> None:
        """``rlimit_nofile``: start tmemd with this soft and hard RLIMIT_NOFILE (a
        test of descriptor exhaustion; tmemd itself raises the soft limit to the hard).
        ``nbd_size`` and ``journal_reserve``: small by default (tmemd's own defaults
        are 1G and 64M), because tmemd preallocates both on disk for every guest and
        keeps them across stops: a test suite starts a hundred tmemds. A
        ``--nbd-size`` or ``--journal-reserve`` in ``extra_args`` wins."""
        self.run_dir = Path(run_dir)
        self.rlimit_nofile = rlimit_nofile
        # Added to tmemd's environment at each start (e.g. TMEMD_FAILPOINTS; a test
        # may change it between restarts).
        self.environment: dict[str, str] = dict(environment or {})
        self.args = [
            sys.executable, "-m", "tmem_host.daemon.main",
            "--run-dir", str(self.run_dir), "--budget", budget,
            *(arg for spec in guests for arg in ("--guest", spec)),
            "--nbd-size", nbd_size, "--journal-reserve", journal_reserve,
            *extra_args,
        ]
        self.log_path = self.run_dir / LOG_FILE_NAME
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise TmemdFailed("tmemd was not started")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> TmemdProcess:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                self.args, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.environment},
                preexec_fn=self._limit_descriptors if self.rlimit_nofile is not None else None,
            )
        self._wait_ready(timeout)
        return self

    def _limit_descriptors(self) -> None:
        """In the child, before exec."""
        assert self.rlimit_nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.rlimit_nofile, self.rlimit_nofile))

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        output = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while READY_LINE.encode() not in output:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    self.kill()
                    raise TmemdFailed(f"tmemd not ready after {timeout} s\n{self.log_tail()}")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.proc.wait()
                    self._close_pipes()
                    raise TmemdFailed(
                        f"tmemd exited with {self.proc.returncode}\n{self.log_tail()}"
                    )
                output += chunk

    def abi_socket(self, guest: str) -> Path:
        return abi_socket_path(self.run_dir, guest)

    def nbd_socket(self, guest: str) -> Path:
        return nbd_socket_path(self.run_dir, guest)

    def disk_socket(self, guest: str) -> Path:
        """The guest's cached disk (guest option cached-disk=PATH)."""
        return disk_socket_path(self.run_dir, guest)

    def control(self) -> ControlClient:
        return ControlClient(self.run_dir)

    def rss_bytes(self) -> int:
        """tmemd's resident memory now (VmRSS), as the testbed reads it."""
        usage = process_usage(self.pid)
        if usage is None:
            raise TmemdFailed(f"tmemd (pid {self.pid}) is gone\n{self.log_tail()}")
        return usage.rss_bytes

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; return the exit code (kill and raise if it hangs)."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise TmemdFailed(f"tmemd ignored SIGTERM for {timeout} s\n{self.log_tail()}")
        self._close_pipes()
        return self._proc.returncode

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_pipes()

    def crash_and_restart(self, downtime: float = 0.0, timeout: float = 20.0, *,
                          when: Callable[[], bool] | None = None, wait_s: float = 60.0) -> None:
        """SIGKILL tmemd (no cleanup: sockets, pid file and journals stay), wait
        ``downtime`` seconds, start it again with the same arguments and state dir.
        ``when``: first poll it until it is true (TimeoutError after ``wait_s``), so a
        test kills tmemd in the middle of a workload rather than before it."""
        _wait_for(when, wait_s)
        self.kill()
        time.sleep(downtime)
        self.start(timeout)

    def restart(self, downtime: float = 0.0, timeout: float = 20.0, *,
                when: Callable[[], bool] | None = None, wait_s: float = 60.0) -> None:
        """Stop tmemd gracefully (SIGTERM; it must exit 0) and start it again with
        the same arguments: what a `systemctl restart` or an upgrade does. ``when``
        as for crash_and_restart."""
        _wait_for(when, wait_s)
        code = self.terminate()
        if code != 0:
            raise TmemdFailed(f"tmemd exited {code} on SIGTERM\n{self.log_tail()}")
        time.sleep(downtime)
        self.start(timeout)

    def _close_pipes(self) -> None:
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> TmemdProcess:
        return self.start() if self._proc is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.terminate()


def _wait_for(condition: Callable[[], bool] | None, wait_s: float) -> None:
    """Poll ``condition`` until it holds; TimeoutError after ``wait_s`` seconds."""
    if condition is not None and not wait_until(condition, wait_s):
        raise TimeoutError(f"the restart condition did not hold within {wait_s} s")


# The type of the tests' `start_tmemd` fixture (tests/conftest.py).
StartTmemd = Callable[..., TmemdProcess]
