"""`make bench`: tmemd's page throughput on this host, against two reference points.

All rows move the same 4 KiB pages of realistic mixed content (text, binary,
zero-filled and random pages, fixed seed; `tmem_workloads.usemem`'s templates):

- in-process lz4 compress / decompress of the pages, no I/O: the ceiling;
- tmemd over its unix socket (a tmemd the bench starts): one page per request,
  pipelined (PIPELINE_DEPTH in flight), and batched (BATCH_PAGES per frame);
- tmemd's NBD export (the bench guest's): WRITE and READ of BATCH_PAGES-page
  requests, BATCH_DEPTH in flight, as QEMU's NBD client would send swap I/O;
- Redis (Debian's redis-server, started here on a unix socket, persistence off)
  SET/GET of the same pages, unpipelined and pipelined BATCH_PAGES deep, by the
  bench's own client (the reference the targets are against), and redis-benchmark
  (Redis's C load generator, 4 KiB values, BATCH_DEPTH connections x BATCH_PAGES
  pipelined) against the same server: the server's capacity;
- the remote tier (remote_suite): PUT_BATCH / GET_BATCH through a second tmemd
  whose memory is full, so every page goes to a Redis Cluster (LocalCluster, 3+3
  on loopback), beside redis-py's own fastest ways with the same cluster
  (tmem_host.remote.rawbench: the engine's limit on this machine).

Prints a table and writes bench/results/<timestamp>.json. More rows plug in as
further suites: functions of BenchContext -> list[Row] in SUITES.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import platform
import queue
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from math import ceil
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import lz4.block
from rich.console import Console
from rich.table import Table

from tmem_host.daemon.client import AbiClient, PipelinedRequest
from tmem_host.daemon.main import keep_batch_buffers_on_the_heap
from tmem_host.daemon.process import TmemdProcess
from tmem_host.journal.journaled import JournaledStore
from tmem_host.limits import widen_socket_buffers
from tmem_host.nbd.client import bench_export
from tmem_host.profiling import Profile, sampled
from tmem_host.replies import RemoteStats
from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.rawbench import raw_cluster_rows
from tmem_host.remote.tier import RemoteSettings
from tmem_host.testbed.hostmetrics import HostCpu, process_usage
from tmem_wire import nbd as nbd_wire
from tmem_wire.abi import Key, Op, PoolFlag, Status, decode_batch_reply
from tmem_wire.frontswap import PAGE_SIZE, frontswap_keys
from tmem_workloads.usemem import expected_page, page_templates

SEED = 20111
PIPELINE_DEPTH = 32
BATCH_PAGES = 64
# Batch frames in flight in the batched rows (64 pages each).
BATCH_DEPTH = 4
RESULTS_DIR = Path("bench/results")
BENCH_GUEST = "bench"
REFERENCE_ROW = "redis SET pipelined"


@dataclass
class Row:
    name: str
    kind: str  # "put" or "get": which lz4 ceiling it compares with
    pages: int
    seconds: float

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.pages_per_s * PAGE_SIZE / 1e6


@dataclass
class BenchContext:
    pages: list[bytes]
    keys: list[Key]
    run_dir: Path
    daemon: TmemdProcess
    quick: bool
    budget: str
    notes: dict[str, object] = field(default_factory=dict)
    # The rows of the suites run so far (a later suite may compare with them).
    rows_so_far: list[Row] = field(default_factory=list)


def mixed_pages(count: int, seed: int = SEED) -> list[bytes]:
    templates = page_templates(seed)
    return [expected_page(templates, seed, number) for number in range(count)]


def timed(name: str, kind: str, pages: int, work: Callable[[], object]) -> Row:
    started = time.perf_counter()
    work()
    return Row(name, kind, pages, time.perf_counter() - started)


# -- in-process lz4 --------------------------------------------------------------


def lz4_suite(ctx: BenchContext) -> list[Row]:
    compress, decompress = lz4.block.compress, lz4.block.decompress
    packed = [compress(page, store_size=False) for page in ctx.pages]
    ctx.notes["lz4_ratio"] = round(sum(map(len, packed)) / (len(ctx.pages) * PAGE_SIZE), 3)

    def compress_all() -> None:
        for page in ctx.pages:
            compress(page, store_size=False)

    def decompress_all() -> None:
        for blob in packed:
            decompress(blob, uncompressed_size=PAGE_SIZE)

    return [timed("lz4 compress (in-process)", "put", len(ctx.pages), compress_all),
            timed("lz4 decompress (in-process)", "get", len(ctx.pages), decompress_all)]


# -- tmemd -----------------------------------------------------------------------


def tmemd_suite(ctx: BenchContext) -> list[Row]:
    pages, keys = ctx.pages, ctx.keys
    sync_count = len(pages) // 4 if ctx.quick else len(pages) // 2
    rows: list[Row] = []
    with AbiClient.open(ctx.daemon.abi_socket(BENCH_GUEST)) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)

        def put_sync() -> None:
            _check([client.put(pool_id, oid, index, page)
                   for (oid, index), page in zip(keys[:sync_count], pages)], "PUT")

        def get_sync() -> None:
            _check([client.get(pool_id, oid, index)[0] for oid, index in keys[:sync_count]], "GET")

        def put_pipelined() -> None:
            requests = (PipelinedRequest(Op.PUT, pool_id, oid, index, page)
                        for (oid, index), page in zip(keys, pages))
            _check([reply.status for reply in client.pipelined(requests, PIPELINE_DEPTH)], "PUT")

        def get_pipelined() -> None:
            requests = (PipelinedRequest(Op.GET, pool_id, oid, index) for oid, index in keys)
            _check([reply.status for reply in client.pipelined(requests, PIPELINE_DEPTH)], "GET")

        def put_batched() -> None:
            _put_batched(client, pool_id, keys, pages)

        def get_batched() -> None:
            _get_batched(client, pool_id, keys)

        rows.append(timed("tmemd PUT sync", "put", sync_count, put_sync))
        rows.append(timed("tmemd GET sync", "get", sync_count, get_sync))
        rows.append(timed(f"tmemd PUT pipelined x{PIPELINE_DEPTH}", "put", len(pages),
                          put_pipelined))
        rows.append(timed(f"tmemd GET pipelined x{PIPELINE_DEPTH}", "get", len(pages),
                          get_pipelined))
        rows.append(timed(f"tmemd PUT_BATCH {BATCH_PAGES}p x{BATCH_DEPTH}", "put", len(pages),
                          put_batched))
        rows.append(timed(f"tmemd GET_BATCH {BATCH_PAGES}p x{BATCH_DEPTH}", "get", len(pages),
                          get_batched))
        # Proof the data made the round trip, outside the timed part.
        sample = range(0, len(pages), max(1, len(pages) // 97))
        if client.get_batch(pool_id, [keys[i] for i in sample]) != [pages[i] for i in sample]:
            raise RuntimeError("tmemd returned different pages than were put")
        (record,) = client.stats(pool_id)
        ctx.notes["tmemd_ratio"] = round(record.stored_bytes / max(1, record.raw_bytes), 3)
    return rows


def _batches(count: int) -> Iterator[range]:
    return (range(start, min(start + BATCH_PAGES, count)) for start in range(0, count, BATCH_PAGES))


def _check(statuses: Sequence[int], what: str) -> None:
    if any(status != Status.OK for status in statuses):
        raise RuntimeError(f"{what}: tmemd answered {sorted(set(statuses))}")


def _put_batched(client: AbiClient, pool_id: int, keys: Sequence[Key],
                 pages: Sequence[bytes]) -> None:
    """PUT_BATCH of every page, BATCH_PAGES per frame, BATCH_DEPTH frames in flight."""
    window: list[int] = []
    for batch in _batches(len(pages)):
        window.append(client.submit_put_batch(
            pool_id, keys[batch.start:batch.stop], pages[batch.start:batch.stop]))
        if len(window) >= BATCH_DEPTH:
            _check(_batch_statuses(client, window.pop(0)), "PUT_BATCH")
    for request_id in window:
        _check(_batch_statuses(client, request_id), "PUT_BATCH")


def _get_batched(client: AbiClient, pool_id: int, keys: Sequence[Key]) -> list[bytes | None]:
    """GET_BATCH of every key, BATCH_PAGES per frame, BATCH_DEPTH frames in flight:
    the pages, in the keys' order."""
    found: list[bytes | None] = []
    window: list[int] = []

    def collect(request_id: int) -> None:
        statuses, got = client.get_batch_reply(request_id)
        _check(statuses, "GET_BATCH")
        found.extend(got)

    for batch in _batches(len(keys)):
        window.append(client.submit_get_batch(pool_id, keys[batch.start:batch.stop]))
        if len(window) >= BATCH_DEPTH:
            collect(window.pop(0))
    for request_id in window:
        collect(request_id)
    return found


