"""tmemd's control socket: newline-delimited JSON (docs/CONTROL.md).

Request: `{"cmd": "set-weight", "guest": "g1", "weight": 200}`; reply:
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. One reply
per request, in order. This module holds both ends: the line codec, the
asyncio server protocol and the synchronous client tmemctl and tests use
(its typed methods give the results read by key their shapes,
tmem_host.replies).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from tmem_host.limits import Admission, ConnectionKind, ConnectionLimiter
from tmem_host.replies import BudgetReply, DrainReply, GuestRecord, StatsReply

log = logging.getLogger("tmemd.control")

CONTROL_SOCKET_NAME = "control.sock"
# A request is a short JSON object; anything longer is garbage or abuse.
MAX_LINE_BYTES = 64 * 1024


class ControlError(Exception):
    """A control request failed; the message is the daemon's one-line reason."""


class DaemonNotRunning(ControlError):
    """Nothing listens on the control socket."""


class LineTooLong(ControlError):
    pass


def encode_message(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class JsonLineDecoder:
    """Bytes in, JSON objects out (sans-IO). Raises ControlError on bad lines."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages: list[dict[str, Any]] = []
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            # A whole line can arrive in one read: the limit holds for it too.
            if len(line) > MAX_LINE_BYTES:
                raise LineTooLong(f"line longer than {MAX_LINE_BYTES} bytes")
            if line.strip():
                messages.append(_parse_line(line))
        if len(self._buffer) > MAX_LINE_BYTES:
            raise LineTooLong(f"line longer than {MAX_LINE_BYTES} bytes")
        return messages


def _parse_line(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as exc:  # bad JSON or UTF-8, an integer too long to convert
        raise ControlError(f"not JSON: {exc}") from None
    except RecursionError:  # nesting deeper than the parser goes
        raise ControlError("JSON nested too deeply") from None
    if not isinstance(message, dict):
        raise ControlError("a message must be a JSON object")
    return message


ControlHandler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlServerProtocol(asyncio.Protocol):
    """Serves one control connection; requests run one at a time, in order.

    Bounded like the guests' connections: nothing is read while requests wait
    (at most one read's worth of them), and the next reply waits while the client
    leaves the previous ones unread. With a ``limiter``: at most
    CONTROL_CONNECTIONS at once, the first request due within the handshake
    timeout, closed after the idle timeout."""

    def __init__(self, handler: ControlHandler, limiter: ConnectionLimiter | None = None) -> None:
        self._handler = handler
        self._limiter = limiter
        self._admission: Admission | None = None
        self._bytes_in = 0
        self._requests = 0
        self._decoder = JsonLineDecoder()
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._transport: asyncio.Transport | None = None
        self._worker: asyncio.Task[None] | None = None
        self._bad_input = False
        # Clear while the client leaves its replies unread (asyncio's pause_writing).
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses).
        self._transport = transport = cast(asyncio.Transport, transport)
        if self._limiter is not None:
            self._admission = self._limiter.admit(self, transport, ConnectionKind.CONTROL)
            if self._admission is None:
                return  # refused (closed, logged and counted by the limiter)
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self._bytes_in += len(data)
        if self._bad_input:
            return  # answered once already; the connection is closing
        try:
            for request in self._decoder.feed(data):
                self._requests += 1
                self._queue.put_nowait(request)
            if not self._queue.empty() and self._transport is not None:
                self._transport.pause_reading()  # until the worker has served them
        except ControlError as exc:
            log.warning("control: bad input, closing", extra={"reason": str(exc)})
            self._bad_input = True
            self._reply({"ok": False, "error": str(exc)})
            self._queue.put_nowait(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.put_nowait(None)
        self._writable.set()
        if self._admission is not None:
            self._admission.release()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the limiter's view (tmem_host.limits.LimitedConnection) --

    @property
    def handshake_done(self) -> bool:
        return self._requests > 0

    @property
    def activity(self) -> int:
        return self._bytes_in

    def close_by_limit(self, reason: str) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def _serve(self) -> None:
        while (request := await self._queue.get()) is not None:
            try:
                reply = {"ok": True, "result": await self._handler(request)}
            except ControlError as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # a handler bug must not kill the daemon
                log.exception("control: command failed", extra={"request": request})
                reply = {"ok": False, "error": f"internal error: {exc!r}"}
            self._reply(reply)
            await self._writable.wait()
            if self._queue.empty() and self._transport is not None:
                self._transport.resume_reading()
        if self._transport is not None:
            self._transport.close()

    def _reply(self, reply: dict[str, Any]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode_message(reply))


class ControlClient:
    """Synchronous control client: one request, one reply."""

    def __init__(self, run_dir: Path, *, timeout: float = 10.0) -> None:
        self.path = Path(run_dir) / CONTROL_SOCKET_NAME
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise DaemonNotRunning(f"tmemd is not running (no listener on {self.path})") from None
        self._decoder = JsonLineDecoder()
        self._pending: list[dict[str, Any]] = []

    def request(self, cmd: str, **args: Any) -> Any:
        """Send one command; return its result or raise ControlError."""
        self._sock.sendall(encode_message({"cmd": cmd, **args}))
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise ControlError("tmemd closed the control connection")
            self._pending.extend(self._decoder.feed(data))
        reply = self._pending.pop(0)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "unknown error")))
        return reply.get("result")

    # The commands whose results are read by key, typed (docs/CONTROL.md).

    def stats(self) -> StatsReply:
        return cast(StatsReply, self.request("stats"))

    def guests(self) -> list[GuestRecord]:
        return cast(list[GuestRecord], self.request("guests"))

    def set_budget(self, size: int | str) -> BudgetReply:
        return cast(BudgetReply, self.request("set-budget", size=size))

    def drain(self, guest: str) -> DrainReply:
        """Start draining GUEST (tmemctl's drain() then waits for it)."""
        return cast(DrainReply, self.request("drain", guest=guest))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
