"""The agent's virtio-serial channel finds its port by name on every connect:
after a hot-unplug and re-add the port may have another /dev node (the VM side
of this is tests/agent/test_fault_injection.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tmem_guest.channel import PORT_NAME, ChannelDown, VirtioPortChannel


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