# -- the journal ------------------------------------------------------------------

JOURNAL_ROUNDS = 2
COMPACTION_PAGES = 100_000


def journal_suite(ctx: BenchContext) -> list[Row]:
    """PUT_BATCH into a fresh persistent pool at each durability level: the bench
    tmemd (journal, the default) and two more started with --durability none and
    fsync, alternated (best of JOURNAL_ROUNDS); then one in-process compaction and
    one replay of a journal of COMPACTION_PAGES pages."""
    rows: list[Row] = []
    best: dict[str, Row] = {}
    with TmemdProcess(ctx.run_dir / "durability-none", budget=ctx.budget, guests=(BENCH_GUEST,),
                      extra_args=("--log-level", "warning", "--durability", "none")) as none, \
            TmemdProcess(ctx.run_dir / "durability-fsync", budget=ctx.budget,
                         guests=(BENCH_GUEST,),
                         extra_args=("--log-level", "warning", "--durability", "fsync")) as fsync:
        for _ in range(JOURNAL_ROUNDS):
            for level, daemon in (("journal", ctx.daemon), ("none", none), ("fsync", fsync)):
                with AbiClient.open(daemon.abi_socket(BENCH_GUEST)) as client:
                    pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
                    row = timed(f"tmemd PUT_BATCH durability {level}", "put", len(ctx.pages),
                                lambda: _put_batched(client, pool_id, ctx.keys, ctx.pages))
                    client.destroy_pool(pool_id)
                if level not in best or row.seconds < best[level].seconds:
                    best[level] = row
    rows += [best["none"], best["journal"], best["fsync"]]
    ctx.notes["durability_journal_vs_none"] = round(
        best["journal"].pages_per_s / best["none"].pages_per_s, 3)
    ctx.notes["durability_fsync_vs_journal"] = round(
        best["fsync"].pages_per_s / best["journal"].pages_per_s, 3)

    state_dir = ctx.run_dir / "compaction"
    store = JournaledStore(COMPACTION_PAGES * PAGE_SIZE * 2, state_dir=state_dir)
    client_state = store.add_client(BENCH_GUEST)
    _, pool_id, _ = store.new_pool(client_state, persistent=True)
    for start in range(0, COMPACTION_PAGES, len(ctx.pages)):
        count = min(len(ctx.pages), COMPACTION_PAGES - start)
        store.put_many(client_state, pool_id, [((1 + start, 0, 0), n) for n in range(count)],
                       ctx.pages[:count])
    rows.append(timed(f"journal compaction {COMPACTION_PAGES // 1000}k pages", "journal",
                      COMPACTION_PAGES, lambda: store.compact(client_state)))
    ctx.notes["journal_bytes_per_page"] = round(
        store.journal_stats(client_state)["size_bytes"] / COMPACTION_PAGES)

    async def compact_in_steps() -> None:
        # As tmemd does it: one step per pass of the event loop, until it is done.
        store.compact_in_steps(client_state)
        while store.journal_stats(client_state)["compacting"]:
            await asyncio.sleep(0)

    rows.append(timed(f"journal compaction {COMPACTION_PAGES // 1000}k pages, in steps", "journal",
                      COMPACTION_PAGES, lambda: asyncio.run(compact_in_steps())))
    # How long the event loop was held at once: the whole compaction before it ran in steps.
    ctx.notes["journal_compaction_longest_step_ms"] = round(
        store.journal_stats(client_state)["last_compaction_pause_s"] * 1000, 2)
    rows.append(timed(f"journal replay {COMPACTION_PAGES // 1000}k pages", "journal",
                      COMPACTION_PAGES, lambda: JournaledStore(
                          store.budget_bytes, state_dir=state_dir).add_client(BENCH_GUEST)))
    return rows


