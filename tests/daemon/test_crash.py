"""kill -9 of a real tmemd in the middle of a put stream, then a restart on the same
state dir: every acknowledged persistent page comes back with the same bytes under
the same pool id; flushed pages stay gone; ephemeral pools are gone; the cap
counts the restored pages."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tmem_guest.channel import ChannelDown, UnixSocketChannel
from tmem_guest.session import Session
from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.process import StartTmemd, TmemdFailed, TmemdProcess
from tmem_host.failpoints import ENVIRONMENT
from tmem_host.journal.journaled import journal_path
from tmem_host.waiting import wait_until
from tmem_wire.abi import PoolFlag, Status
from tmem_wire.frontswap import PAGE_SIZE, frontswap_key
from tmem_workloads.usemem import expected_page, page_templates

TEMPLATES = page_templates(11)
BATCH = 32


def page(number: int, version: int = 0) -> bytes:
    return expected_page(TEMPLATES, 11 + version, number)


class PutStream(threading.Thread):
    """Batches of fresh keys into one pool until tmemd dies; records what was acknowledged."""

    def __init__(self, daemon: TmemdProcess, pool_id: int) -> None:
        super().__init__(daemon=True)
        self.client = AbiClient.open(daemon.abi_socket("g1"))
        self.pool_id = pool_id
        self.acknowledged: list[int] = []
        self.refused = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        number = 0
        try:
            while True:
                numbers = range(number, number + BATCH)
                keys = [((7, 0, 0), n) for n in numbers]
                statuses = self.client.put_batch(self.pool_id, keys, [page(n) for n in numbers])
                for n, status in zip(numbers, statuses):
                    if status == Status.OK:
                        self.acknowledged.append(n)
                    else:
                        self.refused += 1
                number += BATCH
        except OSError as error:  # tmemd was killed: the reply never came
            self.error = error
        finally:
            self.client.close()


def test_kill_9_mid_stream_loses_no_acknowledged_page(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1",), budget="256M")
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        ephemeral, _ = client.new_pool(PoolFlag(0))
        single, _ = client.new_pool(PoolFlag.PERSISTENT)
        batched, _ = client.new_pool(PoolFlag.PERSISTENT)
        doomed, _ = client.new_pool(PoolFlag.PERSISTENT)
        streamed, _ = client.new_pool(PoolFlag.PERSISTENT)
        for n in range(100):
            assert client.put(single, (1, 0, 0), n, page(n)) == Status.OK
        keys = [((2, n % 3, 0), n) for n in range(256)]
        assert client.put_batch(batched, keys, [page(n) for n in range(256)]) == [Status.OK] * 256
        assert client.put(ephemeral, (1, 0, 0), 0, page(0)) == Status.OK
        assert client.put(doomed, (1, 0, 0), 0, page(0)) == Status.OK
        assert client.destroy_pool(doomed) == Status.OK
        assert client.flush_page(single, (1, 0, 0), 5) == Status.OK
        assert client.flush_object(batched, (2, 1, 0)) == Status.OK
        assert client.flush_batch(batched, [((2, 0, 0), 0), ((2, 0, 0), 3)]) == [Status.OK] * 2
        assert client.put(single, (1, 0, 0), 6, page(6, version=1)) == Status.OK
        before = {record.pool_id: record for record in client.stats()}

    stream = PutStream(daemon, streamed)
    stream.start()
    daemon.crash_and_restart(when=lambda: len(stream.acknowledged) >= 3000, wait_s=30)
    stream.join(10)
    assert not stream.is_alive() and isinstance(stream.error, OSError)
    assert len(stream.acknowledged) >= 3000 and stream.refused == 0

    with AbiClient.open(daemon.abi_socket("g1")) as client:
        after = {record.pool_id: record for record in client.stats()}
        assert set(after) == {single, batched, streamed}  # same ids; ephemeral, destroyed gone
        for pool_id in (single, batched):
            assert after[pool_id].pages == before[pool_id].pages
            assert after[pool_id].stored_bytes == before[pool_id].stored_bytes
            assert after[pool_id].flags == PoolFlag.PERSISTENT
        assert client.get(single, (1, 0, 0), 5) == (Status.MISS, None)
        assert client.get(single, (1, 0, 0), 6) == (Status.OK, page(6, version=1))
        found = client.get_batch(single, [((1, 0, 0), n) for n in range(100)])
        assert found == [None if n == 5 else page(6, 1) if n == 6 else page(n) for n in range(100)]
        found = client.get_batch(batched, keys)
        assert found == [None if n % 3 == 1 or n in (0, 3) else page(n) for n in range(256)]
        acked = set(stream.acknowledged)
        for start in range(0, max(acked) + BATCH, 256):
            numbers = range(start, start + 256)
            pages = client.get_batch(streamed, [((7, 0, 0), n) for n in numbers])
            for n, data in zip(numbers, pages):
                if n in acked:
                    assert data == page(n), f"acknowledged page {n} lost or wrong"
                else:  # in flight when tmemd died: absent, or complete and correct
                    assert data is None or data == page(n)
        # A fresh pool takes the lowest free id (the ephemeral pool's).
        assert client.new_pool(PoolFlag(0))[0] == ephemeral

    with daemon.control() as control:
        stats = control.request("stats")
    store = stats["store"]["clients"]["g1"]
    assert store["pages"] == sum(record.pages for record in after.values())
    assert stats["store"]["used_bytes"] == store["stored_bytes"] == sum(
        record.stored_bytes for record in after.values())
    journal = stats["journal"]["g1"]
    assert journal["replayed_pages"] == store["pages"] and journal["size_bytes"] > 0
    table = subprocess.run([sys.executable, "-m", "tmem_host.ctl.main", "--run-dir",
                            str(daemon.run_dir), "stats"], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert "journal/live" in table and " MiB/" in table  # the journal's size against its live part


def test_restored_pages_count_against_the_cap(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1:cap=256K",), budget="64M")
    incompressible = [expected_page(TEMPLATES, 11, n) for n in range(3, 400, 4)]  # random kind
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        pool, _ = client.new_pool(PoolFlag.PERSISTENT)
        statuses = [client.put(pool, (0, 0, 0), n, data) for n, data in enumerate(incompressible)]
    accepted = statuses.count(Status.OK)
    assert 0 < accepted < len(incompressible) and Status.REFUSED in statuses
    daemon.crash_and_restart()
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        assert client.stats(pool)[0].pages == accepted
        # Full before the crash, full after it: the restored pages fill the cap.
        assert client.put(pool, (1, 0, 0), 0, incompressible[0]) == Status.REFUSED
        assert client.flush_object(pool, (0, 0, 0)) == Status.OK
        assert client.put(pool, (1, 0, 0), 0, incompressible[0]) == Status.OK


def test_no_journal_means_nothing_survives(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1",), extra_args=("--no-journal",))
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        pool, _ = client.new_pool(PoolFlag.PERSISTENT)
        assert client.put(pool, (0, 0, 0), 0, page(0)) == Status.OK
    daemon.crash_and_restart()
    assert not list(daemon.run_dir.glob("*.journal"))
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        assert client.stats() == []


def test_a_graceful_stop_keeps_the_state(start_tmemd: StartTmemd, tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = start_tmemd(guests=("g1",), extra_args=("--state-dir", str(state)))
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        pool, _ = client.new_pool(PoolFlag.PERSISTENT)
        assert client.put(pool, (0, 0, 0), 0, page(0)) == Status.OK
    assert (state / "g1.journal").stat().st_size > 0 and (state / "g1.fallback").exists()
    assert not (daemon.run_dir / "g1.journal").exists()
    journal = (state / "g1.journal").read_bytes()
    assert daemon.terminate() == 0
    assert sorted(path.name for path in state.iterdir()) == ["g1.fallback", "g1.journal"]
    assert (state / "g1.journal").read_bytes() == journal
    assert sorted(path.name for path in daemon.run_dir.iterdir()) == ["tmemd.log"]  # no sockets


def test_the_agent_session_reattaches_its_restored_pool(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1",))
    session = Session(UnixSocketChannel(daemon.abi_socket("g1")), backoff_max=0.2,
                      request_timeout=10)
    cache = session.register_pool(persistent=False)
    swap = session.register_pool(persistent=True)
    session.start()
    try:
        assert session.wait_up(10)
        keys = [frontswap_key(0, slot) for slot in range(64)]
        assert session.put_batch(swap, keys, [page(n) for n in range(64)]) == [True] * 64
        assert session.put(cache, (1, 0, 0), 0, page(1))
        swap_id = swap.pool_id
        daemon.crash_and_restart()
        into = [memoryview(bytearray(PAGE_SIZE)) for _ in keys]
        deadline = time.monotonic() + 20
        while True:  # until the session noticed the drop and re-attached
            try:
                if session.connections >= 2 and session.wait_up(1):
                    found = session.get_batch(swap, keys, into)
                    break
            except ChannelDown:
                pass
            assert time.monotonic() < deadline, "the session did not come back"
            time.sleep(0.05)
        assert swap.pool_id == swap_id and found == [True] * 64
        assert [bytes(view) for view in into] == [page(n) for n in range(64)]
        # The ephemeral pool did not survive: the session made a new one, empty.
        assert not session.get(cache, (1, 0, 0), 0, memoryview(bytearray(PAGE_SIZE)))
    finally:
        session.stop()


def test_a_guest_that_cannot_come_back_keeps_its_journal(start_tmemd: StartTmemd,
                                                         tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = start_tmemd(guests=("g1",), extra_args=("--state-dir", str(state)))
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        pool, _ = client.new_pool(PoolFlag.PERSISTENT)
        assert client.put(pool, (0, 0, 0), 0, page(0)) == Status.OK
    journal = (state / "g1.journal").read_bytes()
    daemon.kill()
    # The restart cannot listen (the ABI socket path is a directory): the guest
    # fails to come up, and its journal must not be destroyed by the attempt.
    (daemon.run_dir / "g1.tmem.sock").unlink()
    (daemon.run_dir / "g1.tmem.sock").mkdir()
    with pytest.raises(TmemdFailed):
        daemon.start()
    assert (state / "g1.journal").read_bytes() == journal
    (daemon.run_dir / "g1.tmem.sock").rmdir()
    daemon.start()
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        assert client.get(pool, (0, 0, 0), 0) == (Status.OK, page(0))


def test_kill_9_in_the_middle_of_a_compaction_loses_nothing(tmp_path: Path) -> None:
    # The journal compacts in steps while the guest goes on writing; tmemd dies
    # (a failpoint: SIGKILL) right after the first step, with NAME.journal.tmp
    # half written. The restart replays the old journal: every page's last copy.
    daemon = TmemdProcess(tmp_path / "run", budget="512M", guests=("g1",),
                          environment={ENVIRONMENT: "journal-compaction-step"})
    daemon.start()
    keys = [((n % 16, 0, 0), n // 16) for n in range(8192)]
    versions: dict[int, int] = {}
    try:
        with AbiClient.open(daemon.abi_socket("g1")) as client:
            pool_id, _ = client.new_pool(PoolFlag.PERSISTENT)
            # Rewriting the same 8,192 pages (about 20 MiB of records) passes the
            # compaction threshold (twice the live bytes plus 64 MiB) in the fifth round.
            for version in range(12):
                for start in range(0, len(keys), 256):
                    numbers = range(start, start + 256)
                    statuses = client.put_batch(pool_id, [keys[n] for n in numbers],
                                                [page(n, version) for n in numbers])
                    assert statuses == [Status.OK] * 256
                    versions.update(dict.fromkeys(numbers, version))
    except OSError:  # tmemd died under this batch: its reply never came
        pass
    assert wait_until(lambda: not daemon.alive(), 30), "the compaction never started"
    journal = journal_path(daemon.run_dir, "g1")  # the state dir defaults to the run dir
    assert journal.with_name(journal.name + ".tmp").exists()  # killed mid-compaction
    daemon.kill()
    daemon.environment = {}
    daemon.start()
    try:
        with AbiClient.open(daemon.abi_socket("g1")) as client:
            for start in range(0, len(keys), 256):
                numbers = range(start, start + 256)
                found = client.get_batch(pool_id, [keys[n] for n in numbers])
                for n, data in zip(numbers, found):
                    # The batch in flight when tmemd died: its old copy or its new one.
                    assert data in (page(n, versions[n]), page(n, versions[n] + 1)), f"page {n}"
        assert not journal.with_name(journal.name + ".tmp").exists()
    finally:
        assert daemon.terminate() == 0
