"""The ABI session's replies that wait for the remote tier's writes (a PUT is
acknowledged only once the cluster has its page): the connection is served on
meanwhile, so that the next requests' work overlaps the cluster's, and still
every reply leaves in order, only after what it acknowledges is written, also
across a half-closed connection; at most MAX_WAITING_PASSES passes wait."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tmem_host import limits
from tmem_host.remote.cluster import LocalCluster
from tmem_host.store.tier import RemotePage
from tmem_wire.abi import Op, Status

from .test_session_fetch_batching import PAGE, Host, connect, get, put, until, with_remote_pages
from .test_tier_store import master_port, remote_page

PAUSE_MS = 1500


def in_flight(page: RemotePage | None) -> bool:
    """Whether this remote page's write has not been acknowledged yet."""
    assert page is not None
    return page.pending is not None


def pause_writes(cluster: LocalCluster, host: Host, key_number: int) -> None:
    """The master of this key's hash tag takes no write for PAUSE_MS."""
    port = master_port(cluster, host.tier, host.client, host.pool_id, host.keys[key_number])
    with cluster.node_by_port(port).client() as admin:
        admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")


def test_requests_behind_a_put_that_waits_are_served_and_replies_leave_in_order(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        connection = await connect(host)
        pool, keys = host.pool_id, host.keys
        first, second = os.urandom(PAGE), os.urandom(PAGE)
        pause_writes(redis_cluster, host, 0)
        await connection.deliver(put(1, pool, keys[0], first))
        await asyncio.sleep(0.05)  # its write is in flight, to the paused master
        page = remote_page(host.client, pool, keys[0])
        assert in_flight(page)  # not written yet
        assert connection.replies_so_far() == [] and connection.transport.reading
        await connection.deliver(put(2, pool, keys[1], second) + get(3, pool, keys[0]))
        # Served while the first PUT waits (counted as served), nothing sent ahead of it.
        await until(lambda: connection.session.stats()["frames_in"] == 4)
        second_page = remote_page(host.client, pool, keys[1])
        assert in_flight(second_page)
        assert connection.replies_so_far() == []
        replies = await connection.replies(3)
        assert [reply.request_id for reply in replies] == [1, 2, 3]
        assert [reply.opcode for reply in replies] == [Op.PUT, Op.PUT, Op.GET]
        assert [reply.status for reply in replies] == [Status.OK] * 3
        assert replies[2].payload == first
        # Each PUT was acknowledged after the cluster had its page.
        assert not in_flight(page) and not in_flight(second_page)
        assert connection.session.stats()["store_waits"] >= 2

    with_remote_pages(tmp_path, redis_cluster, 2, scenario)


def test_a_guest_that_shuts_its_side_gets_every_waiting_reply_then_the_close(
        tmp_path: Path, redis_cluster: LocalCluster) -> None:
    async def scenario(host: Host) -> None:
        connection = await connect(host)
        pool, keys = host.pool_id, host.keys
        pause_writes(redis_cluster, host, 0)
        await connection.deliver(put(1, pool, keys[0], os.urandom(PAGE)) + put(2, pool, keys[1], os.urandom(PAGE)))
        assert connection.session.eof_received() is True  # kept open for the replies
        assert not connection.transport.closed
        await until(lambda: connection.transport.closed)
        replies = connection.replies_so_far()
        assert [(reply.request_id, reply.status) for reply in replies] == [(1, Status.OK), (2, Status.OK)]
        # With nothing waiting, an EOF closes as asyncio does by default.
        idle = await connect(host)
        assert idle.session.eof_received() is None

    with_remote_pages(tmp_path, redis_cluster, 2, scenario)


def test_reading_pauses_once_max_waiting_passes_wait(
        tmp_path: Path, redis_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_WAITING_PASSES", 3)

    async def scenario(host: Host) -> None:
        connection = await connect(host)
        pool, keys = host.pool_id, host.keys
        pages = [os.urandom(PAGE) for _ in range(5)]
        pause_writes(redis_cluster, host, 0)
        for number in range(3):  # one pass each
            await connection.deliver(put(1 + number, pool, keys[number], pages[number]))
            await asyncio.sleep(0.01)
        assert not connection.transport.reading  # three passes wait: read no more
        assert connection.replies_so_far() == []
        delivered = asyncio.ensure_future(connection.deliver(
            put(4, pool, keys[3], pages[3]) + get(5, pool, keys[2])))
        replies = await connection.replies(5)
        await delivered
        assert [(reply.request_id, reply.status) for reply in replies] == [(n, Status.OK) for n in range(1, 6)]
        assert replies[4].payload == pages[2]

    with_remote_pages(tmp_path, redis_cluster, 4, scenario)
