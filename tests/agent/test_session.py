"""The agent's session layer against a real tmemd, over the unix socket QEMU would use."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tmem_guest.channel import ChannelDown, UnixSocketChannel
from tmem_guest.session import Session, SessionPool
from tmem_host.daemon.process import TmemdProcess
from tmem_host.waiting import wait_until
from tmem_wire import abi
from tmem_wire.frontswap import PAGE_SIZE, frontswap_key

GUEST = "g1"
CAPPED = "capped"
CAP_PAGES = 16


def page(seed: int) -> bytes:
    return seed.to_bytes(8, "little") * (PAGE_SIZE // 8)


@pytest.fixture
def tmemd(tmp_path: Path) -> Iterator[TmemdProcess]:
    with TmemdProcess(tmp_path / "run", guests=(GUEST, f"{CAPPED}:cap={CAP_PAGES * PAGE_SIZE}")) as daemon:
        yield daemon


def open_session(daemon: TmemdProcess, guest: str = GUEST, *, persistent: bool = True) -> tuple[Session, SessionPool]:
    session = Session(UnixSocketChannel(daemon.abi_socket(guest)), backoff_max=0.2, request_timeout=10)
    pool = session.register_pool(persistent=persistent)
    session.start()
    assert session.wait_up(10), "session did not come up"
    return session, pool


def test_single_page_put_get_flush_roundtrip(tmemd: TmemdProcess) -> None:
    session, pool = open_session(tmemd)
    try:
        oid, index = frontswap_key(0, 37)
        assert session.put(pool, oid, index, page(37))
        into = memoryview(bytearray(PAGE_SIZE))
        assert session.get(pool, oid, index, into)
        assert into == page(37)
        session.flush_page(pool, oid, index)
        assert not session.get(pool, oid, index, into)
    finally:
        session.stop()


def test_batches_return_each_page_to_its_slot_and_report_misses(tmemd: TmemdProcess) -> None:
    session, pool = open_session(tmemd)
    try:
        slots = list(range(100, 200))  # more than one frame's worth: the session splits
        keys = [frontswap_key(0, slot) for slot in slots]
        assert session.put_batch(pool, keys, [page(slot) for slot in slots]) == [True] * len(slots)
        session.flush_batch(pool, keys[::2])
        buffer = bytearray(len(slots) * PAGE_SIZE)
        into = [memoryview(buffer)[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(len(slots))]
        found = session.get_batch(pool, keys, into)
        assert found == [i % 2 == 1 for i in range(len(slots))]
        for i in range(1, len(slots), 2):
            assert into[i] == page(slots[i])
        session.flush_batch(pool, [(keys[1][0], abi.WHOLE_OBJECT)])
        assert not session.get(pool, keys[1][0], keys[1][1], into[0])
    finally:
        session.stop()


def test_many_threads_in_flight_each_get_their_own_reply(tmemd: TmemdProcess) -> None:
    session, pool = open_session(tmemd)
    failures: list[str] = []

    def worker(thread: int) -> None:
        into = memoryview(bytearray(PAGE_SIZE))
        for n in range(60):
            slot = thread * 1000 + n
            oid, index = frontswap_key(1, slot)
            if not session.put(pool, oid, index, page(slot)):
                failures.append(f"put {slot} refused")
            if not session.get(pool, oid, index, into) or into != page(slot):
                failures.append(f"get {slot} wrong")

    try:
        threads = [threading.Thread(target=worker, args=(number,)) for number in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
    finally:
        session.stop()


def test_cap_refuses_puts_beyond_it(tmemd: TmemdProcess) -> None:
    session, pool = open_session(tmemd, CAPPED)
    try:
        slots = list(range(CAP_PAGES * 4))
        # Random pages: the cap counts stored (compressed) bytes.
        accepted = session.put_batch(pool, [frontswap_key(0, s) for s in slots], [os.urandom(PAGE_SIZE) for _ in slots])
        assert 0 < sum(accepted) <= CAP_PAGES + 1
        assert accepted.count(False) >= len(slots) - CAP_PAGES - 1
    finally:
        session.stop()


def test_channel_drop_reattaches_the_same_pool_and_keeps_its_pages(tmemd: TmemdProcess) -> None:
    session, pool = open_session(tmemd)
    try:
        oid, index = frontswap_key(0, 5)
        assert session.put(pool, oid, index, page(5))
        pool_id = pool.pool_id
        session.channel.disconnect()  # what a QEMU chardev reconnect looks like to the agent
        assert session.wait_up(10)
        into = memoryview(bytearray(PAGE_SIZE))
        for _ in range(50):  # the reader may not have seen the drop yet
            try:
                if session.connections >= 2 and session.get(pool, oid, index, into):
                    break
            except ChannelDown:
                pass
            session.wait_up(1)
            threading.Event().wait(0.05)
        assert session.connections >= 2
        assert pool.pool_id == pool_id
        assert into == page(5)
    finally:
        session.stop()


def serve_like_tmemd_until(listener: socket.socket, connections: int, refuse: abi.Op) -> None:
    """A peer that speaks the ABI as tmemd does for ``connections`` connections
    (HELLO, STATS of no pools, NEW_POOL) but answers every ``refuse`` request with
    PROTOCOL_ERROR: what the ABI lets a server say of a frame it cannot take."""
    for _ in range(connections):
        connection, _ = listener.accept()
        decoder = abi.FrameDecoder()
        with connection:
            while data := connection.recv(1 << 16):
                decoder.feed(data)
                while isinstance(frame := decoder.next_frame(), abi.Frame):
                    if frame.opcode == abi.Op.HELLO:
                        reply = abi.reply_to(frame, abi.Status.OK, abi.Hello().encode())
                    elif frame.opcode == abi.Op.STATS:
                        reply = abi.reply_to(frame, abi.Status.OK, abi.encode_pool_stats([]))
                    elif frame.opcode == abi.Op.NEW_POOL:
                        reply = abi.reply_to(frame, abi.Status.OK, abi.encode_pool_grant(abi.PoolFlag.PERSISTENT),
                                             pool_id=3)
                    else:
                        assert frame.opcode == refuse
                        reply = abi.reply_to(frame, abi.Status.PROTOCOL_ERROR, b"cannot take this frame")
                    connection.sendall(abi.encode_frame(reply))


@contextmanager
def session_with_a_peer_refusing(tmp_path: Path, refuse: abi.Op) -> Iterator[tuple[Session, SessionPool]]:
    """A session up with serve_like_tmemd_until (two connections, ``refuse`` answered
    PROTOCOL_ERROR); on exit the session stops and the peer must be done."""
    path = tmp_path / "peer.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        peer = threading.Thread(target=serve_like_tmemd_until, args=(listener, 2, refuse), daemon=True)
        peer.start()
        session = Session(UnixSocketChannel(path), backoff_max=0.2, request_timeout=10)
        pool = session.register_pool(persistent=True)
        session.start()
        try:
            assert session.wait_up(10)
            yield session, pool
        finally:
            session.stop()
            peer.join(10)
        assert not peer.is_alive()


def test_a_protocol_error_reply_starts_the_session_over_and_is_never_read_as_misses(tmp_path: Path) -> None:
    """A server answers a frame it cannot take with PROTOCOL_ERROR (the stream is
    unusable until a resync, docs/ABI.md). The call fails as ChannelDown (the swap
    frontend retries a read once the session is back) and the session says HELLO
    again: a GET_BATCH's pages were not looked up, so they never read as lost
    (before, they came back as misses: EIO for swap pages tmemd still holds)."""
    with session_with_a_peer_refusing(tmp_path, abi.Op.GET_BATCH) as (session, pool):
        keys = [frontswap_key(0, slot) for slot in range(8)]
        with pytest.raises(ChannelDown, match="tmemd refused GET_BATCH: cannot take this frame"):
            session.get_batch(pool, keys, [memoryview(bytearray(PAGE_SIZE)) for _ in keys])
        assert wait_until(lambda: session.connections == 2 and session.is_up, 10)


def test_tmemd_restart_calls_fail_fast_then_the_pool_resumes_or_is_created_afresh(
        tmemd: TmemdProcess) -> None:
    session, pool = open_session(tmemd)
    try:
        oid, index = frontswap_key(0, 9)
        assert session.put(pool, oid, index, page(9))
        tmemd.terminate()
        with pytest.raises(ChannelDown):
            for _ in range(100):  # until the reader noticed
                session.put(pool, oid, index, page(9))
                threading.Event().wait(0.05)
        tmemd.start()
        assert session.wait_up(15)
        into = memoryview(bytearray(PAGE_SIZE))
        # A graceful restart keeps the guest's pool: the session resumes it.
        assert session.get(pool, oid, index, into) and into == page(9)
        assert session.pools_resumed == 1
        # The state gone (deleted while tmemd was down): a miss, never stale data.
        tmemd.terminate()
        (tmemd.run_dir / f"{GUEST}.journal").unlink()
        tmemd.start()
        assert session.wait_up(15)
        assert not session.get(pool, oid, index, into)
        assert session.put(pool, oid, index, page(10))
        assert session.get(pool, oid, index, into) and into == page(10)
    finally:
        session.stop()


def stop_tmemd(daemon: TmemdProcess) -> None:
    os.kill(daemon.pid, signal.SIGSTOP)


def continue_tmemd(daemon: TmemdProcess) -> None:
    os.kill(daemon.pid, signal.SIGCONT)


def start_impatient_session(daemon: TmemdProcess, *, persistent: bool) -> tuple[Session, SessionPool]:
    """A session started (not yet up) that gives a request 1 s: for a stopped tmemd."""
    session = Session(UnixSocketChannel(daemon.abi_socket(GUEST), send_timeout=1.0), request_timeout=1.0,
                      heartbeat_interval=0.2, backoff_max=0.2)
    pool = session.register_pool(persistent=persistent)
    session.start()
    return session, pool


def test_a_stopped_tmemd_times_calls_out_then_they_fail_at_once_until_it_continues(tmemd: TmemdProcess) -> None:
    session, pool = start_impatient_session(tmemd, persistent=True)
    try:
        assert session.wait_up(10)
        oid, index = frontswap_key(0, 11)
        assert session.put(pool, oid, index, page(11))
        pool_id = pool.pool_id
        stop_tmemd(tmemd)
        try:
            started = time.monotonic()
            with pytest.raises(ChannelDown):
                session.put(pool, oid, index + 1, page(12))
            assert 0.9 < time.monotonic() - started < 3.0  # the request timeout, not 30 s
            assert session.timeouts == 1 and not session.is_up
            started = time.monotonic()
            with pytest.raises(ChannelDown):  # down: no waiting at all
                session.get(pool, oid, index, memoryview(bytearray(PAGE_SIZE)))
            assert time.monotonic() - started < 0.2
            # Re-HELLOs to the stopped tmemd time out meanwhile: the session stays down.
            failures = session.handshake_failures
            assert wait_until(lambda: session.handshake_failures > failures, 10)
            assert not session.is_up
        finally:
            continue_tmemd(tmemd)
        assert session.wait_up(15)
        # Same tmemd, same pool: its pages are still there, and each reply is its own request's.
        assert pool.pool_id == pool_id and session.pools_resumed >= 1
        into = memoryview(bytearray(PAGE_SIZE))
        assert session.get(pool, oid, index, into) and into == page(11)
        # The PUT given up was still applied when tmemd continued: the ABI's "possibly
        # stored"; the swap frontend keeps such a slot on its disk and flushes the key.
        assert session.get(pool, oid, index + 1, into) and into == page(12)
    finally:
        session.stop()


def test_an_idle_session_notices_a_stopped_tmemd_by_its_heartbeat(tmemd: TmemdProcess) -> None:
    session = Session(UnixSocketChannel(tmemd.abi_socket(GUEST)), request_timeout=1.0, heartbeat_interval=0.2,
                      backoff_max=0.2)
    session.register_pool(persistent=True)
    session.start()
    try:
        assert session.wait_up(10)
        stop_tmemd(tmemd)
        try:
            wait_until(lambda: not session.is_up, 5)
            assert not session.is_up and session.timeouts == 1  # no call was made: the heartbeat went unanswered
        finally:
            continue_tmemd(tmemd)
        assert session.wait_up(15)
    finally:
        session.stop()


class Replies:
    """What post_put_batch's callbacks received, by key batch, as they arrived."""

    def __init__(self) -> None:
        self.results: list[tuple[list[abi.Key], list[bool] | None]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, keys: object, accepted: list[bool] | None) -> None:
        with self._lock:
            self.results.append((list(keys), accepted))  # type: ignore[call-overload]
            self.threads.add(threading.current_thread().name)

    def count(self) -> int:
        with self._lock:
            return len(self.results)


