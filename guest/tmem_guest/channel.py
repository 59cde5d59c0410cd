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
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tmem_wire.agent import PORT_NAME

VIRTIO_PORTS = Path("/sys/class/virtio-ports")
DEV = Path("/dev")
# The size of the buffers virtio_console queues for host-to-guest data (a read()
# returns at most one of them) and of the pieces the agent writes: virtio_console
# copies each write() into a kmalloc'd bounce buffer (up to 32 KiB, an order-3
# allocation the kernel retries without end under memory pressure, and the agent
# sits on the reclaim path); 4 KiB pieces are order-0. The pieces go as the
# iovecs of one writev(): the port has no write_iter, so the kernel writes them one
# by one, in one syscall.
PORT_BUFFER_BYTES = 4096


# Linux's IOV_MAX: a longer writev() fails with EINVAL.
MAX_IOVECS = 1024


def pieces(data: memoryview, start: int, size: int) -> list[memoryview]:
    """data[start:] cut into views of at most `size` bytes, at most MAX_IOVECS of them
    (the iovecs of a readv/writev)."""
    end = min(len(data), start + MAX_IOVECS * size)
    return [data[offset : offset + size] for offset in range(start, end, size)]


class ChannelDown(ConnectionError):
    """The host side is not connected; the operation did not reach tmemd."""


#: Called by the reader thread while it cannot go on (its own send blocked, or a
#: disconnect waiting for another thread's send): read what has arrived. The
#: stream has bounded buffers both ways, and tmemd stops reading a guest that does
#: not read its replies; a reader that only waits would wait for ever.
Drain = Callable[[], None]


