"""tmemd's Daemon run in-process on the test's own event loop (no subprocess):
its control commands, its guests' runtimes and a graceful stop and start are
driven and inspected directly, with a real client on its real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.config import DaemonConfig, GuestConfig
from tmem_host.daemon.control import ControlError
from tmem_host.daemon.runtime import abi_socket_path
from tmem_host.daemon.server import Daemon
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
