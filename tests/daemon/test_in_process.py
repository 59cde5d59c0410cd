"""tmemd's Daemon run in-process on the test's own event loop (no subprocess):
its control commands, its guests' runtimes and a graceful stop and start are
driven and inspected directly, with a real client on its real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tmem_host import limits

from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.config import DaemonConfig, GuestConfig
from tmem_host.daemon.control import ControlError
from tmem_host.daemon.runtime import abi_socket_path, nbd_socket_path
from tmem_host.daemon.server import Daemon
from tmem_host.limits import SOCKET_BUFFER_BYTES, check_socket_buffers
from tmem_host.nbd.client import NbdClient
from tmem_wire import nbd
from tmem_wire.abi import PoolFlag, Status

PAGE = 4096


def config(run_dir: Path) -> DaemonConfig:
    return DaemonConfig(run_dir=run_dir, budget_bytes=16 << 20,
                        guests=(GuestConfig("g1"), GuestConfig("g2")),
                        nbd_size_bytes=4 << 20, journal_reserve_bytes=1 << 20)


def in_process(run_dir: Path, scenario: Callable[[Daemon], Awaitable[None]]) -> None:
    """Run a Daemon on this test's event loop around ``scenario``, then stop it."""
    async def main() -> None:
        daemon = Daemon(config(run_dir))
        serving = asyncio.create_task(daemon.run(handle_signals=False))
        await asyncio.wait_for(daemon.ready.wait(), 10)
        try:
            await scenario(daemon)
        finally:
            daemon.stop()
            await asyncio.wait_for(serving, 10)

    asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Let the daemon's loop run until ``condition`` holds (False after ``timeout``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def put_pages(run_dir: Path, guest: str, count: int) -> int:
    """A real client (blocking: run it in a thread): a persistent pool and pages."""
    with AbiClient.open(abi_socket_path(run_dir, guest)) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        for index in range(count):
            assert client.put(pool_id, (1, 0, 0), index, bytes([index + 1]) * PAGE) == Status.OK
    return pool_id


def test_drain_freezes_the_guest_and_empties_its_export(tmp_path: Path) -> None:
    async def scenario(daemon: Daemon) -> None:
        runtime = daemon.guests["g1"]
        export = runtime.nbd_export
        for slot in range(40):  # through the export's own request path
            request = nbd.Request(nbd.Command.WRITE, 0, slot, slot * PAGE, PAGE,
                                  bytes([slot + 1]) * PAGE)
            assert export.serve(request) == (nbd.Error.OK, b"")
        reply = await daemon.commands.handle({"cmd": "drain", "guest": "g1"})
        assert reply["draining"] and runtime.draining and reply["persistent_pages"] == 40
        assert runtime.export_drain is not None
        assert await runtime.export_drain == 40
        assert export.stats()["slots_in_tmem"] == 0
        pool_id = export.stats()["pool_id"]
        assert pool_id is not None
        status = daemon.store.put(runtime.client, pool_id, (0, 0, 0), 9, bytes(PAGE))
        assert status == Status.FROZEN  # new pages go to the fallback file
        await daemon.commands.handle({"cmd": "thaw", "guest": "g1"})
        assert not runtime.draining

    in_process(tmp_path, scenario)


def test_forget_waits_for_the_guest_to_disconnect_and_a_restart_resumes_the_rest(
        tmp_path: Path) -> None:
    pools: dict[str, int] = {}

    async def first(daemon: Daemon) -> None:
        for guest in ("g1", "g2"):
            pools[guest] = await asyncio.to_thread(put_pages, tmp_path, guest, 8)
        runtime = daemon.guests["g1"]
        client = await asyncio.to_thread(AbiClient.open, abi_socket_path(tmp_path, "g1"))
        try:
            assert await until(lambda: runtime.connected > 0)  # the daemon saw the connection
            with pytest.raises(ControlError, match="live connection"):
                await daemon.commands.handle({"cmd": "forget", "guest": "g1"})
        finally:
            client.close()
        assert await until(lambda: runtime.connected == 0)
        reply = await daemon.commands.handle({"cmd": "forget", "guest": "g1"})
        assert reply == {"guest": "g1", "forgotten": True, "configured": True}
        assert daemon.store.pool_stats(daemon.guests["g1"].client) == []

    async def second(daemon: Daemon) -> None:
        g1, g2 = daemon.guests["g1"].client, daemon.guests["g2"].client
        assert daemon.store.pool_stats(g1) == []
        assert [pool.pages for pool in daemon.store.pool_stats(g2)] == [8]
        assert daemon.store.get(g2, pools["g2"], (1, 0, 0), 3) == (Status.OK, bytes([4]) * PAGE)

    in_process(tmp_path, first)
    in_process(tmp_path, second)  # a graceful stop and a start on the same dirs


def test_every_connection_gets_socket_buffers_that_hold_a_batch(tmp_path: Path) -> None:
    """A 64-page batch (256 KiB) does not fit a unix socket's default buffer (208
    KiB): tmemd's ABI and NBD connections, and its host clients, ask for
    SOCKET_BUFFER_BYTES each way (the kernel doubles what it grants, up to
    net.core.wmem_max / rmem_max)."""
    def granted(sysctl: str) -> int:
        return 2 * min(SOCKET_BUFFER_BYTES, int(Path(f"/proc/sys/net/core/{sysctl}").read_text()))

    default_bytes = int(Path("/proc/sys/net/core/wmem_default").read_text())
    expected = (granted("wmem_max"), granted("rmem_max"))
    assert expected[0] > default_bytes  # else this host cannot tell them apart

    def buffers(sock: Any) -> tuple[int, int]:
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    async def scenario(daemon: Daemon) -> None:
        abi = await asyncio.to_thread(AbiClient.open, abi_socket_path(daemon.run_dir, "g1"))
        block = NbdClient(nbd_socket_path(daemon.run_dir, "g1"), "g1")
        await asyncio.to_thread(block.__enter__)
        try:
            guest = daemon.guests["g1"]
            assert await until(lambda: len(guest.sessions) == 1 and guest.nbd_export.connected == 1)
            (session,) = guest.sessions
            (connection,) = guest.nbd_export._connections
            assert session._transport is not None and connection.transport is not None
            assert buffers(session._transport.get_extra_info("socket")) == expected
            assert buffers(connection.transport.get_extra_info("socket")) == expected
            assert buffers(abi.sock) == expected
            assert buffers(block._sock) == expected
        finally:
            await asyncio.to_thread(abi.close)
            await asyncio.to_thread(block.__exit__, None, None, None)

    in_process(tmp_path, scenario)


def test_a_host_that_caps_socket_buffers_is_named_at_start(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    wmem_max = int(Path("/proc/sys/net/core/wmem_max").read_text())
    assert check_socket_buffers() == 2 * min(SOCKET_BUFFER_BYTES, wmem_max)
    monkeypatch.setattr(limits, "SOCKET_BUFFER_BYTES", 4 * wmem_max)  # more than any host grants
    with caplog.at_level(logging.WARNING, logger="tmemd.limits"):
        assert check_socket_buffers() == 2 * wmem_max
    assert "socket buffers are capped below what batches need" in caplog.text