class Channel(Protocol):
    def connect(self) -> bool:
        """Try once to bring the channel up; True when it is up."""
        ...

    def send(self, data: memoryview, drain: Drain | None = None) -> None:
        """Write all of `data`; raise ChannelDown if the host side is gone. `drain`
        (the reader thread's sends only) is called whenever bytes arrive meanwhile."""
        ...

    def wait_readable(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for bytes (or a disconnect) to read."""
        ...

    def recv_into(self, buffer: memoryview) -> int:
        """Block until bytes arrive and read them into `buffer`; 0 means the host side is gone."""
        ...

    def disconnect(self, drain: Drain | None = None) -> None:
        """Forget the current connection (the next connect() starts over); `drain`
        (the reader thread) is called whenever bytes arrive while a send holds it up."""
        ...


def find_port(name: str = PORT_NAME, sysfs: Path = VIRTIO_PORTS, dev: Path = DEV) -> Path:
    """The /dev node of the virtio-serial port called `name` (no udev in the guest)."""
    for entry in sorted(sysfs.glob("*")):
        name_file = entry / "name"
        if name_file.is_file() and name_file.read_text().strip() == name:
            return dev / entry.name
    raise FileNotFoundError(f"no virtio-serial port named {name!r} under {sysfs}")


class VirtioPortChannel:
    """A virtio-serial port, opened non-blocking and waited on with poll().

    Non-blocking because a blocking write() waits for as long as the host is
    disconnected; here a send notices the disconnect (POLLHUP) and raises
    ChannelDown, so frontends fall back instead of stalling.

    The port is looked up by name and opened on every connect(), and closed by
    disconnect(): when the host removes the port and adds it again (QMP
    device_del / device_add), the new port may get another /dev/vportNpM, and
    a descriptor of the removed port only ever reports a hang-up. A channel
    made with a fixed `path` reopens that path instead.

    A port is one byte stream for as long as the host keeps its chardev: closing
    and reopening it in the guest (a session taken down by a timeout) does not
    start a new stream on tmemd's side. A send given up half-way through a frame
    (tmemd stopped, its socket full) would leave tmemd waiting for the rest of
    that frame's payload and reading the next HELLOs as page data, forever. So the
    unsent rest of a torn frame is kept and written before anything else; it is
    dropped only when the stream really ends (POLLHUP: the host side went away, a
    new connection resyncs on HELLO) or the port is replaced.
    """

    def __init__(self, name: str = PORT_NAME, *, path: Path | None = None,
                 send_timeout: float = 30.0, sysfs: Path = VIRTIO_PORTS,
                 dev: Path = DEV) -> None:
        self.name = name
        self.path = path
        self.send_timeout = send_timeout
        self._fixed_path = path
        self._sysfs = sysfs
        self._dev = dev
        self._fd: int | None = None
        # send() (callers' threads) against connect()/disconnect() (the reader's):
        # a descriptor is never closed, or its number reused, under a write.
        self._io_lock = threading.Lock()
        self._writable = select.poll()
        self._readable = select.poll()
        self._duplex = select.poll()  # the reader's sends: writable, or bytes to drain
        self._iovec_source: memoryview | None = None
        self._iovec_list: list[memoryview] = []
        # The unsent rest of a frame a send gave up on (see the class docstring).
        # Only a failure path fills it, so its allocation is off the I/O path.
        self._torn_tail = bytearray()

    def connect(self) -> bool:
        with self._io_lock:
            try:
                path = self._fixed_path or find_port(self.name, self._sysfs, self._dev)
                fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:  # no such port (yet): removed, or not re-added so far
                return False
            if path != self.path:
                self._torn_tail.clear()  # another port: another stream
            self.path = path
            self._close()
            self._fd = fd
            self._writable = select.poll()
            self._writable.register(fd, select.POLLOUT)
            self._readable = select.poll()
            self._readable.register(fd, select.POLLIN)
            self._duplex = select.poll()
            self._duplex.register(fd, select.POLLOUT | select.POLLIN)
            # POLLHUP is reported for as long as no host process holds the chardev.
            for _, events in self._writable.poll(0):
                if events & select.POLLHUP:
                    self._torn_tail.clear()  # the host's stream ended with it
                    self._close()  # the next try looks the port up again
                    return False
            return True

    def send(self, data: memoryview, drain: Drain | None = None) -> None:
        with self._io_lock:
            fd = self._fd
            if fd is None:
                raise ChannelDown(f"port {self.name!r}: not connected")
            deadline = time.monotonic() + self.send_timeout
            if self._torn_tail:
                tail = memoryview(self._torn_tail)
                try:
                    sent = self._send(fd, tail, deadline, drain)
                finally:
                    tail.release()
                del self._torn_tail[:sent]
                if self._torn_tail:
                    raise ChannelDown(f"{self.path}: host not reading for {self.send_timeout} s")
            sent = self._send(fd, data, deadline, drain)
            if sent < len(data):
                if sent:
                    self._torn_tail[:] = data[sent:]
                raise ChannelDown(f"{self.path}: host not reading for {self.send_timeout} s")

    def _send(self, fd: int, data: memoryview, deadline: float, drain: Drain | None) -> int:
        """Write `data` until done or `deadline`; return how much went out."""
        waiting = self._writable if drain is None else self._duplex
        sent = 0
        while sent < len(data):
            try:
                sent += os.writev(fd, pieces(data, sent, PORT_BUFFER_BYTES))
                continue
            except BlockingIOError:
                pass
            except OSError as error:
                self._torn_tail.clear()  # the port is gone, and its stream with it
                raise ChannelDown(f"write to {self.path}: {error}") from error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return sent
            for _, events in waiting.poll(min(remaining, 1.0) * 1000):
                if events & (select.POLLHUP | select.POLLERR):
                    self._torn_tail.clear()
                    raise ChannelDown(f"{self.path}: host disconnected")
                if events & select.POLLIN and drain is not None:
                    drain()  # (a hang-up was raised above)
        return sent

    def wait_readable(self, timeout: float) -> bool:
        return bool(self._readable.poll(timeout * 1000))

    def recv_into(self, buffer: memoryview) -> int:
        # readv into the caller's buffer: os.read(fd, n) would allocate n bytes per call.
        # A port read() returns at most one 4 KiB port buffer, but readv() goes on to
        # the next iovec while each comes back full: one iovec per port buffer drains
        # a whole batch reply in one syscall instead of one read (and poll) per 4 KiB.
        # Poll only when nothing is there.
        fd = self._fd  # only the reader thread, which also (dis)connects, calls this
        if fd is None:
            return 0
        iovecs = self._iovecs(buffer)
        while True:
            try:
                return os.readv(fd, iovecs)  # 0 while the host is disconnected
            except BlockingIOError:
                self._readable.poll()
            except OSError:
                return 0

    def _iovecs(self, buffer: memoryview) -> list[memoryview]:
        """`buffer` cut at PORT_BUFFER_BYTES, cached: the session passes the same buffer every time."""
        if self._iovec_source is not buffer:
            self._iovec_source = buffer
            self._iovec_list = pieces(buffer, 0, PORT_BUFFER_BYTES)
        return self._iovec_list

    def disconnect(self, drain: Drain | None = None) -> None:
        # A caller's send may hold the lock for up to send_timeout, blocked because
        # the host waits for the reader to read: the reader reads while it waits.
        # (Reading needs no lock: only the reader's connect/disconnect close the fd.)
        while not self._io_lock.acquire(timeout=0.05):
            while drain is not None and self._fd is not None and self._bytes_arrived():
                drain()
        try:
            self._close()
        finally:
            self._io_lock.release()

    def _bytes_arrived(self) -> bool:
        """Bytes to read now (not a hang-up, which reads as 0 for ever)."""
        return any(events & select.POLLIN and not events & select.POLLHUP
                   for _, events in self._readable.poll(0))

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class UnixSocketChannel:
    """A client connection to tmemd's per-guest ABI socket (what QEMU's chardev does)."""

    def __init__(self, path: Path, *, send_timeout: float = 30.0) -> None:
        self.path = path
        self.send_timeout = send_timeout
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
            # Bounds sendall() against a host that stopped reading; recv_into is only
            # called once wait_readable said there is something.
            candidate.settimeout(self.send_timeout)
            self._socket = candidate
            return True

    def send(self, data: memoryview, drain: Drain | None = None) -> None:
        connection = self._socket
        if connection is None:
            raise ChannelDown(f"{self.path}: not connected")
        try:
            if drain is None:
                connection.sendall(data)
                return
            deadline = time.monotonic() + self.send_timeout
            while data:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ChannelDown(f"{self.path}: host not reading for {self.send_timeout} s")
                readable, writable, _ = select.select([connection], [connection], [], remaining)
                if readable:
                    drain()
                if writable:
                    data = data[connection.send(data[:1 << 16]):]
        except OSError as error:
            raise ChannelDown(f"send to {self.path}: {error}") from error

    def wait_readable(self, timeout: float) -> bool:
        connection = self._socket
        if connection is None:
            return True  # recv_into reports the disconnect at once
        try:
            return bool(select.select([connection], [], [], timeout)[0])
        except (OSError, ValueError):  # closed under us (stop, disconnect): recv_into says 0
            return True

    def recv_into(self, buffer: memoryview) -> int:
        connection = self._socket
        if connection is None:
            return 0
        try:
            return connection.recv_into(buffer)
        except OSError:
            return 0

    def disconnect(self, drain: Drain | None = None) -> None:
        # sendall() holds no lock here: nothing to wait for, and nothing to drain.
        with self._lock:
            if self._socket is not None:
                try:
                    self._socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._socket.close()
                self._socket = None


def open_channel(spec: str, *, send_timeout: float = 30.0) -> Channel:
    """`port` (find org.tmem.0), `port:NAME`, a /dev path, or `unix:PATH`; a send
    gives up (ChannelDown) after `send_timeout` seconds of a host not reading."""
    if spec.startswith("unix:"):
        return UnixSocketChannel(Path(spec[len("unix:") :]), send_timeout=send_timeout)
    if spec == "port":
        return VirtioPortChannel(send_timeout=send_timeout)
    if spec.startswith("port:"):
        return VirtioPortChannel(spec[len("port:") :], send_timeout=send_timeout)
    return VirtioPortChannel(path=Path(spec), send_timeout=send_timeout)


__all__ = ["Channel", "ChannelDown", "UnixSocketChannel", "VirtioPortChannel", "find_port", "open_channel"]
