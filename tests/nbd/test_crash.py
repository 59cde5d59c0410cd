"""The NBD export across a kill -9 of tmemd: acknowledged writes survive a restart on
the same state dir, refused pages come back from the fallback file, a slot is never
read stale; drain() moves tmem-held slots to the fallback file while serving."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.journal.journaled import JournaledStore
from tmem_host.nbd.client import ClientRequest, NbdClient
from tmem_host.nbd.export import NbdExport
from tmem_wire import nbd

from .conftest import export_stats

PAGE = 4096
REQUEST_PAGES = 32


def slot_page(slot: int, version: int = 0) -> bytes:
    """Incompressible and distinct per slot and version."""
    return random.Random(slot * 1000 + version).randbytes(PAGE)


def fill_page(slot: int) -> bytes:
    return (slot + 1).to_bytes(8, "little") * (PAGE // 8)


class WriteStream(threading.Thread):
    """32-page WRITEs of consecutive slots, 4 in flight, until tmemd dies."""

    def __init__(self, daemon: TmemdProcess, guest: str) -> None:
        super().__init__(daemon=True)
        self.client = NbdClient(daemon.nbd_socket(guest), guest)
        self.client.connect()
        self.acknowledged: set[int] = set()  # first slots of acknowledged requests
        self.failed = 0

    def run(self) -> None:
        requests = (ClientRequest(nbd.Command.WRITE, first * PAGE, REQUEST_PAGES * PAGE,
                                  b"".join(slot_page(s) for s in range(first, first + REQUEST_PAGES)))
                    for first in range(0, 1 << 30, REQUEST_PAGES))
        try:
            for reply in self.client.run(requests, depth=4):
                if reply.error:
                    self.failed += 1
                else:
                    self.acknowledged.add(int(reply.handle - 1) * REQUEST_PAGES)
        except OSError:
            pass  # tmemd was killed
        except Exception as error:  # NbdClientError: the connection ended mid-reply
            if "closed" not in str(error):
                raise
        finally:
            self.client.close()


def read_slots(client: NbdClient, first: int, count: int) -> bytes:
    error, data = client.read(first * PAGE, count * PAGE)
    assert error == nbd.Error.OK
    return data


def test_acknowledged_writes_survive_kill_9(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1",), budget="256M", extra_args=("--nbd-size", "256M"))
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.write(0, b"".join(fill_page(s) for s in range(64))) == nbd.Error.OK
        trim = ClientRequest(nbd.Command.TRIM, 16 * PAGE, 16 * PAGE)
        assert client.call(trim).error == nbd.Error.OK
    stream = WriteStream(daemon, "g1")
    stream.start()
    daemon.crash_and_restart(when=lambda: len(stream.acknowledged) >= 100, wait_s=30)
    stream.join(10)
    assert not stream.is_alive() and stream.failed == 0 and len(stream.acknowledged) >= 100

    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        first_batch = read_slots(client, 0, 64)
        acked = sorted(stream.acknowledged)
        for first in acked:
            data = read_slots(client, first, REQUEST_PAGES)
            assert data == b"".join(slot_page(s) for s in range(first, first + REQUEST_PAGES)), first
    # The stream overwrote slots 0..63 (acknowledged: they read the new pages).
    assert 0 in stream.acknowledged and 32 in stream.acknowledged
    assert first_batch == b"".join(slot_page(s) for s in range(64))
    stats = export_stats(daemon, "g1")
    assert stats["slots_in_tmem"] >= len(acked) * REQUEST_PAGES and stats["read_errors"] == 0


def test_refused_pages_come_back_from_the_fallback_never_stale(start_tmemd: StartTmemd,
                                                               tmp_path: Path) -> None:
    state = tmp_path / "state"
    daemon = start_tmemd(guests=("small:cap=128K",), budget="64M",
                         extra_args=("--nbd-size", "16M", "--state-dir", str(state)))
    with NbdClient(daemon.nbd_socket("small"), "small") as client:
        # Slot 0: first a same-filled page, which costs no data bytes: into tmem.
        assert client.write(0, fill_page(0)) == nbd.Error.OK
        # Slots 1..63 of incompressible pages: the cap refuses most of them.
        assert client.write(PAGE, b"".join(slot_page(s) for s in range(1, 64))) == nbd.Error.OK
        full = export_stats(daemon, "small")
        # Slot 0 again, incompressible: refused, so its tmem copy must go first.
        assert client.write(0, slot_page(0, version=2)) == nbd.Error.OK
        before = export_stats(daemon, "small")
    assert before["pages_refused_fallback"] == full["pages_refused_fallback"] + 1
    assert before["slots_in_tmem"] == full["slots_in_tmem"] - 1
    assert before["pages_refused_fallback"] > 30 and before["pages_put_tmem"] > 1
    daemon.crash_and_restart()
    assert (state / "small.fallback").exists() and (state / "small.journal").exists()
    with NbdClient(daemon.nbd_socket("small"), "small") as client:
        assert read_slots(client, 0, 1) == slot_page(0, version=2)
        assert read_slots(client, 1, 63) == b"".join(slot_page(s) for s in range(1, 64))
        assert read_slots(client, 64, 4) == bytes(4 * PAGE)
    after = export_stats(daemon, "small")
    assert after["pages_read_fallback"] > 30 and after["pages_read_tmem"] > 0
    assert after["slots_in_tmem"] == before["slots_in_tmem"] and after["read_errors"] == 0


def test_drain_moves_every_slot_to_the_fallback_and_survives_a_restart(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = JournaledStore(64 << 20, state_dir=tmp_path)
        client = store.add_client("g1")
        export = NbdExport(store, client, name="g1", size_bytes=8 << 20,
                           fallback_path=tmp_path / "g1.fallback")
        slots = list(range(0, 300)) + list(range(1000, 1100)) + [2047]
        for slot in slots:
            request = nbd.Request(nbd.Command.WRITE, 0, slot, slot * PAGE, PAGE, slot_page(slot))
            assert export.serve(request) == (nbd.Error.OK, b"")
        assert export.stats()["slots_in_tmem"] == len(slots)
        assert await export.drain(pages_per_step=64) == len(slots)
        stats = export.stats()
        assert stats["slots_in_tmem"] == 0 and stats["pages_drained"] == len(slots)
        assert store.stats()["clients"]["g1"]["pages"] == 0
        for slot in slots + [5000 % 2048]:
            error, data = export.serve(nbd.Request(nbd.Command.READ, 0, 1, slot * PAGE, PAGE))
            assert error == nbd.Error.OK and data == (slot_page(slot) if slot in slots
                                                      else bytes(PAGE))
        # What a restart sees: an empty pool, the pages in the kept fallback file.
        again = JournaledStore(64 << 20, state_dir=tmp_path)
        resumed = NbdExport(again, again.add_client("g1"), name="g1", size_bytes=8 << 20,
                            fallback_path=tmp_path / "g1.fallback", start="resume")
        assert resumed.stats()["slots_in_tmem"] == 0 and resumed.stats()["pool_id"] == 0
        for slot in slots:
            error, data = resumed.serve(nbd.Request(nbd.Command.READ, 0, 1, slot * PAGE, PAGE))
            assert (error, data) == (nbd.Error.OK, slot_page(slot))
        export.close()
        resumed.close()

    asyncio.run(scenario())


def test_without_a_journal_a_crashed_disk_reads_errors_not_zeros(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1",), extra_args=("--nbd-size", "16M", "--no-journal"))
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.write(0, b"".join(slot_page(s) for s in range(8))) == nbd.Error.OK
    daemon.crash_and_restart()
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.read(0, PAGE)[0] == nbd.Error.EIO  # lost: never zeros
        assert client.read(100 * PAGE, PAGE)[0] == nbd.Error.EIO  # unknown: the same
        assert client.write(PAGE, slot_page(1, version=3)) == nbd.Error.OK
        assert read_slots(client, 1, 1) == slot_page(1, version=3)
        assert client.call(ClientRequest(nbd.Command.TRIM, 8 * PAGE, 8 * PAGE)).error == 0
        assert read_slots(client, 8, 8) == bytes(8 * PAGE)
        assert client.read(0, 2 * PAGE)[0] == nbd.Error.EIO
    assert export_stats(daemon, "g1")["read_errors"] == 3
    # A graceful stop keeps what is lost lost (and what was written since, written).
    daemon.restart()
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        assert client.read(0, PAGE)[0] == nbd.Error.EIO
        assert read_slots(client, 1, 1) == slot_page(1, version=3)
        assert read_slots(client, 8, 8) == bytes(8 * PAGE)


def test_slots_an_admin_flush_took_stay_errors_after_a_crash(start_tmemd: StartTmemd) -> None:
    daemon = start_tmemd(guests=("g1",), extra_args=("--nbd-size", "16M"))
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client, daemon.control() as control:
        control.request("freeze", guest="g1")  # slot 0's first copy goes to the fallback
        assert client.write(0, slot_page(0)) == nbd.Error.OK
        control.request("thaw", guest="g1")
        assert client.write(0, b"".join(slot_page(s, version=1) for s in range(4))) == 0
        control.request("flush", guest="g1")  # tmem drops slots 0-3 behind the guest's back
        assert client.read(0, PAGE)[0] == nbd.Error.EIO
    daemon.crash_and_restart()
    with NbdClient(daemon.nbd_socket("g1"), "g1") as client:
        # Never the fallback's older copy of slot 0, nor zeros for slots 1-3.
        for slot in range(4):
            assert client.read(slot * PAGE, PAGE)[0] == nbd.Error.EIO
        assert client.write(0, slot_page(0, version=2)) == nbd.Error.OK
        assert read_slots(client, 0, 1) == slot_page(0, version=2)
        assert read_slots(client, 4, 4) == bytes(4 * PAGE)  # never written: zeros
