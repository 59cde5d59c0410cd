"""The swap frontend's reliability against a real tmemd on the host: outages (SIGSTOP,
kill -9 with and without tmemd's journal) and drains (tmemctl drain), with the
agent's SwapStore on a real O_DIRECT fallback file.

Every page written is checked where it is read back: the guarantee under test is
"the latest page, or EIO; never stale data" (docs/AGENT.md, "Outages and drain")."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tmem_guest.channel import UnixSocketChannel
from tmem_guest.counters import Counters
from tmem_guest.session import ChannelDown, Session
from tmem_guest.swap import FallbackDisk, SwapStore
from tmem_guest.system import aligned_buffer
from tmem_host.ctl.main import drain, guest_persistent_pages
from tmem_host.daemon.process import TmemdProcess
from tmem_host.waiting import wait_until
from tmem_wire import nbd
from tmem_wire.frontswap import PAGE_SHIFT, PAGE_SIZE, Where

GUEST = "g1"
SLOTS = 2048
REQUEST_PAGES = 32
REQUEST_TIMEOUT_S = 1.0


def stamp(slot: int, version: int) -> bytes:
    """A page that names its slot and version: a misplaced or stale page shows."""
    return (slot.to_bytes(8, "little") + version.to_bytes(8, "little")) * (PAGE_SIZE // 16)


@dataclass
class Swap:
    """A SwapStore on a fallback file, its session to tmemd and its maintenance thread."""

    store: SwapStore
    session: Session
    disk: FallbackDisk
    stopping: threading.Event
    buffer: memoryview  # page-aligned request memory, as the NBD workers have

    def write(self, first_slot: int, versions: list[int]) -> int:
        for i, version in enumerate(versions):
            self.buffer[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT] = stamp(first_slot + i, version)
        return self.store.write(first_slot << PAGE_SHIFT, self.buffer[: len(versions) << PAGE_SHIFT])

    def read(self, first_slot: int, count: int, into: memoryview) -> tuple[int, list[bytes]]:
        error = self.store.read(first_slot << PAGE_SHIFT, count << PAGE_SHIFT, into[: count << PAGE_SHIFT])
        return error, [bytes(into[i << PAGE_SHIFT : (i + 1) << PAGE_SHIFT]) for i in range(count)]

    def check(self, latest: dict[int, int]) -> None:
        """Every slot in `latest` reads back as its latest version."""
        into = memoryview(aligned_buffer(PAGE_SIZE))
        for slot, version in sorted(latest.items()):
            assert self.read(slot, 1, into) == (nbd.Error.OK, [stamp(slot, version)]), f"slot {slot}"


class SlowDisk(FallbackDisk):
    """The fallback file with a disk's varying write latency (the guests' is a
    200-IOPS disk): it lets a drain's write of a slot and the guest's overtake each other."""

    MAX_WRITE_LATENCY_S = 0.005

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._latency = random.Random(7)

    def write(self, offset: int, data: memoryview) -> None:
        time.sleep(self._latency.uniform(0, self.MAX_WRITE_LATENCY_S))
        super().write(offset, data)


def open_swap(daemon: TmemdProcess, tmp_path: Path, *, maintain: bool = True, read_wait: float = 30.0) -> Swap:
    disk_path = tmp_path / "fallback.img"
    with disk_path.open("wb") as disk_file:
        disk_file.truncate(SLOTS * PAGE_SIZE)
    channel = UnixSocketChannel(daemon.abi_socket(GUEST), send_timeout=REQUEST_TIMEOUT_S)
    session = Session(channel, request_timeout=REQUEST_TIMEOUT_S, heartbeat_interval=0.2, backoff_max=0.2)
    pool = session.register_pool(persistent=True)
    session.start()
    assert session.wait_up(10)
    disk = SlowDisk(disk_path)
    store = SwapStore(session, pool, disk, Counters("swap", "batched"), batched=True, read_wait=read_wait)
    stopping = threading.Event()
    if maintain:
        threading.Thread(target=store.maintain, args=(stopping, 0.2), daemon=True).start()
    return Swap(store, session, disk, stopping, memoryview(aligned_buffer(REQUEST_PAGES * PAGE_SIZE)))


@pytest.fixture
def swap(tmp_path: Path) -> Iterator[tuple[TmemdProcess, Swap]]:
    with TmemdProcess(tmp_path / "run", guests=(GUEST,)) as daemon:
        opened = open_swap(daemon, tmp_path)
        try:
            yield daemon, opened
        finally:
            opened.stopping.set()
            opened.session.stop()
            opened.disk.close()


def fill(swap: Swap, requests: int, version: int = 1) -> dict[int, int]:
    latest: dict[int, int] = {}
    for number in range(requests):
        first = number * REQUEST_PAGES
        assert swap.write(first, [version] * REQUEST_PAGES) == nbd.Error.OK
        latest.update(dict.fromkeys(range(first, first + REQUEST_PAGES), version))
    return latest


def pool_pages(daemon: TmemdProcess) -> int:
    with daemon.control() as control:
        return guest_persistent_pages(control, GUEST)


def test_drain_moves_every_page_to_the_disk_while_writes_race_it_and_win(swap: tuple[TmemdProcess, Swap]) -> None:
    daemon, opened = swap
    latest: dict[int, int] = {}
    for drain_round in range(3):
        latest.update(fill(opened, 40, version=10 * drain_round))  # 1280 pages in tmem
        assert opened.store.slots.count(Where.TMEM) == 1280 == pool_pages(daemon)
        draining = threading.Event()

        def rewrite() -> None:  # the guest keeps swapping during the drain, the same slots
            version = 10 * drain_round + 1
            while not draining.is_set():
                for number in range(40):
                    first = number * REQUEST_PAGES
                    assert opened.write(first, [version] * REQUEST_PAGES) == nbd.Error.OK
                    latest.update(dict.fromkeys(range(first, first + REQUEST_PAGES), version))
                version += 1

        writer = threading.Thread(target=rewrite)
        with daemon.control() as control:
            writer.start()
            result = drain(control, GUEST, timeout=60, interval=0.02)
            draining.set()
            writer.join()
            assert result.pages_left == 0 and result.pages_at_start > 0, result
            assert opened.store.slots.count(Where.TMEM) == 0 and pool_pages(daemon) == 0
            opened.check(latest)
            control.request("thaw", guest=GUEST)
    counters = opened.store.counters
    assert counters["drained_pages"] > 0 and counters["lost_pages"] == 0
    # Draining: new pages are refused by tmemd and go to the disk; thaw lets them in again.
    with daemon.control() as control:
        control.request("drain", guest=GUEST)
        assert opened.write(0, [90] * REQUEST_PAGES) == nbd.Error.OK
        assert opened.store.slots.count(Where.TMEM) == 0
        control.request("thaw", guest=GUEST)
    assert opened.write(0, [91] * REQUEST_PAGES) == nbd.Error.OK
    assert opened.store.slots.count(Where.TMEM) == REQUEST_PAGES
    latest.update(dict.fromkeys(range(REQUEST_PAGES), 91))
    opened.check(latest)


def test_a_write_tmemd_stops_during_goes_to_disk_and_its_late_put_is_flushed(swap: tuple[TmemdProcess, Swap]) -> None:
    daemon, opened = swap
    latest = fill(opened, 4)
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert opened.write(0, [2] * REQUEST_PAGES) == nbd.Error.OK  # timed out: on the disk
        assert time.monotonic() - started < 3 * REQUEST_TIMEOUT_S
        assert opened.store.unsure.count() == REQUEST_PAGES
        assert opened.write(REQUEST_PAGES, [2] * REQUEST_PAGES) == nbd.Error.OK  # session down: straight to disk
        latest.update(dict.fromkeys(range(2 * REQUEST_PAGES), 2))
        opened.check({slot: 2 for slot in range(2 * REQUEST_PAGES)})  # from the disk, while tmemd is stopped
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert opened.session.wait_up(15)
    # tmemd applied the PUT given up on; the maintenance thread flushes what the map does not point at.
    wait_until(lambda: not opened.store.unsure.count() and pool_pages(daemon) == 64, 10)
    assert opened.store.unsure.count() == 0 and opened.store.counters["unsure_flushed"] >= REQUEST_PAGES
    assert pool_pages(daemon) == opened.store.slots.count(Where.TMEM) == 64  # slots 64..127 are still in tmem
    opened.check(latest)


def test_a_read_during_an_outage_waits_for_tmemd_and_gets_the_page(swap: tuple[TmemdProcess, Swap]) -> None:
    daemon, opened = swap
    latest = fill(opened, 1)
    os.kill(daemon.pid, signal.SIGSTOP)
    outcome: list[tuple[int, list[bytes]]] = []
    reader = threading.Thread(
        target=lambda: outcome.append(opened.read(0, 8, memoryview(aligned_buffer(8 * PAGE_SIZE))))
    )
    try:
        reader.start()
        # Past the request timeout: the session is down, and the read waits for it.
        assert wait_until(lambda: not opened.session.is_up, 5 * REQUEST_TIMEOUT_S)
        assert reader.is_alive()
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    reader.join(20)
    assert outcome == [(nbd.Error.OK, [stamp(slot, 1) for slot in range(8)])]
    opened.check(latest)


def test_after_kill_9_tmemd_comes_back_from_its_journal_and_the_pool_resumes(swap: tuple[TmemdProcess, Swap]) -> None:
    daemon, opened = swap
    latest = fill(opened, 8)
    pool_id = opened.store.pool.pool_id
    resumed = opened.session.pools_resumed
    daemon.crash_and_restart()
    assert opened.session.wait_up(15)
    wait_until(lambda: opened.session.pools_resumed != resumed, 15)
    assert opened.session.pools_resumed == resumed + 1 and opened.store.pool.pool_id == pool_id
    hits = opened.store.counters["hits"]
    opened.check(latest)  # every slot from tmem, as the map says
    assert opened.store.counters["hits"] - hits == len(latest)


def test_without_a_journal_pages_tmem_lost_read_as_eio_never_as_stale_data(tmp_path: Path) -> None:
    with TmemdProcess(tmp_path / "run", guests=(GUEST,), extra_args=("--no-journal",)) as daemon:
        opened = open_swap(daemon, tmp_path, read_wait=2.0)
        try:
            fill(opened, 2, version=1)
            # The older version of slots 0..31 also sits on the disk: a wrong fallback would show it.
            older = memoryview(aligned_buffer(REQUEST_PAGES * PAGE_SIZE))  # O_DIRECT: page-aligned
            older[:] = b"".join(stamp(slot, 0) for slot in range(REQUEST_PAGES))
            opened.store.disk.write(0, older)
            daemon.crash_and_restart()
            assert opened.session.wait_up(15)
            with pytest.raises(AssertionError):
                opened.check({0: 1})
            into = memoryview(aligned_buffer(REQUEST_PAGES * PAGE_SIZE))
            assert opened.read(0, REQUEST_PAGES, into)[0] == nbd.Error.EIO
            assert opened.store.counters["lost_pages"] > 0
            # A new write of a lost slot is the current page again.
            assert opened.write(0, [3] * REQUEST_PAGES) == nbd.Error.OK
            opened.check(dict.fromkeys(range(REQUEST_PAGES), 3))
        finally:
            opened.stopping.set()
            opened.session.stop()
            opened.disk.close()


def test_calls_during_an_outage_raise_at_once(swap: tuple[TmemdProcess, Swap]) -> None:
    daemon, opened = swap
    daemon.kill()
    wait_until(lambda: not opened.session.is_up, 5)
    started = time.monotonic()
    with pytest.raises(ChannelDown):
        opened.session.pool_stats(opened.store.pool)
    assert time.monotonic() - started < 0.1
    latest = fill(opened, 2, version=4)  # tmemd gone: every page to the disk
    assert opened.store.counters["disk_writes"] >= 2 * REQUEST_PAGES
    opened.check(latest)