def test_posted_puts_complete_on_the_reader_thread_in_order_with_later_requests(tmemd: TmemdProcess) -> None:
    session, pool = open_session(tmemd)
    try:
        replies = Replies()
        keys = [frontswap_key(0, slot) for slot in range(100)]  # two frames
        session.post_put_batch(pool, keys, [page(slot) for slot in range(100)], replies)
        # Sent after the posts: tmemd applies them after, replies or not.
        into = memoryview(bytearray(PAGE_SIZE))
        assert session.get(pool, *keys[99], into) and into == page(99)
        session.flush_batch(pool, keys[:10])
        assert wait_until(lambda: replies.count() == 2, 10)
        assert [key for batch, _ in replies.results for key in batch] == keys
        assert all(accepted == [True] * len(batch) for batch, accepted in replies.results)
        assert replies.threads == {"tmem-session"}
        found = session.get_batch(pool, keys, [memoryview(bytearray(PAGE_SIZE)) for _ in keys])
        assert found == [False] * 10 + [True] * 90
        # Many more posts than calls exist: each call is freed by its reply.
        for round_ in range(3 * 8):
            session.post_put_batch(pool, keys[:1], [page(round_)], replies)
        assert wait_until(lambda: replies.count() == 2 + 3 * 8, 10)
        assert session.get(pool, *keys[0], into) and into == page(3 * 8 - 1)
    finally:
        session.stop()
    capped, capped_pool = open_session(tmemd, CAPPED)
    try:
        refused = Replies()
        slots = range(CAP_PAGES * 2)  # random pages: the cap counts stored (compressed) bytes
        capped.post_put_batch(capped_pool, [frontswap_key(0, slot) for slot in slots],
                              [os.urandom(PAGE_SIZE) for _ in slots], refused)
        assert wait_until(lambda: refused.count() == 1, 10)
        accepted = refused.results[0][1]
        assert accepted is not None and 0 < sum(accepted) <= CAP_PAGES + 1 and not accepted[-1]
    finally:
        capped.stop()


