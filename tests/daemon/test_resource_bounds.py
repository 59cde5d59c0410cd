"""What one client can take from tmemd: memory, descriptors, time (docs/CONTROL.md,
"Connection limits").

Each attack runs against a real tmemd over its real sockets, while tmemd's VmRSS
is sampled and another guest (g2) times PUT+GET round trips over its own ABI
socket. The bounds asserted:

- RSS: at most RSS_GROWTH_MAX above what tmemd had before the attack. Before the
  reply bound, 64 unread NBD READs of 32 MiB took tmemd to 2.15 GiB; now each
  connection holds at most about 2 x REPLY_BYTES_IN_FLIGHT of replies.
- g2's PUT+GET: each under ROUND_TRIP_MAX_S (the event loop never stalls on one
  client's replies).
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tmem_host.daemon.client import AbiClient, TmemdClosedConnection
from tmem_host.daemon.control import ControlClient, ControlError
from tmem_host.limits import CONTROL_CONNECTIONS
from tmem_host.daemon.logsetup import RateLimitFilter, TextFormatter
from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.nbd.client import NbdClient, NbdClientError
from tmem_host.nbd.export import MAX_PAYLOAD
from tmem_wire import nbd
from tmem_wire.abi import MIN_PAGE_SHIFT, PoolFlag, Status, max_batch_pages

MIB = 1 << 20
PAGE = 4096
RSS_GROWTH_MAX = 48 * MIB
ROUND_TRIP_MAX_S = 0.5
SAMPLES = 20
LOG_MAX_BYTES = 200_000
# These tests are not about the fallback files: no disk space reserved for them.
NO_PREALLOCATION = ("--no-preallocate",)


@dataclass
class Watch:
    """tmemd's RSS and g2's PUT+GET round trips, sampled while an attack runs."""

    daemon: TmemdProcess
    rss_before: int = 0
    rss: list[int] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = AbiClient.open(self.daemon.abi_socket("g2"))
        self.pool_id, _ = self.client.new_pool(PoolFlag(0))
        self.round_trip(0)  # the pool and the connection warm
        self.rss_before = self.daemon.rss_bytes()

    def round_trip(self, number: int) -> float:
        page = number.to_bytes(8, "little") * (PAGE // 8)
        started = time.perf_counter()
        assert self.client.put(self.pool_id, (7, 0, 0), number, page) == Status.OK
        assert self.client.get(self.pool_id, (7, 0, 0), number) == (Status.OK, page)
        return time.perf_counter() - started

    def sample(self, count: int = SAMPLES, interval_s: float = 0.1) -> None:
        for number in range(count):
            self.rss.append(self.daemon.rss_bytes())
            self.round_trips.append(self.round_trip(len(self.round_trips) + 1))
            time.sleep(interval_s)

    def check(self, what: str) -> None:
        growth = max(self.rss) - self.rss_before
        print(f"{what}: RSS before {self.rss_before / MIB:.1f} MiB, max during "
              f"{max(self.rss) / MIB:.1f} MiB (+{growth / MIB:.1f}); g2 PUT+GET max "
              f"{max(self.round_trips) * 1000:.1f} ms over {len(self.round_trips)} samples")
        assert growth <= RSS_GROWTH_MAX, f"{what}: RSS grew by {growth / MIB:.1f} MiB"
        assert max(self.round_trips) < ROUND_TRIP_MAX_S, self.round_trips

    def close(self) -> None:
        self.client.close()


@contextmanager
def watching(daemon: TmemdProcess) -> Iterator[Watch]:
    watch = Watch(daemon)
    try:
        yield watch
    finally:
        watch.close()


def limits(daemon: TmemdProcess) -> dict[str, Any]:
    with daemon.control() as control:
        stats = control.request("stats")
    result: dict[str, Any] = stats["limits"]
    result["nbd"] = stats["nbd"]
    result["sessions"] = stats["connections"]
    return result


def nbd_round_trip(daemon: TmemdProcess, guest: str, slot: int) -> None:
    data = os.urandom(2 * PAGE)
    with NbdClient(daemon.nbd_socket(guest), guest, timeout=5) as client:
        assert client.write(slot * PAGE, data) == nbd.Error.OK
        assert client.read(slot * PAGE, len(data)) == (nbd.Error.OK, data)


def read_request(handle: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.Command.READ, handle, offset, length)


def receive_exactly(sock: socket.socket, length: int) -> bytes:
    buffer = bytearray(length)
    view = memoryview(buffer)
    received = 0
    while received < length:
        count = sock.recv_into(view[received:])
        assert count, "tmemd closed the connection"
        received += count
    return bytes(buffer)


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closed: EOF (after whatever it sent) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


@pytest.fixture
def many_descriptors() -> Iterator[None]:
    """The test opens more sockets than a default soft limit of 1024 allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- memory: replies in flight ------------------------------------------------------


