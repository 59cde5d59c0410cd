"""One ABI connection of one guest: frames in, store calls, replies out.

An asyncio (buffered) protocol rather than streams: each chunk read decodes
every complete frame, serves each synchronously against the store and writes
all replies of that chunk with one `transport.write`. Buffered, because a
plain Protocol makes asyncio allocate a fresh 256 KiB bytes per read.

Bounds (tmem_host.limits): a pass stops taking frames once the replies in
flight reach REPLY_BYTES_IN_FLIGHT (a chunk of GET_BATCH requests asks for far
more); the rest wait in the decoder with reading paused. Until HELLO a
connection costs a 4 KiB receive buffer and frames of at most a page, and the
limiter closes it if HELLO does not come in time.

Session rules (docs/CONTROL.md, "Reconnects and resync"):
- A new connection discards bytes until the first valid HELLO header (the
  decoder's resync mode): after a virtio-serial reconnect the stream may
  start mid-frame. A later HELLO restarts the session state.
- Pools belong to the guest (the store client), so they outlive connections.
- Well-framed but unacceptable requests get an error status with a short
  reason; bytes the decoder cannot frame close the connection (logged).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tmem_wire.abi import (
    ALL_POOLS, BATCH_HEADER_SIZE, DESCRIPTOR_SIZE, FLAG_REPLY, Feature, Flag, HEADER_SIZE, MAX_ERROR_TEXT,
    NEED_DATA, Buffer, Frame, FrameDecoder, Hello, NeedData, NewPool, Op, PoolFlag, ProtocolError, Status,
    decode_key_batch, decode_put_batch, encode_batch_reply, encode_pool_grant, encode_pool_stats,
    negotiate, pack_header_into, put_batch_pages,
)

from tmem_host.limits import (
    Admission, ConnectionKind, ConnectionLimiter, DurableReplies, ReplyFlow, widen_socket_buffers,
)
from tmem_host.replies import ConnectionStats
from tmem_host.store import EncodedPages, EncodingJob, PageEncoder, Store
from tmem_host.waiting import all_done

if TYPE_CHECKING:
    from tmem_host.daemon.runtime import GuestRuntime

log = logging.getLogger("tmemd.session")

# What tmemd offers in HELLO; the reply holds the minimum of both sides.
SERVER_HELLO = Hello(features=Feature.BATCH | Feature.ASYNC | Feature.STATS | Feature.DRAIN,
                     max_in_flight=128)
# One read's worth: a few 64-page batch frames (a 256 KiB read held less than one,
# so the encoder threads never had a frame to encode ahead: docs/PERFORMANCE.md).
RECV_BUFFER_BYTES = 1 << 20
# Until HELLO: a HELLO frame is 96 bytes, and a connection that never says it
# (half-open, junk) should cost next to nothing.
HANDSHAKE_RECV_BYTES = 4096
# Until HELLO a frame's payload is at most a page: enough for anything a client
# may send before HELLO to get its "HELLO first", too little to buffer.
HANDSHAKE_MAX_PAYLOAD = 4096

_OK = Status.OK
# Reply pieces of one read, joined into one write.
_Chunks = list[Buffer]
_REPLY = int(FLAG_REPLY)
_REPLY_DRAIN = int(FLAG_REPLY | Flag.DRAIN)
# Requests whose pages the remote tier may first have to read back.
_GETS = frozenset({Op.GET, Op.GET_BATCH})
# Frames taken at once when a get waits for the remote tier: the get and those
# already received behind it, whose fetches join its batch (the NBD export's
# MAX_READS_PER_FETCH; a client keeps a few frames in flight, at most 128).
MAX_FRAMES_PER_FETCH = 32


class _Refusal(Exception):
    """A well-framed request tmemd will not serve: answered with status + reason."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class AbiSession(asyncio.BufferedProtocol):
    def __init__(
        self,
        store: Store,
        resolve_guest: Callable[[asyncio.BaseTransport], GuestRuntime | None],
        transport_kind: str,
        limiter: ConnectionLimiter | None = None,
        encoder: PageEncoder | None = None,
    ) -> None:
        self.store = store
        self._resolve_guest = resolve_guest
        self.transport_kind = transport_kind
        self.guest: GuestRuntime | None = None
        self._transport: asyncio.Transport | None = None
        self._limiter = limiter
        # PUT_BATCH pages encoded ahead (see _encode_ahead): by frame, with the frame
        # itself, so that an entry can never serve another frame that took its id.
        self._encoder = encoder
        self._encoding: dict[int, tuple[Frame, EncodingJob]] = {}
        self._admission: Admission | None = None
        self._flow = ReplyFlow(self._serve)
        self._decoder = FrameDecoder(max_payload=HANDSHAKE_MAX_PAYLOAD, resync=True)
        self._recv_buffer = memoryview(bytearray(HANDSHAKE_RECV_BYTES))
        # Frames of the current read chunk served so far (its passes' in-flight count).
        self._chunk_frames = 0
        # Bytes of the replies the current pass has built.
        self._out_bytes = 0
        self._negotiated: Hello | None = None
        # REPLY, plus DRAIN while the guest is draining and negotiated Feature.DRAIN.
        self._reply_flags = _REPLY
        self._connected_at = time.time()
        self._handlers: dict[int, Callable[[Frame, _Chunks], None]] = {
            Op.NEW_POOL: self._new_pool,
            Op.DESTROY_POOL: self._destroy_pool,
            Op.PUT: self._put,
            Op.GET: self._get,
            Op.FLUSH_PAGE: self._flush_page,
            Op.FLUSH_OBJECT: self._flush_object,
            Op.PUT_BATCH: self._put_batch,
            Op.GET_BATCH: self._get_batch,
            Op.FLUSH_BATCH: self._flush_batch,
            Op.STATS: self._stats,
        }
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.errors = 0
        self.hellos = 0
        self.in_flight_max = 0
        self.reply_backlogs = 0
        # A pass stopped on the store (the remote tier): the frames taken from the
        # decoder to serve first, in order, when it resumes (a get that waits, those
        # already received behind it; an undecodable one as its error) and the
        # replies built before them (_carried). Replies that wait for the store's
        # writes are in _durable.
        self._resumed: collections.deque[Frame | ProtocolError] = collections.deque()
        # The gets the pending fetch covers; in the pass right after it (ids of
        # frames taken ahead) they are served as they are then (the tier forgets
        # what it read after that pass).
        self._fetching: list[Frame] = []
        self._fetched: set[int] = set()
        self._carried: _Chunks = []
        self._carried_served = 0
        self._durable = DurableReplies(lambda: store.make_durable(tier=False))
        self.store_waits = 0
        self.encoded_ahead = 0

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses).
        self._transport = transport = cast(asyncio.Transport, transport)
        guest = self._resolve_guest(transport)
        if guest is None:
            log.warning("connection refused: unknown peer",
                        extra={"transport": self.transport_kind,
                               "peer": str(transport.get_extra_info("peername"))})
            transport.close()
            return
        if self._limiter is not None:
            self._admission = self._limiter.admit(self, transport, ConnectionKind.ABI, guest.name)
            if self._admission is None:
                return  # refused (closed, logged and counted by the limiter)
        self.guest = guest
        guest.attach(self)
        self._flow.attach(transport)
        self._durable.attach(transport)
        widen_socket_buffers(transport.get_extra_info("socket"))
        log.info("guest connected", extra={"guest": guest.name, "transport": self.transport_kind})

    def connection_lost(self, exc: Exception | None) -> None:
        if self.guest is not None:
            self.guest.detach(self)
            log.info("guest disconnected",
                     extra={"guest": self.guest.name, "frames_in": self.frames_in,
                            "errors": self.errors,
                            "reason": str(exc) if exc else "closed"})
        if self._admission is not None:
            self._admission.release()
        self._flow.detach()
        self._transport = None
        self._resumed.clear()
        self._fetching = []
        self._encoding.clear()
        self._durable.detach()

    # The guest is not reading its replies: stop reading its requests.
    def pause_writing(self) -> None:
        self._flow.pause_writing()

    def resume_writing(self) -> None:
        self._flow.resume_writing()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv_buffer

    def eof_received(self) -> bool | None:
        # Replies that still wait for the store go first (then it closes); else
        # asyncio closes the transport once the replies written are sent.
        return True if self._durable.hold_eof() else None

    def buffer_updated(self, nbytes: int) -> None:
        if self._transport is None or self.guest is None:
            return
        self.bytes_in += nbytes
        self._chunk_frames = 0
        try:
            self._decoder.feed(self._recv_buffer[:nbytes])
        except ProtocolError as error:
            self._undecodable(self._transport, [], 0, error)
            return
        self._encode_ahead()
        self._serve()

    def _encode_ahead(self) -> None:
        """Hand the PUT_BATCH frames received whole to the encoder thread now: it
        compresses them (GIL released) while this thread serves the frames before
        them. Only once HELLO has set the frame limit, and not while frames wait
        for the remote tier (they are served first, and may include a HELLO)."""
        encoder = self._encoder
        if encoder is None or self._negotiated is None or self._resumed:
            return
        assert self.guest is not None
        # The frame the coming pass serves first is encoded by the pass itself (in
        # one C call): handing it to a thread would only add two thread wake-ups
        # to its latency. The ones behind it are encoded while the pass serves it.
        served_next = self._decoder.frames_ahead == 0 and not self._flow.suspended
        for number, frame in enumerate(self._decoder.parse_ahead()):
            if (number == 0 and served_next) or frame.opcode != Op.PUT_BATCH \
                    or not self.store.encodes_batches(self.guest.client, frame.pool_id):
                continue
            try:
                page_shift, pages = put_batch_pages(frame.payload)
                if len(pages) >> page_shift > self._negotiated.max_batch_pages:
                    continue  # refused in its turn
                job = encoder.submit(pages, 1 << page_shift, self.store.compress)
            except ProtocolError:
                continue  # refused in its turn
            except (OSError, RuntimeError, MemoryError) as error:  # no thread, closed: encoded in its turn
                log.warning("encoder refused a batch", extra={"guest": self.guest.name, "error": str(error)})
                return
            self._encoding[id(frame)] = (frame, job)

    def _serve(self) -> None:
        """One pass: serve the decoder's frames until it needs data, the replies
        in flight reach their bound (then the rest wait, see ReplyFlow) or a get
        must wait for the remote tier (then the pass resumes when it has read; the
        gets already received behind it join that fetch, see _fetch_behind)."""
        transport = self._transport
        if transport is None or self.guest is None or self._flow.suspended:
            return
        out, self._carried = self._carried, []
        self._reply_flags = _REPLY_DRAIN if self.guest.draining and self.drain_negotiated else _REPLY
        self._out_bytes = sum(len(chunk) for chunk in out)
        room = self._flow.room() - self._durable.bytes
        decoder = self._decoder
        handlers = self._handlers
        first = served = self._chunk_frames
        backlog = refetch = False
        waiter: asyncio.Future[None] | None = None
        taken_ahead = self._resumed
        fetched = self._fetched  # empty but in the pass right after a fetch
        try:
            while True:
                # Frames taken ahead (counted, and checked against the requests in
                # flight, when they came) first.
                resumed = bool(taken_ahead)
                if resumed:
                    taken = taken_ahead.popleft()
                    if isinstance(taken, ProtocolError):
                        raise taken
                    frame = taken
                else:
                    next_frame = _next_request(decoder)
                    if next_frame is NEED_DATA:
                        break
                    assert isinstance(next_frame, Frame)
                    frame = next_frame
                    served += 1  # every request served gets exactly one reply
                opcode = frame.opcode
                if opcode == Op.HELLO:
                    self._hello(frame, out)
                else:
                    negotiated = self._negotiated
                    try:
                        if negotiated is None:
                            raise _Refusal(Status.PROTOCOL_ERROR, "HELLO first")
                        # Every frame of this chunk arrived before any of its replies
                        # left, so the guest had at least `served` requests in flight.
                        if served > negotiated.max_in_flight and not resumed:
                            raise _Refusal(Status.INVALID, f"more than {negotiated.max_in_flight}"
                                           " requests in flight")
                        # A get that joined the fetch just done is served as it is now,
                        # but for copies gone meanwhile (pages demoted while it waited):
                        # a page the tier could not read back misses, it is not fetched
                        # again. A get held over to a later pass fetches again if it must.
                        if (opcode in _GETS and (waiter := self._prefetch(
                                frame, again=resumed and id(frame) in fetched)) is not None):
                            taken_ahead.appendleft(frame)
                            if fetched:
                                # Not in this pass: the pass resumed from a fetch serves
                                # what that fetch covered. The next pass (from the event
                                # loop) asks again, and its reads join what this one asked.
                                waiter = None
                                refetch = True
                            else:
                                served, waiter = self._fetch_behind(
                                    waiter, served, negotiated.max_in_flight, room)
                            break
                        handlers[opcode](frame, out)
                    except _Refusal as refusal:
                        self._encoding.pop(id(frame), None)  # refused before its handler took it
                        self.errors += 1
                        self._reply(out, frame, refusal.status,
                                    refusal.reason.encode()[:MAX_ERROR_TEXT])
                    except ProtocolError as error:  # a payload codec rejected a value
                        self._encoding.pop(id(frame), None)
                        self.errors += 1
                        self._reply(out, frame, error.status,
                                    error.message.encode()[:MAX_ERROR_TEXT])
                if self._out_bytes >= room:
                    backlog = True
                    break
        except ProtocolError as error:
            # Frames a resumed pass carried count with this pass's.
            carried, self._carried_served = self._carried_served, 0
            self._undecodable(transport, out, served - first + carried, error)
            return
        self._chunk_frames = served
        if waiter is not None:
            # The replies so far wait with the rest of the pass (and count then).
            self._carried = out
            self._carried_served += served - first
            self.store_waits += 1
            self._flow.suspend(waiter, self._serve_fetched)
            return
        carried, self._carried_served = self._carried_served, 0
        if self._write(transport, out, served - first + carried, served):
            return  # too many replies wait for the store: the next pass comes when the first leave
        if backlog:
            self.reply_backlogs += 1
        # A get left to fetch in the next pass: that pass comes as after a backlog
        # (from the event loop, so after the tier forgot what it read).
        self._flow.pass_done(backlog or refetch)

    def _serve_fetched(self) -> None:
        """The pass that resumes after a fetch: the gets it covered serve what it read."""
        self._fetched = {id(frame) for frame in self._fetching}
        self._fetching = []
        try:
            self._serve()
        finally:
            self._fetched = set()

    def _fetch_behind(self, waiter: asyncio.Future[None], served: int, max_in_flight: int,
                      room: int) -> tuple[int, asyncio.Future[None]]:
        """The get first among the resumed frames waits for ``waiter``; the gets
        already received behind it (taken before, then from the decoder) join its
        fetch: the tier reads all that is asked in one loop pass as one pipeline per
        master. They stay, in order, to be served in the pass that resumes, with the
        first frame that is not a get (nothing but a read runs ahead of its turn).
        Taking stops at MAX_FRAMES_PER_FETCH frames, at the requests in flight the
        guest may have (the next one is refused in its turn), and before the replies
        could pass the pass's ``room`` (a get left over fetches in its own turn).
        Returns ``served`` with the frames taken from the decoder, and the future
        for the whole fetch."""
        resumed = self._resumed
        first = resumed[0]
        assert isinstance(first, Frame)
        self._fetching = [first]
        waiters = [waiter]
        budget = room - self._out_bytes - self._reply_bound(first)
        position = 1
        while position < MAX_FRAMES_PER_FETCH and budget > 0:
            if position < len(resumed):
                following = resumed[position]
            else:
                if served >= max_in_flight:
                    break
                try:
                    taken = _next_request(self._decoder)
                except ProtocolError as error:  # raised in its turn, after the frames before it
                    resumed.append(error)
                    break
                if taken is NEED_DATA:
                    break
                assert isinstance(taken, Frame)
                following = taken
                resumed.append(following)
                served += 1  # counted as it comes, like every frame
            position += 1
            if not isinstance(following, Frame) or following.opcode not in _GETS:
                break
            budget -= self._reply_bound(following)
            if budget <= 0:
                break
            if (joined := self._prefetch(following)) is not None:
                waiters.append(joined)
                self._fetching.append(following)
        return served, all_done(waiters)

    def _reply_bound(self, frame: Frame) -> int:
        """The most bytes a GET's or GET_BATCH's reply takes (every page found, or
        an error's reason)."""
        assert self.guest is not None
        page_shift = self.store.pool_page_shift(self.guest.client, frame.pool_id)
        payload = MAX_ERROR_TEXT
        if page_shift is not None:
            if frame.opcode == Op.GET:
                payload = max(payload, 1 << page_shift)
            else:  # the decoder checked the key batch's length
                count = (len(frame.payload) - BATCH_HEADER_SIZE) // DESCRIPTOR_SIZE
                payload = max(payload, BATCH_HEADER_SIZE + count + 8 + (count << page_shift))
        return HEADER_SIZE + payload

    def _prefetch(self, frame: Frame, *, again: bool = False) -> asyncio.Future[None] | None:
        """Before a GET or GET_BATCH: a future if its pages must first be read back
        from the remote tier (None: they are in memory, or the request is bad and
        its handler says so). ``again``: its fetch is done (Store.fetch)."""
        assert self.guest is not None
        client = self.guest.client
        if not self.store.may_fetch(client, frame.pool_id):
            return None
        if frame.opcode == Op.GET:
            keys = [(frame.oid, frame.index)]
        else:
            try:
                keys = decode_key_batch(frame.payload)
            except ProtocolError:
                return None
        return self.store.fetch(client, frame.pool_id, keys, again=again)

    def _undecodable(self, transport: asyncio.Transport, out: _Chunks, served: int,
                     error: ProtocolError) -> None:
        self.errors += 1
        # The connection closes: nothing to wait for (an acknowledged page the tier
        # fails to take stays in memory, Store.strand).
        self._write(transport, out, served, served, wait=False)
        log.warning("closing connection: undecodable input",
                    extra={"guest": self._guest_name(), "reason": str(error)})
        transport.close()

    def _write(self, transport: asyncio.Transport, out: _Chunks, served: int,
               in_flight: int, *, wait: bool = True) -> bool:
        """Send the pass's replies once what they acknowledge is as durable as
        promised (durability fsync: one fdatasync for all of them; the remote tier:
        its writes acknowledged by the cluster), after the earlier replies still
        waiting; the connection is served on meanwhile (DurableReplies). True if
        the pass must stop until the first waiting reply leaves. ``wait=False``
        (the connection is closing): send every reply now."""
        self.frames_in += served
        if in_flight > self.in_flight_max:
            self.in_flight_max = in_flight
        if not out:
            return False
        reply = b"".join(out)
        self.bytes_out += len(reply)
        self.frames_out += served
        waiter = self.store.make_durable()
        if not wait:
            self._durable.send_all(reply)
            return False
        if waiter is not None:
            self.store_waits += 1
        if not self._durable.add(reply, waiter):
            return False
        self._flow.suspend(self._durable.first_waiting(), self._serve)
        return True

    # -- requests ---------------------------------------------------------------

    def _hello(self, frame: Frame, out: _Chunks) -> None:
        try:
            offer = Hello.decode(frame.payload)
            agreed = negotiate(offer, SERVER_HELLO)
        except ProtocolError as error:
            self.errors += 1
            self._reply(out, frame, error.status, error.message.encode()[:MAX_ERROR_TEXT])
            return
        if self._negotiated is not None:
            log.info("session restarted by HELLO", extra={"guest": self._guest_name()})
        self.hellos += 1
        if self._negotiated is None:  # the decoder copied the read: the buffer may change
            self._recv_buffer = memoryview(bytearray(RECV_BUFFER_BYTES))
        self._negotiated = agreed
        self._decoder.max_payload = agreed.max_frame - HEADER_SIZE
        self._reply(out, frame, _OK, agreed.encode())

    def _new_pool(self, frame: Frame, out: _Chunks) -> None:
        request = NewPool.decode(frame.payload)
        assert self._negotiated is not None and self.guest is not None
        if not self._negotiated.page_sizes & (1 << request.page_shift):
            raise _Refusal(Status.INVALID, f"page shift {request.page_shift} not negotiated")
        persistent = PoolFlag.PERSISTENT in request.flags
        inclusive = PoolFlag.INCLUSIVE_GETS in request.flags
        status, pool_id, shared = self.store.new_pool(
            self.guest.client, persistent, request.page_shift, request.uuid, inclusive
        )
        if status != _OK:
            raise _Refusal(status, "no free pool slot" if status == Status.NOT_PERMITTED
                           else "pool refused")
        granted = PoolFlag(0)
        if persistent:
            granted |= PoolFlag.PERSISTENT
        if shared:
            granted |= PoolFlag.SHARED
        elif inclusive and not persistent:  # the store honours it for private ephemeral pools
            granted |= PoolFlag.INCLUSIVE_GETS
        self._reply(out, frame, _OK, encode_pool_grant(granted), pool_id=pool_id)

    def _destroy_pool(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        self._reply(out, frame, self.store.destroy_pool(self.guest.client, frame.pool_id))

    def _put(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        page = frame.payload
        assert isinstance(page, bytes)  # the decoder hands out payloads as bytes
        status = self.store.put(self.guest.client, frame.pool_id, frame.oid, frame.index, page)
        self._reply(out, frame, status)

    def _get(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        status, page = self.store.get(self.guest.client, frame.pool_id, frame.oid, frame.index)
        if page is None:
            self._reply(out, frame, status)
        else:
            self._reply(out, frame, status, page)

    def _flush_page(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        self._reply(out, frame, self.store.flush_page(
            self.guest.client, frame.pool_id, frame.oid, frame.index))

    def _flush_object(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        self._reply(out, frame, self.store.flush_object(
            self.guest.client, frame.pool_id, frame.oid))

    def _check_batch(self, count: int) -> None:
        assert self._negotiated is not None
        if count > self._negotiated.max_batch_pages:
            raise _Refusal(Status.INVALID, f"batch of {count} exceeds the negotiated "
                           f"{self._negotiated.max_batch_pages}")

    def _put_batch(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        page_shift, keys, pages = decode_put_batch(frame.payload)
        self._check_batch(len(keys))
        pool_shift = self._pool_page_shift(frame.pool_id)
        if page_shift != pool_shift:
            raise _Refusal(Status.INVALID, f"batch of 2^{page_shift}-byte pages for a pool of "
                           f"2^{pool_shift}-byte pages")
        encoded = self._encoded(frame)
        statuses = self.store.put_many(self.guest.client, frame.pool_id, keys, pages, encoded)
        self._reply(out, frame, _OK, encode_batch_reply(statuses))

    def _encoded(self, frame: Frame) -> EncodedPages | None:
        """The frame's pages as the encoder threads stored them (waiting for them
        if they are still at work); else encoded now, in one call for the batch.
        None for a pool that takes no pages encoded ahead (dedup), or a payload
        refused in its turn."""
        entry = self._encoding.pop(id(frame), None)
        if entry is not None and entry[0] is frame and (encoded := entry[1].result()) is not None:
            self.encoded_ahead += 1
            return encoded
        assert self.guest is not None
        try:
            page_shift, pages = put_batch_pages(frame.payload)
        except ProtocolError:
            return None
        return self.store.encode_batch(self.guest.client, frame.pool_id, pages, 1 << page_shift)

    def _get_batch(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        keys = decode_key_batch(frame.payload)
        self._check_batch(len(keys))
        page_shift = self._pool_page_shift(frame.pool_id)
        statuses, pages = self.store.get_many(self.guest.client, frame.pool_id, keys)
        self._reply(out, frame, _OK, encode_batch_reply(statuses, pages, page_shift=page_shift))

    def _flush_batch(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        keys = decode_key_batch(frame.payload)
        self._check_batch(len(keys))
        self._pool_page_shift(frame.pool_id)
        # The store takes index WHOLE_OBJECT as a flush of the whole object.
        statuses = self.store.flush_many(self.guest.client, frame.pool_id, keys)
        self._reply(out, frame, _OK, encode_batch_reply(statuses))

    def _stats(self, frame: Frame, out: _Chunks) -> None:
        assert self.guest is not None
        pool_id = None if frame.pool_id == ALL_POOLS else frame.pool_id
        if pool_id is not None:
            self._pool_page_shift(pool_id)
        records = self.store.pool_stats(self.guest.client, pool_id)
        self._reply(out, frame, _OK, encode_pool_stats(records))

    def _pool_page_shift(self, pool_id: int) -> int:
        assert self.guest is not None
        page_shift = self.store.pool_page_shift(self.guest.client, pool_id)
        if page_shift is None:
            raise _Refusal(Status.INVALID, f"no pool {pool_id}")
        return page_shift

    @property
    def drain_negotiated(self) -> bool:
        """Whether this connection's client can be told to drain (Feature.DRAIN)."""
        return self._negotiated is not None and Feature.DRAIN in self._negotiated.features

    def _reply(self, out: _Chunks, request: Frame, status: Status, payload: Buffer = b"",
               pool_id: int | None = None) -> None:
        self._out_bytes += HEADER_SIZE + len(payload)
        _append_reply(out, request, status, payload, pool_id, self._reply_flags)

    # -- control ------------------------------------------------------------------

    def _guest_name(self) -> str:
        return self.guest.name if self.guest is not None else "?"

    def close(self, reason: str) -> None:
        if self._transport is not None:
            log.info("closing connection", extra={"guest": self._guest_name(), "reason": reason})
            self._transport.close()

    # -- the limiter's view (tmem_host.limits.LimitedConnection) -----------

    @property
    def handshake_done(self) -> bool:
        return self._negotiated is not None

    @property
    def activity(self) -> int:
        return self.bytes_in

    def close_by_limit(self, reason: str) -> None:
        if self._transport is not None:
            self._transport.abort()

    def stats(self) -> ConnectionStats:
        return {
            "guest": self._guest_name(),
            "transport": self.transport_kind,
            "connected_s": round(time.time() - self._connected_at, 3),
            "negotiated": self._negotiated is not None,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors": self.errors,
            "in_flight_max": self.in_flight_max,
            "resyncs": max(0, self.hellos - 1),
            "reply_backlogs": self.reply_backlogs,
            "store_waits": self.store_waits,
            "encoded_ahead": self.encoded_ahead,
            "discarded_bytes": self._decoder.discarded,
        }


def _next_request(decoder: FrameDecoder) -> Frame | NeedData:
    """The decoder's next frame (ProtocolError if it is undecodable, or a reply)."""
    frame = decoder.next_frame()
    if isinstance(frame, Frame) and frame.flags & _REPLY:
        raise ProtocolError(Status.PROTOCOL_ERROR, "the guest sent a reply frame")
    return frame


def _append_reply(out: _Chunks, request: Frame, status: Status, payload: Buffer = b"",
                  pool_id: int | None = None, flags: int = _REPLY) -> None:
    """Queue a reply: its header, then its payload (joined with the rest of the read's)."""
    header = bytearray(HEADER_SIZE)
    pack_header_into(
        header, 0, opcode=request.opcode, flags=flags, request_id=request.request_id,
        status=status, pool_id=request.pool_id if pool_id is None else pool_id,
        oid=request.oid, index=request.index, payload_length=len(payload),
    )
    out.append(header)
    if payload:
        out.append(payload)
