"""A synchronous tmem ABI client over a unix socket: tests, bench and fuzzer use it.

Two layers: `submit()`/`flush()`/`reply()` send frames and match replies by
request id (replies may come in any order, several requests may be in flight),
and the one-call helpers (`put`, `get`, `put_batch`, ...) built on them.
"""

from __future__ import annotations

import itertools
import socket
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tmem_host.limits import widen_socket_buffers
from tmem_wire.abi import (
    ALL_POOLS,
    Buffer,
    HEADER_SIZE,
    MIN_PAGE_SHIFT,
    NEED_DATA,
    Frame,
    FrameDecoder,
    Hello,
    Key,
    NewPool,
    Oid,
    Op,
    PoolFlag,
    PoolStats,
    Status,
    decode_batch_reply,
    decode_pool_grant,
    decode_pool_stats,
    encode_key_batch,
    encode_put_batch,
    error_text,
    pack_header_into,
)

_RECV_SIZE = 1 << 18
# Chunks per sendmsg call (Linux's IOV_MAX is 1024).
_MAX_IOVEC = 512


@dataclass(frozen=True, slots=True)
class PipelinedRequest:
    """One request for `AbiClient.pipelined`."""

    opcode: Op
    pool_id: int = 0
    oid: Oid = (0, 0, 0)
    index: int = 0
    payload: bytes = b""


class AbiError(Exception):
    """tmemd answered a request that must succeed with a non-OK status."""

    def __init__(self, op: Op, status: Status, text: str) -> None:
        super().__init__(f"{op.name}: {status.name}" + (f" ({text})" if text else ""))
        self.status = status
        self.text = text


class TmemdClosedConnection(ConnectionError):
    """tmemd closed the connection before the awaited reply arrived."""


def _encode_header(
    opcode: int, request_id: int, pool_id: int, oid: Oid, index: int, payload_length: int
) -> bytearray:
    header = bytearray(HEADER_SIZE)
    pack_header_into(header, 0, opcode=opcode, flags=0, request_id=request_id, status=0,
                     pool_id=pool_id, oid=oid, index=index, payload_length=payload_length)
    return header


