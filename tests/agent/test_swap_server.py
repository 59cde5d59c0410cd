"""The agent's NBD swap server on the host: this test plays the guest kernel's NBD
client on the server's socketpair, the server talks to a real tmemd over the unix
socket QEMU would use, and refused pages land on a real O_DIRECT fallback file.

What a guest cannot show quickly: every page comes back from where it went, and the
I/O path allocates nothing in proportion to the data it moves (docs/AGENT.md:
allocations on the reclaim path are what deadlock a swap agent)."""

from __future__ import annotations

import os
import socket
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tmem_guest.channel import UnixSocketChannel
from tmem_guest.counters import Counters
from tmem_guest.keys import PAGE_SIZE
from tmem_guest.session import Session
from tmem_guest.swap import READAHEAD_GET_PAGES, FallbackDisk, NbdSwapServer, SwapStore
from tmem_host.daemon.process import TmemdProcess
from tmem_wire import nbd

GUEST = "g1"
CAPPED = "capped"
CAP_PAGES = 48
DISK_BYTES = 16 << 20
WRITE_PAGES = 64  # what the agent's max_sectors_kb (256) lets the kernel send
READ_PAGES = 8  # swap readahead with vm.page-cluster = 3


@pytest.fixture
def tmemd(tmp_path: Path) -> Iterator[TmemdProcess]:
    with TmemdProcess(tmp_path / "run", guests=(GUEST, f"{CAPPED}:cap={CAP_PAGES * PAGE_SIZE}")) as daemon:
        yield daemon


class KernelSide:
    """The NBD client end, with preallocated buffers so it allocates nothing itself."""

    def __init__(self, sock: socket.socket, max_pages: int) -> None:
        self.sock = sock
        # Random pages: tmemd's cap counts compressed bytes.
        self.request = bytearray(nbd.REQUEST_HEADER.size) + os.urandom(max_pages * PAGE_SIZE)
        self.request_view = memoryview(self.request)
        self.reply = bytearray(nbd.SIMPLE_REPLY_HEADER.size + max_pages * PAGE_SIZE)
        self.reply_view = memoryview(self.reply)

    def fill(self, seed: int, pages: int) -> None:
        """WRITE payload: page i of it starts with (seed + i), so a misplaced page shows."""
        start = nbd.REQUEST_HEADER.size
        for page in range(pages):
            self.request[start + page * PAGE_SIZE : start + page * PAGE_SIZE + 8] = (seed + page).to_bytes(8, "little")

    def call(self, command: int, handle: int, offset: int, length: int) -> int:
        """Send one request (a WRITE's payload as last filled); return the reply's error."""
        nbd.REQUEST_HEADER.pack_into(self.request, 0, nbd.REQUEST_MAGIC, 0, command, handle, offset, length)
        payload = length if command == nbd.Command.WRITE else 0
        self.sock.sendall(self.request_view[: nbd.REQUEST_HEADER.size + payload])
        self.sock.recv_into(self.reply_view, nbd.SIMPLE_REPLY_HEADER.size, socket.MSG_WAITALL)
        magic, error, reply_handle = nbd.SIMPLE_REPLY_HEADER.unpack_from(self.reply)
        assert (magic, reply_handle) == (nbd.SIMPLE_REPLY_MAGIC, handle)
        if command == nbd.Command.READ and error == nbd.Error.OK:
            view = self.reply_view[nbd.SIMPLE_REPLY_HEADER.size : nbd.SIMPLE_REPLY_HEADER.size + length]
            assert self.sock.recv_into(view, length, socket.MSG_WAITALL) == length
        return int(error)

    def read_seeds(self, pages: int) -> list[int]:
        start = nbd.SIMPLE_REPLY_HEADER.size
        return [int.from_bytes(self.reply[start + page * PAGE_SIZE : start + page * PAGE_SIZE + 8], "little")
                for page in range(pages)]


@dataclass
class Served:
    server: NbdSwapServer
    store: SwapStore
    session: Session
    kernel: KernelSide


