"""The agent's virtio-serial channel finds its port by name on every connect:
after a hot-unplug and re-add the port may have another /dev node (the VM side
of this is tests/agent/test_fault_injection.py)."""

from __future__ import annotations

import os
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
