"""The NBD export over a remote tier on a real Redis Cluster, served in-process
(the export and its connections on this test's event loop, a real NBD client in
a thread): a READ that waits for the tier still gets every page it asks for."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from tmem_host.journal.journaled import JournaledStore
from tmem_host.nbd.client import ClientRequest, NbdClient
from tmem_host.nbd.export import NbdConnection, NbdExport
from tmem_host.remote.cluster import LocalCluster
from tmem_host.remote.tier import RemoteTier
from tmem_host.store import Client
from tmem_host.store.tier import RemotePage
from tmem_wire import nbd
from tmem_wire.frontswap import PAGE_SIZE, frontswap_keys

from .test_tier_store import demote_all, master_port, remote_page, settle, tiered

GROUP = 64  # slots that share a hash tag (docs/REMOTE.md)
BUDGET = 8 << 20


@contextlib.asynccontextmanager
async def exported(tmp_path: Path, cluster: LocalCluster,
                   **settings: Any) -> AsyncIterator[tuple[JournaledStore, RemoteTier, Client, NbdClient]]:
    """Guest g1's swap export on a store with a remote tier (``settings``: of
    RemoteSettings), served on this loop, and a real NBD client connected to it
    (its calls run in a thread); all closed at the end."""
    async with tiered(tmp_path, cluster, BUDGET, **settings) as (store, tier):
        client = store.add_client("g1")
        await tier.register(client, uuid.uuid4(), None)
        export = NbdExport(store, client, name="g1", size_bytes=16 << 20,
                           fallback_path=tmp_path / "g1.fallback")
        socket_path = tmp_path / "g1.nbd.sock"
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: NbdConnection(export), str(socket_path))
        nbd_client = NbdClient(socket_path, "g1")
        await asyncio.to_thread(nbd_client.connect)
        try:
            yield store, tier, client, nbd_client
        finally:
            await asyncio.to_thread(nbd_client.close)
            server.close()
            export.close()


def test_a_page_demoted_while_its_read_waits_for_the_tier_is_read_back(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """A READ of two slots: one in memory, one the tier must read from a master that
    is slow (paused). Meanwhile memory runs short and the demoter moves the first
    to the cluster. The READ reads it again, rather than fail with EIO for a page
    the cluster has."""
    async def main() -> None:
        async with exported(tmp_path, redis_cluster, read_around=False) as (store, tier, client, nbd_client):
            slots = 8 * GROUP
            data = os.urandom(slots * PAGE_SIZE)
            keys = frontswap_keys(0, range(slots))

            async def write(first: int, count: int) -> None:
                error = await asyncio.to_thread(nbd_client.write, first * PAGE_SIZE,
                                                data[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
                assert error == nbd.Error.OK
                await settle(store)

            await write(0, slots)
            pool_id = next(number for number, pool in enumerate(client.pools) if pool is not None)

            def remote(slot: int) -> RemotePage | None:
                return remote_page(client, pool_id, keys[slot])

            def port(slot: int) -> int:
                return master_port(redis_cluster, tier, client, pool_id, keys[slot])

            await demote_all(store, tier, client, slots, BUDGET)
            tier.forget_copies()
            # Two neighbouring hash tags on different masters: the READ spans both.
            boundary = next(first for first in range(GROUP, slots, GROUP)
                            if port(first - 1) != port(first))
            await write(boundary - GROUP, GROUP)  # back in memory
            assert remote(boundary - 1) is None
            with redis_cluster.node_by_port(port(boundary)).client() as admin:
                admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")
            read = asyncio.ensure_future(asyncio.to_thread(
                nbd_client.read, (boundary - 1) * PAGE_SIZE, 2 * PAGE_SIZE))
            await asyncio.sleep(0.1)
            assert not read.done()  # waiting for the paused master
            await demote_all(store, tier, client, slots, BUDGET)
            demoted = remote(boundary - 1)
            assert demoted is not None and demoted.fetched is None and demoted.pending is None
            error, payload = await read
            assert error == nbd.Error.OK
            assert payload == data[(boundary - 1) * PAGE_SIZE:(boundary + 1) * PAGE_SIZE]

    asyncio.run(main())


def test_requests_behind_a_write_that_waits_for_the_cluster_are_served_and_replied_in_order(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """A WRITE whose page goes to a master that is slow (its writes paused) is
    acknowledged only once that master has it; the WRITE and READ sent behind it
    are served meanwhile (the second WRITE's page is on its way too), and every
    reply leaves in order, the READ's with the first WRITE's data."""
    async def main() -> None:
        # No memory share: every page goes to the cluster as it is written.
        async with exported(tmp_path, redis_cluster, read_around=False, local_fraction=0.0, demote_above=10.0) as (store, tier, client, nbd_client):
            first, second = os.urandom(PAGE_SIZE), os.urandom(PAGE_SIZE)
            keys = frontswap_keys(0, range(2 * GROUP))
            assert await asyncio.to_thread(nbd_client.write, 0, os.urandom(PAGE_SIZE)) == nbd.Error.OK
            pool_id = next(number for number, pool in enumerate(client.pools) if pool is not None)
            port = master_port(redis_cluster, tier, client, pool_id, keys[0])
            with redis_cluster.node_by_port(port).client() as admin:
                admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
            requests = [ClientRequest(nbd.Command.WRITE, 0, PAGE_SIZE, first),
                        ClientRequest(nbd.Command.WRITE, GROUP * PAGE_SIZE, PAGE_SIZE, second),
                        ClientRequest(nbd.Command.READ, 0, PAGE_SIZE)]

            def paced() -> Iterator[ClientRequest]:
                yield requests[0]
                time.sleep(0.1)  # the first WRITE is read alone, and waits for the master
                yield from requests[1:]

            replies = asyncio.ensure_future(asyncio.to_thread(lambda: list(nbd_client.run(paced(), 3))))
            deadline = asyncio.get_running_loop().time() + 1.0
            pool = client.pools[pool_id]
            assert pool is not None
            second_key = keys[GROUP]
            while second_key[1] not in pool.objects.get(second_key[0], {}):  # the second WRITE served
                assert asyncio.get_running_loop().time() < deadline, "nothing served behind the WRITE"
                await asyncio.sleep(0.005)
            assert not replies.done()  # yet nothing answered before the first WRITE
            done = await replies
            assert [reply.handle for reply in done] == [2, 3, 4]  # in order
            assert [reply.error for reply in done] == [nbd.Error.OK] * 3
            assert done[2].data == first
            page = remote_page(client, pool_id, keys[0])
            assert page is not None and page.pending is None  # written when acknowledged

    asyncio.run(main())


def test_a_client_that_disconnects_while_its_writes_wait_gets_their_replies_first(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    """WRITEs to a slow master, then the client sends NBD_CMD_DISC and shuts its
    side: every WRITE is still acknowledged (once the master has its page), and
    only then does tmemd close."""
    async def main() -> None:
        async with exported(tmp_path, redis_cluster, read_around=False, local_fraction=0.0, demote_above=10.0) as (store, tier, client, nbd_client):
            assert await asyncio.to_thread(nbd_client.write, 0, os.urandom(PAGE_SIZE)) == nbd.Error.OK
            pool_id = next(number for number, pool in enumerate(client.pools) if pool is not None)
            keys = frontswap_keys(0, range(GROUP))
            port = master_port(redis_cluster, tier, client, pool_id, keys[0])
            with redis_cluster.node_by_port(port).client() as admin:
                admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
            pages = [os.urandom(PAGE_SIZE) for _ in range(2)]

            def then_leave() -> Iterator[ClientRequest]:
                for number, page in enumerate(pages):
                    yield ClientRequest(nbd.Command.WRITE, number * PAGE_SIZE, PAGE_SIZE, page)
                yield ClientRequest(nbd.Command.DISC, 0, 0)
                nbd_client._sock.shutdown(socket.SHUT_WR)

            def replies_then_eof() -> tuple[list[int], bytes]:
                errors = [reply.error for reply in itertools.islice(nbd_client.run(then_leave(), 3), 2)]
                return errors, nbd_client._sock.recv(1)  # b"": tmemd closed

            errors, after = await asyncio.to_thread(replies_then_eof)
            assert errors == [nbd.Error.OK, nbd.Error.OK] and after == b""
            for number in range(2):  # each acknowledged once the master had it
                page = remote_page(client, pool_id, keys[number])
                assert page is not None and page.pending is None

    asyncio.run(main())
