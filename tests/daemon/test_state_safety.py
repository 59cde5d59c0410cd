"""tmemd's sockets and state files against other local users and a full disk:
sockets are 0600 (or 0660 for a configured group) whatever the umask, a symlink
planted in the state dir is never followed, an unsafe state dir stops tmemd with
one line, and two guests sharing a small state dir cannot take each other's disk
space (docs/RELIABILITY.md, "Threat model" and "Disk space")."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tmem_host.daemon.control import CONTROL_SOCKET_NAME
from tmem_host.daemon.process import StartTmemd, TmemdFailed, TmemdProcess
from tmem_host.nbd.client import NbdClient
from tmem_wire import nbd
from tmem_workloads.usemem import expected_page, page_templates

PAGE = 4096
NOBODY = 65534  # uid of 'nobody' and gid of 'nogroup' on Debian
TEMPLATES = page_templates(3)

CONNECT_AS_OTHER_USER = """
import socket, sys
for path in sys.argv[1:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        print("connected", path)
    except PermissionError:
        print("refused", path)
    finally:
        s.close()
"""


def other_user_connects(paths: list[Path], *, group: int = NOBODY) -> dict[str, str]:
    """Try each socket as uid nobody (and the given gid): {path: connected|refused}."""
    # The system's python: the venv's lives where only root may look.
    result = subprocess.run(["/usr/bin/python3", "-c", CONNECT_AS_OTHER_USER, *map(str, paths)],
                            user=NOBODY, group=group, extra_groups=[], capture_output=True,
                            text=True, timeout=30, check=True)
    return {path: outcome for outcome, path in
            (line.split(" ", 1) for line in result.stdout.splitlines())}


def sockets_of(daemon: TmemdProcess) -> list[Path]:
    return [daemon.abi_socket("g1"), daemon.nbd_socket("g1"), daemon.abi_socket("g2"),
            daemon.run_dir / CONTROL_SOCKET_NAME]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's own are root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tmem-sockets-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """tmemd started under umask 000 (inherited by the child)."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_local_user_is_refused_by_every_socket_under_umask_000(
        start_tmemd: StartTmemd, public_dir: Path, open_umask: None) -> None:
    run_dir = public_dir / "run"
    run_dir.mkdir(mode=0o755)  # others may reach the sockets: their modes must stop them
    daemon = start_tmemd(run_dir=run_dir)
    for path in sockets_of(daemon):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert set(other_user_connects(sockets_of(daemon)).values()) == {"refused"}
    for state_file in (run_dir / "g1.journal", run_dir / "g1.fallback", run_dir / "tmemd.pid"):
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600, state_file
    # Root still gets in: the sockets work.
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.write(0, bytes(PAGE)) == nbd.Error.OK
    # What umask 000 would have given a socket: the other user gets in (the check works).
    os.chmod(daemon.nbd_socket("g1"), 0o777)
    assert other_user_connects([daemon.nbd_socket("g1")]) == {
        str(daemon.nbd_socket("g1")): "connected"}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_socket_group_lets_its_members_in_and_nobody_else(
        start_tmemd: StartTmemd, public_dir: Path, open_umask: None) -> None:
    (public_dir / "run").mkdir(mode=0o700)
    daemon = start_tmemd(run_dir=public_dir / "run", extra_args=("--socket-group", "nogroup"))
    for path in sockets_of(daemon):
        info = path.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, NOBODY), path
    run_dir = daemon.run_dir.stat()  # the group may search it, no more
    assert (stat.S_IMODE(run_dir.st_mode), run_dir.st_gid) == (0o750, NOBODY)
    assert set(other_user_connects(sockets_of(daemon)).values()) == {"connected"}
    root_group = other_user_connects(sockets_of(daemon), group=0)
    assert set(root_group.values()) == {"refused"}