# -- several guests at once ---------------------------------------------------------

GUEST_COUNT = 4
GUEST_ROUNDS = 2
GUEST_TIMEOUT_S = 600.0


def _put_as_guest(socket_path: Path, keys: Sequence[Key], pages: Sequence[bytes],
                  start: Barrier, spans: Queue[tuple[float, float]]) -> None:
    """One guest's PUT_BATCHes, in a process of its own, once ``start`` lets every
    guest go; puts (started, ended) on ``spans``.

    Forked, the process shares the parent's pages copy-on-write: its first touch
    of each page object (a reference count) would copy a page of memory inside
    the timed window, a cost no guest of its own memory pays and the one guest
    putting alone (the parent) does not either. So it copies its share first."""
    pages = [bytes(bytearray(page)) for page in pages]
    keys = list(keys)
    with AbiClient.open(socket_path) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        start.wait(timeout=GUEST_TIMEOUT_S)  # BrokenBarrierError if another guest never came
        started = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        _put_batched(client, pool_id, keys, pages)
        spans.put((started, time.monotonic()))


def guests_suite(ctx: BenchContext) -> list[Row]:
    """PUT_BATCH from GUEST_COUNT guests at once into one tmemd, each guest a
    client process of its own with a quarter of the pages (BATCH_DEPTH frames in
    flight each): the aggregate rate from the first start to the last end, against
    one guest putting all the pages alone into the same tmemd (best of
    GUEST_ROUNDS each, alternated)."""
    names = [f"{BENCH_GUEST}{number}" for number in range(GUEST_COUNT)]
    share = len(ctx.pages) // GUEST_COUNT
    processes = multiprocessing.get_context("fork")
    alone: list[tuple[Row, CpuUse]] = []
    together: list[tuple[Row, CpuUse]] = []
    with TmemdProcess(ctx.run_dir / "guests", budget=ctx.budget, guests=tuple(names),
                      extra_args=("--log-level", "warning")) as daemon:
        for _ in range(GUEST_ROUNDS):
            with AbiClient.open(daemon.abi_socket(names[0])) as client:
                pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
                with _cpu_meter(daemon.pid) as cpu:
                    row = timed("tmemd PUT_BATCH one guest (of the 4-guest tmemd)", "put",
                                share * GUEST_COUNT,
                                lambda: _put_batched(client, pool_id, ctx.keys[:share * GUEST_COUNT],
                                                     ctx.pages[:share * GUEST_COUNT]))
                alone.append((row, cpu))
                client.destroy_pool(pool_id)
            start, spans = processes.Barrier(GUEST_COUNT), processes.Queue()
            workers = [processes.Process(target=_put_as_guest, args=(
                daemon.abi_socket(name), ctx.keys[number * share:(number + 1) * share],
                ctx.pages[number * share:(number + 1) * share], start, spans))
                for number, name in enumerate(names)]
            # Nothing the parent holds is traced by a child's collector (which would
            # touch, and so copy, every object it inherited).
            gc.freeze()
            try:
                for worker in workers:
                    worker.start()
            finally:
                gc.unfreeze()
            ran: list[tuple[float, float]] = []
            with _cpu_meter(daemon.pid) as cpu:  # from the barrier to the last guest's end
                try:
                    deadline = time.monotonic() + GUEST_TIMEOUT_S
                    while len(ran) < len(workers):
                        try:
                            ran.append(spans.get(timeout=0.5))
                        except queue.Empty:
                            if any(worker.exitcode for worker in workers) or time.monotonic() > deadline:
                                start.abort()  # the guests still waiting to start give up
                                raise RuntimeError("a guest's client failed or hung: exit codes "
                                                   f"{[worker.exitcode for worker in workers]}") from None
                finally:
                    for worker in workers:
                        worker.join(timeout=10)
                        if worker.is_alive():
                            worker.kill()
                            worker.join()
            seconds = max(end for _, end in ran) - min(begin for begin, _ in ran)
            together.append((Row(f"tmemd PUT_BATCH {GUEST_COUNT} guests at once (aggregate)", "put",
                                 share * GUEST_COUNT, seconds), cpu))
            with daemon.control() as control:  # every page landed, in its guest's pool
                clients = control.stats()["store"]["clients"]
                short = {name: clients[name]["pages"] for name in names if clients[name]["pages"] < share}
                if short:
                    raise RuntimeError(f"pages held after {share} put per guest: {short}")
                for name in names:
                    control.request("flush", guest=name)
    (best_alone, alone_cpu), (best_together, together_cpu) = (
        min(runs, key=lambda run: run[0].seconds) for runs in (alone, together))
    ctx.notes["guests_aggregate_vs_one"] = round(best_together.pages_per_s / best_alone.pages_per_s, 3)
    # What the cores had left. Every page costs CPU in tmemd and in its guest's
    # client, on the same cores: however tmemd spreads its work, the guests together
    # can go at most as much faster than one as the cores one guest left idle allow.
    for label, cpu in (("one", alone_cpu), ("four", together_cpu)):
        ctx.notes[f"guests_{label}_host_busy"] = round(cpu.host_busy, 3)
        ctx.notes[f"guests_{label}_tmemd_cores"] = round(cpu.tmemd_cores, 2)
    # From the busy share as printed, so the two figures in the report agree.
    ctx.notes["guests_cpu_ceiling_vs_one"] = round(1 / max(0.01, round(alone_cpu.host_busy, 3)), 3)
    return [best_alone, best_together]


