"""The agent's NBD swap server on the host: this test plays the guest kernel's NBD
client on the server's socketpair, the server talks to a real tmemd over the unix
socket QEMU would use, and refused pages land on a real O_DIRECT fallback file.

What a guest cannot show quickly: every page comes back from where it went, and the
I/O path allocates nothing in proportion to the data it moves (docs/AGENT.md:
allocations on the reclaim path are what deadlock a swap agent)."""

from __future__ import annotations

import os
import socket
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tmem_guest.channel import UnixSocketChannel
from tmem_guest.counters import Counters
from tmem_guest.session import Session
from tmem_guest.swap import READAHEAD_GET_PAGES, FallbackDisk, NbdSwapServer, SwapStore
from tmem_host.daemon.process import TmemdProcess
from tmem_host.waiting import wait_until
from tmem_wire import nbd
from tmem_wire.frontswap import PAGE_SIZE

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
        error, reply_handle = self.receive_reply(length if command == nbd.Command.READ else 0)
        assert reply_handle == handle
        return error

    def receive_reply(self, read_length: int) -> tuple[int, int]:
        """The next reply: (error, handle); a READ's payload (`read_length`) lands
        after the header in `reply`."""
        self.sock.recv_into(self.reply_view, nbd.SIMPLE_REPLY_HEADER.size, socket.MSG_WAITALL)
        magic, error, handle = nbd.SIMPLE_REPLY_HEADER.unpack_from(self.reply)
        assert magic == nbd.SIMPLE_REPLY_MAGIC
        if read_length and error == nbd.Error.OK:
            view = self.reply_view[nbd.SIMPLE_REPLY_HEADER.size : nbd.SIMPLE_REPLY_HEADER.size + read_length]
            assert self.sock.recv_into(view, read_length, socket.MSG_WAITALL) == read_length
        return int(error), int(handle)

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


def send_read(kernel: KernelSide, handle: int, slot: int, pages: int) -> None:
    """A READ whose reply is collected later (receive_read_replies)."""
    kernel.sock.sendall(nbd.REQUEST_HEADER.pack(nbd.REQUEST_MAGIC, 0, nbd.Command.READ, handle,
                                                slot * PAGE_SIZE, pages * PAGE_SIZE))


def receive_read_replies(kernel: KernelSide, count: int, pages: int) -> dict[int, tuple[int, list[int]]]:
    """`count` READ replies, in whatever order they come: handle -> (error, page seeds)."""
    replies = {}
    for _ in range(count):
        error, handle = kernel.receive_reply(pages * PAGE_SIZE)
        replies[handle] = (error, kernel.read_seeds(pages) if error == nbd.Error.OK else [])
    return replies


def test_reads_waiting_for_tmemd_hold_neither_workers_nor_stripes(served: Served, tmemd: TmemdProcess) -> None:
    """tmemd is gone: READs of pages only tmem has wait for it, more of them than
    there are workers, but WRITEs and TRIMs, of the very stripes those READs cover
    too, still reach the fallback disk at once (they are what frees guest memory).
    When tmemd is back from its journal, every READ gets its own pages."""
    kernel = served.kernel
    for slot in (0, WRITE_PAGES):
        kernel.fill(100 + slot, WRITE_PAGES)
        assert kernel.call(nbd.Command.WRITE, slot, slot * PAGE_SIZE, WRITE_PAGES * PAGE_SIZE) == 0
    tmemd.kill()
    assert wait_until(lambda: not served.session.is_up, 10), "the session did not notice tmemd died"
    # Slots 16k .. 16k+7 for k = 0..7: two READs in every 32-slot stripe of the 128 written.
    waiting = {1000 + k: 16 * k for k in range(8)}
    for handle, slot in waiting.items():
        send_read(kernel, handle, slot, READ_PAGES)
    assert wait_until(lambda: served.server.parked_reads == len(waiting), 10), served.server.parked_reads
    for handle, slot in enumerate((8, 40, 72), start=2000):  # next to waiting READs, stripe by stripe
        kernel.fill(5000 + slot, READ_PAGES)
        assert kernel.call(nbd.Command.WRITE, handle, slot * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
    assert kernel.call(nbd.Command.TRIM, 3000, 120 * PAGE_SIZE, 8 * PAGE_SIZE) == 0
    assert served.store.counters["disk_writes"] == 3 * READ_PAGES
    tmemd.start()
    replies = receive_read_replies(kernel, len(waiting), READ_PAGES)
    assert replies == {handle: (nbd.Error.OK, list(range(100 + slot, 100 + slot + READ_PAGES)))
                       for handle, slot in waiting.items()}
    # The WRITEs made while tmemd was away read back from the disk.
    assert kernel.call(nbd.Command.READ, 4000, 40 * PAGE_SIZE, READ_PAGES * PAGE_SIZE) == 0
    assert kernel.read_seeds(READ_PAGES) == list(range(5040, 5040 + READ_PAGES))


def test_a_read_waiting_longer_than_read_wait_is_answered_eio(served: Served, tmemd: TmemdProcess) -> None:
    kernel = served.kernel
    served.store.read_wait = 1.0
    kernel.fill(100, WRITE_PAGES)
    assert kernel.call(nbd.Command.WRITE, 1, 0, WRITE_PAGES * PAGE_SIZE) == 0
    tmemd.kill()
    assert wait_until(lambda: not served.session.is_up, 10), "the session did not notice tmemd died"
    send_read(kernel, 2, 0, READ_PAGES)
    assert receive_read_replies(kernel, 1, READ_PAGES) == {2: (nbd.Error.EIO, [])}
    assert served.server.parked_reads == 0 and served.store.counters["errors"] >= 1


