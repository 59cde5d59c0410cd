"""LocalCluster against real redis-servers: the cluster it starts works, and each
way it breaks the cluster behaves as the remote tier's tests will rely on."""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from tmem_host.remote.cluster import PORT_RANGE, ClusterLaunchError, LocalCluster
from tmem_host.remote.rawbench import raw_cluster_rows

FAILOVER_DEADLINE_S = 20.0


@contextmanager
def cluster_client(cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = RedisCluster(startup_nodes=[ClusterNode(host, port)  # type: ignore[no-untyped-call]
                                         for host, port in cluster.seeds])
    try:
        yield client
    finally:
        client.close()


def ours_alive(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is still the redis-server running in ``directory`` (not a
    reused pid; redis-server rewrites its cmdline, so its cwd tells)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory
    except FileNotFoundError:
        return False


def bind_in_port_range(sock: socket.socket) -> int:
    """Bind ``sock`` to a free loopback port where LocalCluster picks its ports."""
    port = random.randrange(*PORT_RANGE)
    while True:
        try:
            sock.bind(("127.0.0.1", port))
            return port
        except OSError:
            port += 1


def test_starts_three_masters_with_one_replica_each(redis_cluster: LocalCluster) -> None:
    masters, replicas = redis_cluster.masters(), redis_cluster.replicas()
    assert len(masters) == 3 and len(replicas) == 3
    assert redis_cluster.health_problem() is None
    assert redis_cluster.seed_spec == ",".join(f"127.0.0.1:{node.port}"
                                               for node in redis_cluster.nodes)
    # Each master has its own replica.
    master_ids = {node.node_id for node in masters}
    followed = [view.master_id for view in masters[0].view() if "slave" in view.flags]
    assert sorted(followed, key=str) == sorted(master_ids)
    assert redis_cluster.config_get("cluster-node-timeout") == {
        node.port: "2000" for node in redis_cluster.nodes}


def test_a_key_set_through_redis_py_reads_back(redis_cluster: LocalCluster) -> None:
    with cluster_client(redis_cluster) as client:
        client.set(b"harness:hello", b"\x00page\xff")
        assert client.get(b"harness:hello") == b"\x00page\xff"


def test_killed_master_is_replaced_by_its_replica(breakable_cluster: LocalCluster) -> None:
    cluster = breakable_cluster
    key = "harness:survives-failover"
    master = cluster.master_of(key)
    with master.client() as client:
        pipe = client.pipeline(transaction=False)  # one connection: WAIT covers the SET
        pipe.set(key, "value")
        pipe.wait(1, 5000)
        assert pipe.execute() == [True, 1]

    cluster.kill(master)
    started = time.monotonic()
    promoted = cluster.wait_failover(master, FAILOVER_DEADLINE_S)
    took = time.monotonic() - started
    assert promoted.node_id in master.replicas_when_killed
    assert cluster.master_of(key) is promoted
    assert took < FAILOVER_DEADLINE_S
    with cluster_client(cluster) as client:
        assert client.get(key) == b"value"

    cluster.restart(master)
    cluster.wait_healthy(FAILOVER_DEADLINE_S)
    assert master.role() == "slave"  # it rejoins as the replica of its replacement
    assert len(cluster.masters()) == 3 and len(cluster.replicas()) == 3


def test_paused_cluster_times_out_and_works_after_resume(
        breakable_cluster: LocalCluster) -> None:
    cluster = breakable_cluster
    master = cluster.master_of("harness:pause")
    with cluster_client(cluster) as client:
        client.set("harness:pause", "kept")
    plain = redis.Redis("127.0.0.1", master.port, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
    cluster.pause()
    try:
        with pytest.raises(redis.TimeoutError):
            plain.get("harness:pause")
    finally:
        cluster.resume()
    cluster.wait_healthy(FAILOVER_DEADLINE_S)
    assert plain.get("harness:pause") == b"kept"
    plain.close()


def test_stop_all_and_start_all_keep_the_data(breakable_cluster: LocalCluster) -> None:
    cluster = breakable_cluster
    written = {f"harness:aof:{n}".encode(): os.urandom(64) for n in range(200)}
    with cluster_client(cluster) as client:
        client.mset_nonatomic(written)
    old_pids = [node.pid for node in cluster.nodes]
    cluster.stop_all()
    assert all(not node.running for node in cluster.nodes)
    cluster.start_all()
    assert all(node.pid not in old_pids for node in cluster.nodes)
    with cluster_client(cluster) as client:
        assert client.mget_nonatomic(list(written)) == list(written.values())


def test_config_set_reaches_every_node(redis_cluster: LocalCluster) -> None:
    redis_cluster.config_set("maxmemory-policy", "allkeys-lru")
    try:
        assert set(redis_cluster.config_get("maxmemory-policy").values()) == {"allkeys-lru"}
    finally:
        redis_cluster.config_set("maxmemory-policy", "noeviction")


def test_raw_cluster_rows_move_and_verify_pages(redis_cluster: LocalCluster) -> None:
    before = redis_cluster.dbsize_total()
    pages = [os.urandom(4096) for _ in range(256)]
    rows = raw_cluster_rows(redis_cluster.seed_spec, pages)
    assert [(row.op, row.pages) for row in rows] == [("put", 256), ("get", 256)] * 3
    assert all(row.pages_per_s > 0 for row in rows)
    assert redis_cluster.dbsize_total() == before  # its keys are gone


def test_collect_logs_copies_every_node_log(redis_cluster: LocalCluster, tmp_path: Path) -> None:
    copied = redis_cluster.collect_logs(tmp_path)
    assert sorted(path.name for path in copied) == sorted(
        f"redis-{node.port}.log" for node in redis_cluster.nodes)
    assert all("Ready to accept connections" in path.read_text() for path in copied)


def test_close_leaves_no_process_behind(tmp_path: Path) -> None:
    with socket.socket() as busy:  # base_port is taken: the cluster skips it
        base_port = bind_in_port_range(busy)
        with LocalCluster(tmp_path, replicas_per_master=0, appendonly=False,
                          base_port=base_port) as cluster:
            started = [(node.pid, node.directory) for node in cluster.nodes]
            assert all(node.port > base_port for node in cluster.nodes)
            assert all(pid is not None and ours_alive(pid, directory)
                       for pid, directory in started)
            cluster.pause()  # close must also stop paused nodes
    assert not any(ours_alive(pid, directory) for pid, directory in started if pid is not None)
    cluster.close()  # idempotent


def test_failed_start_reports_and_cleans_up(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, replicas_per_master=0, maxmemory_policy="no-such-policy")
    with pytest.raises(ClusterLaunchError) as caught:
        cluster.start()
    error = caught.value
    assert error.exit_code == 1
    assert error.command[-1].endswith("redis.conf")
    assert "no-such-policy" in error.output
    assert not any(node.running for node in cluster.nodes)