@pytest.fixture(params=["batched", "pipelined"])
def served(request: pytest.FixtureRequest, tmemd: TmemdProcess, tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmemd, tmp_path, GUEST, request.param)


@pytest.fixture
def served_capped(tmemd: TmemdProcess, tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmemd, tmp_path, CAPPED, "pipelined")


def serve(tmemd: TmemdProcess, tmp_path: Path, guest: str, mode: str) -> Iterator[Served]:
    disk_path = tmp_path / "fallback.img"
    with disk_path.open("wb") as disk_file:
        disk_file.truncate(DISK_BYTES)
    session = Session(UnixSocketChannel(tmemd.abi_socket(guest)), request_timeout=10)
    pool = session.register_pool(persistent=True)
    session.start()
    assert session.wait_up(10)
    disk = FallbackDisk(disk_path)
    store = SwapStore(session, pool, disk, Counters("swap", mode), batched=True)
    server = NbdSwapServer(Path("/dev/nbd-unused"), store, mode=mode)
    server.start_workers()
    try:
        yield Served(server, store, session, KernelSide(server.kernel_end, WRITE_PAGES))
    finally:
        server.kernel_end.close()
        assert server.finished.wait(10), "workers did not stop at EOF"
        server.close()
        session.stop()
        disk.close()


def write_then_read(kernel: KernelSide, request_number: int, slot: int) -> None:
    """One WRITE of WRITE_PAGES at `slot`, then a READ of its first READ_PAGES."""
    offset = slot * PAGE_SIZE
    assert kernel.call(nbd.Command.WRITE, 2 * request_number, offset, WRITE_PAGES * PAGE_SIZE) == nbd.Error.OK
    assert kernel.call(nbd.Command.READ, 2 * request_number + 1, offset, READ_PAGES * PAGE_SIZE) == nbd.Error.OK


def test_pages_read_back_from_where_they_were_written(served: Served) -> None:
    kernel = served.kernel
    for request_number, slot in enumerate(range(0, 16 * WRITE_PAGES, WRITE_PAGES)):
        kernel.fill(slot, WRITE_PAGES)
        assert kernel.call(nbd.Command.WRITE, request_number, slot * PAGE_SIZE, WRITE_PAGES * PAGE_SIZE) == 0
    # Whole-request and unaligned-within-request reads, in another order than written.
    for slot, pages in [(15 * WRITE_PAGES, WRITE_PAGES), (3, READ_PAGES), (WRITE_PAGES - 4, READ_PAGES), (0, 1)]:
        assert kernel.call(nbd.Command.READ, 1000 + slot, slot * PAGE_SIZE, pages * PAGE_SIZE) == 0
        assert kernel.read_seeds(pages) == list(range(slot, slot + pages))
    counters = served.store.counters
    assert counters["puts"] == 16 * WRITE_PAGES and counters["put_refusals"] == 0
    assert counters["hits"] == counters["gets"] >= WRITE_PAGES + 2 * READ_PAGES + 1 and counters["disk_reads"] == 0
    # TRIM forgets the slots: tmem no longer holds them, the map points nowhere.
    assert kernel.call(nbd.Command.TRIM, 2000, 0, 16 * WRITE_PAGES * PAGE_SIZE) == 0
    assert served.store.slots.count(served.store.slots.get(0)) == served.store.slots.slot_count
    # A request past the device's end is refused, not served.
    assert kernel.call(nbd.Command.READ, 2001, DISK_BYTES, PAGE_SIZE) == nbd.Error.EINVAL


