"""The key-value workload's own code against a real redis-server on this host:
the whole command (a server of its own, load, redis-benchmark, verify), a value
changed behind its back, and a server that is not there or answers an error."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tmem_workloads import kv


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_command_runs_its_own_server_and_verifies_every_value() -> None:
    port = free_port()
    completed = subprocess.run(
        [sys.executable, "-m", "tmem_workloads.kv", "--start-server", "--port", str(port), "--mib", "2",
         "--requests", "500", "--clients", "2", "--seed", "3"],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    keys = (2 << 20) // kv.DEFAULT_VALUE_BYTES
    assert result["verified"] and result["keys"] == result["dbsize"] == keys and result["bad_keys"] == 0
    assert result["used_memory"] > 2 << 20
    latency = result["latency"]
    assert latency["requests"] == 500 and latency["requests_per_s"] > 0
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["p999_ms"] <= latency["max_ms"]
    # The server was its own: shut down with the command.
    with pytest.raises(kv.KvError, match="cannot connect"):
        kv.RespClient("127.0.0.1", port, 2.0)


def test_a_value_changed_or_lost_behind_its_back_fails_verification() -> None:
    params = kv.KvParams(mib=1, value_bytes=1000, requests=100, clients=1, seed=5)
    with kv.OwnServer(free_port()) as server:
        client = kv.RespClient("127.0.0.1", server.port, 10.0)
        try:
            kv.load(client, params)
            assert kv.verify(client, params) == []
            first, second = kv.KEY_FORMAT.format(17), kv.KEY_FORMAT.format(400)
            value = client.call("GET", first)
            assert isinstance(value, bytes) and len(value) == 1000
            client.call("SET", first, value[:-1] + bytes([value[-1] ^ 1]))  # one bit
            client.call("DEL", second)
            assert kv.verify(client, params) == [first, second]
        finally:
            client.close()


def test_a_server_error_is_an_error_not_a_value() -> None:
    with kv.OwnServer(free_port()) as server:
        client = kv.RespClient("127.0.0.1", server.port, 10.0)
        try:
            with pytest.raises(kv.KvError, match="the server answered: ERR unknown command"):
                client.call("NOSUCHCOMMAND")
            assert client.pipeline([("SET", "a", b"\x00\r\n"), ("GET", "a"), ("GET", "b"), ("INCR", "n")]) == \
                [b"OK", b"\x00\r\n", None, 1]
        finally:
            client.close()
    # Gone (shut down with the block): the drive fails with KvError, the command with exit 1.
    params = kv.KvParams(mib=1, value_bytes=4000, requests=10, clients=1, seed=1)
    with pytest.raises(kv.KvError):
        kv.drive("127.0.0.1", server.port, params, 5.0)