@pytest.mark.parametrize("planted", ["g1.fallback", "g1.journal"])
def test_a_planted_symlink_is_never_followed(start_tmemd: StartTmemd, tmp_path: Path,
                                             planted: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_bytes(b"not tmemd's" * 100)
    (state / planted).symlink_to(target)
    with pytest.raises(TmemdFailed) as failed:
        start_tmemd(guests=("g1",), extra_args=("--state-dir", str(state), "--nbd-size", "16M"))
    assert "symbolic link" in str(failed.value) and "Traceback" not in str(failed.value)
    assert target.read_bytes() == b"not tmemd's" * 100
    assert (state / planted).is_symlink()


@pytest.mark.parametrize("problem", ["world-writable", "other owner"])
def test_an_unsafe_state_dir_stops_tmemd_with_one_line(tmp_path: Path, problem: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    if problem == "world-writable":
        os.chmod(state, 0o777)
    else:
        os.chown(state, NOBODY, NOBODY)
    result = subprocess.run(
        [sys.executable, "-m", "tmem_host.daemon.main", "--run-dir", str(tmp_path / "run"),
         "--budget", "16M", "--guest", "g1", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "cannot start" in errors[0] and "state dir" in errors[0], result.stderr
    assert list(state.iterdir()) == []


def page(number: int) -> bytes:
    return expected_page(TEMPLATES, 3, number)


@pytest.fixture
def small_state_dir(mount_tmpfs: Callable[[str, str], Path]) -> Path:
    """A 56 MiB file system of its own (tmpfs)."""
    return mount_tmpfs("state", "56M")


def fill_the_disk(directory: Path) -> int:
    """What another process (or a runaway guest) does: write until ENOSPC."""
    written = 0
    with (directory / "filler").open("wb") as filler:
        chunk = b"\xee" * (1 << 20)
        try:
            while True:
                filler.write(chunk)
                filler.flush()
                written += len(chunk)
        except OSError:
            pass
    return written


def test_two_guests_sharing_a_small_state_dir_keep_their_own_space(
        start_tmemd: StartTmemd, small_state_dir: Path) -> None:
    # g1's pages are all refused (cap): everything it writes lands in its fallback file.
    daemon = start_tmemd(guests=("g1:cap=64K", "g2"), budget="64M",
                         extra_args=("--state-dir", str(small_state_dir), "--nbd-size", "16M",
                                     "--journal-reserve", "8M"))
    fill_the_disk(small_state_dir)
    g1_pages = 16 << 20 >> 12
    with NbdClient(daemon.nbd_socket("g1"), "g1") as g1, \
            NbdClient(daemon.nbd_socket("g2"), "g2") as g2:
        for first in range(0, g1_pages, 256):  # the whole export, in 1 MiB writes
            data = b"".join(os.urandom(PAGE) for _ in range(256))
            assert g1.write(first * PAGE, data) == nbd.Error.OK, first
        for first in range(0, 1024, 64):  # 4 MiB into tmem: about as much journal
            assert g2.write(first * PAGE, b"".join(page(n) for n in range(first, first + 64))) \
                == nbd.Error.OK
    with daemon.control() as control:
        stats = control.request("stats")
    assert stats["nbd"]["g1"]["pages_refused_fallback"] > g1_pages - 64
    assert not stats["journal"]["g2"]["broken"] and stats["journal"]["g2"]["write_errors"] == 0
    daemon.crash_and_restart()  # on the full disk
    with NbdClient(daemon.nbd_socket("g2"), "g2") as g2:
        for first in range(0, 1024, 64):
            assert g2.read(first * PAGE, 64 * PAGE) == (
                nbd.Error.OK, b"".join(page(n) for n in range(first, first + 64)))
    # No leftovers grow on the full disk: each guest has its journal and fallback file.
    assert sorted(path.name for path in small_state_dir.iterdir()) == [
        "filler", "g1.fallback", "g1.journal", "g2.fallback", "g2.journal"]


def test_a_guest_that_does_not_fit_the_disk_is_refused_at_start(
        small_state_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tmem_host.daemon.main", "--run-dir", str(tmp_path / "run"),
         "--budget", "16M", "--guest", "g1", "--state-dir", str(small_state_dir),
         "--nbd-size", "1G"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "cannot start" in line]
    assert len(errors) == 1 and "no room to preallocate" in errors[0], result.stderr
    assert list(small_state_dir.iterdir()) == []
