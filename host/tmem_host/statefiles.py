"""tmemd's files on disk: safe opening, space reservation, directory checks.

Every file tmemd keeps for a guest (its journal, its NBD fallback file) is
opened through `open_state_file`: never through a symlink (a link planted in
the state dir must not make root's tmemd truncate or grow its target), never
inherited by a child, and private to tmemd's user. `fallocate` reserves disk
blocks so that one guest's files cannot take the space another guest's need
(docs/RELIABILITY.md, "Disk space").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from pathlib import Path
from typing import Any, Final

# linux/falloc.h
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10

STATE_FILE_MODE: Final = 0o600


class UnsafePath(OSError):
    """A state directory or file tmemd must not use; the message says why and what to do."""


def open_state_file(path: Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """Open a guest's state file: no symlink followed, close-on-exec, mode 0600."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, STATE_FILE_MODE)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafePath(errno.ELOOP, f"{path} is a symbolic link: tmemd never follows one "
                             "in its state dir (remove it)") from None
        raise


def _load_fallocate() -> Any:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    function = getattr(ctypes.CDLL(libc_name, use_errno=True), "fallocate", None)
    if function is not None:
        function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError(EOPNOTSUPP) where libc or the file system lacks it."""
    if length <= 0:
        return
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"fallocate: {os.strerror(code)}")


def unsupported(error: OSError) -> bool:
    """Whether a fallocate error means 'this file system cannot', not a failure."""
    return error.errno in (errno.EOPNOTSUPP, errno.ENOSYS)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` survive a host crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_private_dir(path: Path, what: str, *, group_access: bool = False) -> None:
    """Create ``path`` (0700, or 0750 when a socket group must reach it) or check the
    one that is there: a real directory owned by tmemd's user that nobody else can
    write to. Anyone who can write to it could plant links or swap files under tmemd."""
    try:
        path.mkdir(mode=0o750 if group_access else 0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
    except OSError as error:
        raise UnsafePath(error.errno, f"{what} {path}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(errno.ENOTDIR, f"{what} {path} is not a directory (a symlink?)")
    if info.st_uid != os.geteuid():
        raise UnsafePath(errno.EPERM, f"{what} {path} belongs to uid {info.st_uid}, not to "
                         f"tmemd's uid {os.geteuid()}: chown it or choose another")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafePath(errno.EPERM, f"{what} {path} is writable by others (mode "
                         f"{stat.S_IMODE(info.st_mode):04o}): chmod go-w it")
