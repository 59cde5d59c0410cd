"""The key-value workload: redis-server in the guest, driven from the host.

A real application under swap: Debian's redis-server runs in the guest, in the
workload's memory cgroup, with a data set larger than that (ratio x guest RAM).
The host reaches it through a forwarded loopback port (Guest.forward_port):

1. load: every key ``key:%012d`` (the names redis-benchmark's ``-r`` draws) is
   SET to a value of ``value_bytes`` from usemem's page mix (text, structured
   binary, zero and random content, stamped with the key's number), pipelined;
2. benchmark: redis-benchmark, Redis's own C load generator, GETs random keys of
   the set (``-r``) with ``clients`` connections, one request in flight on each:
   a server that swaps answers late, and the tail latency shows it;
3. verify: every key is read back and compared; a missing or wrong value fails
   the run (the workload's ``verified``), whatever the benchmark said.

redis-benchmark's GETs never write, so the set stays what the loader wrote.
The latency percentiles come from its HDR histogram ("Latency by percentile
distribution"): each figure is the first bucket at or above the percentile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypedDict

import redis

from tmem_host.vm import guestops
from tmem_host.vm.launcher import Guest
from tmem_workloads.usemem import expected_page, page_templates

KV_PORT = 6379
KV_CGROUP = "kv"
KEY_FORMAT = "key:{:012d}"
# Keys per pipelined round trip when loading and verifying.
PIPELINE_KEYS = 64
# jemalloc's 4 KiB size class holds a value of up to 4096 bytes less the sds header.
DEFAULT_VALUE_BYTES = 4000
SERVER_ARGUMENTS = (
    f"--port {KV_PORT} --bind 0.0.0.0 --protected-mode no --save '' --appendonly no "
    "--daemonize yes --dir /tmp --logfile /tmp/redis-kv.log --pidfile /tmp/redis-kv.pid"
)


class KvError(Exception):
    """The key-value server could not be started or reached (infrastructure)."""


class LatencyRecord(TypedDict):
    """redis-benchmark's figures for one test."""

    requests: int
    requests_per_s: float
    avg_ms: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


_PERCENTILE_LINE = re.compile(r"^\s*([\d.]+)% <= ([\d.]+) milliseconds")
_THROUGHPUT_LINE = re.compile(r"throughput summary: ([\d.]+) requests per second")
_SUMMARY_HEADER = re.compile(r"^\s*avg\s+min\s+p50\s+p95\s+p99\s+max\s*$")


def parse_redis_benchmark(output: str, requests: int) -> LatencyRecord:
    """One test's figures from redis-benchmark's full (not --csv, not -q) output;
    ValueError if a part is missing."""
    lines = output.replace("\r", "\n").splitlines()
    distribution: list[tuple[float, float]] = []
    section = ""
    summary: list[float] = []
    throughput: float | None = None
    for number, line in enumerate(lines):
        if line.startswith("Latency by percentile distribution"):
            section = "percentiles"
            continue
        if line.startswith("Cumulative distribution"):
            section = ""
        if section == "percentiles" and (match := _PERCENTILE_LINE.match(line)):
            distribution.append((float(match.group(1)), float(match.group(2))))
        if match := _THROUGHPUT_LINE.search(line):
            throughput = float(match.group(1))
        if _SUMMARY_HEADER.match(line) and number + 1 < len(lines):
            summary = [float(value) for value in lines[number + 1].split()]
    if throughput is None or len(summary) != 6 or not distribution:
        raise ValueError(f"not redis-benchmark's output: {output[-500:]!r}")

    def percentile(wanted: float) -> float:
        return next(latency for share, latency in distribution if share >= wanted)

    avg, _, p50, _, p99, maximum = summary
    return {"requests": requests, "requests_per_s": throughput, "avg_ms": avg, "p50_ms": p50,
            "p99_ms": p99, "p999_ms": percentile(99.9), "max_ms": maximum}