def test_unread_nbd_read_replies_stay_bounded(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(extra_args=NO_PREALLOCATION)
    requests = 64
    with watching(daemon) as watch:
        reader = NbdClient(daemon.nbd_socket("g1"), "g1", timeout=10)
        quitter = NbdClient(daemon.nbd_socket("g1"), "g1", timeout=10)
        negotiated = reader.connect()
        quitter.connect()
        assert negotiated.maximum_payload == MAX_PAYLOAD == 4 * MIB
        flood = b"".join(read_request(handle, handle * MAX_PAYLOAD % negotiated.size, MAX_PAYLOAD)
                         for handle in range(requests))
        # 1,792 bytes of requests ask for 256 MiB of replies, on each connection.
        reader.send_raw(flood)
        quitter.send_raw(flood)
        watch.sample()
        watch.check("NBD READ flood")
        stats = limits(daemon)
        assert stats["nbd"]["g1"]["reply_backlogs"] >= 2
        # The replies come in request order, whole, once the client reads them.
        sock = reader._sock
        for handle in range(requests):
            magic, error, reply_handle = struct.unpack(">IIQ", receive_exactly(sock, 16))
            assert (magic, error, reply_handle) == (nbd.SIMPLE_REPLY_MAGIC, 0, handle)
            assert receive_exactly(sock, MAX_PAYLOAD) == bytes(MAX_PAYLOAD)
        reader.close()
        quitter._sock.close()  # with its replies unread
        watch.sample(5)
        nbd_round_trip(daemon, "g1", 0)
        assert limits(daemon)["guests"]["g1"]["nbd"]["connections"] == 0
    # A READ beyond the maximum payload is refused, cheaply.
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.read(0, 8 * MAX_PAYLOAD)[0] == nbd.Error.EINVAL


def test_unread_abi_get_batch_replies_stay_bounded(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(extra_args=NO_PREALLOCATION)
    batch = max_batch_pages(MIN_PAGE_SHIFT)  # each reply is about 4 MiB
    keys = [((1, 0, 0), index) for index in range(batch)]
    pages = [os.urandom(PAGE) for _ in range(batch)]
    requests = 64
    with watching(daemon) as watch, AbiClient.open(daemon.abi_socket("g1")) as attacker:
        pool_id, _ = attacker.new_pool(PoolFlag.PERSISTENT)
        for start in range(0, batch, 256):
            statuses = attacker.put_batch(pool_id, keys[start:start + 256],
                                          pages[start:start + 256])
            assert set(statuses) == {Status.OK}
        watch.rss_before = daemon.rss_bytes()
        request_ids = [attacker.submit_get_batch(pool_id, keys) for _ in range(requests)]
        # 2 MiB of requests: tmemd stops reading them, so they go from a thread.
        sender = threading.Thread(target=attacker.flush, daemon=True)
        sender.start()
        watch.sample()
        watch.check("ABI GET_BATCH flood")
        [session] = [s for s in limits(daemon)["sessions"] if s["guest"] == "g1"]
        assert session["reply_backlogs"] >= 1
        # Every reply arrives, whole, once the client reads them.
        for request_id in request_ids:
            statuses, found = attacker.get_batch_reply(request_id)
            assert statuses == [Status.OK] * batch and found == pages
        sender.join(10)
        assert not sender.is_alive()
    # The same flood from a client that hangs up without reading.
    with AbiClient.open(daemon.abi_socket("g1")) as quitter:
        for _ in range(requests):
            quitter.submit_get_batch(pool_id, keys)
        sender = threading.Thread(target=_flush_until_closed, args=(quitter,), daemon=True)
        sender.start()
        time.sleep(0.5)
        quitter.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked sender (close would not)
        sender.join(10)
        assert not sender.is_alive()
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        assert client.get_batch(pool_id, keys[:4]) == pages[:4]


def _flush_until_closed(client: AbiClient) -> None:
    try:
        client.flush()
    except (TmemdClosedConnection, OSError):
        pass


# -- connections, timeouts and descriptors --------------------------------------------


def test_half_open_connections_cannot_crowd_out_guests(
        start_tmemd: StartTmemd, many_descriptors: None) -> None:
    daemon = start_tmemd(extra_args=["--handshake-timeout", "2", *NO_PREALLOCATION])
    junk: list[socket.socket] = []

    def connect_junk() -> None:
        for path in (daemon.abi_socket("g1"), daemon.nbd_socket("g1")):
            for _ in range(600):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))  # blocking: waits while the listen backlog is full
                junk.append(sock)

    with watching(daemon) as watch:
        opener = threading.Thread(target=connect_junk)
        started = time.monotonic()
        opener.start()
        watch.sample(10, 0.05)
        opener.join(20)
        assert len(junk) == 1200
        print(f"1200 half-open connections in {time.monotonic() - started:.2f} s")
        stats = limits(daemon)
        for kind in ("abi", "nbd"):
            group = stats["guests"]["g1"][kind]
            assert group["connections"] <= 8
            assert group["evicted"] + group["handshake_timeouts"] >= 592
        # g1's own clients still get in past the junk; the control socket works.
        nbd_round_trip(daemon, "g1", 0)
        with AbiClient.open(daemon.abi_socket("g1")) as g1:
            pool_id, _ = g1.new_pool(PoolFlag(0))
            assert g1.put(pool_id, (1, 0, 0), 0, bytes(PAGE)) == Status.OK
            watch.sample(10, 0.05)
            watch.check("1200 half-open connections")
            # The handshake timeout closes what is left of the junk; g1's client stays,
            # and so may the newest silent ABI connection (as QEMU's chardev waits
            # for its agent's HELLO).
            time.sleep(2.0 + 1.0)
            stats = limits(daemon)
            assert stats["guests"]["g1"]["abi"]["connections"] <= 2
            assert stats["guests"]["g1"]["nbd"]["connections"] == 0
            assert stats["totals"]["handshake_timeouts"] >= 1
            assert g1.get(pool_id, (1, 0, 0), 0) == (Status.OK, bytes(PAGE))
    try:
        open_junk = [sock for sock in junk if not closed_by_peer(sock, 1.0)]
        # At most the newest silent ABI connection is still waiting.
        assert len(open_junk) <= 1, len(open_junk)
    finally:
        for sock in junk:
            sock.close()
    log_size = daemon.log_path.stat().st_size
    print(f"tmemd log: {log_size} bytes")
    assert log_size < LOG_MAX_BYTES


