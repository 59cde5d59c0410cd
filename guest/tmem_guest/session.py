"""The agent's one session layer to tmemd: many requests in flight, one reader.

Callers on any thread send a request and block on their own `_Call`; a reader
thread decodes replies and completes the call whose request id matches, so
replies may come in any order (Feature.ASYNC). The same thread owns the
connection: it (re)connects with bounded backoff, says HELLO, re-attaches the
registered pools (STATS tells whether tmemd still has them; otherwise NEW_POOL)
and only then lets calls through. While the channel is down every call raises
`ChannelDown` at once, so frontends fall back (swap to its disk, cache to a
miss) instead of waiting.

Liveness: a stopped (SIGSTOP) or wedged tmemd leaves the port connected but
silent. A request unanswered for `request_timeout` takes the session down (every
pending call fails with ChannelDown, the reader re-HELLOs with backoff), and with
nothing else sent for `heartbeat_interval` the reader sends a STATS of its own, so
an idle agent notices too. Request ids are never reused: a reply that arrives for
a request already given up matches nothing pending and is dropped (counted in
`late_replies`), never taken for a newer request's. Replies carrying Flag.DRAIN
(tmemctl drain) set `drain_requested`; the heartbeat makes an idle agent see it.

Buffers: each `_Call` owns a preallocated frame buffer, and at most
`max_in_flight` calls exist, which also bounds what is in flight. Frames are
written with one `Channel.send` each (the port channel writes them as 4 KiB
pieces of one writev).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tmem_guest.channel import Channel, ChannelDown, Drain
from tmem_wire import abi
from tmem_wire.abi import Frame, Key, Oid, Op, PoolFlag, Status

log = logging.getLogger("tmem_guest.session")

__all__ = ["ChannelDown", "Session", "SessionPool"]

# Batches are cut at this many pages per frame: the NBD and FUSE frontends send
# at most 32 per request, and per-call buffers are sized for this.
MAX_FRAME_PAGES = 64
RECEIVE_BUFFER_BYTES = 64 * 1024
# A swap write must not wait much longer than a disk would: after this long without
# a reply tmemd counts as gone (start --request-timeout).
DEFAULT_REQUEST_TIMEOUT_S = 5.0
# An idle session sends a STATS this often (start --heartbeat).
DEFAULT_HEARTBEAT_S = 1.0
# What the agent asks for in HELLO: DRAIN lets tmemd flag its replies.
AGENT_FEATURES = abi.Feature.BATCH | abi.Feature.ASYNC | abi.Feature.STATS | abi.Feature.DRAIN
_DRAIN_FLAG = int(abi.Flag.DRAIN)


@dataclass(slots=True)
class SessionPool:
    """A pool the session keeps attached across reconnects; `pool_id` is None while detached."""

    persistent: bool
    page_shift: int = abi.MIN_PAGE_SHIFT
    pool_id: int | None = None
    # Set when an invalidation may not have reached tmemd: the pool's contents can
    # no longer be trusted, so the next handshake destroys it and makes a new one.
    # Frontends treat the pool as empty while this is set.
    untrusted: bool = False

    @property
    def flags(self) -> PoolFlag:
        return PoolFlag.PERSISTENT if self.persistent else PoolFlag(0)

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift


class _NotRegistered(ChannelDown):
    """The session was down before the request became pending: nothing to undo."""


class _Call:
    """One request slot: its frame buffer and the lock its reply releases."""

    __slots__ = ("buffer", "view", "payload_view", "done", "request_id", "reply", "sent_at", "on_reply")

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.payload_view = self.view[abi.HEADER_SIZE :]
        self.done = threading.Lock()
        self.done.acquire()  # held until the reader (or a disconnect) completes the call
        self.request_id = 0
        self.reply: Frame | None = None
        self.sent_at = 0.0  # time.monotonic() when registered as pending
        # A posted call (Session.post_put_batch): nobody waits on `done`; the reply
        # (None: the session went down first) goes here, and the call is freed.
        self.on_reply: Callable[[Frame | None], None] | None = None


class Session:
    def __init__(
        self,
        channel: Channel,
        *,
        max_in_flight: int = 8,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_S,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        handshake_timeout: float | None = None,
    ) -> None:
        self.channel = channel
        self.request_timeout = request_timeout
        self.heartbeat_interval = heartbeat_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.handshake_timeout = request_timeout if handshake_timeout is None else handshake_timeout
        self.pools: list[SessionPool] = []
        self.negotiated: abi.Hello | None = None
        self.connections = 0  # successful handshakes so far; also the connection epoch
        self.timeouts = 0  # sessions taken down because tmemd did not answer in time
        self.late_replies = 0  # replies to requests given up earlier, dropped
        self.pools_resumed = 0  # pools found again in tmemd's STATS after a reconnect
        self.handshake_failures = 0  # HELLOs (or pool attachments) that failed or timed out
        # Set by every reply carrying Flag.DRAIN; the swap frontend's drain clears it.
        self.drain_requested = threading.Event()
        self.draining = False  # whether the latest reply carried Flag.DRAIN
        size = abi.HEADER_SIZE + abi.BATCH_HEADER_SIZE + MAX_FRAME_PAGES * (
            (1 << abi.MIN_PAGE_SHIFT) + abi.DESCRIPTOR_SIZE
        )
        self._free: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        for _ in range(max_in_flight):
            self._free.put(_Call(size))
        self._max_in_flight = max_in_flight
        self._request_ids = itertools.count(1)
        self._pending: dict[int, _Call] = {}
        self._pending_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._last_sent = 0.0
        self._heartbeat = bytearray(abi.HEADER_SIZE)
        self._heartbeat_id = 0  # the heartbeat in flight, 0 if none
        self._heartbeat_sent = 0.0
        self._up = threading.Event()
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._run, name="tmem-session", daemon=True)

    # -- lifecycle ---------------------------------------------------------------

    def register_pool(self, *, persistent: bool) -> SessionPool:
        """A pool to (re)attach on every connection; register before start()."""
        pool = SessionPool(persistent)
        self.pools.append(pool)
        return pool

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._stopped.set()
        self._mark_down()
        self.channel.disconnect()

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    def wait_up(self, timeout: float) -> bool:
        return self._up.wait(timeout)

    @property
    def batch_pages(self) -> int:
        """Pages per batch frame: what both sides accept, at most MAX_FRAME_PAGES."""
        hello = self.negotiated
        if hello is None or abi.Feature.BATCH not in hello.features:
            return 0
        return min(hello.max_batch_pages, MAX_FRAME_PAGES)

    # -- the connection thread ------------------------------------------------

    def _run(self) -> None:
        backoff = self.backoff_initial
        receive = bytearray(RECEIVE_BUFFER_BYTES)
        receive_view = memoryview(receive)
        while not self._stopped.is_set():
            if not self.channel.connect():
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            # Bytes of an earlier connection may still arrive: hunt for our HELLO reply.
            decoder = abi.FrameDecoder(resync=True)
            try:
                self._handshake(decoder, receive_view)
            except (ChannelDown, abi.ProtocolError, TimeoutError) as error:
                log.warning("handshake with tmemd failed: %s", error)
                self.handshake_failures += 1
                self.channel.disconnect(self._discarding(decoder, receive_view))
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            backoff = self.backoff_initial
            with self._send_lock:
                self.connections += 1
                self._last_sent = time.monotonic()
                self._heartbeat_id = 0
                self._up.set()
            log.info("tmemd session up (connection %d)", self.connections)
            try:
                self._serve_connection(decoder, receive_view)
            except abi.ProtocolError as error:
                log.error("tmemd broke the protocol, reconnecting: %s", error)
            self._mark_down()
            # Every call was failed: what arrives now answers nothing.
            self.channel.disconnect(self._discarding(decoder, receive_view))
            log.warning("tmemd session down")

    def _serve_connection(self, decoder: abi.FrameDecoder, receive: memoryview) -> None:
        """Complete calls from replies until the channel drops or the session is taken
        down (a request unanswered for request_timeout, here or in a caller; stop())."""
        tick = min(self.heartbeat_interval, self.request_timeout) / 4
        next_check = 0.0
        completing = self._completing(decoder, receive)
        while self._up.is_set():
            if self.channel.wait_readable(tick):
                if not self._read(decoder, receive, self._complete):
                    return
            now = time.monotonic()
            if now < next_check:
                continue
            next_check = now + tick
            waited = self._longest_wait(now)
            if waited > self.request_timeout:
                self._give_up(self.connections, f"no reply from tmemd for {waited:.1f} s")
                return
            if now - self._last_sent >= self.heartbeat_interval:
                self._send_heartbeat(now, completing)

    def _read(self, decoder: abi.FrameDecoder, receive: memoryview,
              handle: Callable[[Frame], None]) -> bool:
        """Read what has arrived and hand each whole frame to `handle`; False if the
        host side is gone."""
        count = self.channel.recv_into(receive)
        if count == 0:
            return False
        decoder.feed(receive[:count])
        while (frame := decoder.next_frame()) is not abi.NEED_DATA:
            assert isinstance(frame, Frame)
            handle(frame)
        return True

    def _completing(self, decoder: abi.FrameDecoder, receive: memoryview) -> Drain:
        """The reader's drain while it serves: replies complete their calls."""
        def drain() -> None:
            self._read(decoder, receive, self._complete)  # a hang-up: the send says so
        return drain

    def _discarding(self, decoder: abi.FrameDecoder, receive: memoryview) -> Drain:
        """The reader's drain while no call can be answered (a request of its own
        in flight, whose reply cannot come before it is sent; or no session)."""
        def drain() -> None:
            self._read(decoder, receive, _ignore)
        return drain

    def _longest_wait(self, now: float) -> float:
        """How long the oldest request in flight (heartbeat included) has waited."""
        with self._pending_lock:
            oldest = min((call.sent_at for call in self._pending.values()), default=now)
        if self._heartbeat_id:
            oldest = min(oldest, self._heartbeat_sent)
        return now - oldest

    def _send_heartbeat(self, now: float, drain: Drain) -> None:
        """A STATS of all pools: its reply proves tmemd alive (and may carry DRAIN)."""
        negotiated = self.negotiated
        if self._heartbeat_id or negotiated is None or abi.Feature.STATS not in negotiated.features:
            return
        if not self._send_lock.acquire(blocking=False):
            return  # a caller is sending: that is traffic enough
        try:
            self._heartbeat_id = next(self._request_ids)
            self._heartbeat_sent = self._last_sent = now
            abi.pack_header_into(
                self._heartbeat, 0, opcode=Op.STATS, flags=0, request_id=self._heartbeat_id, status=0,
                pool_id=abi.ALL_POOLS, oid=(0, 0, 0), index=0, payload_length=0,
            )
            self.channel.send(memoryview(self._heartbeat), drain)
        except ChannelDown as error:
            self._give_up(self.connections, f"heartbeat not sent: {error}")
        finally:
            self._send_lock.release()

    def _give_up(self, epoch: int, reason: str) -> None:
        """Take connection `epoch` down because tmemd did not answer (or take) a
        request in time; the reader then reconnects and says HELLO again."""
        if self._mark_down(epoch):
            self.timeouts += 1
            log.warning("%s: tmemd stopped or stuck? session down, reconnecting", reason)

    def _mark_down(self, epoch: int | None = None) -> bool:
        """Fail every pending call: their requests may or may not have been served.
        With `epoch`, only if that connection is still the live one; True if it was."""
        with self._pending_lock:
            if epoch is not None and (epoch != self.connections or not self._up.is_set()):
                return False
            self._up.clear()
            pending = list(self._pending.values())
            self._pending.clear()
        for call in pending:
            call.reply = None
            if call.on_reply is not None:
                self._finish_posted(call, None)
            else:
                call.done.release()
        return True

    def _finish_posted(self, call: _Call, reply: Frame | None) -> None:
        on_reply, call.on_reply = call.on_reply, None
        self._free.put(call)
        assert on_reply is not None
        try:
            on_reply(reply)
        except Exception:  # a frontend's bug must not take the reader thread down
            log.exception("a posted request's completion failed")

    def _complete(self, frame: Frame) -> None:
        draining = bool(frame.flags & _DRAIN_FLAG)
        if draining:
            if not self.draining:
                log.info("tmemd asks this guest to drain its persistent pages")
            self.drain_requested.set()
        self.draining = draining
        with self._pending_lock:
            call = self._pending.pop(frame.request_id, None)
        if call is None:
            if frame.request_id == self._heartbeat_id:
                self._heartbeat_id = 0
                return
            # Ids are never reused: this answers a request given up on (timeout, reconnect).
            self.late_replies += 1
            log.info("late reply to request %d (op %d) dropped", frame.request_id, frame.opcode)
            return
        if call.on_reply is not None:
            if frame.status == Status.PROTOCOL_ERROR:
                self._refused(frame, self.connections)  # (the reader's own epoch)
                self._finish_posted(call, None)
                return
            self._finish_posted(call, frame)
            return
        call.reply = frame
        call.done.release()

    def _handshake(self, decoder: abi.FrameDecoder, receive: memoryview) -> None:
        """HELLO, then attach every pool; runs before any caller may send."""
        # One more in flight than calls exist: the reader's heartbeat.
        offer = abi.Hello(features=AGENT_FEATURES, max_in_flight=self._max_in_flight + 1)
        hello = self._exchange(decoder, receive, Op.HELLO, payload=offer.encode())
        self.negotiated = abi.Hello.decode(hello.payload)
        existing: dict[int, abi.PoolStats] = {}
        if abi.Feature.STATS in self.negotiated.features:
            reply = self._exchange(decoder, receive, Op.STATS, pool_id=abi.ALL_POOLS)
            existing = {record.pool_id: record for record in abi.decode_pool_stats(reply.payload)}
        for pool in self.pools:
            if pool.untrusted and pool.pool_id is not None:
                self._exchange(decoder, receive, Op.DESTROY_POOL, pool_id=pool.pool_id, check=False)
                existing.pop(pool.pool_id, None)
            record = existing.get(pool.pool_id) if pool.pool_id is not None else None
            if record is not None and record.flags & PoolFlag.PERSISTENT == pool.flags & PoolFlag.PERSISTENT:
                # tmemd kept it (the channel dropped), or brought it back from its journal
                # after a restart: same id, same pages, so the frontends' maps stay valid.
                self.pools_resumed += 1
                log.info("pool %d resumed (%d pages in tmemd)", record.pool_id, record.pages)
                continue
            reply = self._exchange(
                decoder, receive, Op.NEW_POOL, payload=abi.NewPool(pool.flags, pool.page_shift).encode()
            )
            granted = abi.decode_pool_grant(reply.payload)
            if granted & PoolFlag.PERSISTENT != pool.flags & PoolFlag.PERSISTENT:
                raise abi.ProtocolError(Status.INVALID, f"asked pool flags {pool.flags!r}, granted {granted!r}")
            log.info("pool %d created (persistent=%s)", reply.pool_id, pool.persistent)
            pool.pool_id = reply.pool_id
            pool.untrusted = False

    def _exchange(
        self,
        decoder: abi.FrameDecoder,
        receive: memoryview,
        opcode: Op,
        *,
        pool_id: int = 0,
        payload: bytes = b"",
        check: bool = True,
    ) -> Frame:
        """Send one request and read frames until its reply (handshake only: no other caller)."""
        request_id = next(self._request_ids)
        header = bytearray(abi.HEADER_SIZE)
        abi.pack_header_into(
            header, 0, opcode=opcode, flags=0, request_id=request_id, status=0,
            pool_id=pool_id, oid=(0, 0, 0), index=0, payload_length=len(payload),
        )
        with self._send_lock:
            self.channel.send(memoryview(header + payload), self._discarding(decoder, receive))
        deadline = time.monotonic() + self.handshake_timeout
        while True:
            frame = decoder.next_frame()
            if frame is abi.NEED_DATA:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.channel.wait_readable(remaining):
                    raise TimeoutError(f"no reply to {opcode.name} within {self.handshake_timeout} s")
                count = self.channel.recv_into(receive)
                if count == 0:
                    raise ChannelDown("tmemd went away during the handshake")
                decoder.feed(receive[:count])
                continue
            assert isinstance(frame, Frame)
            if frame.request_id != request_id or not frame.is_reply:
                continue  # a stale reply from before the reconnect
            if check and frame.status != Status.OK:
                raise abi.ProtocolError(Status(frame.status), f"{opcode.name}: {abi.error_text(frame)}")
            return frame

    # -- calls ---------------------------------------------------------------------

    def _call(
        self, opcode: Op, pool: SessionPool, oid: Oid, index: int, payload: abi.Buffer = b"",
        encode: Callable[[memoryview], int] | None = None,
    ) -> Frame:
        """Send one request, wait for its reply; raise ChannelDown if it cannot be had.

        `encode`, if given, writes the payload straight into the call's frame
        buffer (the view after the header) and returns its length: no payload object."""
        call = self._free.get()
        try:
            generation = self._send(call, opcode, pool, oid, index, payload, encode)
            if not call.done.acquire(timeout=self.request_timeout):
                self._withdraw(call)
                self._give_up(generation, f"no reply to {opcode.name} within {self.request_timeout} s")
                raise ChannelDown(f"no reply to {opcode.name} within {self.request_timeout} s")
            reply, call.reply = call.reply, None
            if reply is None:
                raise ChannelDown("tmemd session went down with the request in flight")
            if reply.status == Status.PROTOCOL_ERROR:
                self._refused(reply, generation, opcode)
                raise ChannelDown(f"tmemd refused {opcode.name}: {abi.error_text(reply)}")
            return reply
        finally:
            self._free.put(call)

    def _post(
        self, opcode: Op, pool: SessionPool, encode: Callable[[memoryview], int],
        on_reply: Callable[[Frame | None], None],
    ) -> None:
        """Send one request and return: `on_reply` gets its reply later, on the
        reader thread (None if the session went down first, or tmemd refused the
        frame). It must be quick and take no lock a sender may hold. Raises
        ChannelDown if the request was not sent (`on_reply` may still get None, if
        a disconnect raced the send)."""
        call = self._free.get()  # waits while max_in_flight calls are out: the bound
        try:
            self._send(call, opcode, pool, (0, 0, 0), 0, b"", encode, on_reply)
        except _NotRegistered:
            self._free.put(call)
            raise

    def _send(
        self, call: _Call, opcode: Op, pool: SessionPool, oid: Oid, index: int, payload: abi.Buffer,
        encode: Callable[[memoryview], int] | None, on_reply: Callable[[Frame | None], None] | None = None,
    ) -> int:
        """Frame the request in `call`'s buffer, register it as pending and send it:
        the connection epoch it went out on. Raises _NotRegistered (a ChannelDown)
        if it never was pending, else ChannelDown with the call withdrawn (a posted
        call, `on_reply` given, is then freed by whoever took it out of pending)."""
        pool_id = pool.pool_id
        if not self._up.is_set() or pool_id is None:
            raise _NotRegistered("tmemd session is down")
        if encode is not None:
            length = encode(call.payload_view)
        else:
            length = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
            call.view[abi.HEADER_SIZE : abi.HEADER_SIZE + length] = payload
        request_id = call.request_id = next(self._request_ids)
        abi.pack_header_into(
            call.buffer, 0, opcode=opcode, flags=0, request_id=request_id, status=0,
            pool_id=pool_id, oid=oid, index=index, payload_length=length,
        )
        with self._pending_lock:
            if not self._up.is_set():
                raise _NotRegistered("tmemd session is down")
            generation = self.connections
            call.sent_at = time.monotonic()
            call.on_reply = on_reply
            self._pending[request_id] = call
        posted = on_reply is not None
        # Bounded: another caller's send may be stuck on a host that stopped reading.
        if not self._send_lock.acquire(timeout=self.request_timeout):
            self._withdraw(call, posted)
            self._give_up(generation, f"{opcode.name} not sent within {self.request_timeout} s")
            raise ChannelDown("tmemd is not taking requests")
        try:
            # A reconnect since registering: this request must not precede the new HELLO.
            if generation != self.connections or not self._up.is_set():
                self._withdraw(call, posted)
                raise ChannelDown("tmemd session went down before the request was sent")
            self._last_sent = call.sent_at
            try:
                self.channel.send(call.view[: abi.HEADER_SIZE + length])
            except ChannelDown as error:
                # Maybe part of a frame went out: the stream is unusable until a new HELLO.
                self._withdraw(call, posted)
                self._give_up(generation, f"{opcode.name} not sent: {error}")
                raise
        finally:
            self._send_lock.release()
        return generation

    def _refused(self, reply: Frame, generation: int, opcode: Op | None = None) -> None:
        """tmemd answered PROTOCOL_ERROR on connection `generation`: the stream is
        unusable until a resync (docs/ABI.md): start over with a HELLO. The reply
        answers nothing: a GET_BATCH's pages are not missing, they were not looked up."""
        if self._mark_down(generation):
            log.warning("tmemd refused %s (%s): session down, saying HELLO again",
                        opcode.name if opcode is not None else f"op {reply.opcode}", abi.error_text(reply))

    def _withdraw(self, call: _Call, posted: bool = False) -> None:
        """Take an unanswered call back; if it was completed meanwhile, consume that
        completion. A posted call taken back is freed here (no reply will come);
        one completed meanwhile belongs to its completer, which freed it."""
        with self._pending_lock:
            completed = self._pending.pop(call.request_id, None) is None
        if posted:
            if not completed:
                call.on_reply = None
                self._free.put(call)
            return
        if completed:
            call.done.acquire()
        call.reply = None

    def put(self, pool: SessionPool, oid: Oid, index: int, page: abi.Buffer) -> bool:
        """PUT one page; True if tmem took it."""
        return self._call(Op.PUT, pool, oid, index, page).status == Status.OK

    def get(self, pool: SessionPool, oid: Oid, index: int, into: memoryview) -> bool:
        """GET one page into `into`; True on a hit."""
        reply = self._call(Op.GET, pool, oid, index)
        if reply.status != Status.OK:
            return False
        into[:] = reply.payload
        return True

    def flush_page(self, pool: SessionPool, oid: Oid, index: int) -> None:
        self._call(Op.FLUSH_PAGE, pool, oid, index)

    def flush_object(self, pool: SessionPool, oid: Oid) -> None:
        self._call(Op.FLUSH_OBJECT, pool, oid, 0)

    def _chunks(self, count: int) -> range:
        step = self.batch_pages
        if step == 0:
            raise ChannelDown("batch operations need Feature.BATCH, which tmemd did not grant")
        return range(0, count, step)

    def put_batch(self, pool: SessionPool, keys: Sequence[Key], pages: Sequence[abi.Buffer]) -> list[bool]:
        """PUT_BATCH (split to the negotiated batch size); one accepted flag per page."""
        accepted: list[bool] = []
        for start in self._chunks(len(keys)):
            end = start + self.batch_pages
            chunk_keys, chunk_pages = keys[start:end], pages[start:end]
            reply = self._call(
                Op.PUT_BATCH, pool, (0, 0, 0), 0,
                encode=lambda out: abi.encode_put_batch_into(out, 0, pool.page_shift, chunk_keys, chunk_pages),
            )
            if reply.status != Status.OK:
                accepted += [False] * len(keys[start:end])
                continue
            statuses, _ = abi.decode_batch_reply(reply.payload)
            accepted += [status == Status.OK for status in statuses]
        return accepted

    def post_put_batch(self, pool: SessionPool, keys: Sequence[Key], pages: Sequence[abi.Buffer],
                       on_accepted: Callable[[Sequence[Key], list[bool] | None], None]) -> None:
        """PUT_BATCH without waiting for the replies: the pages are copied into the
        frames, which go out in order with every other request (so tmemd applies a
        FLUSH sent after this returns after these puts). For each frame,
        `on_accepted(keys, flags)` runs later on the reader thread: one accepted
        flag per key, or None if the session went down first (the puts may or may
        not have landed). Raises ChannelDown if a frame could not be sent; the
        frames sent before it still complete."""
        for start in self._chunks(len(keys)):
            end = start + self.batch_pages
            chunk_keys, chunk_pages = keys[start:end], pages[start:end]

            def on_reply(reply: Frame | None, chunk_keys: Sequence[Key] = chunk_keys) -> None:
                if reply is None:
                    on_accepted(chunk_keys, None)
                elif reply.status != Status.OK:
                    on_accepted(chunk_keys, [False] * len(chunk_keys))
                else:
                    statuses, _ = abi.decode_batch_reply(reply.payload)
                    on_accepted(chunk_keys, [status == Status.OK for status in statuses])

            self._post(Op.PUT_BATCH, pool,
                       lambda out: abi.encode_put_batch_into(out, 0, pool.page_shift, chunk_keys, chunk_pages),
                       on_reply)

    def get_batch(self, pool: SessionPool, keys: Sequence[Key], into: Sequence[memoryview]) -> list[bool]:
        """GET_BATCH into `into` (one page view per key); one hit flag per key."""
        found: list[bool] = []
        for start in self._chunks(len(keys)):
            end = start + self.batch_pages
            chunk_keys = keys[start:end]
            reply = self._call(
                Op.GET_BATCH, pool, (0, 0, 0), 0, encode=lambda out: abi.encode_key_batch_into(out, 0, chunk_keys)
            )
            if reply.status != Status.OK:
                found += [False] * len(chunk_keys)
                continue
            found += abi.decode_batch_reply_into(reply.payload, pool.page_shift, into[start:end])
        return found

    def flush_batch(self, pool: SessionPool, keys: Sequence[Key]) -> None:
        """FLUSH_BATCH; a key with index abi.WHOLE_OBJECT flushes its whole object."""
        for start in self._chunks(len(keys)):
            chunk_keys = keys[start : start + self.batch_pages]
            self._call(
                Op.FLUSH_BATCH, pool, (0, 0, 0), 0, encode=lambda out: abi.encode_key_batch_into(out, 0, chunk_keys)
            )

    def pool_stats(self, pool: SessionPool) -> abi.PoolStats | None:
        reply = self._call(Op.STATS, pool, (0, 0, 0), 0)
        records = abi.decode_pool_stats(reply.payload) if reply.status == Status.OK else []
        return records[0] if records else None


def _ignore(frame: Frame) -> None:
    pass
