"""kv: a key-value server under swap, loaded, benchmarked and verified (stdlib only).

Debian's redis-server holds a data set of ``--mib`` MiB, ``--value-bytes`` a key:

1. load: every key ``key:%012d`` (the names redis-benchmark's ``-r`` draws) is
   SET to a value from usemem's page mix (text, structured binary, zero and
   random content, stamped with the key's number), PIPELINE_KEYS per round trip;
2. benchmark: redis-benchmark, Redis's own C load generator, GETs random keys of
   the set (``-r``) with ``--clients`` connections, one request in flight on each:
   a server that swaps answers late, and the tail latency shows it;
3. verify: every key is read back and compared; a missing or wrong value fails
   the run (``verified``), whatever the benchmark said.

redis-benchmark's GETs never write, so the set stays what the loader wrote. The
same code drives a server in the guest from the host, through a forwarded port
(the kv workload, tmem_host.testbed.kvload), and, run in the guest with
``--start-server``, a server of its own (the density scenario's kv phase):

    python3 -m tmem_workloads.kv --mib 256 --start-server [--requests 20000] [--clients 4]

Prints one JSON line: the figures, ``total_s`` (load plus benchmark) and ``verified``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from tmem_workloads.usemem import expected_page, page_templates

KV_PORT = 6379
KEY_FORMAT = "key:{:012d}"
# Keys per pipelined round trip when loading and verifying.
PIPELINE_KEYS = 64
# jemalloc's 4 KiB size class holds a value of up to 4096 bytes less the sds header.
DEFAULT_VALUE_BYTES = 4000
# A server of this module's own: no persistence (the data set is the workload's),
# loopback only.
OWN_SERVER_ARGUMENTS = ("--bind", "127.0.0.1", "--protected-mode", "no", "--save", "", "--appendonly", "no")


class KvError(Exception):
    """The key-value server could not be started, reached or benchmarked."""


class LatencyRecord(TypedDict):
    """redis-benchmark's figures for one test."""

    requests: int
    requests_per_s: float
    avg_ms: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


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


def values(params: KvParams, first: int, count: int, templates: list[bytes]) -> Iterator[tuple[str, bytes]]:
    for number in range(first, first + count):
        yield KEY_FORMAT.format(number), expected_page(templates, params.seed, number)[: params.value_bytes]


# -- a pipelining RESP2 client: what load and verify need, nothing more ---------------

Reply = bytes | int | list[Any] | None