def test_readahead_window_serves_the_next_reads_and_never_a_page_older_than_its_last_write(served: Served) -> None:
    kernel = served.kernel
    kernel.fill(0, WRITE_PAGES)
    assert kernel.call(nbd.Command.WRITE, 1, 0, WRITE_PAGES * PAGE_SIZE) == 0
    ahead = READAHEAD_GET_PAGES - READ_PAGES  # what one READ_PAGES read fetches ahead
    for handle, slot in enumerate(range(0, READAHEAD_GET_PAGES, READ_PAGES), 10):
        assert kernel.call(nbd.Command.READ, handle, slot * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
        assert kernel.read_seeds(READ_PAGES) == list(range(slot, slot + READ_PAGES))
    counters = served.store.counters
    assert counters["readahead_hits"] == ahead and counters["gets"] == READAHEAD_GET_PAGES
    # Refill the window, then rewrite slots inside it: reads must see the new pages.
    assert kernel.call(nbd.Command.READ, 20, 0, READ_PAGES * PAGE_SIZE) == 0
    kernel.fill(5000, READ_PAGES)
    assert kernel.call(nbd.Command.WRITE, 21, 2 * READ_PAGES * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
    assert kernel.call(nbd.Command.READ, 22, 2 * READ_PAGES * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
    assert kernel.read_seeds(READ_PAGES) == list(range(5000, 5000 + READ_PAGES))
    # That read went to tmem and refilled the window with the slots after it.
    hits_before = counters["readahead_hits"]
    assert kernel.call(nbd.Command.READ, 23, 3 * READ_PAGES * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
    assert kernel.read_seeds(READ_PAGES) == list(range(3 * READ_PAGES, 4 * READ_PAGES))
    assert counters["readahead_hits"] == hits_before + READ_PAGES
    # TRIM forgets too: a rewrite after it reads back new, through the window or not.
    assert kernel.call(nbd.Command.TRIM, 24, 4 * READ_PAGES * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
    kernel.fill(7000, READ_PAGES)
    assert kernel.call(nbd.Command.WRITE, 25, 4 * READ_PAGES * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
    assert kernel.call(nbd.Command.READ, 26, 4 * READ_PAGES * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
    assert kernel.read_seeds(READ_PAGES) == list(range(7000, 7000 + READ_PAGES))


def test_pages_tmem_refuses_go_to_the_fallback_disk_and_read_back(served_capped: Served) -> None:
    kernel = served_capped.kernel
    requests = 4  # 256 pages against a 48-page cap
    for request_number in range(requests):
        slot = request_number * WRITE_PAGES
        kernel.fill(10_000 + slot, WRITE_PAGES)
        assert kernel.call(nbd.Command.WRITE, request_number, slot * PAGE_SIZE, WRITE_PAGES * PAGE_SIZE) == 0
    for request_number in range(requests):
        slot = request_number * WRITE_PAGES
        assert kernel.call(nbd.Command.READ, 100 + request_number, slot * PAGE_SIZE, WRITE_PAGES * PAGE_SIZE) == 0
        assert kernel.read_seeds(WRITE_PAGES) == list(range(10_000 + slot, 10_000 + slot + WRITE_PAGES))
    counters = served_capped.store.counters
    assert 0 < counters["put_refusals"] <= requests * WRITE_PAGES - CAP_PAGES // 2
    assert counters["disk_writes"] == counters["put_refusals"] and counters["disk_reads"] == counters["put_refusals"]
    assert counters["hits"] == requests * WRITE_PAGES - counters["put_refusals"]


# Requests in the measured window; small objects (keys, page views) come and go per
# request, but nothing may stay and nothing the size of a page payload may be made.
MEASURED_PAIRS = 200
RETAINED_BOUND = 16 * 1024
SMALL_OBJECTS_BOUND = 32 * 1024
# A READ_PAGES read with the readahead behind it: one GET_BATCH reply of READAHEAD_GET_PAGES.
READ_REPLY_FRAME = READAHEAD_GET_PAGES * PAGE_SIZE + 64


def test_steady_state_io_path_allocates_no_payload_sized_memory(served: Served) -> None:
    """tracemalloc over every thread of this process (server workers, session reader).

    WRITEs: header and payload are received into the worker's buffers, the PUT_BATCH
    frame is packed into the session's call buffer and the fallback disk writes from
    the payload buffer: no allocation in proportion to the 256 KiB moved. READs: the
    session's frame decoder still copies each GET_BATCH reply (and grows its receive
    buffer) once, a reply of up to READAHEAD_GET_PAGES with the readahead; the pages
    then go straight into the NBD reply buffer or the readahead window. The WRITE
    bound is a tenth of one WRITE payload (256 KiB), which the earlier path copied
    twice per request; the READ bound is the decoder's two copies of one reply.
    """
    kernel = served.kernel
    for number in range(50):  # warm up: pools, histograms, caches
        write_then_read(kernel, number, (number * WRITE_PAGES) % 2048)
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for number in range(MEASURED_PAIRS):
            offset = (number * WRITE_PAGES) % 2048 * PAGE_SIZE
            assert kernel.call(nbd.Command.WRITE, number, offset, WRITE_PAGES * PAGE_SIZE) == 0
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for number in range(MEASURED_PAIRS):
            write_then_read(kernel, number, (number * WRITE_PAGES) % 2048)
        current, mixed_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert write_peak - baseline < SMALL_OBJECTS_BOUND, f"WRITEs allocated up to {write_peak - baseline} bytes"
    # The frame decoder's payload copy and its receive buffer: at most two reply frames.
    assert mixed_peak - baseline < SMALL_OBJECTS_BOUND + 2 * READ_REPLY_FRAME, (
        f"WRITE+READ allocated up to {mixed_peak - baseline} bytes"
    )
    assert current - baseline < RETAINED_BOUND, f"{current - baseline} bytes retained after {MEASURED_PAIRS} pairs"
    counters = served.store.counters
    assert counters["errors"] == 0 and counters["hits"] == counters["gets"] > MEASURED_PAIRS * READ_PAGES


def test_a_read_waiting_for_tmemd_does_not_hold_up_writes(served: Served, tmemd: TmemdProcess) -> None:
    """tmemd is gone: a READ of a page only tmem has waits for it, but meanwhile
    WRITEs must still reach the fallback disk (they are what frees guest memory);
    when tmemd is back from its journal, the READ gets its page."""
    kernel = served.kernel
    kernel.fill(100, WRITE_PAGES)
    assert kernel.call(nbd.Command.WRITE, 1, 0, WRITE_PAGES * PAGE_SIZE) == 0
    tmemd.kill()
    assert wait_until(lambda: not served.session.is_up, 10), "the session did not notice tmemd died"
    header = nbd.REQUEST_HEADER
    kernel.sock.sendall(header.pack(nbd.REQUEST_MAGIC, 0, nbd.Command.READ, 2, 0, READ_PAGES * PAGE_SIZE))
    time.sleep(0.5)  # the READ is waiting for the session now
    for handle in (3, 4):  # more WRITEs than one worker: a spare serves each in turn
        kernel.fill(1000 * handle, WRITE_PAGES)
        offset = handle * WRITE_PAGES * PAGE_SIZE
        assert kernel.call(nbd.Command.WRITE, handle, offset, WRITE_PAGES * PAGE_SIZE) == 0
    assert served.store.counters["disk_writes"] == 2 * WRITE_PAGES
    tmemd.start()
    kernel.sock.recv_into(kernel.reply_view, nbd.SIMPLE_REPLY_HEADER.size, socket.MSG_WAITALL)
    magic, error, handle = nbd.SIMPLE_REPLY_HEADER.unpack_from(kernel.reply)
    assert (magic, error, handle) == (nbd.SIMPLE_REPLY_MAGIC, 0, 2)
    view = kernel.reply_view[nbd.SIMPLE_REPLY_HEADER.size : nbd.SIMPLE_REPLY_HEADER.size + READ_PAGES * PAGE_SIZE]
    assert kernel.sock.recv_into(view, len(view), socket.MSG_WAITALL) == len(view)
    assert kernel.read_seeds(READ_PAGES) == list(range(100, 100 + READ_PAGES))


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
