"""Byte channels to tmemd: the virtio-serial port in a guest, a unix socket on a host.

Both behave the same towards the session layer: `connect()` tries once to bring
the channel up, `send()` writes a whole buffer, `recv_into()` returns 0 when the
peer is gone. The unix-socket form connects to tmemd's `NAME.tmem.sock` exactly
as QEMU's chardev does, so the session layer runs against a real tmemd on the
host in tests.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path
from typing import Protocol

PORT_NAME = "org.tmem.0"
VIRTIO_PORTS = Path("/sys/class/virtio-ports")
# virtio_console copies each write() into a kernel bounce buffer of at most 32 KiB:
# bigger writes are cut there anyway, and smaller contiguous allocations are the
# ones that still succeed under memory pressure.
MAX_PORT_WRITE = 32 * 1024
# The size of the buffers virtio_console queues for host-to-guest data; a read()
# returns at most one of them.
PORT_BUFFER_BYTES = 4096


class ChannelDown(ConnectionError):
    """The host side is not connected; the operation did not reach tmemd."""


class Channel(Protocol):
    def connect(self) -> bool:
        """Try once to bring the channel up; True when it is up."""
        ...

    def send(self, data: memoryview) -> None:
        """Write all of `data`; raise ChannelDown if the host side is gone."""
        ...

    def wait_readable(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for bytes (or a disconnect) to read."""
        ...

    def recv_into(self, buffer: memoryview) -> int:
        """Block until bytes arrive and read them into `buffer`; 0 means the host side is gone."""
        ...

    def disconnect(self) -> None:
        """Forget the current connection (the next connect() starts over)."""
        ...


def find_port(name: str = PORT_NAME, sysfs: Path = VIRTIO_PORTS) -> Path:
    """The /dev node of the virtio-serial port called `name` (no udev in the guest)."""
    for entry in sorted(sysfs.glob("*")):
        name_file = entry / "name"
        if name_file.is_file() and name_file.read_text().strip() == name:
            return Path("/dev") / entry.name
    raise FileNotFoundError(f"no virtio-serial port named {name!r} under {sysfs}")


class VirtioPortChannel:
    """A virtio-serial port, opened non-blocking and waited on with poll().

    Non-blocking because a blocking write() waits for as long as the host is
    disconnected; here a send notices the disconnect (POLLHUP) and raises
    ChannelDown, so frontends fall back instead of stalling. The device stays
    open across host disconnects.
    """

    def __init__(self, path: Path, *, send_timeout: float = 30.0) -> None:
        self.path = path
        self.send_timeout = send_timeout
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._writable = select.poll()
        self._writable.register(self._fd, select.POLLOUT)
        self._readable = select.poll()
        self._readable.register(self._fd, select.POLLIN)
        self._iovec_source: memoryview | None = None
        self._iovec_list: list[memoryview] = []

    def connect(self) -> bool:
        # POLLHUP is reported for as long as no host process holds the chardev.
        for _, events in self._writable.poll(0):
            return not events & select.POLLHUP
        return True

    def send(self, data: memoryview) -> None:
        deadline = time.monotonic() + self.send_timeout
        for start in range(0, len(data), MAX_PORT_WRITE):
            chunk = data[start : start + MAX_PORT_WRITE]
            while chunk:
                try:
                    chunk = chunk[os.write(self._fd, chunk) :]
                    continue
                except BlockingIOError:
                    pass
                except OSError as error:
                    raise ChannelDown(f"write to {self.path}: {error}") from error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChannelDown(f"{self.path}: host not reading for {self.send_timeout} s")
                for _, events in self._writable.poll(min(remaining, 1.0) * 1000):
                    if events & (select.POLLHUP | select.POLLERR):
                        raise ChannelDown(f"{self.path}: host disconnected")

    def wait_readable(self, timeout: float) -> bool:
        return bool(self._readable.poll(timeout * 1000))

    def recv_into(self, buffer: memoryview) -> int:
        # readv into the caller's buffer: os.read(fd, n) would allocate n bytes per call.
        # A port read() returns at most one 4 KiB port buffer, but readv() goes on to
        # the next iovec while each comes back full: one iovec per port buffer drains
        # a whole batch reply in one syscall instead of one read (and poll) per 4 KiB.
        # Poll only when nothing is there.
        iovecs = self._iovecs(buffer)
        while True:
            try:
                return os.readv(self._fd, iovecs)  # 0 while the host is disconnected
            except BlockingIOError:
                self._readable.poll()
            except OSError:
                return 0

    def _iovecs(self, buffer: memoryview) -> list[memoryview]:
        """`buffer` cut at PORT_BUFFER_BYTES, cached: the session passes the same buffer every time."""
        if self._iovec_source is not buffer:
            self._iovec_source = buffer
            self._iovec_list = [buffer[start : start + PORT_BUFFER_BYTES] for start in range(0, len(buffer), PORT_BUFFER_BYTES)]
        return self._iovec_list

    def disconnect(self) -> None:
        """Nothing to close: the port stays open and reports the next host connection."""


class UnixSocketChannel:
    """A client connection to tmemd's per-guest ABI socket (what QEMU's chardev does)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def connect(self) -> bool:
        with self._lock:
            if self._socket is not None:
                return True
            candidate = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                candidate.connect(os.fspath(self.path))
            except OSError:
                candidate.close()
                return False
            self._socket = candidate
            return True

    def send(self, data: memoryview) -> None:
        connection = self._socket
        if connection is None:
            raise ChannelDown(f"{self.path}: not connected")
        try:
            connection.sendall(data)
        except OSError as error:
            raise ChannelDown(f"send to {self.path}: {error}") from error

    def wait_readable(self, timeout: float) -> bool:
        connection = self._socket
        if connection is None:
            return True  # recv_into reports the disconnect at once
        return bool(select.select([connection], [], [], timeout)[0])

    def recv_into(self, buffer: memoryview) -> int:
        connection = self._socket
        if connection is None:
            return 0
        try:
            return connection.recv_into(buffer)
        except OSError:
            return 0

    def disconnect(self) -> None:
        with self._lock:
            if self._socket is not None:
                try:
                    self._socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._socket.close()
                self._socket = None


def open_channel(spec: str) -> Channel:
    """`port` (find org.tmem.0), `port:NAME`, a /dev path, or `unix:PATH`."""
    if spec.startswith("unix:"):
        return UnixSocketChannel(Path(spec[len("unix:") :]))
    if spec == "port":
        return VirtioPortChannel(find_port())
    if spec.startswith("port:"):
        return VirtioPortChannel(find_port(spec[len("port:") :]))
    return VirtioPortChannel(Path(spec))


__all__ = ["Channel", "ChannelDown", "UnixSocketChannel", "VirtioPortChannel", "find_port", "open_channel"]
