"""What one 4 KiB read of a disk costs: tmemd's exports against a file in the host
page cache and against qemu-nbd, QEMU's own NBD server (C), over the same data.

    .venv/bin/python bench/disk_latency.py [--reads 4000] [--where host,guest]

host: a depth-1 NBD client on the host reads random pages of a 32 MiB image
(every page read once before, so tmemd's pool and the host page cache hold them)
from tmemd's cached disk and from qemu-nbd (--cache=writeback), then the same at
depth 16; and from an empty server, asyncio and tmem_wire's NBD codec answering
every READ with one page and nothing else, in a process of its own: the floor
under any request path written that way. guest: a fresh 192 MiB TCG guest per variant writes 32 MiB of its disk
where the disk is empty (O_DIRECT), then reads random pages of it with O_DIRECT,
one at a time, three passes over the same pages (the guest's page cache holds
none of them): a data disk that is a file in the host page cache (QEMU's file
driver, the testbed's disk-hostcache), the image through qemu-nbd, the image
through tmemd's cached disk (its first pass fills the pool), the swap disk
on tmemd's NBD export (the testbed's tmem-blk; the pages written are in tmem),
and the empty asyncio server above (the disk reads as one page repeated).
For each guest variant QEMU's own figure too: query-blockstats' read time over
read operations during the passes (what the device model waited per request).
Prints µs per read and one JSON line. docs/PERFORMANCE.md, "The cached disk's
reads", says what the figures showed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import cast

from tmem_host.bench import mixed_pages
from tmem_host.daemon.process import TmemdProcess
from tmem_host.limits import widen_socket_buffers
from tmem_host.nbd.client import ClientRequest, NbdClient
from tmem_host.vm.guestops import disk_by_serial
from tmem_host.vm.launcher import Guest, VmConfig
from tmem_host.waiting import wait_until
from tmem_wire import nbd
from tmem_wire.agent import DISK_SERIALS
from tmem_wire.frontswap import PAGE_SIZE

IMAGE_MIB = 32
EXPORT = "g1"
SERVER_START_S = 5.0
# In the guest: random O_DIRECT page reads of the first {pages} pages of the disk
# at sys.argv[1], the same pages each pass; µs per read for each pass.
GUEST_READER = """
import mmap, os, random, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buffer = mmap.mmap(-1, 4096)
offsets = [random.Random(2).randrange({pages}) * 4096 for _ in range({reads})]
passes = []
for _ in range(3):
    started = time.perf_counter()
    for offset in offsets:
        os.preadv(fd, [buffer], offset)
    passes.append(round((time.perf_counter() - started) / len(offsets) * 1e6, 1))
print(passes)
"""


def write_image(path: Path) -> None:
    path.write_bytes(b"".join(mixed_pages(IMAGE_MIB * 256)))


@contextmanager
def listening(argv: list[str], socket_path: Path, what: str) -> Iterator[Path]:
    """The server ``argv`` starts, once it listens on ``socket_path``; stopped after."""
    process = subprocess.Popen(argv)
    try:
        if not wait_until(lambda: socket_path.exists() or process.poll() is not None, SERVER_START_S) \
                or not socket_path.exists():
            raise RuntimeError(f"{what} did not listen on {socket_path} (exit {process.poll()})")
        yield socket_path
    finally:
        process.terminate()
        process.wait()


def qemu_nbd(image: Path, socket_path: Path) -> AbstractContextManager[Path]:
    """qemu-nbd serving ``image`` (export EXPORT) on ``socket_path``, through the
    host page cache, up to 4 clients."""
    return listening(["qemu-nbd", "--socket", str(socket_path), "--format", "raw", "--export-name", EXPORT,
                      "--cache=writeback", "--shared", "4", str(image)], socket_path, "qemu-nbd")


def empty_export(socket_path: Path) -> AbstractContextManager[Path]:
    """EmptyExport on ``socket_path``, in a process of its own (as tmemd is)."""
    return listening([sys.executable, __file__, "--serve-empty", str(socket_path)], socket_path,
                     "the empty export")


@contextmanager
def cached_disk(image: Path, work_dir: Path) -> Iterator[Path]:
    """tmemd serving ``image`` as guest EXPORT's cached disk."""
    with TmemdProcess(work_dir / "tmemd", budget="512M", guests=(f"{EXPORT}:cached-disk={image}",)) as daemon:
        yield daemon.disk_socket(EXPORT)


