"""The cached disk (nbd.readcache): a data disk image read through the guest's
ephemeral pool, against a real tmemd, with the test suite's NBD client and qemu-io.

The invalidation rules: a read after a write, a TRIM or WRITE_ZEROES sees the new
content, never the cached one; an evicted page is read from the image again; a
restarted tmemd starts with an empty cache.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from tmem_host.daemon.process import StartTmemd, TmemdProcess, TmemdFailed
from tmem_host.nbd.client import ClientRequest, NbdClient
from tmem_host.replies import CachedDiskStats
from tmem_wire import nbd

from .conftest import run_tool

PAGE = 4096
DISK_PAGES = 2048  # 8 MiB


def page(tag: int, number: int) -> bytes:
    """A page no other (tag, number) has, half compressible like real data."""
    rng = random.Random(tag << 32 | number)
    return rng.randbytes(PAGE // 2) + bytes([number & 0xFF]) * (PAGE // 2)


def make_image(path: Path, tag: int, pages: int = DISK_PAGES) -> Path:
    path.write_bytes(b"".join(page(tag, number) for number in range(pages)))
    return path


def disk_stats(daemon: TmemdProcess, guest: str = "d1") -> CachedDiskStats:
    with daemon.control() as control:
        return control.stats()["cached_disks"][guest]


def start_with_disk(start_tmemd: StartTmemd, image: Path, budget: str = "64M",
                    more: tuple[str, ...] = ()) -> TmemdProcess:
    return start_tmemd(guests=(f"d1:cached-disk={image}", *more), budget=budget)


def read_all(client: NbdClient, pages: int = DISK_PAGES, chunk: int = 64) -> bytes:
    out = []
    for first in range(0, pages, chunk):
        error, data = client.read(first * PAGE, min(chunk, pages - first) * PAGE)
        assert error == 0, f"read at page {first}: error {error}"
        out.append(data)
    return b"".join(out)


def test_reads_fill_the_cache_and_hit_it_the_second_time(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    image = make_image(tmp_path / "data.img", tag=1)
    expected = image.read_bytes()
    daemon = start_with_disk(start_tmemd, image)
    with NbdClient(daemon.disk_socket("d1"), "d1") as client:
        assert client.negotiated is not None and client.negotiated.size == DISK_PAGES * PAGE
        assert read_all(client) == expected
        first = disk_stats(daemon)
        assert first["pages_read_backing"] == DISK_PAGES and first["pages_read_cache"] == 0
        assert first["pages_cached"] == DISK_PAGES == first["pages_cached_now"]
        assert read_all(client) == expected
    second = disk_stats(daemon)
    assert second["pages_read_cache"] == DISK_PAGES and second["pages_read_backing"] == DISK_PAGES
    # The image is read past the host page cache where the file system allows it
    # (ext4 here): the cache is tmem's alone.
    assert second["direct_io"]
    # Inclusive gets: a hit keeps the page (a block device never learns that the
    # guest dropped it).
    assert second["pages_cached_now"] == DISK_PAGES


def test_writes_trims_and_zeroes_after_cached_reads_are_never_served_stale(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    image = make_image(tmp_path / "data.img", tag=2)
    expected = bytearray(image.read_bytes())
    daemon = start_with_disk(start_tmemd, image)
    with NbdClient(daemon.disk_socket("d1"), "d1") as client:
        assert read_all(client) == expected  # every page cached
        # A write over cached pages, partly past a cached range.
        new = b"".join(page(3, number) for number in range(8))
        assert client.write(100 * PAGE, new) == 0
        expected[100 * PAGE : 108 * PAGE] = new
        # A TRIM and a WRITE_ZEROES over cached pages.
        reply = client.call(ClientRequest(nbd.Command.TRIM, 200 * PAGE, 16 * PAGE))
        assert reply.error == 0
        expected[200 * PAGE : 216 * PAGE] = bytes(16 * PAGE)
        reply = client.call(ClientRequest(nbd.Command.WRITE_ZEROES, 300 * PAGE, 4 * PAGE))
        assert reply.error == 0
        expected[300 * PAGE : 304 * PAGE] = bytes(4 * PAGE)
        stats = disk_stats(daemon)
        assert stats["pages_invalidated"] == 8 + 16 + 4
        assert read_all(client) == expected
        assert client.call(ClientRequest(nbd.Command.FLUSH, 0, 0)).error == 0
    # The writes reached the image itself.
    assert image.read_bytes() == bytes(expected)
    stats = disk_stats(daemon)
    assert stats["pages_written"] == 8 and stats["trims"] == 1 and stats["zeroes"] == 1
    assert stats["flushes"] == 1 and stats["fallback_errors"] == 0


def test_evicted_pages_are_read_from_the_image_again(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    # A 4 MiB budget against an 8 MiB disk (about half compressible): the cache
    # keeps part of it, and another guest's swap pages (persistent) evict the rest.
    image = make_image(tmp_path / "data.img", tag=4)
    expected = image.read_bytes()
    daemon = start_with_disk(start_tmemd, image, budget="4M", more=("swapper",))
    with NbdClient(daemon.disk_socket("d1"), "d1") as client:
        assert read_all(client) == expected
        stats = disk_stats(daemon)
        assert 0 < stats["pages_cached_now"] < DISK_PAGES
        with NbdClient(daemon.nbd_socket("swapper"), "swapper") as swap:
            for first in range(0, 1024, 64):  # 4 MiB of incompressible swap pages
                assert swap.write(first * PAGE, os.urandom(64 * PAGE)) == 0
        evicted = disk_stats(daemon)
        assert evicted["pages_cached_now"] < stats["pages_cached_now"]
        assert read_all(client) == expected
        again = disk_stats(daemon)
        assert again["pages_read_backing"] - evicted["pages_read_backing"] >= DISK_PAGES - stats["pages_cached_now"]


def test_a_restarted_tmemd_starts_with_an_empty_cache(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    image = make_image(tmp_path / "data.img", tag=5)
    daemon = start_with_disk(start_tmemd, image)
    with NbdClient(daemon.disk_socket("d1"), "d1") as client:
        read_all(client)
    assert disk_stats(daemon)["pages_cached_now"] == DISK_PAGES
    # Killed with every page cached; the image changes while tmemd is down (a
    # write it never saw): the restarted tmemd must not serve what it cached.
    daemon.crash_and_restart(when=lambda: True)
    make_image(image, tag=6)
    expected = image.read_bytes()
    assert disk_stats(daemon)["pages_cached_now"] == 0
    with NbdClient(daemon.disk_socket("d1"), "d1") as client:
        assert read_all(client) == expected
    assert disk_stats(daemon)["pages_read_cache"] == 0
    # And a graceful restart likewise.
    daemon.restart()
    make_image(image, tag=7)
    with NbdClient(daemon.disk_socket("d1"), "d1") as client:
        assert read_all(client) == image.read_bytes()


def test_qemu_io_verifies_patterns_through_the_cache(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    image = tmp_path / "data.img"
    image.write_bytes(bytes(DISK_PAGES * PAGE))
    daemon = start_with_disk(start_tmemd, image)
    uri = f"nbd+unix:///d1?socket={daemon.disk_socket('d1')}"
    result = run_tool("qemu-io", "-f", "raw", uri,
                      "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M",
                      "-c", "write -P 0xa5 64k 64k", "-c", "read -P 0xa5 64k 64k",
                      "-c", "read -P 0x5a 0 64k", "-c", "discard 512k 64k", "-c", "read -P 0 512k 64k")
    assert "verification failed" not in result.stdout, result.stdout
    stats = disk_stats(daemon)
    assert stats["pages_read_cache"] > 0 and stats["pages_invalidated"] > 0


@pytest.mark.parametrize("make, reason", [
    (lambda path: path, "No such file"),
    (lambda path: (path.write_bytes(b"x" * 5000), path)[1], "multiple of 4096"),
])
def test_a_cached_disk_tmemd_cannot_serve_stops_it_with_one_line(
        start_tmemd: StartTmemd, tmp_path: Path, make: object, reason: str) -> None:
    image = tmp_path / "bad.img"
    assert callable(make)
    make(image)
    with pytest.raises(TmemdFailed, match=reason):
        start_with_disk(start_tmemd, image)


POOL = "8f1c2d3e-4b5a-4c6d-9e7f-0a1b2c3d4e5f"


def test_a_shared_pool_serves_the_second_guest_what_the_first_read(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    image = make_image(tmp_path / "base.img", tag=8)
    expected = bytearray(image.read_bytes())
    daemon = start_tmemd(guests=(f"d1:cached-disk={image}:cached-disk-pool={POOL}",
                                 f"d2:cached-disk={image}:cached-disk-pool={POOL}",
                                 f"d3:cached-disk={image}"), budget="64M")
    with NbdClient(daemon.disk_socket("d1"), "d1") as first:
        assert read_all(first) == expected
        with NbdClient(daemon.disk_socket("d2"), "d2") as second:
            assert read_all(second) == expected
            two = disk_stats(daemon, "d2")
            assert two["shared_pool"] == POOL and two["pages_read_cache"] == DISK_PAGES
            assert two["pages_read_backing"] == 0
            # A write by either flushes the pages for both: the image changed for both.
            new = b"".join(page(9, number) for number in range(4))
            assert second.write(10 * PAGE, new) == 0
            expected[10 * PAGE : 14 * PAGE] = new
            assert read_all(first) == expected
    # Without the pool, the same image is cached privately: d3's first pass misses.
    with NbdClient(daemon.disk_socket("d3"), "d3") as private:
        assert read_all(private) == expected
    three = disk_stats(daemon, "d3")
    assert three["shared_pool"] is None and three["pages_read_cache"] == 0
    assert three["pages_read_backing"] == DISK_PAGES


def test_a_shared_pool_never_serves_another_image(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    one = make_image(tmp_path / "one.img", tag=10)
    other = make_image(tmp_path / "other.img", tag=11)
    with pytest.raises(TmemdFailed, match=f"cached-disk-pool {POOL} reads .*one.img"):
        start_tmemd(guests=(f"d1:cached-disk={one}:cached-disk-pool={POOL}",
                            f"d2:cached-disk={other}:cached-disk-pool={POOL}"))


def test_a_write_through_one_guests_disk_flushes_every_cache_of_that_image(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    # Two guests' cached disks are one image, each with a private pool: d2 caches
    # the image (a guest's udev probes it at boot), then d1 writes it. d2 must
    # read the new content, not what its pool held.
    image = make_image(tmp_path / "base.img", tag=12)
    daemon = start_tmemd(guests=(f"d1:cached-disk={image}", f"d2:cached-disk={image}"), budget="64M")
    with NbdClient(daemon.disk_socket("d2"), "d2") as reader:
        assert read_all(reader) == image.read_bytes()
        with NbdClient(daemon.disk_socket("d1"), "d1") as writer:
            new = b"".join(page(13, number) for number in range(16))
            assert writer.write(0, new) == 0
            zeroed = writer.call(ClientRequest(nbd.Command.WRITE_ZEROES, 64 * PAGE, 8 * PAGE))
            assert zeroed.error == 0
        # The writer's changes left the reader's pool; the rest of it stays.
        assert disk_stats(daemon, "d2")["pages_cached_now"] == DISK_PAGES - 16 - 8
        assert read_all(reader) == image.read_bytes()
        assert reader.read(0, 16 * PAGE) == (0, new)


def test_write_allocate_caches_what_was_written(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    # The testbed's case: the guest writes its data set, then reads it. With
    # write-allocate the first read is a hit, as it is for the host page cache.
    image = tmp_path / "data.img"
    image.write_bytes(bytes(DISK_PAGES * PAGE))
    expected = bytearray(b"".join(page(14, number) for number in range(DISK_PAGES)))
    daemon = start_tmemd(guests=(f"d1:cached-disk={image}:cached-disk-write-allocate",
                                 f"d2:cached-disk={image}"), budget="64M")
    with NbdClient(daemon.disk_socket("d2"), "d2") as other:
        assert read_all(other, 64) == bytes(64 * PAGE)  # d2 caches the zeros of the first pages
        with NbdClient(daemon.disk_socket("d1"), "d1") as client:
            for first in range(0, DISK_PAGES, 64):
                assert client.write(first * PAGE, bytes(expected[first * PAGE : (first + 64) * PAGE])) == 0
            stats = disk_stats(daemon)
            assert stats["write_allocate"] and stats["pages_written_cached"] == DISK_PAGES
            assert read_all(client) == expected
            stats = disk_stats(daemon)
            assert stats["pages_read_cache"] == DISK_PAGES and stats["pages_read_backing"] == 0
            # An overwrite replaces the cached pages (one page of a run, and a run).
            for offset, length, tag in ((5, 1, 15), (100, 8, 16)):
                new = b"".join(page(tag, number) for number in range(length))
                assert client.write(offset * PAGE, new) == 0
                expected[offset * PAGE : (offset + length) * PAGE] = new
            assert read_all(client) == expected
            assert disk_stats(daemon)["pages_read_backing"] == 0
        # The writes left d2's pool (its zeros are gone), and reached the image.
        assert read_all(other, 64) == expected[: 64 * PAGE]
    assert disk_stats(daemon, "d2")["pages_read_cache"] == 0
    assert image.read_bytes() == bytes(expected)


def test_write_allocate_never_caches_a_write_the_image_refused(
        start_tmemd: StartTmemd, tmp_path: Path, mount_tmpfs: Callable[[str, str], Path]) -> None:
    # A sparse 8 MiB image on a 1 MiB file system: writes past the first MiB fail
    # with ENOSPC. The failed write's pages must read what the image holds (its
    # old zeros, or what of the write landed), never the write's data from tmem.
    image = mount_tmpfs("small", "1M") / "data.img"
    with image.open("wb") as sparse:
        sparse.truncate(DISK_PAGES * PAGE)
    daemon = start_tmemd(guests=(f"d1:cached-disk={image}:cached-disk-write-allocate",), budget="64M")
    with NbdClient(daemon.disk_socket("d1"), "d1") as client:
        assert read_all(client) == bytes(DISK_PAGES * PAGE)  # every page cached (zeros)
        errors = []
        for first in range(0, DISK_PAGES, 64):
            errors.append(client.write(first * PAGE, b"".join(page(17, first + n) for n in range(64))))
        assert errors[0] == 0 and nbd.Error.ENOSPC in errors, errors
        stats = disk_stats(daemon)
        assert stats["fallback_errors"] > 0 and 0 < stats["pages_written_cached"] < DISK_PAGES
        assert read_all(client) == image.read_bytes()
