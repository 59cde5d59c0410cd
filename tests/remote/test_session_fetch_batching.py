"""The ABI session over a remote tier on a real Redis Cluster (3 masters, 3
replicas on loopback), driven in-process: GET and GET_BATCH frames already
received behind one that waits for the tier join its fetch (one pipeline per
master for all of them), and everything else stays as it was: one reply per
request in order, nothing but reads ahead of its turn, the requests-in-flight
and reply-bytes bounds, an undecodable frame or a HELLO among those taken
ahead, however the bytes arrive."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from tmem_host.daemon.session import AbiSession
from tmem_host.journal.journaled import JournaledStore
from tmem_host.limits import REPLY_BYTES_IN_FLIGHT
from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.tier import RemoteTier
from tmem_host.store import Client
from tmem_host.store.tier import RemotePage
from tmem_wire.abi import (
    ALL_POOLS, NEED_DATA, Frame, FrameDecoder, Hello, Key, Op, Status, decode_batch_reply,
    encode_frame, encode_key_batch,
)
from tmem_wire.frontswap import frontswap_keys

from .test_tier_store import demote_all, master_port, remote_page, tiered

if TYPE_CHECKING:
    from tmem_host.daemon.runtime import GuestRuntime

PAGE = 4096
PAGE_SHIFT = 12
BATCH = 64


# -- an in-process host: store, tier, and a session on a transport the test drives --


@dataclass
class Host:
    store: JournaledStore
    tier: RemoteTier
    client: Client
    pool_id: int
    keys: list[Key]
    pages: dict[Key, bytes]

    @property
    def round_trips(self) -> int:
        return self.tier.counters["round_trips"]

    async def settle(self) -> None:
        while (waiter := self.store.make_durable()) is not None:
            await waiter


def with_remote_pages(tmp_path: Path, cluster: LocalCluster, count: int,
                      scenario: Callable[[Host], Awaitable[None]]) -> None:
    """A persistent pool of ``count`` random pages (frontswap keys: one hash tag
    per 64 aligned slots), every one in the cluster and none in memory, then
    ``scenario``; the loop must have logged no exception."""
    async def main() -> None:
        failures: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: failures.append(context))
        # No room for data and no demotion: every page goes straight to the cluster.
        # No read-around: what a get fetches is what the session asked.
        async with tiered(tmp_path, cluster, 8 << 20, demote_above=10.0, local_fraction=0.0,
                          read_around=False) as (store, tier):
            client = store.add_client("g1")
            await tier.register(client, uuid.uuid4(), None)
            _, pool_id, _ = store.new_pool(client, True)
            keys = frontswap_keys(0, range(count))
            pages = [os.urandom(PAGE) for _ in keys]
            host = Host(store, tier, client, pool_id, keys, dict(zip(keys, pages)))
            for first in range(0, count, BATCH):
                assert store.put_many(client, pool_id, keys[first:first + BATCH],
                                      pages[first:first + BATCH]) == [Status.OK] * len(pages[first:first + BATCH])
            await host.settle()
            assert client.remote_pages == count and client.pages == count
            tier.forget_copies()  # those of the writes: gets read the cluster
            await scenario(host)
            await host.settle()
        assert failures == []

    asyncio.run(main())


class FakeTransport:
    """What asyncio's transport does for the session: writes (each one kept),
    pausing and resuming reading, closing (connection_lost from the loop)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.reading = True
        self.closed = False
        self.protocol: AbiSession | None = None

    def write(self, data: bytes) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            assert self.protocol is not None
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0  # the peer reads at once: a pass's room is the whole bound


@dataclass(eq=False)
class GuestStub:
    """The parts of GuestRuntime a session uses."""

    client: Client
    name: str = "g1"
    draining: bool = False
    sessions: set[AbiSession] = field(default_factory=set)

    def attach(self, session: AbiSession) -> None:
        self.sessions.add(session)

    def detach(self, session: AbiSession) -> None:
        self.sessions.discard(session)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


