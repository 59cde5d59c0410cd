"""tmemd's process lifecycle, configuration, logging and the vsock option."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from typing import Any
from pathlib import Path

import pytest

from tmem_host.daemon.client import AbiClient, TmemdClosedConnection
from tmem_host.daemon.config import (
    ConfigError,
    GuestConfig,
    build_config,
    parse_guest_spec,
    parse_size,
)
from tmem_host.daemon.process import StartTmemd, TmemdFailed, TmemdProcess
from tmem_host.daemon.vsock import guest_for_peer, vsock_unavailable_reason
from tmem_host.fuzz import fuzz_daemon_args, run_fuzz
from tmem_wire.abi import PoolFlag, Status


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(start_tmemd: StartTmemd, signum: int) -> None:
    daemon = start_tmemd()
    run_dir = daemon.run_dir
    assert (run_dir / "tmemd.pid").read_text().strip() == str(daemon.pid)
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        daemon.proc.send_signal(signum)
        assert daemon.proc.wait(15) == 0
        with pytest.raises(TmemdClosedConnection):
            client.stats()
    # Sockets and pid file gone; the guests' state kept for the next start.
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "g1.fallback", "g1.journal", "g2.fallback", "g2.journal", "tmemd.log"]
    assert "tmemd stopped" in daemon.log_text()


def test_a_second_daemon_on_the_same_run_dir_is_refused(tmemd: TmemdProcess) -> None:
    second = TmemdProcess(tmemd.run_dir)
    with pytest.raises(TmemdFailed, match="exited with 2"):
        second.start()
    assert f"another tmemd (pid {tmemd.pid})" in tmemd.log_text()
    with AbiClient.open(tmemd.abi_socket("g1")) as client:  # the first one is unharmed
        assert client.stats() == []


def test_stale_sockets_and_pid_file_are_replaced(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / "tmemd.pid").write_text("999999999\n")
    (run_dir / "g1.tmem.sock").write_text("left over")
    daemon = start_tmemd(run_dir=run_dir)
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        assert client.new_pool()[0] == 0


def test_config_file_and_command_line_merge(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    shared = uuid.uuid4()
    config = tmp_path / "tmemd.toml"
    config.write_text(f"""
budget = "32M"
log_format = "json"
compress = false

[[guest]]
name = "a"
weight = 300
cap = "2M"
shared = ["{shared}"]

[[guest]]
name = "b"
dedup = true
""")
    daemon = start_tmemd(guests=["b:weight=7"], extra_args=["--config", str(config)])
    with daemon.control() as control:
        stats = control.request("stats")
    clients = stats["store"]["clients"]
    assert (clients["a"]["weight"], clients["a"]["cap_bytes"]) == (300, 2 << 20)
    # The command line's b replaces the file's b (no dedup there).
    assert (clients["b"]["weight"], clients["b"]["dedup"]) == (7, False)
    assert stats["guests"]["a"]["shared_uuids"] == [str(shared)]
    # --budget on the command line (the fixture's 64M) wins over the file's 32M.
    assert stats["store"]["budget_bytes"] == 64 << 20
    assert stats["store"]["compress"] is False
    records = [json.loads(line) for line in daemon.log_text().splitlines()]
    ready = next(record for record in records if record["msg"] == "tmemd ready")
    assert ready["pid"] == daemon.pid and ready["guests"] == 2


def test_bad_configuration_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tmem_host.daemon.main", "--run-dir", str(tmp_path),
         "--budget", "lots", "--guest", "g1"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "tmemd: --budget: not a size: 'lots' (examples: 4096, 64K, 512M, 1G)"


def test_vsock_listener_is_skipped_with_a_log_line_when_unavailable(
        start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(extra_args=["--vsock-port", "7700", "--guest-cid", "g1=3"])
    reason = vsock_unavailable_reason()
    if reason is None:
        assert "vsock listening" in daemon.log_text()
    else:
        # This machine: no /dev/vhost-vsock, so no guest could reach the listener.
        log = daemon.log_text()
        assert "vsock listener skipped" in log and reason in log
    with daemon.control() as control:
        guests = {guest["name"]: guest for guest in control.request("guests")}
    assert guests["g1"]["cid"] == 3 and guests["g2"]["cid"] is None


def test_vsock_peers_map_to_guests_by_cid_only() -> None:
    guests = {3: "g1", 4: "g2"}
    assert guest_for_peer((3, 1234), guests) == "g1"
    assert guest_for_peer((4, 1), guests) == "g2"
    assert guest_for_peer((5, 1234), guests) is None  # unknown CIDs are refused
    assert guest_for_peer(("3", 1234), guests) is None
    assert guest_for_peer(None, guests) is None


def test_guest_specs_and_sizes_parse() -> None:
    shared = uuid.uuid4()
    assert parse_guest_spec(f"g1:weight=200:cap=64M:shared={shared}:dedup:cid=9") == GuestConfig(
        "g1", weight=200, cap_bytes=64 << 20, shared_uuids=frozenset({shared}), dedup=True,
        cid=9)
    assert parse_size("512M") == 512 << 20 and parse_size("1.5G") == 3 << 29
    assert parse_size("4096") == 4096 and parse_size("2GiB") == 2 << 30
    for bad_spec in ("g1:weight=0", "g1:colour=red", "../g1", "g1:shared=not-a-uuid",
                     "g1:cid=2"):
        with pytest.raises(ConfigError):
            parse_guest_spec(bad_spec)
    common: dict[str, Any] = dict(file_settings={}, run_dir=Path("/r"), budget="1M",
                                  compress=None, nbd_size=None, vsock_port=None,
                                  log_level=None, log_format=None)
    with pytest.raises(ConfigError, match="same vsock CID"):
        build_config(guest_specs=["a:cid=3", "b:cid=3"], guest_cids=[], **common)
    with pytest.raises(ConfigError, match="configured guest"):
        build_config(guest_specs=["a"], guest_cids=["b=4"], **common)
    config = build_config(guest_specs=["a"], guest_cids=["a=4"], **common)
    assert config.guest_for_cid(4) == GuestConfig("a", cid=4)


def test_fuzzing_leaves_the_daemon_alive_and_correct(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=fuzz_daemon_args(), budget="128M")
    report = run_fuzz(daemon.run_dir, 20_000, seed=11, daemon=daemon)
    assert report.crash_reasons == []
    assert report.frames == 20_000 and report.clean_checks == report.rounds
    # The mutations reached both the decoder (closes) and the handlers (replies).
    assert report.closed_by_daemon > report.rounds // 2
    assert report.replies > report.rounds
    with AbiClient.open(daemon.abi_socket("clean")) as client:
        pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
        assert client.put(pool_id, (1, 0, 0), 0, bytes(4096)) == Status.OK