def test_posted_puts_a_stopped_tmemd_never_answers_complete_as_unknown_and_free_their_calls(
        tmemd: TmemdProcess) -> None:
    session, pool = start_impatient_session(tmemd, persistent=False)
    try:
        assert session.wait_up(10)
        replies = Replies()
        stop_tmemd(tmemd)
        try:
            for slot in range(4):
                session.post_put_batch(pool, [frontswap_key(0, slot)], [page(slot)], replies)
            # No reply: the request timeout takes the session down, each post learns "unknown".
            assert wait_until(lambda: replies.count() == 4, 10)
            assert [accepted for _, accepted in replies.results] == [None] * 4 and session.timeouts == 1
            with pytest.raises(ChannelDown):  # down: refused at once, no callback
                session.post_put_batch(pool, [frontswap_key(0, 9)], [page(9)], replies)
            assert replies.count() == 4
        finally:
            continue_tmemd(tmemd)
        assert session.wait_up(15)
        # Every call came back: more posts than calls exist all go through.
        for slot in range(3 * 8):
            session.post_put_batch(pool, [frontswap_key(0, slot)], [page(slot)], replies)
        assert wait_until(lambda: replies.count() == 4 + 3 * 8, 10)
        assert all(accepted == [True] for _, accepted in replies.results[4:])
    finally:
        session.stop()


def test_a_posted_put_tmemd_refuses_as_a_protocol_error_starts_the_session_over(tmp_path: Path) -> None:
    with session_with_a_peer_refusing(tmp_path, abi.Op.PUT_BATCH) as (session, pool):
        replies = Replies()
        session.post_put_batch(pool, [frontswap_key(0, 1)], [page(1)], replies)
        assert wait_until(lambda: replies.count() == 1, 10) and replies.results[0][1] is None
        assert wait_until(lambda: session.connections == 2 and session.is_up, 10)
