"""The agent's virtio-serial channel finds its port by name on every connect:
after a hot-unplug and re-add the port may have another /dev node (the VM side
of this is tests/agent/test_fault_injection.py)."""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from pathlib import Path

import pytest

from tmem_guest.channel import ChannelDown, VirtioPortChannel
from tmem_wire.agent import PORT_NAME


def add_port(root: Path, node: str, name: str) -> int:
    """A fake port: its sysfs name file and a FIFO as its /dev node; returns a reader fd."""
    (root / "sys" / node).mkdir(parents=True)
    (root / "sys" / node / "name").write_text(name + "\n")
    os.mkfifo(root / "dev" / node)
    return os.open(root / "dev" / node, os.O_RDONLY | os.O_NONBLOCK)


def remove_port(root: Path, node: str) -> None:
    (root / "sys" / node / "name").unlink()
    (root / "sys" / node).rmdir()
    (root / "dev" / node).unlink()


def test_the_port_is_looked_up_by_name_on_every_connect(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    other = add_port(tmp_path, "vport1p1", "org.other.0")
    first = add_port(tmp_path, "vport1p2", PORT_NAME)
    channel = VirtioPortChannel(sysfs=tmp_path / "sys", dev=tmp_path / "dev")
    try:
        assert channel.connect()
        assert channel.path == tmp_path / "dev" / "vport1p2"
        channel.send(memoryview(b"before"))
        assert os.read(first, 100) == b"before"
        # Unplugged: no port by that name, so no connection (and no send).
        channel.disconnect()
        remove_port(tmp_path, "vport1p2")
        assert not channel.connect()
        with pytest.raises(ChannelDown):
            channel.send(memoryview(b"lost"))
        # Re-added under another node: found again, and sends go there.
        second = add_port(tmp_path, "vport2p1", PORT_NAME)
        assert channel.connect()
        assert channel.path == tmp_path / "dev" / "vport2p1"
        channel.send(memoryview(b"after"))
        assert os.read(second, 100) == b"after"
        os.close(second)
    finally:
        channel.disconnect()
        os.close(first)
        os.close(other)


def read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def test_a_send_given_up_mid_frame_is_completed_before_the_next_one(tmp_path: Path) -> None:
    """The host stopped reading (tmemd SIGSTOPped): a frame cut by the send timeout
    must not leave the stream torn, or tmemd reads the next HELLO as page payload.
    The session reconnects by closing and reopening the same port (one stream)."""
    (tmp_path / "dev").mkdir()
    reader = add_port(tmp_path, "vport1p1", PORT_NAME)
    channel = VirtioPortChannel(sysfs=tmp_path / "sys", dev=tmp_path / "dev", send_timeout=0.2)
    frame = bytes(range(256)) * 1024  # 256 KiB: more than the FIFO holds (64 KiB)
    hello = b"HELLO" * 20
    try:
        assert channel.connect()
        with pytest.raises(ChannelDown):
            channel.send(memoryview(frame))
        channel.disconnect()
        assert channel.connect()  # the same port: the same stream
        received = read_all(reader)
        assert 0 < len(received) < len(frame)
        # The host still does not read: the tail does not fit either.
        with pytest.raises(ChannelDown):
            channel.send(memoryview(hello))
        received += read_all(reader)
        # Now it reads as fast as the channel writes.
        for _ in range(100):
            try:
                channel.send(memoryview(hello))
                break
            except ChannelDown:
                received += read_all(reader)
        else:
            pytest.fail("the channel never got the tail and the next frame out")
        received += read_all(reader)
        assert received == frame + hello
    finally:
        channel.disconnect()
        os.close(reader)


def test_a_torn_frame_is_dropped_when_the_port_is_replaced(tmp_path: Path) -> None:
    """Another port is another stream (tmemd resyncs a new connection on HELLO):
    the old frame's rest must not go there."""
    (tmp_path / "dev").mkdir()
    first = add_port(tmp_path, "vport1p1", PORT_NAME)
    channel = VirtioPortChannel(sysfs=tmp_path / "sys", dev=tmp_path / "dev", send_timeout=0.2)
    try:
        assert channel.connect()
        with pytest.raises(ChannelDown):
            channel.send(memoryview(bytes(256 * 1024)))
        channel.disconnect()
        remove_port(tmp_path, "vport1p1")
        second = add_port(tmp_path, "vport2p1", PORT_NAME)
        assert channel.connect()
        channel.send(memoryview(b"HELLO"))
        assert read_all(second) == b"HELLO"
        os.close(second)
    finally:
        channel.disconnect()
        os.close(first)


# -- a host that writes before it reads ----------------------------------------------
#
# tmemd stops reading a guest whose replies it cannot send, and those replies only
# move when the agent reads: an agent that only writes waits for ever (the SIGSTOP
# flake of tests/agent/test_guest_reliability.py). A pty in raw mode stands in for
# the port: bounded buffers both ways, a full-duplex stream.

HOST_BYTES = 1 << 20  # far beyond what a pty buffers either way


class WritesFirstHost:
    """The far end of a pty: writes HOST_BYTES, then reads ``expected`` bytes."""

    def __init__(self, master: int, expected: int) -> None:
        self.master = master
        self.expected = expected
        self.received = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        view = memoryview(bytes(range(256)) * (HOST_BYTES // 256))
        while view:
            view = view[os.write(self.master, view[:65536]):]
        while len(self.received) < self.expected:
            chunk = os.read(self.master, 65536)
            if not chunk:
                return
            self.received += chunk


def raw_pty_channel(send_timeout: float) -> tuple[int, int, VirtioPortChannel]:
    master, slave = os.openpty()
    tty.setraw(slave)
    channel = VirtioPortChannel(path=Path(os.ttyname(slave)), send_timeout=send_timeout)
    assert channel.connect()
    return master, slave, channel


def test_a_send_reads_what_arrives_meanwhile() -> None:
    request = os.urandom(HOST_BYTES)
    master, slave, channel = raw_pty_channel(send_timeout=20.0)
    drained = bytearray()
    buffer = memoryview(bytearray(1 << 16))

    def drain() -> None:
        drained.extend(buffer[:channel.recv_into(buffer)])

    try:
        host = WritesFirstHost(master, len(request))
        channel.send(memoryview(request), drain)
        host.thread.join(20)
        assert bytes(host.received) == request
        while len(drained) < HOST_BYTES and channel.wait_readable(1.0):
            drain()
        assert bytes(drained) == bytes(range(256)) * (HOST_BYTES // 256)
    finally:
        channel.disconnect()
        os.close(slave)
        os.close(master)


def test_without_reading_the_same_send_gives_up() -> None:
    """The failure the drain prevents: both ends wait for each other."""
    master, slave, channel = raw_pty_channel(send_timeout=1.0)
    try:
        host = WritesFirstHost(master, 0)
        with pytest.raises(ChannelDown):
            channel.send(memoryview(os.urandom(HOST_BYTES)))
        assert host.thread.is_alive()  # still writing: nobody reads
        # Let the host finish (its descriptor is not closed under its write).
        while host.thread.is_alive():
            if select.select([slave], [], [], 0.1)[0]:
                os.read(slave, 1 << 16)
        host.thread.join()
    finally:
        channel.disconnect()
        os.close(slave)
        os.close(master)


def test_a_disconnect_reads_while_another_threads_send_is_held_up() -> None:
    """The reader gives a session up while a caller's send is blocked: it must read
    while it waits for that send, or neither ever ends."""
    request = os.urandom(HOST_BYTES)
    master, slave, channel = raw_pty_channel(send_timeout=20.0)
    buffer = memoryview(bytearray(1 << 16))
    outcome: list[BaseException | None] = []

    def caller() -> None:
        try:
            channel.send(memoryview(request))
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            outcome.append(error)

    try:
        host = WritesFirstHost(master, len(request))
        sender = threading.Thread(target=caller)
        sender.start()
        time.sleep(0.2)  # the caller holds the channel now, blocked
        def drain() -> None:
            channel.recv_into(buffer)

        channel.disconnect(drain)
        sender.join(20)
        host.thread.join(20)
        assert outcome == [None]
        assert bytes(host.received) == request
    finally:
        channel.disconnect()
        os.close(slave)
        os.close(master)