@dataclass(frozen=True, slots=True)
class KvParams:
    mib: int  # the data set: keys x value_bytes
    value_bytes: int
    requests: int
    clients: int
    seed: int

    @property
    def keys(self) -> int:
        return (self.mib << 20) // self.value_bytes


def _values(params: KvParams, first: int, count: int, templates: list[bytes]) -> Iterator[tuple[str, bytes]]:
    for number in range(first, first + count):
        yield KEY_FORMAT.format(number), expected_page(templates, params.seed, number)[: params.value_bytes]


def start_server(guest: Guest, memory_max: str) -> None:
    """redis-server in the guest's workload cgroup (``memory_max``: its memory.max),
    daemonized there, ready when this returns."""
    command = guestops.in_cgroup(f"redis-server {SERVER_ARGUMENTS}", memory_max, KV_CGROUP)
    guest.ssh(f"{command} && for i in $(seq 100); do redis-cli -p {KV_PORT} ping 2>/dev/null "
              f"| grep -q PONG && exit 0; sleep 0.2; done; cat /tmp/redis-kv.log; exit 1", timeout=120)


def _connect(port: int, timeout_s: float) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout_s, socket_connect_timeout=30)


def load(client: redis.Redis, params: KvParams) -> None:
    templates = page_templates(params.seed)
    for first in range(0, params.keys, PIPELINE_KEYS):
        pipe = client.pipeline(transaction=False)
        for key, value in _values(params, first, min(PIPELINE_KEYS, params.keys - first), templates):
            pipe.set(key, value)
        pipe.execute()


def verify(client: redis.Redis, params: KvParams) -> list[str]:
    """The keys whose value is missing or wrong (at most 16 named), checking every key."""
    templates = page_templates(params.seed)
    bad: list[str] = []
    for first in range(0, params.keys, PIPELINE_KEYS):
        expected = list(_values(params, first, min(PIPELINE_KEYS, params.keys - first), templates))
        found = client.mget([key for key, _ in expected])
        bad += [key for (key, value), got in zip(expected, found) if got != value]
    return bad


def benchmark(port: int, params: KvParams, timeout_s: float) -> LatencyRecord:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise KvError("redis-benchmark is missing: install the packages in ci/system-packages.txt")
    try:
        result = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(port), "-t", "get", "-n", str(params.requests),
             "-r", str(params.keys), "-c", str(params.clients), "-P", "1"],
            capture_output=True, text=True, timeout=timeout_s, check=True)
    except subprocess.CalledProcessError as error:
        raise KvError(f"redis-benchmark failed ({error.returncode}): {error.stderr.strip()[-300:]}") from None
    except subprocess.TimeoutExpired:
        raise KvError(f"redis-benchmark did not finish in {timeout_s:.0f} s") from None
    return parse_redis_benchmark(result.stdout, params.requests)


def run(guest: Guest, params: KvParams, timeout_s: float) -> dict[str, Any]:
    """Load, benchmark and verify against the server start_server started; the
    workload's result (JSON-ready; ``total_s`` is load plus benchmark)."""
    port = guest.forward_port(KV_PORT)
    client = _connect(port, timeout_s)
    try:
        started = time.monotonic()
        load(client, params)
        loaded = time.monotonic()
        latency = benchmark(port, params, timeout_s)
        benchmarked = time.monotonic()
        bad = verify(client, params)
        stored = int(client.dbsize())
        used = int(client.info("memory")["used_memory"])
    except redis.RedisError as error:
        raise KvError(f"the key-value server in {guest.config.name}: {error}") from None
    finally:
        client.close()
    return {
        "keys": params.keys, "value_bytes": params.value_bytes, "dbsize": stored,
        "used_memory": used, "bad_keys": len(bad), "first_bad_keys": bad[:16],
        "verified": not bad and stored == params.keys,
        "load_s": round(loaded - started, 3), "bench_s": round(benchmarked - loaded, 3),
        "verify_s": round(time.monotonic() - benchmarked, 3),
        "total_s": round(benchmarked - started, 3), "latency": latency,
    }