# Not READ_ONLY: QEMU opens a guest's disk read-write (a WRITE gets EINVAL).
EMPTY_FLAGS = nbd.TransmissionFlag.HAS_FLAGS


class EmptyExport(asyncio.Protocol):
    """NBD through tmem_wire's codec, every READ answered with the same page: what
    asyncio and the codec cost a request, without tmemd's export and store."""

    def __init__(self) -> None:
        self.codec = nbd.NbdServerConnection()
        self.page = mixed_pages(1)[0]
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        widen_socket_buffers(self.transport.get_extra_info("socket"))
        self.transport.write(self.codec.send(nbd.Greeting()))

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.codec.receive_data(data)
        output: list[bytes] = []
        while True:
            event = self.codec.next_event()
            if event is nbd.NEED_DATA or event is nbd.PAUSED or isinstance(event, nbd.ConnectionClosed):
                break
            if isinstance(event, nbd.InfoOption):
                output.append(self.codec.send(nbd.ExportInfo(
                    name=EXPORT, size=IMAGE_MIB << 20, transmission_flags=EMPTY_FLAGS, minimum_block=PAGE_SIZE,
                    preferred_block=PAGE_SIZE, maximum_payload=nbd.DEFAULT_MAX_PAYLOAD, description="")))
            elif isinstance(event, nbd.ExportNameOption):
                output.append(self.codec.send(nbd.ExportChosen(IMAGE_MIB << 20, EMPTY_FLAGS)))
            elif isinstance(event, nbd.Request) and event.command == nbd.Command.READ:
                output.append(self.codec.send(nbd.SimpleReply(event.handle, nbd.Error.OK)))
                output.append(self.page * (event.length // PAGE_SIZE))
            elif isinstance(event, nbd.Request):
                output.append(self.codec.send(nbd.SimpleReply(event.handle, nbd.Error.EINVAL)))
            elif not isinstance(event, nbd.ClientFlags):  # QEMU's other options: not here
                output.append(self.codec.send(nbd.OptionError(nbd.ReplyType.ERR_UNSUP, "not supported")))
        if output:
            self.transport.write(b"".join(output))


def serve_empty_export(socket_path: Path) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_unix_server(EmptyExport, str(socket_path))
        await server.serve_forever()
    asyncio.run(serve())


def host_reads(socket_path: Path, reads: int) -> dict[str, float]:
    """µs per random page READ at depth 1 and 16 (best of two runs each)."""
    pages = IMAGE_MIB * 256
    offsets = [random.Random(1).randrange(pages) * PAGE_SIZE for _ in range(reads)]
    with NbdClient(socket_path, EXPORT) as client:
        for first in range(0, pages, 64):  # every page read once: cached from now on
            client.read(first * PAGE_SIZE, 64 * PAGE_SIZE)
        result: dict[str, float] = {}
        for depth in (1, 16):
            best = float("inf")
            for _ in range(2):
                requests = (ClientRequest(nbd.Command.READ, offset, PAGE_SIZE, b"") for offset in offsets)
                started = time.perf_counter()
                if any(reply.error for reply in client.run(requests, depth)):
                    raise RuntimeError(f"a READ from {socket_path} failed")
                best = min(best, (time.perf_counter() - started) / reads * 1e6)
            result[f"depth {depth}"] = round(best, 1)
    return result


def qemu_reads(guest: Guest, role: str) -> tuple[int, int]:
    """QEMU's block statistics of the disk ``role`` (its -drive id or -blockdev
    node name): read operations and the nanoseconds they took."""
    for entry in guest.qmp("query-blockstats"):
        if role in (entry.get("device"), entry.get("node-name")):
            return int(entry["stats"]["rd_operations"]), int(entry["stats"]["rd_total_time_ns"])
    raise RuntimeError(f"no block device {role!r} in query-blockstats")


def guest_reads(work_dir: Path, reads: int, role: str, fill: bool, **disk: object) -> dict[str, object]:
    """µs per read for each of the three passes over disk ``role`` (data, swap)
    of a guest whose disks are ``disk``, and QEMU's mean µs per read meanwhile;
    ``fill``: write the pages first (the disk starts empty)."""
    config = VmConfig(name=EXPORT, memory_mib=192, data_disk_mib=IMAGE_MIB if role == "data" else 0,
                      run_dir=work_dir / "guest", **disk)  # type: ignore[arg-type]
    device = disk_by_serial(DISK_SERIALS[role])
    with Guest(config) as guest:
        if fill:  # the disk starts empty (a scratch file, the swap export): data first
            guest.ssh(f"dd if=/dev/urandom of={device} bs=1M count={IMAGE_MIB} oflag=direct status=none",
                      timeout=300)
        script = GUEST_READER.format(pages=IMAGE_MIB * 256, reads=reads)
        operations, nanoseconds = qemu_reads(guest, role)
        output = guest.ssh(f"python3 -c {shlex.quote(script)} {device}", timeout=900).stdout
        operations_after, nanoseconds_after = qemu_reads(guest, role)
    passes: list[float] = json.loads(output.strip().splitlines()[-1])
    qemu_us = (nanoseconds_after - nanoseconds) / max(operations_after - operations, 1) / 1000
    return {"passes_us": passes, "qemu_us": round(qemu_us, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=4000)
    parser.add_argument("--where", default="host,guest")
    parser.add_argument("--serve-empty", type=Path, help=argparse.SUPPRESS)  # empty_export's process
    arguments = parser.parse_args()
    if arguments.serve_empty:
        serve_empty_export(arguments.serve_empty)
        return
    where = set(arguments.where.split(","))
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="disk-latency-") as temp:
        work = Path(temp)
        image = work / "image.raw"
        write_image(image)
        variants: list[tuple[str, Callable[[Path], object]]] = []
        if "host" in where:
            def host_tmemd(run: Path) -> object:
                with cached_disk(image, run) as socket_path:
                    return host_reads(socket_path, arguments.reads * 5)

            def host_qemu_nbd(run: Path) -> object:
                with qemu_nbd(image, run / "qemu-nbd.sock") as socket_path:
                    return host_reads(socket_path, arguments.reads * 5)
            def host_empty(run: Path) -> object:
                with empty_export(run / "empty.sock") as socket_path:
                    return host_reads(socket_path, arguments.reads * 5)
            variants += [("host: tmemd cached disk", host_tmemd), ("host: qemu-nbd", host_qemu_nbd),
                         ("host: empty asyncio server", host_empty)]
        if "guest" in where:
            def guest_file(run: Path) -> object:
                return guest_reads(run, arguments.reads, "data", True, data_disk_speed="hostcache")

            def guest_qemu_nbd(run: Path) -> object:
                with qemu_nbd(image, run / "qemu-nbd.sock") as socket_path:
                    return guest_reads(run, arguments.reads, "data", False, data_disk_speed="nbd",
                                       data_nbd_socket=socket_path)

            def guest_cached_disk(run: Path) -> object:
                with cached_disk(image, run) as socket_path:
                    return guest_reads(run, arguments.reads, "data", False, data_disk_speed="nbd",
                                       data_nbd_socket=socket_path)

            def guest_swap_export(run: Path) -> object:
                with TmemdProcess(run / "tmemd", budget="512M", guests=(EXPORT,)) as daemon:
                    return guest_reads(run, arguments.reads, "swap", True, swap="nbd",
                                       nbd_socket=daemon.nbd_socket(EXPORT), nbd_export=EXPORT)
            def guest_empty(run: Path) -> object:
                with empty_export(run / "empty.sock") as socket_path:
                    return guest_reads(run, arguments.reads, "data", False, data_disk_speed="nbd",
                                       data_nbd_socket=socket_path)
            variants += [("guest: file in the host page cache", guest_file),
                         ("guest: empty asyncio server", guest_empty),
                         ("guest: qemu-nbd", guest_qemu_nbd), ("guest: tmemd cached disk", guest_cached_disk),
                         ("guest: tmemd swap export", guest_swap_export)]
        for name, measure in variants:
            run_dir = Path(tempfile.mkdtemp(dir=work))
            results[name] = measure(run_dir)
            print(f"{name}: µs per 4 KiB read {results[name]}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
