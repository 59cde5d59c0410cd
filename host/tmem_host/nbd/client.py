"""A small blocking NBD client for tmemd's export: the benchmark and the tests drive it.

Fixed newstyle GO handshake, simple replies only, requests pipelined up to a
depth. Real guests use QEMU's client; this one exists to measure the export
and to send what QEMU never would.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tmem_host.limits import widen_socket_buffers
from tmem_wire import nbd
from tmem_wire.frontswap import PAGE_SIZE


class NbdClientError(Exception):
    """The server broke the protocol, refused the export or closed the connection."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    size: int
    transmission_flags: int
    minimum_block: int
    preferred_block: int
    maximum_payload: int


@dataclass(frozen=True, slots=True)
class ClientRequest:
    command: int
    offset: int
    length: int
    data: bytes = b""
    flags: int = 0


@dataclass(frozen=True, slots=True)
class ClientReply:
    handle: int
    error: int
    data: bytes


class NbdClient:
    """``with NbdClient(path, "g1") as client: client.write(0, data)``."""

    def __init__(self, socket_path: str | Path, export: str, *, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.export = export
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        widen_socket_buffers(self._sock)
        self._next_handle = 1
        self.negotiated: Negotiated | None = None

    def __enter__(self) -> NbdClient:
        self.connect()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def connect(self) -> Negotiated:
        self._sock.connect(self.socket_path)
        magic, option_magic, flags = struct.unpack(">QQH", self._recv(18))
        if (magic, option_magic) != (nbd.NBDMAGIC, nbd.IHAVEOPT):
            raise NbdClientError("not an NBD newstyle server")
        if not flags & nbd.HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdClientError("server lacks fixed newstyle")
        client_flags = nbd.ClientFlag.FIXED_NEWSTYLE | (flags & nbd.HandshakeFlag.NO_ZEROES)
        name = self.export.encode()
        go = (struct.pack(">I", len(name)) + name
              + struct.pack(">HH", 1, nbd.InfoType.BLOCK_SIZE))
        self._sock.sendall(struct.pack(">I", client_flags)
                           + struct.pack(">QII", nbd.IHAVEOPT, nbd.Option.GO, len(go)) + go)
        size = transmission_flags = -1
        blocks = (1, PAGE_SIZE, nbd.DEFAULT_MAX_PAYLOAD)
        while True:
            magic, _option, reply_type, length = struct.unpack(">QIII", self._recv(20))
            if magic != nbd.OPTION_REPLY_MAGIC:
                raise NbdClientError(f"bad option reply magic {magic:#x}")
            data = self._recv(length)
            if reply_type == nbd.ReplyType.ACK:
                break
            if reply_type != nbd.ReplyType.INFO:
                raise NbdClientError(f"GO {self.export!r} refused: {reply_type:#x} {data!r}")
            (info_type,) = struct.unpack_from(">H", data)
            if info_type == nbd.InfoType.EXPORT:
                _, size, transmission_flags = struct.unpack(">HQH", data)
            elif info_type == nbd.InfoType.BLOCK_SIZE:
                blocks = struct.unpack(">III", data[2:])
        if size < 0:
            raise NbdClientError("GO acknowledged without NBD_INFO_EXPORT")
        self.negotiated = Negotiated(size, transmission_flags, *blocks)
        return self.negotiated

    def close(self) -> None:
        try:
            if self.negotiated is not None:
                self._sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0,
                                               nbd.Command.DISC, 0, 0, 0))
        except OSError:
            pass  # the server may be gone already
        self._sock.close()

    # -- transmission --

    def run(self, requests: Iterable[ClientRequest], depth: int = 1) -> Iterator[ClientReply]:
        """Send requests keeping up to ``depth`` in flight; yield replies in completion order."""
        pending: dict[int, int] = {}  # handle -> expected READ payload length
        for request in requests:
            while len(pending) >= depth:
                yield self._reply(pending)
            handle = self._next_handle
            self._next_handle += 1
            header = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, request.flags, request.command,
                                 handle, request.offset, request.length)
            self._sock.sendall(header + request.data if request.data else header)
            pending[handle] = request.length if request.command == nbd.Command.READ else 0
        while pending:
            yield self._reply(pending)

    def call(self, request: ClientRequest) -> ClientReply:
        [reply] = self.run([request])
        return reply

    def write(self, offset: int, data: bytes) -> int:
        return self.call(ClientRequest(nbd.Command.WRITE, offset, len(data), data)).error

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        reply = self.call(ClientRequest(nbd.Command.READ, offset, length))
        return reply.error, reply.data

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are: for tests of what a broken client does."""
        self._sock.sendall(data)

    def close_write_and_wait(self) -> bytes:
        """Half-close, then read until the server closes; returns what it sent meanwhile."""
        self._sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        try:
            while chunk := self._sock.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
        return bytes(received)

    def _reply(self, pending: dict[int, int]) -> ClientReply:
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != nbd.SIMPLE_REPLY_MAGIC or handle not in pending:
            raise NbdClientError(f"bad reply magic {magic:#x} or unknown handle {handle}")
        length = pending.pop(handle)
        data = self._recv(length) if length and not error else b""
        return ClientReply(handle, error, data)

    def _recv(self, length: int) -> bytes:
        buffer = bytearray(length)
        view = memoryview(buffer)
        received = 0
        while received < length:
            count = self._sock.recv_into(view[received:])
            if not count:
                raise NbdClientError("server closed the connection")
            received += count
        return bytes(buffer)


def bench_export(socket_path: str | Path, export: str, pages: Sequence[bytes], *,
                 pages_per_request: int = 64, depth: int = 4,
                 commands: Sequence[nbd.Command] = (nbd.Command.WRITE, nbd.Command.READ),
                 ) -> list[tuple[str, str, int, float]]:
    """Time WRITE then READ (``commands``: either alone, a READ of pages written
    before) of ``pages`` in ``pages_per_request``-page requests, ``depth`` in flight.

    Returns (row name, "put" or "get", pages, seconds) per direction, for ``make bench``.
    """
    request_bytes = pages_per_request * PAGE_SIZE
    payloads = [b"".join(pages[start : start + pages_per_request])
                for start in range(0, len(pages) - pages_per_request + 1, pages_per_request)]
    rows: list[tuple[str, str, int, float]] = []
    with NbdClient(socket_path, export) as client:
        for command in commands:
            kind = "put" if command == nbd.Command.WRITE else "get"
            requests = (ClientRequest(command, number * request_bytes, request_bytes,
                                      payload if command == nbd.Command.WRITE else b"")
                        for number, payload in enumerate(payloads))
            started = time.perf_counter()
            errors = sum(1 for reply in client.run(requests, depth) if reply.error)
            elapsed = time.perf_counter() - started
            if errors:
                raise NbdClientError(f"{errors} NBD {command.name} requests failed")
            rows.append((f"NBD {command.name} {pages_per_request}p x{depth}", kind,
                         len(payloads) * pages_per_request, elapsed))
        # Proof the data made the round trip, outside the timed part.
        for number in range(0, len(payloads), max(1, len(payloads) // 17)):
            if client.read(number * request_bytes, request_bytes) != (nbd.Error.OK, payloads[number]):
                raise NbdClientError(f"NBD READ of request {number} returned other data")
    return rows