class RespClient:
    """One connection to a Redis server; ``pipeline`` sends commands in one write
    and reads their replies in order. A server error reply raises KvError."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        try:
            self._socket = socket.create_connection((host, port), timeout=timeout_s)
        except OSError as error:
            raise KvError(f"cannot connect to {host}:{port}: {error}") from None
        self._reader = self._socket.makefile("rb")

    def close(self) -> None:
        self._reader.close()
        self._socket.close()

    def pipeline(self, commands: Sequence[Sequence[bytes | str | int]]) -> list[Reply]:
        self._socket.sendall(b"".join(encode_command(command) for command in commands))
        return [self._reply() for _ in commands]

    def call(self, *command: bytes | str | int) -> Reply:
        return self.pipeline([command])[0]

    def _line(self) -> bytes:
        line = self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise KvError("the server closed the connection")
        return line[:-2]

    def _reply(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise KvError(f"the server answered: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self._reader.read(length + 2)
            if len(data) != length + 2:
                raise KvError("the server closed the connection")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise KvError(f"not a RESP reply: {line[:40]!r}")


def encode_command(command: Sequence[bytes | str | int]) -> bytes:
    parts = [part if isinstance(part, bytes) else str(part).encode() for part in command]
    return b"".join([b"*%d\r\n" % len(parts), *(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)])


# -- the three steps --------------------------------------------------------------------


def load(client: RespClient, params: KvParams) -> None:
    templates = page_templates(params.seed)
    for first in range(0, params.keys, PIPELINE_KEYS):
        client.pipeline([("SET", key, value) for key, value in
                         values(params, first, min(PIPELINE_KEYS, params.keys - first), templates)])


def verify(client: RespClient, params: KvParams) -> list[str]:
    """The keys whose value is missing or wrong, checking every key."""
    templates = page_templates(params.seed)
    bad: list[str] = []
    for first in range(0, params.keys, PIPELINE_KEYS):
        expected = list(values(params, first, min(PIPELINE_KEYS, params.keys - first), templates))
        found = client.call("MGET", *(key for key, _ in expected))
        assert isinstance(found, list)
        bad += [key for (key, value), got in zip(expected, found) if got != value]
    return bad


_PERCENTILE_LINE = re.compile(r"^\s*([\d.]+)% <= ([\d.]+) milliseconds")
_THROUGHPUT_LINE = re.compile(r"throughput summary: ([\d.]+) requests per second")
_SUMMARY_HEADER = re.compile(r"^\s*avg\s+min\s+p50\s+p95\s+p99\s+max\s*$")


def parse_redis_benchmark(output: str, requests: int) -> LatencyRecord:
    """One test's figures from redis-benchmark's full (not --csv, not -q) output;
    ValueError if a part is missing. The percentiles come from its HDR histogram
    ("Latency by percentile distribution"): each is the first bucket at or above."""
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


def benchmark(host: str, port: int, params: KvParams, timeout_s: float) -> LatencyRecord:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise KvError("redis-benchmark is missing (Debian's redis-tools)")
    try:
        result = subprocess.run(
            [binary, "-h", host, "-p", str(port), "-t", "get", "-n", str(params.requests),
             "-r", str(params.keys), "-c", str(params.clients), "-P", "1"],
            capture_output=True, text=True, timeout=timeout_s, check=True)
        return parse_redis_benchmark(result.stdout, params.requests)
    except subprocess.CalledProcessError as error:
        raise KvError(f"redis-benchmark failed ({error.returncode}): {error.stderr.strip()[-300:]}") from None
    except subprocess.TimeoutExpired:
        raise KvError(f"redis-benchmark did not finish in {timeout_s:.0f} s") from None
    except ValueError as error:
        raise KvError(str(error)) from None


def drive(host: str, port: int, params: KvParams, timeout_s: float) -> dict[str, Any]:
    """Load, benchmark and verify the server at host:port: the workload's result
    (JSON-ready; ``total_s`` is load plus benchmark). KvError if it cannot."""
    client = RespClient(host, port, timeout_s)
    try:
        started = time.monotonic()
        load(client, params)
        loaded = time.monotonic()
        latency = benchmark(host, port, params, timeout_s)
        benchmarked = time.monotonic()
        bad = verify(client, params)
        stored = client.call("DBSIZE")
        info = client.call("INFO", "memory")
    except OSError as error:
        raise KvError(f"the key-value server at {host}:{port}: {error}") from None
    finally:
        client.close()
    used = re.search(rb"^used_memory:(\d+)", info, re.MULTILINE) if isinstance(info, bytes) else None
    if not isinstance(stored, int) or used is None:
        raise KvError(f"the key-value server at {host}:{port} answered DBSIZE or INFO oddly")
    return {
        "keys": params.keys, "value_bytes": params.value_bytes, "dbsize": stored,
        "used_memory": int(used.group(1)), "bad_keys": len(bad), "first_bad_keys": bad[:16],
        "verified": not bad and stored == params.keys,
        "load_s": round(loaded - started, 3), "bench_s": round(benchmarked - loaded, 3),
        "verify_s": round(time.monotonic() - benchmarked, 3),
        "total_s": round(benchmarked - started, 3), "latency": latency,
    }


# -- a server of its own ----------------------------------------------------------------


class OwnServer:
    """redis-server on loopback ``port`` in a scratch directory, in the foreground
    of this process (so in its memory cgroup); ready when entered, shut down
    (SHUTDOWN NOSAVE, then killed) when left."""

    def __init__(self, port: int, timeout_s: float = 60.0) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="tmem-kv-")
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OwnServer:
        binary = shutil.which("redis-server")
        if binary is None:
            self._dir.cleanup()
            raise KvError("redis-server is missing (Debian's redis-server)")
        log = Path(self._dir.name) / "redis.log"
        self._process = subprocess.Popen(
            [binary, "--port", str(self.port), "--dir", self._dir.name, "--logfile", str(log),
             *OWN_SERVER_ARGUMENTS], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                client = RespClient("127.0.0.1", self.port, 5.0)
                try:
                    if client.call("PING") == b"PONG":
                        return self
                finally:
                    client.close()
            except (KvError, OSError):
                pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-500:] if log.exists() else ""
                self.__exit__(None, None, None)
                raise KvError(f"redis-server did not start on port {self.port}: {text}")
            time.sleep(0.1)

    def __exit__(self, *_: object) -> None:
        process, self._process = self._process, None
        if process is not None:
            try:
                client = RespClient("127.0.0.1", self.port, 5.0)
                try:
                    client.call("SHUTDOWN", "NOSAVE")
                except (KvError, OSError):
                    pass  # it answers by closing the connection
                finally:
                    client.close()
            except KvError:
                pass
            try:
                process.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._dir.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tmem_workloads.kv", description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, required=True, help="the data set's size")
    parser.add_argument("--value-bytes", type=int, default=DEFAULT_VALUE_BYTES)
    parser.add_argument("--requests", type=int, default=20000, help="redis-benchmark's GETs")
    parser.add_argument("--clients", type=int, default=4, help="redis-benchmark's connections")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, default=KV_PORT)
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (without --start-server)")
    parser.add_argument("--start-server", action="store_true", help="run a redis-server of its own")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for each step")
    args = parser.parse_args(argv)
    if args.mib <= 0 or not 0 < args.value_bytes <= 4096 or args.requests <= 0 or args.clients <= 0:
        parser.error("--mib, --requests and --clients must be positive, --value-bytes 1-4096")
    params = KvParams(args.mib, args.value_bytes, args.requests, args.clients, args.seed)
    try:
        if args.start_server:
            with OwnServer(args.port):
                result = drive("127.0.0.1", args.port, params, args.timeout)
        else:
            result = drive(args.host, args.port, params, args.timeout)
    except KvError as error:
        print(f"kv: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