class AbiClient:
    """One ABI connection. Call `hello()` first (or use `AbiClient.open`)."""

    def __init__(self, path: Path | str, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        widen_socket_buffers(self.sock)
        self.sock.connect(str(self.path))
        self.negotiated: Hello | None = None
        self._decoder = FrameDecoder()
        # recv_into a reused buffer: recv(N) would allocate N bytes per call.
        self._recv_buffer = memoryview(bytearray(_RECV_SIZE))
        self._request_ids = itertools.count(1)
        self._outgoing: list[Buffer] = []
        self._replies: dict[int, Frame] = {}

    @classmethod
    def open(cls, path: Path | str, *, offer: Hello | None = None,
             timeout: float = 10.0) -> AbiClient:
        client = cls(path, timeout=timeout)
        try:
            client.hello(offer or Hello())
        except BaseException:
            client.close()
            raise
        return client

    # -- frame layer ---------------------------------------------------------

    def submit(self, opcode: Op, *, pool_id: int = 0, oid: Oid = (0, 0, 0), index: int = 0,
               payload: bytes = b"") -> int:
        """Queue one request (sent on flush()); return its request id."""
        request_id = next(self._request_ids)
        self._outgoing.append(_encode_header(opcode, request_id, pool_id, oid, index,
                                             len(payload)))
        if payload:
            self._outgoing.append(payload)
        return request_id

    def flush(self) -> None:
        if self._outgoing:
            chunks = self._outgoing
            self._outgoing = []
            self._send(chunks)

    def send_raw(self, data: bytes) -> None:
        """Send arbitrary bytes (fuzzing, resync tests)."""
        self.flush()
        self._send([data])

    def _send(self, chunks: list[Buffer]) -> None:
        """Gather-write the chunks: big payloads are not copied into one buffer."""
        views = [memoryview(chunk) for chunk in chunks]
        try:
            while views:
                sent = self.sock.sendmsg(views[:_MAX_IOVEC])
                while views and sent >= len(views[0]):
                    sent -= len(views.pop(0))
                if sent:
                    views[0] = views[0][sent:]
        except (BrokenPipeError, ConnectionResetError) as error:
            raise TmemdClosedConnection(f"tmemd closed {self.path}") from error

    def receive(self) -> Frame:
        """The next reply off the wire, whatever its request id."""
        while True:
            frame = self._decoder.next_frame()
            if frame is not NEED_DATA:
                assert isinstance(frame, Frame)
                return frame
            try:
                received = self.sock.recv_into(self._recv_buffer)
            except ConnectionResetError:
                received = 0
            if not received:
                raise TmemdClosedConnection(f"tmemd closed {self.path}")
            self._decoder.feed(self._recv_buffer[:received])

    def reply(self, request_id: int) -> Frame:
        """The reply to `request_id`, keeping other replies for their callers."""
        self.flush()
        while request_id not in self._replies:
            frame = self.receive()
            self._replies[frame.request_id] = frame
        return self._replies.pop(request_id)

    def call(self, opcode: Op, *, pool_id: int = 0, oid: Oid = (0, 0, 0), index: int = 0,
             payload: bytes = b"") -> Frame:
        """Send one request and wait for its reply."""
        return self.reply(self.submit(opcode, pool_id=pool_id, oid=oid, index=index,
                                      payload=payload))

    def pipelined(self, requests: Iterable[PipelinedRequest], depth: int) -> Iterator[Frame]:
        """Replies to `requests` in request order, with up to `depth` in flight."""
        window: deque[int] = deque()
        for request in requests:
            window.append(self.submit(request.opcode, pool_id=request.pool_id, oid=request.oid,
                                      index=request.index, payload=request.payload))
            if len(window) >= depth:
                yield self.reply(window.popleft())
        while window:
            yield self.reply(window.popleft())

    # -- operations ------------------------------------------------------------

    def hello(self, offer: Hello | None = None) -> Hello:
        frame = self.call(Op.HELLO, payload=(offer or Hello()).encode())
        _check(Op.HELLO, frame)
        self.negotiated = Hello.decode(frame.payload)
        return self.negotiated

    def new_pool(self, flags: PoolFlag = PoolFlag.PERSISTENT, *,
                 page_shift: int = MIN_PAGE_SHIFT,
                 shared_uuid: uuid.UUID | None = None) -> tuple[int, PoolFlag]:
        """Create a pool; return (pool id, granted flags)."""
        if shared_uuid is not None:
            flags |= PoolFlag.SHARED
        frame = self.call(Op.NEW_POOL, payload=NewPool(flags, page_shift, shared_uuid).encode())
        _check(Op.NEW_POOL, frame)
        return frame.pool_id, decode_pool_grant(frame.payload)

    def destroy_pool(self, pool_id: int) -> Status:
        return Status(self.call(Op.DESTROY_POOL, pool_id=pool_id).status)

    def put(self, pool_id: int, oid: Oid, index: int, page: bytes) -> Status:
        return Status(self.call(Op.PUT, pool_id=pool_id, oid=oid, index=index,
                                payload=page).status)

    def get(self, pool_id: int, oid: Oid, index: int) -> tuple[Status, bytes | None]:
        frame = self.call(Op.GET, pool_id=pool_id, oid=oid, index=index)
        status = Status(frame.status)
        return status, bytes(frame.payload) if status == Status.OK else None

    def flush_page(self, pool_id: int, oid: Oid, index: int) -> Status:
        return Status(self.call(Op.FLUSH_PAGE, pool_id=pool_id, oid=oid, index=index).status)

    def flush_object(self, pool_id: int, oid: Oid) -> Status:
        return Status(self.call(Op.FLUSH_OBJECT, pool_id=pool_id, oid=oid).status)

    def submit_put_batch(self, pool_id: int, keys: Sequence[Key], pages: Sequence[Buffer],
                         page_shift: int = MIN_PAGE_SHIFT) -> int:
        return self.submit(Op.PUT_BATCH, pool_id=pool_id,
                           payload=encode_put_batch(page_shift, keys, pages))

    def put_batch(self, pool_id: int, keys: Sequence[Key], pages: Sequence[Buffer],
                  page_shift: int = MIN_PAGE_SHIFT) -> list[Status]:
        frame = self.reply(self.submit_put_batch(pool_id, keys, pages, page_shift))
        _check(Op.PUT_BATCH, frame)
        return decode_batch_reply(frame.payload)[0]

    def submit_get_batch(self, pool_id: int, keys: Sequence[Key]) -> int:
        return self.submit(Op.GET_BATCH, pool_id=pool_id, payload=encode_key_batch(keys))

    def get_batch(self, pool_id: int, keys: Sequence[Key],
                  page_shift: int = MIN_PAGE_SHIFT) -> list[bytes | None]:
        """One entry per key: the page, or None when tmemd did not have it."""
        return self.get_batch_reply(self.submit_get_batch(pool_id, keys), page_shift)[1]

    def get_batch_reply(self, request_id: int, page_shift: int = MIN_PAGE_SHIFT
                        ) -> tuple[list[Status], list[bytes | None]]:
        frame = self.reply(request_id)
        _check(Op.GET_BATCH, frame)
        statuses, pages = decode_batch_reply(frame.payload, page_shift)
        found = iter(pages)
        return statuses, [next(found) if status == Status.OK else None for status in statuses]

    def flush_batch(self, pool_id: int, keys: Sequence[Key]) -> list[Status]:
        frame = self.call(Op.FLUSH_BATCH, pool_id=pool_id, payload=encode_key_batch(keys))
        _check(Op.FLUSH_BATCH, frame)
        return decode_batch_reply(frame.payload)[0]

    def stats(self, pool_id: int = ALL_POOLS) -> list[PoolStats]:
        frame = self.call(Op.STATS, pool_id=pool_id)
        _check(Op.STATS, frame)
        return decode_pool_stats(frame.payload)

    # -- lifetime ----------------------------------------------------------------

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AbiClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _check(op: Op, frame: Frame) -> None:
    if frame.status != Status.OK:
        raise AbiError(op, Status(frame.status), error_text(frame))
