"""A graceful restart of tmemd (SIGTERM, then the same command) with real clients
connected: the guests' persistent pages come back, at every durability level; state
nothing vouches for reads as errors, never zeros; only `tmemctl forget` discards a
guest's pages, and never while the guest is connected (docs/RELIABILITY.md)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.control import ControlError
from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.nbd.client import ClientRequest, NbdClient
from tmem_wire import nbd
from tmem_wire.abi import PoolFlag, Status
from tmem_workloads.usemem import expected_page, page_templates

PAGE = 4096
TEMPLATES = page_templates(5)


def page(number: int, version: int = 0) -> bytes:
    return expected_page(TEMPLATES, 5 + version, number)


class QemuIo:
    """An interactive qemu-io on a guest's NBD export, with QEMU's reconnect-delay
    as the launcher gives it: one connection that outlives tmemd's restarts."""

    def __init__(self, daemon: TmemdProcess, guest: str) -> None:
        options = (f"driver=raw,file.driver=nbd,file.server.type=unix,"
                   f"file.server.path={daemon.nbd_socket(guest)},file.export={guest},"
                   "file.reconnect-delay=30")
        self.proc = subprocess.Popen(["qemu-io", "--image-opts", options], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        self._until_prompt("start")

    def run(self, command: str, timeout: float = 60.0) -> str:
        """Send one command; return its output (up to the next prompt)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt(command, timeout)

    def _until_prompt(self, command: str, timeout: float = 60.0) -> str:
        assert self.proc.stdout is not None
        output = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not output.endswith(b"qemu-io> "):
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                raise AssertionError(f"qemu-io: no answer to {command!r}: {output.decode()}")
            output += chunk
        return output.decode(errors="replace")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_a_connected_qemu_reads_its_pattern_back_after_a_graceful_restart(
        start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1", "small:cap=64K"), extra_args=("--nbd-size", "16M"))
    client = QemuIo(daemon, "g1")
    small = QemuIo(daemon, "small")  # most of its pages refused: in the fallback file
    try:
        assert "wrote 4194304/4194304" in client.run("write -P 0xab 0 4M")
        assert "wrote 4194304/4194304" in small.run("write -P 0xcd 0 4M")
        daemon.restart()
        # The same connection: QEMU reconnects to the new tmemd and reads its data.
        for qemu, pattern in ((client, "0xab"), (small, "0xcd")):
            output = qemu.run(f"read -P {pattern} 0 4M")
            assert "read 4194304/4194304" in output and "Pattern verification failed" not in output, output
        assert "Pattern verification failed" in client.run("read -P 0xab 4M 4K")  # never written: zeros
    finally:
        client.close()
        small.close()
    with daemon.control() as control:
        stats = control.request("stats")
    assert stats["nbd"]["g1"]["pages_read_tmem"] == 1024
    assert stats["nbd"]["small"]["pages_read_fallback"] > 500  # a same-filled page costs 160 B


@pytest.mark.parametrize("durability", ["none", "journal", "fsync"])
def test_the_agents_pools_come_back_after_a_graceful_restart(start_tmemd: StartTmemd,
                                                             durability: str) -> None:
    daemon = start_tmemd(guests=("g1",), extra_args=("--durability", durability))
    keys = [((3, 0, 0), n) for n in range(64)]
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        pool, _ = client.new_pool(PoolFlag.PERSISTENT)
        cache, _ = client.new_pool(PoolFlag(0))
        assert client.put_batch(pool, keys, [page(n) for n in range(64)]) == [Status.OK] * 64
        assert client.flush_page(pool, (3, 0, 0), 7) == Status.OK
        assert client.put(cache, (1, 0, 0), 0, page(99)) == Status.OK
    with daemon.control() as control:
        journal = control.request("stats")["journal"]["g1"]
    assert journal["durability"] == durability
    assert (journal["syncs"] > 0) == (durability == "fsync"), journal
    daemon.restart()
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        found = client.get_batch(pool, keys)
        assert found == [page(n) if n != 7 else None for n in range(64)]
        assert client.stats(pool)[0].pages == 63
        # Ephemeral pages are the host's to drop: the cache pool is gone.
        assert client.get(cache, (1, 0, 0), 0)[0] != Status.OK
        assert client.put(pool, (3, 0, 0), 7, page(7, 1)) == Status.OK
    daemon.restart()  # twice: what the first restart restored is journaled again
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        assert client.get(pool, (3, 0, 0), 7) == (Status.OK, page(7, 1))
        assert client.get(pool, (3, 0, 0), 8) == (Status.OK, page(8))


def test_durability_none_loses_the_pages_to_a_kill_9_as_errors(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1",), extra_args=("--nbd-size", "16M", "--durability", "none"))
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.write(0, b"".join(page(n) for n in range(8))) == nbd.Error.OK
    daemon.restart()  # the checkpoint of the graceful stop brings them back
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.read(0, 8 * PAGE) == (nbd.Error.OK, b"".join(page(n) for n in range(8)))
    assert not list(daemon.run_dir.glob("*.journal"))  # replayed and deleted: nothing to trust
    daemon.crash_and_restart()
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.read(0, PAGE)[0] == nbd.Error.EIO


def test_a_disk_whose_state_is_gone_reads_errors_across_restarts_never_zeros(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = start_tmemd(guests=("g1",), extra_args=("--nbd-size", "16M", "--state-dir", str(state)))
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.write(0, b"".join(page(n) for n in range(16))) == nbd.Error.OK
    assert daemon.terminate() == 0
    (state / "g1.journal").unlink()  # what vouched for the disk is gone
    daemon.start()
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.read(0, PAGE)[0] == nbd.Error.EIO
        assert client.read(1000 * PAGE, PAGE)[0] == nbd.Error.EIO
        assert client.write(PAGE, page(1, 1)) == nbd.Error.OK  # written again: the guest's
        trim = ClientRequest(nbd.Command.TRIM, 8 * PAGE, 8 * PAGE)
        assert client.call(trim).error == nbd.Error.OK
    # The lost slots stay lost across a graceful restart and a kill -9.
    for restart in (daemon.restart, daemon.crash_and_restart):
        restart()
        with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
            assert client.read(0, PAGE)[0] == nbd.Error.EIO
            assert client.read(2 * PAGE, PAGE)[0] == nbd.Error.EIO
            assert client.read(PAGE, PAGE) == (nbd.Error.OK, page(1, 1))
            assert client.read(8 * PAGE, 8 * PAGE) == (nbd.Error.OK, bytes(8 * PAGE))


def test_a_corrupt_journal_restores_nothing_so_reads_fail(start_tmemd: StartTmemd,
                                                          tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = start_tmemd(guests=("g1",), extra_args=("--nbd-size", "16M", "--state-dir", str(state)))
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        for n in range(32):  # one record per page: damage in the middle hides the rest
            assert client.write(n * PAGE, page(n)) == nbd.Error.OK
        assert client.write(0, page(0, 1)) == nbd.Error.OK  # slot 0 rewritten at the end
    assert daemon.terminate() == 0
    journal = bytearray((state / "g1.journal").read_bytes())
    journal[len(journal) // 2] ^= 0xFF
    (state / "g1.journal").write_bytes(bytes(journal))
    daemon.start()
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        for n in (0, 1, 31):  # never page(0) version 0, a copy older than the last write
            assert client.read(n * PAGE, PAGE)[0] == nbd.Error.EIO
    assert "journal corrupt" in daemon.log_text()


def test_forget_is_refused_while_connected_and_then_discards_everything(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = start_tmemd(guests=("g1", "g2"),
                         extra_args=("--nbd-size", "16M", "--state-dir", str(state)))
    tmemctl = [sys.executable, "-m", "tmem_host.ctl.main", "--run-dir", str(daemon.run_dir)]
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.write(0, page(0)) == nbd.Error.OK
        refused = subprocess.run([*tmemctl, "forget", "g1"], capture_output=True, text=True)
        assert refused.returncode == 1 and "live connection" in refused.stderr, refused.stderr
        assert client.read(0, PAGE) == (nbd.Error.OK, page(0))
    with AbiClient.open(daemon.abi_socket("g2")) as agent:
        pool, _ = agent.new_pool(PoolFlag.PERSISTENT)
        assert agent.put(pool, (0, 0, 0), 0, page(1)) == Status.OK
    forgot = subprocess.run([*tmemctl, "forget", "g1"], capture_output=True, text=True)
    assert forgot.returncode == 0 and "forgotten" in forgot.stdout, forgot.stderr
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.read(0, PAGE) == (nbd.Error.OK, bytes(PAGE))  # a new, empty disk
    daemon.restart()
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.read(0, PAGE) == (nbd.Error.OK, bytes(PAGE))  # and not a lost one
    # A guest no longer configured: its files are forgotten; g2's are untouched.
    assert daemon.terminate() == 0
    daemon.args[daemon.args.index("g2")] = "g3"
    daemon.start()
    with daemon.control() as control:
        assert control.request("forget", guest="g2") == {
            "guest": "g2", "forgotten": True, "configured": False}
        with pytest.raises(ControlError, match="nothing to forget"):
            control.request("forget", guest="g2")
    assert not (state / "g2.journal").exists() and not (state / "g2.fallback").exists()
    assert (state / "g1.journal").exists()