def test_connections_past_the_limit_are_refused_once_none_is_in_its_handshake(
        start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(extra_args=["--connections-per-guest", "3", *NO_PREALLOCATION])
    agents = [AbiClient.open(daemon.abi_socket("g1")) for _ in range(3)]
    disks = [open_nbd(daemon, "g1") for _ in range(3)]
    admins = [ControlClient(daemon.run_dir) for _ in range(CONTROL_CONNECTIONS)]
    try:
        for admin in admins:
            admin.request("guests")  # handshake done: none of them may be replaced
        with pytest.raises(TmemdClosedConnection):
            AbiClient.open(daemon.abi_socket("g1"))
        with pytest.raises((NbdClientError, OSError)):
            open_nbd(daemon, "g1")
        with pytest.raises((ControlError, OSError)), ControlClient(daemon.run_dir) as extra:
            extra.request("guests")
        # Another guest has its own limit; the admitted connections still work.
        with AbiClient.open(daemon.abi_socket("g2")):
            pass
        assert agents[0].stats() == []
        agents.pop().close()
        admins.pop().close()
        time.sleep(0.1)
        agents.append(AbiClient.open(daemon.abi_socket("g1")))
        stats = admins[0].request("stats")["limits"]
    finally:
        for clients in (agents, disks, admins):
            for client in clients:
                client.close()
    assert stats["guests"]["g1"]["abi"] == {
        "connections": 3, "refused_full": 1, "refused_descriptors": 0, "evicted": 0,
        "handshake_timeouts": 0, "idle_timeouts": 0}
    assert stats["guests"]["g1"]["nbd"]["refused_full"] == 1
    assert stats["control"]["refused_full"] == 1
    assert stats["totals"]["refused_full"] == 3
    assert stats["guests"]["g2"]["abi"]["connections"] == 0


def test_idle_abi_and_control_connections_are_closed_but_nbd_ones_are_not(
        start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(extra_args=["--handshake-timeout", "1", "--idle-timeout", "1",
                                     *NO_PREALLOCATION])
    with AbiClient.open(daemon.abi_socket("g1")) as idle_agent, \
            NbdClient(daemon.nbd_socket("g1"), "g1") as idle_disk, \
            ControlClient(daemon.run_dir) as idle_admin:
        idle_admin.request("guests")
        time.sleep(2.5)
        with pytest.raises(TmemdClosedConnection):
            idle_agent.stats()
        with pytest.raises((ControlError, OSError)):
            idle_admin.request("guests")
        # An idle swap disk is a healthy one: QEMU sends no keepalives.
        data = os.urandom(PAGE)
        assert idle_disk.write(0, data) == nbd.Error.OK
        assert idle_disk.read(0, PAGE) == (nbd.Error.OK, data)
    stats = limits(daemon)
    assert stats["guests"]["g1"]["abi"]["idle_timeouts"] == 1
    assert stats["control"]["idle_timeouts"] == 1


def test_a_guest_cannot_take_the_descriptors_others_need(tmp_path: Path) -> None:
    descriptor_limit = 64
    daemon = TmemdProcess(tmp_path / "run", budget="64M", rlimit_nofile=descriptor_limit,
                          extra_args=["--connections-per-guest", "100", *NO_PREALLOCATION])
    admitted: list[AbiClient | NbdClient] = []
    refused = 0
    with daemon:
        print(f"idle tmemd holds {len(os.listdir(f'/proc/{daemon.pid}/fd'))} descriptors")
        # g1 connects to both its sockets, each client finishing its handshake,
        # until four are refused.
        for attempt in range(descriptor_limit):
            try:
                admitted.append(AbiClient.open(daemon.abi_socket("g1"), timeout=5)
                                if attempt % 2 else open_nbd(daemon, "g1"))
            except (TmemdClosedConnection, NbdClientError, OSError):
                refused += 1
                if refused == 4:
                    break
        in_use = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        print(f"g1 got {len(admitted)} connections; tmemd holds {in_use} descriptors")
        assert refused == 4 and in_use <= descriptor_limit - 16
        # g2 (its first connections draw on the reserve) and the control socket work.
        with watching(daemon) as watch:
            watch.sample(5, 0.02)
            nbd_round_trip(daemon, "g2", 0)
            stats = limits(daemon)
        assert stats["descriptor_limit"] == descriptor_limit
        g1 = stats["guests"]["g1"]
        assert g1["abi"]["refused_descriptors"] + g1["nbd"]["refused_descriptors"] == 4
        for client in admitted:
            client.close()
        time.sleep(0.2)
        nbd_round_trip(daemon, "g1", 0)
    log = daemon.log_text()
    assert "out of system resource" not in log and "Too many open files" not in log
    assert daemon.proc.returncode == 0


def open_nbd(daemon: TmemdProcess, guest: str) -> NbdClient:
    client = NbdClient(daemon.nbd_socket(guest), guest, timeout=5)
    try:
        client.connect()
    except BaseException:
        client.close()
        raise
    return client


# -- the log rate limit ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(message: str, *, name: str = "asyncio", level: int = logging.ERROR,
           traceback: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if traceback:
        try:
            raise OSError(24, "Too many open files")
        except OSError as error:
            exc_info = (type(error), error, error.__traceback__)
    entry = logging.LogRecord(name, level, __file__, 1, message, None, exc_info)
    entry.__dict__.update(extra)
    return entry


def test_the_log_rate_limit_lets_a_burst_through_then_one_line_per_interval() -> None:
    clock = FakeClock()
    limit = RateLimitFilter(burst=10, interval_s=10.0, clock=clock)
    flood = [record("socket.accept() out of system resource", traceback=True,
                    socket=n) for n in range(100)]
    passed = [entry for entry in flood if limit.filter(entry)]
    assert passed == flood[:10]
    # Only the first keeps its traceback; the repeats lose theirs.
    assert passed[0].exc_info is not None
    assert all(entry.exc_info is None for entry in passed[1:])
    # Another message, level or logger is another key.
    assert limit.filter(record("socket.accept() out of system resource", level=logging.WARNING))
    assert limit.filter(record("guest connected", name="tmemd.session", level=logging.INFO))
    # One line per interval, carrying how many were dropped before it.
    clock.now += 5.0
    assert not limit.filter(record("socket.accept() out of system resource"))
    clock.now += 5.0
    late = record("socket.accept() out of system resource", traceback=True)
    assert limit.filter(late)
    assert late.__dict__["suppressed"] == 91 and late.exc_info is None
    assert "suppressed=91" in TextFormatter().format(late)
    assert not limit.filter(record("socket.accept() out of system resource"))
    # Quiet for long enough: the bucket is full and the next line is a first again.
    clock.now += 10.0 * 11
    again = record("socket.accept() out of system resource", traceback=True)
    assert limit.filter(again)
    assert again.__dict__["suppressed"] == 1 and again.exc_info is None
    clock.now += 10.0 * 11
    fresh = record("socket.accept() out of system resource", traceback=True)
    assert limit.filter(fresh) and fresh.exc_info is not None
    assert "suppressed" not in fresh.__dict__


def test_forgotten_keys_keep_the_filter_small() -> None:
    clock = FakeClock()
    limit = RateLimitFilter(burst=2, interval_s=1.0, clock=clock)
    for number in range(5 * RateLimitFilter.MAX_KEYS):
        assert limit.filter(record(f"message {number}"))
        clock.now += 0.01
    assert len(limit._buckets) <= RateLimitFilter.MAX_KEYS