@dataclass
class CpuUse:
    """Over a timed run: the share of the host's cores that was busy, and the cores
    tmemd used (its CPU seconds per wall second, every thread)."""
    host_busy: float = 0.0
    tmemd_cores: float = 0.0


@contextmanager
def _cpu_meter(tmemd_pid: int) -> Iterator[CpuUse]:
    use = CpuUse()
    host, tmemd, started = HostCpu.now(), process_usage(tmemd_pid), time.monotonic()
    try:
        yield use
    finally:
        after = process_usage(tmemd_pid)
        use.host_busy = HostCpu.now().busy_since(host)
        if tmemd is not None and after is not None:
            use.tmemd_cores = (after.cpu_s - tmemd.cpu_s) / max(1e-6, time.monotonic() - started)


def _batch_statuses(client: AbiClient, request_id: int) -> list[Status]:
    reply = client.reply(request_id)
    if reply.status != Status.OK:
        return [Status(reply.status)]
    return decode_batch_reply(reply.payload)[0]


# -- Redis -----------------------------------------------------------------------


class RespClient:
    """Just enough RESP2 for SET and GET of binary values over a unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        widen_socket_buffers(self.sock)  # as tmemd's clients do (the server's are its own)
        self.sock.connect(str(path))
        self._buffer = bytearray()
        self._recv_buffer = memoryview(bytearray(1 << 18))

    @staticmethod
    def command(*parts: bytes) -> bytes:
        out = [b"*%d\r\n" % len(parts)]
        for part in parts:
            out += [b"$%d\r\n" % len(part), part, b"\r\n"]
        return b"".join(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 2]
        return line

    def _fill(self) -> None:
        received = self.sock.recv_into(self._recv_buffer)
        if not received:
            raise ConnectionError("redis closed the connection")
        self._buffer += self._recv_buffer[:received]

    def reply(self) -> bytes | None:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            while len(self._buffer) < length + 2:
                self._fill()
            value = bytes(self._buffer[:length])
            del self._buffer[:length + 2]
            return value
        raise RuntimeError(f"unexpected redis reply {line[:80]!r}")

    def close(self) -> None:
        self.sock.close()


@contextmanager
def redis_server(temp_dir: Path) -> Iterator[Path]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is missing: install the packages in "
                           "ci/system-packages.txt")
    sock_path = temp_dir / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock_path), "--save", "",
         "--appendonly", "no", "--dir", str(temp_dir), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _accepts_connections(sock_path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)
        yield sock_path
    finally:
        process.terminate()
        process.wait(10)


def _accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def redis_suite(ctx: BenchContext) -> list[Row]:
    pages = ctx.pages
    names = [b"page:%d" % number for number in range(len(pages))]
    sync_count = len(pages) // 4 if ctx.quick else len(pages) // 2
    with redis_server(ctx.run_dir) as sock_path:
        client = RespClient(sock_path)
        command = RespClient.command
        try:
            def set_sync() -> None:
                for name, page in zip(names[:sync_count], pages):
                    client.send(command(b"SET", name, page))
                    client.reply()

            def get_sync() -> None:
                for name in names[:sync_count]:
                    client.send(command(b"GET", name))
                    client.reply()

            def set_pipelined() -> None:
                for start in range(0, len(pages), BATCH_PAGES):
                    stop = start + BATCH_PAGES
                    client.send(b"".join(command(b"SET", name, page) for name, page
                                         in zip(names[start:stop], pages[start:stop])))
                    for _ in names[start:stop]:
                        client.reply()

            found: list[bytes | None] = []

            def get_pipelined() -> None:
                for start in range(0, len(pages), BATCH_PAGES):
                    stop = start + BATCH_PAGES
                    client.send(b"".join(command(b"GET", name) for name in names[start:stop]))
                    found.extend(client.reply() for _ in names[start:stop])

            rows = [timed("redis SET", "put", sync_count, set_sync),
                    timed("redis GET", "get", sync_count, get_sync),
                    timed(REFERENCE_ROW, "put", len(pages), set_pipelined),
                    timed("redis GET pipelined", "get", len(pages), get_pipelined)]
            if found != pages:
                raise RuntimeError("redis returned different pages than were set")
        finally:
            client.close()
        rows += redis_benchmark_rows(sock_path, len(pages))
    put_batch = next(row for row in ctx.rows_so_far if row.name.startswith("tmemd PUT_BATCH 64p"))
    server_set = next(row for row in rows if row.name.startswith("redis-benchmark SET"))
    ctx.notes["tmemd_put_batch_vs_redis_benchmark_set"] = round(
        put_batch.pages_per_s / server_set.pages_per_s, 3)
    return rows


def redis_benchmark_rows(sock_path: Path, count: int) -> list[Row]:
    """Redis's own C load generator against the same server: 4 KiB values (its own
    filler, not our pages), as many requests in flight as the batched rows
    (BATCH_DEPTH connections x BATCH_PAGES pipelined). It measures the server,
    where the Python client above measures what a Python client can do with it."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark is missing: install the packages in "
                           "ci/system-packages.txt")
    result = subprocess.run(
        [binary, "-s", str(sock_path), "-t", "set,get", "-d", str(PAGE_SIZE), "-n", str(count),
         "-r", str(count), "-c", str(BATCH_DEPTH), "-P", str(BATCH_PAGES), "--csv"],
        capture_output=True, text=True, timeout=300, check=True)
    rows: list[Row] = []
    for line in result.stdout.splitlines():
        fields = [field.strip('"') for field in line.split(",")]
        if fields[0] in ("SET", "GET"):
            requests_per_s = float(fields[1])
            rows.append(Row(f"redis-benchmark {fields[0]} c{BATCH_DEPTH} P{BATCH_PAGES}",
                            "put" if fields[0] == "SET" else "get", count,
                            count / requests_per_s))
    if len(rows) != 2:
        raise RuntimeError(f"redis-benchmark printed no SET/GET rates: {result.stdout!r}")
    return rows


