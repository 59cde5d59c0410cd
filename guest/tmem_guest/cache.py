"""Cleancache via FUSE: a passthrough file system whose reads go through tmem.

Kernels without cleancache hooks give us no "page evicted" event, so the agent
interposes where it can: a pyfuse3 passthrough mount over a directory (on the
data disk). One ephemeral pool per mount; object = (backing inode, 0, 0),
index = page number in the file. A read asks tmem first (one GET_BATCH for the
read's pages); on a miss it reads the backing file and PUTs the missing pages.
Writes, truncation, unlink and rename-over invalidate what they change.

Page cache: files are opened with keep_cache, i.e. the guest page cache works as
usual and keeps file pages across opens; reads reach the agent (and tmem) only
when the guest evicted those pages, as with real cleancache. tmem is thus a
second-level cache behind the guest's own (inclusive: the first read of a page
also puts it). The backing files are read with POSIX_FADV_DONTNEED afterwards so
the guest does not cache the same bytes twice (once per file system).

The tmem side (read-through fills and invalidations, and why no fill leaves a
stale page) is tmem_guest.readthrough. Changes made to the backing directory behind the
mount's back are not seen.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from tmem_guest.counters import Counters, write_text_atomically
from tmem_guest.readthrough import PageCacheBridge
from tmem_guest.session import Session, SessionPool
from tmem_wire.frontswap import page_span

T = TypeVar("T")

# How long the kernel may keep a name's lookup and a file's attributes. Every
# change goes through this mount, and the kernel updates or drops what it cached
# for each (a write, truncate, rename, unlink), so they stay true. With a timeout
# of 0 the kernel asked for the attributes again before every read() (GETATTR:
# a round trip to this process for each, the page cache hit or not), because
# auto_inval_data checks the file's mtime first.
ATTRIBUTE_TIMEOUT_S = 3600.0


class CacheFs(pyfuse3.Operations):  # type: ignore[misc]
    """Passthrough operations; every content change goes through PageCacheBridge."""

    enable_writeback_cache = False  # writes must reach us (and invalidate) at once

    def __init__(self, source: Path, bridge: PageCacheBridge) -> None:
        super().__init__()
        self.bridge = bridge
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: os.fspath(source)}
        self._lookups: defaultdict[int, int] = defaultdict(int)
        self._fd_inode: dict[int, int] = {}

    # -- helpers -----------------------------------------------------------------

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _attributes(self, path: str | None = None, fd: int | None = None) -> Any:
        try:
            info = os.fstat(fd) if fd is not None else os.lstat(path or "")
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        entry = pyfuse3.EntryAttributes()
        for name in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks"):
            setattr(entry, name, getattr(info, name))
        if path == self._paths[pyfuse3.ROOT_INODE]:
            entry.st_ino = pyfuse3.ROOT_INODE
        entry.generation = 0
        entry.entry_timeout = ATTRIBUTE_TIMEOUT_S
        entry.attr_timeout = ATTRIBUTE_TIMEOUT_S
        return entry

    def _remember(self, path: str) -> Any:
        entry = self._attributes(path)
        self._paths[entry.st_ino] = path
        self._lookups[entry.st_ino] += 1
        return entry

    async def _in_thread(self, function: Callable[..., T], *arguments: Any) -> T:
        try:
            return await trio.to_thread.run_sync(function, *arguments)  # type: ignore[no-any-return]
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno or errno.EIO) from None

    # -- names -------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._remember(self._child(parent_inode, name))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self._lookups[inode] -= count
            if self._lookups[inode] <= 0 and inode != pyfuse3.ROOT_INODE:
                del self._lookups[inode]
                if inode not in self._fd_inode.values():
                    self._paths.pop(inode, None)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        self.bridge.counters.add(attribute_requests=1)
        return self._attributes(self._path(inode))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        path = self._path(inode)
        try:
            if fields.update_size:
                self.bridge.begin_change(inode)
                try:
                    os.truncate(path, attr.st_size)
                    self.bridge.invalidate_file(inode)
                finally:
                    self.bridge.end_change(inode)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                current = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns),
                         follow_symlinks=False)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        return self._attributes(path)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        try:
            return os.fsencode(os.readlink(self._path(inode)))
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, inode: int, start_id: int, token: Any) -> None:
        path = self._path(inode)
        try:
            names = sorted(os.listdir(path))
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        for position, name in enumerate(names[start_id:], start_id + 1):
            entry = self._attributes(os.path.join(path, name))
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, position):
                break
            self._paths[entry.st_ino] = os.path.join(path, name)
            self._lookups[entry.st_ino] += 1

    async def releasedir(self, fh: int) -> None:
        return None

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode & ~ctx.umask)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        return self._remember(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        try:
            os.rmdir(self._child(parent_inode, name))
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        try:
            inode = os.lstat(path).st_ino
            os.unlink(path)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        # The inode number may be reused by a new file: its pages must not survive.
        await self._in_thread(self.bridge.invalidate_file, inode)

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int, ctx: Any) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_old, name_old), self._child(parent_new, name_new)
        try:
            replaced = os.lstat(new).st_ino
        except FileNotFoundError:
            replaced = None
        try:
            os.rename(old, new)
            moved = os.lstat(new).st_ino
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        if moved in self._paths:
            self._paths[moved] = new
        if replaced is not None and replaced != moved:
            await self._in_thread(self.bridge.invalidate_file, replaced)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        try:
            os.symlink(os.fsdecode(target), path)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        return self._remember(path)

    async def link(self, inode: int, parent_new: int, name_new: bytes, ctx: Any) -> Any:
        path = self._child(parent_new, name_new)
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        return self._remember(path)

    async def statfs(self, ctx: Any) -> Any:
        info = os.statvfs(self._paths[pyfuse3.ROOT_INODE])
        result = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(result, name, getattr(info, name))
        return result

    # -- files -------------------------------------------------------------------

    def _opened(self, fd: int, inode: int) -> Any:
        self._fd_inode[fd] = inode
        return pyfuse3.FileInfo(fh=fd, keep_cache=True)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        if flags & os.O_TRUNC:
            await self._in_thread(self.bridge.invalidate_file, inode)
        return self._opened(fd, inode)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode & ~ctx.umask)
        except OSError as error:
            raise pyfuse3.FUSEError(error.errno) from None
        entry = self._remember(path)
        await self._in_thread(self.bridge.invalidate_file, entry.st_ino)
        return self._opened(fd, entry.st_ino), entry

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self._in_thread(self.bridge.read, fh, self._fd_inode[fh], offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self._in_thread(self._write, fh, self._fd_inode[fh], offset, data)

    def _write(self, fd: int, inode: int, offset: int, data: bytes) -> int:
        started = time.monotonic()
        self.bridge.begin_change(inode)
        try:
            written = os.pwrite(fd, data, offset)
            self.bridge.invalidate_pages(inode, page_span(offset, written))
        finally:
            self.bridge.end_change(inode)
        self.bridge.counters.add(requests=1)
        self.bridge.counters.observe("fuse_write", time.monotonic() - started)
        return written

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._in_thread(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh: int) -> None:
        self._fd_inode.pop(fh, None)
        os.close(fh)


def serve_cache(
    session: Session,
    pool: SessionPool,
    counters: Counters,
    source: Path,
    mountpoint: Path,
    *,
    ready: Path,
    stopping: threading.Event,
) -> None:
    """Mount, write `ready`, serve until `stopping` is set, unmount."""
    operations = CacheFs(source, PageCacheBridge(session, pool, counters))
    options = set(pyfuse3.default_options)
    options.add("fsname=tmemcache")
    mountpoint.mkdir(parents=True, exist_ok=True)
    pyfuse3.init(operations, os.fspath(mountpoint), options)

    async def watch_stop() -> None:
        while not stopping.is_set():
            await trio.sleep(0.2)
        pyfuse3.terminate()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            nursery.start_soon(watch_stop)
            write_text_atomically(ready, f"{os.getpid()}\n")  # never read half-written

    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
