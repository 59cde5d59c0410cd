"""Fixtures for the remote tier's tests: one real Redis Cluster per session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tmem_host.remote.cluster import LocalCluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """3 masters with 1 replica each on loopback, shared by the session: a test
    that breaks it must leave it healthy (use `breakable_cluster`). The nodes'
    logs are copied to the session's tmp dir (logs/redis-PORT.log) at the end."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH (Debian package redis-server)")
    scratch = tmp_path_factory.mktemp("redis-cluster")
    cluster = LocalCluster(scratch)
    try:
        yield cluster.start()
    finally:
        cluster.close()
        cluster.collect_logs(scratch / "logs")


@pytest.fixture
def breakable_cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session's cluster for a test that kills, pauses or stops nodes: it is
    healed afterwards (resumed, stopped nodes restarted, healthy again)."""
    yield redis_cluster
    redis_cluster.heal()