class Connection:
    """One session on a FakeTransport: bytes in as a transport hands them over
    (only while reading is not paused), replies decoded as the guest would."""

    def __init__(self, host: Host) -> None:
        self.guest = GuestStub(host.client)
        self.transport = FakeTransport()
        self.session = AbiSession(host.store, lambda _transport: cast("GuestRuntime", self.guest), "unix")
        self.transport.protocol = self.session
        self.session.connection_made(cast(asyncio.Transport, self.transport))
        self._decoder = FrameDecoder()
        self._taken = 0  # writes decoded so far

    async def deliver(self, data: bytes, chunks: Sequence[int] | None = None) -> None:
        """``data`` as the peer sends it: in writes of these sizes (one if None),
        each read in as many pieces as the session's buffer takes at a time."""
        position = 0
        for size in chunks if chunks is not None else [len(data)]:
            end = position + size
            while position < end:
                await until(lambda: self.transport.reading or self.transport.closed)
                if self.transport.closed:
                    return
                buffer = self.session.get_buffer(-1)
                piece = data[position:min(end, position + len(buffer))]
                buffer[:len(piece)] = piece
                position += len(piece)
                self.session.buffer_updated(len(piece))
        assert position == len(data)

    def replies_so_far(self) -> list[Frame]:
        for data in self.transport.writes[self._taken:]:
            self._decoder.feed(data)
        self._taken = len(self.transport.writes)
        frames = []
        while (frame := self._decoder.next_frame()) is not NEED_DATA:
            assert isinstance(frame, Frame) and frame.is_reply
            frames.append(frame)
        return frames

    async def replies(self, count: int) -> list[Frame]:
        """The next ``count`` replies (and no more: nothing else was written)."""
        found: list[Frame] = []

        def enough() -> bool:
            found.extend(self.replies_so_far())
            return len(found) >= count

        await until(enough)
        assert len(found) == count
        return found

    async def hello(self, offer: Hello = Hello()) -> None:
        await self.deliver(hello(offer))
        (reply,) = await self.replies(1)
        assert reply.opcode == Op.HELLO and reply.status == Status.OK


async def connect(host: Host, offer: Hello = Hello()) -> Connection:
    """A session past its HELLO."""
    connection = Connection(host)
    await connection.hello(offer)
    return connection


def hello(offer: Hello = Hello(), request_id: int = 1) -> bytes:
    return encode_frame(Frame(Op.HELLO, request_id, payload=offer.encode()))


def get_batch(request_id: int, pool_id: int, keys: Sequence[Key]) -> bytes:
    return encode_frame(Frame(Op.GET_BATCH, request_id, pool_id=pool_id, payload=encode_key_batch(keys)))


def get(request_id: int, pool_id: int, key: Key) -> bytes:
    return encode_frame(Frame(Op.GET, request_id, pool_id=pool_id, oid=key[0], index=key[1]))


def put(request_id: int, pool_id: int, key: Key, page: bytes) -> bytes:
    return encode_frame(Frame(Op.PUT, request_id, pool_id=pool_id, oid=key[0], index=key[1],
                              payload=page))


def flush_page(request_id: int, pool_id: int, key: Key) -> bytes:
    return encode_frame(Frame(Op.FLUSH_PAGE, request_id, pool_id=pool_id, oid=key[0], index=key[1]))


def counted(connection: Connection) -> tuple[int, int]:
    """(frames in, the most in flight); every frame in got its reply out."""
    stats = connection.session.stats()
    assert stats["frames_in"] == stats["frames_out"]
    return stats["frames_in"], stats["in_flight_max"]


def batch_pages(reply: Frame) -> list[bytes | None]:
    """A GET_BATCH reply's pages, None where the status is not OK."""
    assert reply.opcode == Op.GET_BATCH and reply.status == Status.OK
    statuses, pages = decode_batch_reply(reply.payload, PAGE_SHIFT)
    found = iter(pages)
    return [next(found) if status == Status.OK else None for status in statuses]


def batches(host: Host, first_request: int, count: int) -> tuple[bytes, list[list[bytes]]]:
    """``count`` GET_BATCH frames of 64 pages each (ids from ``first_request``),
    and the pages each must return."""
    frames = b"".join(get_batch(first_request + n, host.pool_id, host.keys[n * BATCH:(n + 1) * BATCH])
                      for n in range(count))
    expected = [[host.pages[key] for key in host.keys[n * BATCH:(n + 1) * BATCH]] for n in range(count)]
    return frames, expected


