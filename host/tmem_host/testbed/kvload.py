"""The key-value workload: redis-server in the guest, driven from the host.

A real application under swap: Debian's redis-server runs in the guest, in the
workload's memory cgroup, with a data set larger than that (ratio x guest RAM).
The host reaches it through a forwarded loopback port (Guest.forward_port) and
drives it with tmem_workloads.kv, the same code that serves the density
scenario's kv phase inside a guest: load every key, redis-benchmark's GETs of
random keys (throughput and p50/p99/p99.9 latency), then read back and compare
every key.
"""

from __future__ import annotations

from typing import Any

from tmem_host.vm import guestops
from tmem_host.vm.launcher import Guest
from tmem_workloads.kv import KV_PORT, KvError, KvParams, drive

__all__ = ["KV_CGROUP", "KvError", "KvParams", "run", "start_server"]

KV_CGROUP = "kv"
SERVER_ARGUMENTS = (
    f"--port {KV_PORT} --bind 0.0.0.0 --protected-mode no --save '' --appendonly no "
    "--daemonize yes --dir /tmp --logfile /tmp/redis-kv.log --pidfile /tmp/redis-kv.pid"
)


def start_server(guest: Guest, memory_max: str) -> None:
    """redis-server in the guest's workload cgroup (``memory_max``: its memory.max),
    daemonized there, ready when this returns."""
    command = guestops.in_cgroup(f"redis-server {SERVER_ARGUMENTS}", memory_max, KV_CGROUP)
    guest.ssh(f"{command} && for i in $(seq 100); do redis-cli -p {KV_PORT} ping 2>/dev/null "
              f"| grep -q PONG && exit 0; sleep 0.2; done; cat /tmp/redis-kv.log; exit 1", timeout=120)


def run(guest: Guest, params: KvParams, timeout_s: float) -> dict[str, Any]:
    """Load, benchmark and verify against the server start_server started; the
    workload's result (JSON-ready; ``total_s`` is load plus benchmark)."""
    try:
        return drive("127.0.0.1", guest.forward_port(KV_PORT), params, timeout_s)
    except KvError as error:
        raise KvError(f"the key-value server in {guest.config.name}: {error}") from None