# -- the NBD export -------------------------------------------------------------


def nbd_suite(ctx: BenchContext) -> list[Row]:
    """WRITE/READ of BATCH_PAGES-page requests on the bench guest's NBD export."""
    return [Row(*row) for row in bench_export(ctx.daemon.nbd_socket(BENCH_GUEST), BENCH_GUEST,
                                              ctx.pages, pages_per_request=BATCH_PAGES,
                                              depth=BATCH_DEPTH)]


# -- the remote tier ------------------------------------------------------------

# The guest whose pages fill the remote tmemd's memory (see remote_suite).
FILLER_GUEST = "filler"
# What one remote page costs in tmemd's memory: its metadata (~430 bytes) and its
# share of its object's, with room to spare; the budget must hold it for every page.
REMOTE_PAGE_LOCAL_BYTES = 600


def remote_suite(ctx: BenchContext) -> list[Row]:
    """PUT_BATCH and GET_BATCH through a tmemd whose memory is full, so that every
    data page goes to the cluster and comes back from it, then redis-py's own ways
    with the same pages and cluster (rawbench).

    A tiny budget alone would not measure that: the first pages into an empty
    tmemd stay in memory up to the tier's local fraction of the budget (demoted
    later, outside the timed window), and the budget must still hold every remote
    page's metadata. So a filler guest first fills memory to the local fraction
    with pages that cannot leave (remote-cap of 1 byte: neither its puts nor the
    demoter can send them), and the budget is all pages' metadata over the rest
    (1 - local fraction)."""
    pages = ctx.pages
    # Swap slots as frontswap names them, the layout the tier groups by (one hash
    # tag per 64 aligned slots): what a guest's swap sends.
    keys = frontswap_keys(0, range(len(pages)))
    local_fraction = RemoteSettings(seeds=()).local_fraction
    budget = ceil(len(pages) * REMOTE_PAGE_LOCAL_BYTES / (1 - local_fraction))
    # No AOF rewrites (the AOF itself stays, fsynced every second): past 64 MiB each
    # node forks and writes its whole data set, six at once for 1-4 s here, inside
    # whichever row crossed the size in that run.
    cluster = LocalCluster(ctx.run_dir / "remote-cluster", aof_rewrite=False)
    try:
        with cluster, TmemdProcess(ctx.run_dir / "remote-tmemd", budget=str(budget),
                                   guests=(BENCH_GUEST, f"{FILLER_GUEST}:remote-cap=1"),
                                   extra_args=("--log-level", "warning",
                                               "--remote", cluster.seed_spec)) as daemon:
            _fill_memory(daemon, budget)
            rows = _remote_tmemd_rows(ctx, daemon, keys)
            # Stopped before the raw rows (no idle tmemd beside them), and cleanly.
            if (code := daemon.terminate()) != 0:
                raise RuntimeError(f"the remote tmemd exited {code}\n{daemon.log_tail()}")
            raw = [Row(row.name, row.op, row.pages, row.seconds)
                   for row in raw_cluster_rows(cluster.seed_spec, pages)]
    finally:
        # After the nodes stopped (or failed to start): their whole logs.
        cluster.collect_logs(ctx.run_dir / "remote-logs")
    for tmemd_row in rows:
        verb = {"put": "set", "get": "get"}[tmemd_row.kind]
        fastest = max((row for row in raw if row.kind == tmemd_row.kind),
                      key=lambda row: row.pages_per_s)
        ctx.notes[f"tmemd_remote_{tmemd_row.kind}_vs_fastest_raw_{verb}"] = round(
            tmemd_row.pages_per_s / fastest.pages_per_s, 3)
        ctx.notes[f"fastest_raw_{verb}"] = fastest.name
    return rows + raw