# -- the tests ------------------------------------------------------------------------


def test_get_batches_received_together_fetch_in_one_round_trip_per_master(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    frames_count = 8  # 8 hash tags: 8 round trips if each fetched on its own

    async def scenario(host: Host) -> None:
        connection = await connect(host)
        frames, expected = batches(host, 10, frames_count)
        before = host.round_trips
        await connection.deliver(frames)  # one read
        replies = await connection.replies(frames_count)
        assert host.round_trips - before <= len(redis_cluster.masters()) < frames_count
        assert [reply.request_id for reply in replies] == list(range(10, 10 + frames_count))
        assert [batch_pages(reply) for reply in replies] == expected
        # One wait for the whole read; each frame counted once, the HELLO too.
        assert counted(connection) == (frames_count + 1, frames_count)
        assert connection.session.stats()["store_waits"] == 1
        assert len(connection.transport.writes) == 2  # HELLO's reply, then all 8 at once

    with_remote_pages(tmp_path, redis_cluster, frames_count * BATCH, scenario)


def test_a_get_with_nothing_to_fetch_among_them_does_not_split_the_fetch(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        connection = await connect(host)
        pool, keys, pages = host.pool_id, host.keys, host.pages
        absent = [((9, 9, 9), n) for n in range(64)]
        before = host.round_trips
        await connection.deliver(get_batch(1, pool, keys[0:64]) + get_batch(2, pool, absent)
                                 + get(3, pool, absent[0]) + get_batch(4, pool, keys[64:128]))
        replies = await connection.replies(4)
        assert [reply.request_id for reply in replies] == [1, 2, 3, 4]
        assert batch_pages(replies[0]) == [pages[key] for key in keys[0:64]]
        assert batch_pages(replies[1]) == [None] * 64
        assert replies[2].status != Status.OK
        assert batch_pages(replies[3]) == [pages[key] for key in keys[64:128]]
        assert connection.session.stats()["store_waits"] == 1
        assert host.round_trips - before <= len(redis_cluster.masters())

    with_remote_pages(tmp_path, redis_cluster, 2 * BATCH, scenario)


def test_gets_beyond_the_reply_bound_wait_their_turn(tmp_path: Path,
                                                     redis_cluster: LocalCluster) -> None:
    """20 GET_BATCH frames of 64 pages ask for 5 MiB of replies, more than a pass may
    build: the ones that fit fetch together, the rest later; no write is larger
    than the bound and one reply."""
    frames_count = 20

    async def scenario(host: Host) -> None:
        connection = await connect(host)
        frames, expected = batches(host, 100, frames_count)
        before = host.round_trips
        await connection.deliver(frames)
        replies = await connection.replies(frames_count)
        assert [reply.request_id for reply in replies] == list(range(100, 100 + frames_count))
        assert [batch_pages(reply) for reply in replies] == expected
        round_trips = host.round_trips - before
        assert round_trips <= 3 * len(redis_cluster.masters()) and round_trips < frames_count // 2
        one_reply = len(encode_frame(replies[0]))
        assert max(len(write) for write in connection.transport.writes) <= REPLY_BYTES_IN_FLIGHT + one_reply
        assert counted(connection) == (frames_count + 1, frames_count)
        assert connection.session.stats()["store_waits"] >= 2  # not all in one fetch

    with_remote_pages(tmp_path, redis_cluster, frames_count * BATCH, scenario)


def test_a_put_or_flush_behind_gets_taken_ahead_runs_in_its_turn(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        connection = await connect(host)
        pool, keys, pages = host.pool_id, host.keys, host.pages
        new_page = os.urandom(PAGE)
        before = host.round_trips
        await connection.deliver(b"".join([
            get_batch(1, pool, keys[0:64]),
            get_batch(2, pool, keys[64:128]),  # joins the first one's fetch
            put(3, pool, keys[70], new_page),  # taken ahead too, but not run ahead
            get_batch(4, pool, keys[64:128]),
            get(5, pool, keys[5]),
            flush_page(6, pool, keys[5]),
            get_batch(7, pool, keys[0:64]),
            get(8, pool, keys[70]),
        ]))
        replies = await connection.replies(8)
        assert [reply.request_id for reply in replies] == list(range(1, 9))
        assert [reply.opcode for reply in replies] == [
            Op.GET_BATCH, Op.GET_BATCH, Op.PUT, Op.GET_BATCH, Op.GET, Op.FLUSH_PAGE, Op.GET_BATCH, Op.GET]
        old = [pages[key] for key in keys[:128]]
        assert batch_pages(replies[0]) == old[0:64]
        assert batch_pages(replies[1]) == old[64:128]  # before the PUT: the old page
        assert replies[2].status == Status.OK
        assert batch_pages(replies[3]) == old[64:70] + [new_page] + old[71:128]
        assert (replies[4].status, replies[4].payload) == (Status.OK, old[5])
        assert replies[5].status == Status.OK
        assert batch_pages(replies[6]) == old[0:5] + [None] + old[6:64]
        assert (replies[7].status, replies[7].payload) == (Status.OK, new_page)
        # The first two fetched together (at most one pipeline per master).
        assert host.round_trips - before >= 1

    with_remote_pages(tmp_path, redis_cluster, 128, scenario)


def test_a_get_that_overlaps_what_a_fetch_just_read_gets_every_page(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """A get served after a fetch, asking for pages it read (the tier forgets them
    once that pass is over) and pages it did not: every page comes back, whether
    the get joined the fetch or came behind a frame that is not a get."""
    async def scenario(host: Host) -> None:
        connection = await connect(host)
        pool, keys, pages = host.pool_id, host.keys, host.pages
        absent = ((9, 9, 9), 9)
        await connection.deliver(b"".join([
            get_batch(1, pool, keys[0:64]),
            get_batch(2, pool, keys[32:96]),  # joins the fetch
            flush_page(3, pool, absent),  # ends what is taken ahead
            get_batch(4, pool, keys[64:128]),  # 64-95 read by the fetch, 96-127 not
            get(5, pool, keys[100]),
        ]))
        replies = await connection.replies(5)
        assert [reply.request_id for reply in replies] == [1, 2, 3, 4, 5]
        assert batch_pages(replies[0]) == [pages[key] for key in keys[0:64]]
        assert batch_pages(replies[1]) == [pages[key] for key in keys[32:96]]
        assert batch_pages(replies[3]) == [pages[key] for key in keys[64:128]]
        assert (replies[4].status, replies[4].payload) == (Status.OK, pages[keys[100]])

    with_remote_pages(tmp_path, redis_cluster, 2 * BATCH, scenario)


def test_a_frame_that_is_not_a_get_ends_what_is_taken_ahead(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        connection = await connect(host)
        pool, keys = host.pool_id, host.keys
        _, expected = batches(host, 1, 6)
        requests = [get_batch(1 + n, pool, keys[n * BATCH:(n + 1) * BATCH]) for n in range(6)]
        stats_frame = encode_frame(Frame(Op.STATS, 50, pool_id=ALL_POOLS))
        before = host.round_trips
        await connection.deliver(b"".join(requests[:3]) + stats_frame + b"".join(requests[3:]))
        replies = await connection.replies(7)
        assert [reply.request_id for reply in replies] == [1, 2, 3, 50, 4, 5, 6]
        assert replies[3].opcode == Op.STATS and replies[3].status == Status.OK
        assert [batch_pages(reply) for reply in replies[:3] + replies[4:]] == expected
        # Two fetches: the three before STATS, the three after it.
        assert host.round_trips - before <= 2 * len(redis_cluster.masters())
        assert connection.session.stats()["store_waits"] == 2

        # A HELLO among them: served in its turn (the frames after it are framed
        # by what it negotiates).
        await connection.deliver(get_batch(60, pool, keys[0:64]) + get(61, pool, keys[70])
                                 + hello(request_id=62) + get_batch(63, pool, keys[64:128]))
        replies = await connection.replies(4)
        assert [reply.request_id for reply in replies] == [60, 61, 62, 63]
        assert replies[2].opcode == Op.HELLO and replies[2].status == Status.OK
        assert batch_pages(replies[0]) == expected[0]
        assert replies[1].payload == host.pages[keys[70]]
        assert batch_pages(replies[3]) == expected[1]
        assert connection.session.stats()["resyncs"] == 1

    with_remote_pages(tmp_path, redis_cluster, 6 * BATCH, scenario)


def test_requests_beyond_the_negotiated_in_flight_bound_are_refused_in_their_turn(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        connection = await connect(host, Hello(max_in_flight=3))
        frames, expected = batches(host, 1, 5)
        await connection.deliver(frames)
        replies = await connection.replies(5)
        assert [reply.request_id for reply in replies] == [1, 2, 3, 4, 5]
        assert [batch_pages(reply) for reply in replies[:3]] == expected[:3]
        assert [reply.status for reply in replies[3:]] == [Status.INVALID] * 2
        assert all(b"more than 3 requests in flight" in reply.payload for reply in replies[3:])
        assert connection.session.stats()["errors"] == 2

    with_remote_pages(tmp_path, redis_cluster, 5 * BATCH, scenario)


def test_an_undecodable_frame_behind_gets_taken_ahead_closes_after_their_replies(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        for bad in (b"\xff" * 64,  # not a header
                    encode_frame(Frame(Op.GET, 9, flags=1, pool_id=host.pool_id))):  # a reply
            connection = await connect(host)
            frames, expected = batches(host, 1, 2)
            await connection.deliver(frames + bad + get_batch(3, host.pool_id, host.keys[:64]))
            await until(lambda: connection.transport.closed)
            replies = connection.replies_so_far()
            assert [reply.request_id for reply in replies] == [1, 2]
            assert [batch_pages(reply) for reply in replies] == expected
            await until(lambda: not connection.guest.sessions)  # connection_lost ran
            stats = connection.session.stats()
            assert stats["errors"] == 1
            assert stats["frames_in"] == stats["frames_out"] == 3

    with_remote_pages(tmp_path, redis_cluster, 2 * BATCH, scenario)


def test_a_connection_closed_while_its_gets_wait_is_let_go(tmp_path: Path,
                                                            redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        connection = await connect(host)
        frames, _ = batches(host, 1, 4)
        await connection.deliver(frames)
        assert not connection.transport.reading  # waits for the tier
        connection.transport.close()
        await until(lambda: not connection.guest.sessions)
        # The tier's read completes with nobody to serve: nothing more is written
        # (FakeTransport asserts no write after close; the loop logs no error).
        waiter = host.store.fetch(host.client, host.pool_id, host.keys)
        if waiter is not None:
            await waiter
        for _ in range(5):
            await asyncio.sleep(0)
        assert connection.replies_so_far() == []
        assert connection.session.stats()["frames_out"] == 1  # the HELLO

    with_remote_pages(tmp_path, redis_cluster, 4 * BATCH, scenario)


def test_replies_are_the_same_however_the_bytes_arrive(tmp_path: Path,
                                                        redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        pool, keys, pages = host.pool_id, host.keys, host.pages
        # A key of another object, put anew by each run (got in a later read: see
        # test_a_page_put_just_before_a_get_that_fetches_is_found).
        other = ((1 << 40, 0, 0), 3)
        other_page = os.urandom(PAGE)
        frames, expected = batches(host, 1, 4)
        stream = hello() + frames + b"".join([
            get(10, pool, keys[200]),
            put(11, pool, other, other_page),
            get_batch(12, pool, [keys[3], ((9, 9, 9), 9)]),
            flush_page(13, pool, ((9, 9, 9), 9)),
            get_batch(14, pool, keys[128:192]),
            get(15, pool, ((9, 9, 9), 9)),
        ])
        rng = random.Random(7)
        deliveries: dict[str, list[int] | None] = {"whole": None, "byte at a time": [1] * len(stream)}
        for run in range(3):
            cuts = sorted(rng.sample(range(1, len(stream)), 12))
            deliveries[f"split {run}"] = [b - a for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        answers: dict[str, bytes] = {}
        for name, chunks in deliveries.items():
            connection = Connection(host)
            await connection.deliver(stream, chunks)
            replies = await connection.replies(11)
            assert [reply.request_id for reply in replies] == [1, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15], name
            assert [batch_pages(reply) for reply in replies[1:5]] == expected, name
            assert (replies[5].status, replies[5].payload) == (Status.OK, pages[keys[200]]), name
            assert replies[6].status == Status.OK, name
            assert batch_pages(replies[7]) == [pages[keys[3]], None], name
            assert batch_pages(replies[9]) == [pages[key] for key in keys[128:192]], name
            assert replies[10].status != Status.OK, name
            answers[name] = b"".join(connection.transport.writes)
            await host.settle()
            await connection.deliver(get(16, pool, other))
            (reply,) = await connection.replies(1)
            assert (reply.status, reply.payload) == (Status.OK, other_page), name
            connection.transport.close()
            await until(lambda: not connection.guest.sessions)
        assert len(set(answers.values())) == 1

    with_remote_pages(tmp_path, redis_cluster, 4 * BATCH, scenario)


def test_a_page_put_just_before_a_get_that_fetches_is_found(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """A page whose write to the cluster lands while the get of it (and of a page
    the tier must read) waits: its copy moves from ``pending`` to the read cache,
    and the get finds it (it missed, a spurious EIO, before the read cache)."""
    async def scenario(host: Host) -> None:
        connection = await connect(host)
        other = ((1 << 40, 0, 0), 3)
        page = os.urandom(PAGE)
        await connection.deliver(put(1, host.pool_id, other, page)
                                 + get_batch(2, host.pool_id, [other, host.keys[3]]))
        replies = await connection.replies(2)
        assert batch_pages(replies[1]) == [page, host.pages[host.keys[3]]]

    with_remote_pages(tmp_path, redis_cluster, BATCH, scenario)


def test_a_page_demoted_while_its_get_waits_for_the_tier_is_read_back(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """A GET_BATCH of a page in memory and a page the tier must read, from a master
    that is slow (paused). Meanwhile memory runs short and the demoter moves the
    first page to the cluster: its copy here is gone when the get is served. The
    session reads it again rather than answer MISS for a page the cluster has (the
    lost swap pages of a migrated agent guest, whose new host was demoting what the
    handoff brought while the guest read)."""
    async def main() -> None:
        failures: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: failures.append(context))
        async with tiered(tmp_path, redis_cluster, 8 << 20, read_around=False) as (store, tier):
            client = store.add_client("g1")
            await tier.register(client, uuid.uuid4(), None)
            _, pool_id, _ = store.new_pool(client, True)
            keys = frontswap_keys(0, range(4 * BATCH))
            pages = [os.urandom(PAGE) for _ in keys]
            host = Host(store, tier, client, pool_id, keys, dict(zip(keys, pages)))

            def put_all(first: int, count: int) -> None:
                for start in range(first, first + count, BATCH):
                    assert store.put_many(client, pool_id, keys[start:start + BATCH],
                                          pages[start:start + BATCH]) == [Status.OK] * BATCH

            def remote(number: int) -> RemotePage | None:
                return remote_page(client, pool_id, keys[number])

            def port(number: int) -> int:
                return master_port(redis_cluster, tier, client, pool_id, keys[number])

            put_all(0, len(keys))
            await host.settle()
            await demote_all(store, tier, client, len(keys), 8 << 20)
            tier.forget_copies()
            local_master = port(7)
            put_all(0, BATCH)  # slots 0-63 back in memory, one hash tag
            await host.settle()
            assert remote(7) is None
            wanted = next(number for number in range(BATCH, len(keys)) if port(number) != local_master)
            connection = await connect(host)
            with redis_cluster.node_by_port(port(wanted)).client() as admin:
                admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            await connection.deliver(get_batch(2, pool_id, [keys[7], keys[wanted]]))
            await asyncio.sleep(0.05)
            assert not connection.replies_so_far()  # waiting for the paused master
            await demote_all(store, tier, client, len(keys), 8 << 20)
            demoted = remote(7)
            assert demoted is not None and demoted.fetched is None and demoted.pending is None
            (reply,) = await connection.replies(1)
            assert batch_pages(reply) == [pages[7], pages[wanted]]
            assert tier.guest_stats("g1")["get_missing"] == 0  # type: ignore[index]
        assert failures == []

    asyncio.run(main())