def _remote_tmemd_rows(ctx: BenchContext, daemon: TmemdProcess, keys: list[Key]) -> list[Row]:
    """The timed PUT_BATCH and GET_BATCH rows (the GETs checked), and notes from
    tmemd's remote stats: where the pages went, round trips per batch."""
    pages = ctx.pages
    with AbiClient.open(daemon.abi_socket(BENCH_GUEST)) as client, daemon.control() as control:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)

        def remote_stats() -> RemoteStats:
            remote = control.stats()["remote"]
            assert remote is not None  # tmemd runs with --remote
            return remote

        before = remote_stats()["round_trips"]
        put = timed(f"tmemd remote PUT_BATCH {BATCH_PAGES}p x{BATCH_DEPTH}", "put", len(pages),
                    lambda: _put_batched(client, pool_id, keys, pages))
        after_put = remote_stats()
        remote_pages = after_put["guests"][BENCH_GUEST]["remote_pages"]
        found: list[bytes | None] = []
        get = timed(f"tmemd remote GET_BATCH {BATCH_PAGES}p x{BATCH_DEPTH}", "get", len(pages),
                    lambda: found.extend(_get_batched(client, pool_id, keys)))
        after_get = remote_stats()["round_trips"]
    if found != pages:
        wrong = sum(1 for got, want in zip(found, pages) if got != want)
        raise RuntimeError(f"tmemd's remote tier returned {wrong} of {len(pages)} pages "
                           "different from what was put")
    # The mix has no fill-word pages (those would stay in memory, costing no data).
    ctx.notes["remote_fraction"] = round(remote_pages / len(pages), 4)
    batches = -(-len(pages) // BATCH_PAGES)
    ctx.notes["remote_round_trips_per_put_batch"] = round(
        (after_put["round_trips"] - before) / batches, 2)
    ctx.notes["remote_round_trips_per_get_batch"] = round(
        (after_get - after_put["round_trips"]) / batches, 2)
    return [put, get]


def _fill_memory(daemon: TmemdProcess, budget: int) -> None:
    """PUT_BATCH the filler guest's incompressible pages until tmemd refuses one:
    its memory is then at the tier's local fraction of the budget."""
    page = random.Random(SEED).randbytes(PAGE_SIZE)
    with AbiClient.open(daemon.abi_socket(FILLER_GUEST)) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        for start in range(0, budget // PAGE_SIZE + BATCH_PAGES, BATCH_PAGES):
            keys = frontswap_keys(0, range(start, start + BATCH_PAGES))
            if any(status != Status.OK
                   for status in client.put_batch(pool_id, keys, [page] * BATCH_PAGES)):
                return
    raise RuntimeError(f"tmemd took more filler pages than its budget ({budget} bytes) holds")


# Suites run in this order.
SUITES: list[Callable[[BenchContext], list[Row]]] = [lz4_suite, tmemd_suite, journal_suite, guests_suite,
                                                     nbd_suite, redis_suite, remote_suite]


# -- profiles ---------------------------------------------------------------------

# How long each hot path runs under py-spy: a few thousand samples at DEFAULT_RATE.
PROFILE_SECONDS = 8.0
PROFILE_TOP = 12


@dataclass
class PathProfile:
    """One of tmemd's hot paths, repeated under py-spy: its rate while sampled
    (py-spy pauses tmemd for each sample: about two thirds of the bench row's)
    and where the samples fell."""
    name: str
    pages_per_s: float
    profile: Profile
    stacks_path: Path


def rate(work: Callable[[], int], seconds: float) -> float:
    """Units per second of ``work`` (which returns the units it did), run again
    and again for at least ``seconds`` (bench/abi_codec.py's rows too)."""
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        done += work()
    return done / elapsed


def profile_paths(ctx: BenchContext, out_dir: Path, seconds: float) -> list[PathProfile]:
    """tmemd's hot paths one at a time, each sampled alone: batched PUT and GET
    over the ABI socket, NBD WRITE and READ of BATCH_PAGES-page requests."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pages, keys = ctx.pages, ctx.keys
    nbd_socket = ctx.daemon.nbd_socket(BENCH_GUEST)
    results: list[PathProfile] = []
    with AbiClient.open(ctx.daemon.abi_socket(BENCH_GUEST)) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        _put_batched(client, pool_id, keys, pages)  # so that the first GET finds them

        def put_batched() -> int:
            _put_batched(client, pool_id, keys, pages)
            return len(pages)

        def get_batched() -> int:
            if _get_batched(client, pool_id, keys) != pages:
                raise RuntimeError("tmemd returned different pages than were put")
            return len(pages)

        def nbd(command: nbd_wire.Command) -> Callable[[], int]:
            def run() -> int:
                ((_, _, moved, _),) = bench_export(nbd_socket, BENCH_GUEST, pages, commands=(command,),
                                                   pages_per_request=BATCH_PAGES, depth=BATCH_DEPTH)
                return moved
            return run

        paths: list[tuple[str, Callable[[], int]]] = [
            (f"PUT_BATCH {BATCH_PAGES}p x{BATCH_DEPTH}", put_batched),
            (f"GET_BATCH {BATCH_PAGES}p x{BATCH_DEPTH}", get_batched),
            (f"NBD WRITE {BATCH_PAGES}p x{BATCH_DEPTH}", nbd(nbd_wire.Command.WRITE)),
            (f"NBD READ {BATCH_PAGES}p x{BATCH_DEPTH}", nbd(nbd_wire.Command.READ)),
        ]
        for name, work in paths:
            stacks_path = out_dir / (name.split(" x")[0].replace(" ", "-").lower() + ".txt")
            with sampled(ctx.daemon.pid, stacks_path):
                pages_per_s = rate(work, seconds)
            results.append(PathProfile(name, pages_per_s, Profile.load(stacks_path), stacks_path))
    return results


def render_profiles(results: list[PathProfile]) -> list[Table]:
    tables = []
    for result in results:
        profile = result.profile
        table = Table(title=f"tmemd {result.name}: {result.pages_per_s:,.0f} pages/s sampled, "
                            f"busy {profile.busy_share:.0%} of {profile.samples} samples "
                            f"({result.stacks_path})")
        for column in ("function (self: on top of the stack)", "self", "total"):
            table.add_column(column, justify="left" if column.startswith("function") else "right")
        for share in profile.top(PROFILE_TOP):
            table.add_row(share.function, f"{share.self_share:.1%}", f"{share.total_share:.1%}")
        tables.append(table)
    return tables


# -- report ----------------------------------------------------------------------


def render(rows: list[Row], notes: dict[str, object]) -> Table:
    by_name = {row.name: row for row in rows}
    reference = by_name.get(REFERENCE_ROW)
    ceilings = {"put": by_name.get("lz4 compress (in-process)"),
                "get": by_name.get("lz4 decompress (in-process)")}
    table = Table(title=f"tmemd bench: {PAGE_SIZE} B mixed pages "
                        f"(lz4 ratio {notes.get('lz4_ratio')}, tmemd stored/raw "
                        f"{notes.get('tmemd_ratio')}, load {notes.get('loadavg_before')})")
    for column in ("operation", "pages/s", "MB/s", "vs redis SET pipelined", "vs lz4"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    # The ratios between rows that are not against Redis or lz4 (durability levels,
    # several guests against one, the remote tier against the raw cluster).
    ratios = [f"{key.replace('_', ' ')}: {value}x" for key, value in notes.items()
              if "_vs_" in key and isinstance(value, float)]
    table.caption = "; ".join(ratios) or None
    for row in rows:
        ceiling = ceilings.get(row.kind)
        table.add_row(
            row.name, f"{row.pages_per_s:,.0f}", f"{row.mb_per_s:,.1f}",
            f"{row.pages_per_s / reference.pages_per_s:.2f}" if reference else "-",
            f"{row.pages_per_s / ceiling.pages_per_s:.2f}" if ceiling else "-",
        )
    return table


def _utc_stamp() -> str:
    """What names a run's results: 20261206T173751Z."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmem_host.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=32768, help="pages per row (default 128 MiB)")
    parser.add_argument("--quick", action="store_true", help="fewer unpipelined round trips")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--profile", action="store_true",
                        help="instead of the rows: sample tmemd with py-spy on each hot path "
                             f"({PROFILE_SECONDS:g} s each), print where the time goes and keep "
                             "the stacks (collapsed format: flamegraph.pl, speedscope)")
    args = parser.parse_args(argv)
    # The bench's own clients move batch-sized buffers too (same settings as tmemd).
    keep_batch_buffers_on_the_heap()
    pages = mixed_pages(args.pages)
    keys: list[Key] = [((number >> 10, 0, 0), number & 1023) for number in range(len(pages))]
    budget = f"{max(64, args.pages * PAGE_SIZE * 2 >> 20)}M"
    with tempfile.TemporaryDirectory(prefix="tmem-bench-") as temp_dir, \
            TmemdProcess(Path(temp_dir), budget=budget, guests=(BENCH_GUEST,),
                         nbd_size=f"{-(-args.pages * PAGE_SIZE // (1 << 20))}M",  # room for every page
                         extra_args=("--log-level", "warning")) as daemon:
        ctx = BenchContext(pages, keys, Path(temp_dir), daemon, args.quick, budget)
        if args.profile:
            profiles = profile_paths(ctx, args.results_dir / f"{_utc_stamp()}-profile", PROFILE_SECONDS)
            for table in render_profiles(profiles):
                Console().print(table)
            return 0
        # Other work on the host skews every row: record how busy it was.
        ctx.notes["loadavg_before"] = round(os.getloadavg()[0], 2)
        for suite in SUITES:
            ctx.rows_so_far += suite(ctx)
        rows = ctx.rows_so_far
        ctx.notes["loadavg_after"] = round(os.getloadavg()[0], 2)
    Console().print(render(rows, ctx.notes))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = _utc_stamp()
    result_path = args.results_dir / f"{stamp}.json"
    result_path.write_text(json.dumps({
        "timestamp": stamp, "commit": _git_commit(), "host": platform.node(),
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "page_size": PAGE_SIZE,
        "pages": args.pages, "seed": SEED, "pipeline_depth": PIPELINE_DEPTH,
        "batch_pages": BATCH_PAGES, "batch_depth": BATCH_DEPTH, "notes": ctx.notes,
        "rows": [{**asdict(row), "pages_per_s": round(row.pages_per_s),
                  "mb_per_s": round(row.mb_per_s, 1)} for row in rows],
    }, indent=2) + "\n")
    print(f"results: {result_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
