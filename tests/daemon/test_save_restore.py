"""`tmemctl save` / `restore` (docs/RELIABILITY.md, "Save and restore"): a guest's
persistent pools, its NBD disk's fallback data and lost slots go into one file and
come back on another tmemd with another budget, exactly; a damaged file, a
connected guest or a guest that holds pages is refused with nothing changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmem_host.daemon.client import AbiClient
from tmem_host.daemon.control import ControlError
from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.journal.savefile import SaveFileError, read_save_file
from tmem_host.nbd.client import NbdClient, NbdClientError
from tmem_wire import nbd
from tmem_wire.abi import PoolFlag, Status
from tmem_workloads.usemem import expected_page, page_templates

from .test_control import ok, tmemctl

PAGE = 4096
TEMPLATES = page_templates(15)
DISK_PAGES = 512  # of the 16 MiB export: 2 MiB written
LOST_PAGES = range(0, 20)  # NBD slots an admin flush takes (they read as EIO)
AGENT_KEYS = [((7, 1, 2), n) for n in range(300)]


def page(number: int, version: int = 0) -> bytes:
    return expected_page(TEMPLATES, 15 + version, number)


def fill_guest(daemon: TmemdProcess, guest: str) -> tuple[int, int]:
    """Give the guest two agent pools and an NBD disk (most slots in its fallback
    file: a cap; some slots lost: an admin flush); returns the agent pools' ids."""
    with AbiClient.open(daemon.abi_socket(guest)) as client:
        pool, _ = client.new_pool(PoolFlag.PERSISTENT)
        other, _ = client.new_pool(PoolFlag.PERSISTENT)
        cache, _ = client.new_pool(PoolFlag(0))
        for start in range(0, len(AGENT_KEYS), 64):
            keys = AGENT_KEYS[start:start + 64]
            assert client.put_batch(pool, keys, [page(n, 2) for _, n in keys]) == [Status.OK] * len(keys)
        assert client.flush_page(pool, (7, 1, 2), 5) == Status.OK
        assert client.put(other, (1, 0, 0), 0, bytes(PAGE)) == Status.OK  # a fill page
        assert client.put(cache, (1, 0, 0), 0, page(1)) == Status.OK  # ephemeral: not saved
        assert client.destroy_pool(other) == Status.OK
        other, _ = client.new_pool(PoolFlag.PERSISTENT)  # the same id again, a new pool
        assert client.put(other, (2, 0, 0), 3, page(3, 3)) == Status.OK
    with daemon.control() as control:  # room for about a hundred of the disk's pages
        used = control.request("stats")["store"]["clients"][guest]["stored_bytes"]
        control.request("set-cap", guest=guest, cap=used + 256 * 1024)
    with NbdClient(daemon.nbd_socket(guest), guest) as disk:
        assert disk.write(0, b"".join(page(n) for n in range(DISK_PAGES))) == nbd.Error.OK
    with daemon.control() as control:
        export_pool, = (p["pool_id"] for p in control.guests()[0]["pools"]
                        if p["pool_id"] not in (pool, other, cache))
        control.request("flush", guest=guest, pool=export_pool)  # every tmem slot lost...
    with NbdClient(daemon.nbd_socket(guest), guest) as disk:  # ...but those written since
        for number in range(DISK_PAGES):
            if number not in LOST_PAGES:
                assert disk.write(number * PAGE, page(number, 1)) == nbd.Error.OK
    return pool, other


def assert_guest_holds_the_saved_state(daemon: TmemdProcess, guest: str, pool: int, other: int) -> None:
    with NbdClient(daemon.nbd_socket(guest), guest) as disk:
        for number in range(DISK_PAGES):
            status, data = disk.read(number * PAGE, PAGE)
            if number in LOST_PAGES:
                assert status == nbd.Error.EIO, number  # lost stays lost: never zeros, never old data
            else:
                assert (status, data) == (nbd.Error.OK, page(number, 1)), number
        assert disk.read(DISK_PAGES * PAGE, PAGE) == (nbd.Error.OK, bytes(PAGE))  # never written
    with AbiClient.open(daemon.abi_socket(guest)) as client:
        for start in range(0, len(AGENT_KEYS), 64):
            keys = AGENT_KEYS[start:start + 64]
            assert client.get_batch(pool, keys) == [page(n, 2) if n != 5 else None for _, n in keys]
        assert client.get(other, (2, 0, 0), 3) == (Status.OK, page(3, 3))
        assert client.get(other, (1, 0, 0), 0)[0] != Status.OK  # the destroyed pool's page


def test_a_guest_saved_on_one_tmemd_comes_back_on_another_with_another_budget(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    source = start_tmemd(guests=("g1",), budget="64M", extra_args=("--nbd-size", "16M"))
    pool, other = fill_guest(source, "g1")
    with source.control() as control:
        held = sum(p["pages"] for p in control.guests()[0]["pools"] if "PERSISTENT" in p["flags"])
    saved = tmp_path / "g1.tmemsave"
    saved_line = ok(tmemctl(source, "save", "g1", str(saved)))
    print(saved_line)
    file = read_save_file(saved)
    assert file.metadata["pages"] == held, file.metadata
    assert file.fallback_pages > 200  # the cap sent most of the disk's pages to its fallback file
    assert f"and {len(LOST_PAGES)} lost pages" in saved_line  # LOST records in the journal section
    assert tmemctl(source, "save", "g1", str(saved)).returncode == 1  # never overwritten
    source.terminate()

    # Another tmemd (its own run and state dirs), a smaller budget, no cap.
    target = start_tmemd(guests=("g1", "g2"), budget="24M", extra_args=("--nbd-size", "16M"))
    for name in ("g1", "g2"):
        args = ("restore", str(saved)) + (("--as", name) if name != "g1" else ())
        restored = ok(tmemctl(target, *args))
        assert f"{name}: restored {held} pages of 3 pools" in restored, restored
        assert f"and {len(LOST_PAGES)} lost pages (saved from g1)" in restored, restored
        assert_guest_holds_the_saved_state(target, name, pool, other)
    target.restart()  # restored state is journaled like any other
    assert_guest_holds_the_saved_state(target, "g2", pool, other)


def test_damaged_files_busy_guests_and_full_guests_are_refused_with_nothing_changed(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    daemon = start_tmemd(guests=("g1", "g2", "tiny"), budget="16M", extra_args=("--nbd-size", "16M"))
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        pool, _ = client.new_pool(PoolFlag.PERSISTENT)
        assert client.put_batch(pool, AGENT_KEYS[:64], [page(n) for n in range(64)]) == [Status.OK] * 64
        with daemon.control() as control:  # connected: the guest's state may change under a save
            with pytest.raises(ControlError, match="live connection"):
                control.request("save", guest="g1", path=str(tmp_path / "busy"))
    assert not (tmp_path / "busy").exists()
    saved = tmp_path / "g1.tmemsave"
    with daemon.control() as control:
        control.request("save", guest="g1", path=str(saved))
        with pytest.raises(ControlError, match="absolute path"):
            control.request("save", guest="g1", path="relative")
        with pytest.raises(ControlError, match="holds 64 persistent pages"):
            control.request("restore", path=str(saved))  # into g1 itself, which holds them
        with pytest.raises(ControlError, match="add it first"):
            control.request("restore", path=str(saved), guest="nobody")
    whole = saved.read_bytes()
    damaged = {
        "cut short": whole[:-100],
        "bit flipped": whole[:5000] + bytes([whole[5000] ^ 1]) + whole[5001:],
        "not a save": b"hello" * 100,
        "trailing bytes": whole + b"\0",
    }
    for what, data in damaged.items():
        path = tmp_path / what.replace(" ", "-")
        path.write_bytes(data)
        with pytest.raises(SaveFileError):
            read_save_file(path)
        with daemon.control() as control, pytest.raises(ControlError, match="not restored"):
            control.request("restore", path=str(path), guest="g2")
    with daemon.control() as control:
        control.set_budget("256K")  # far less than the file's 64 pages need, and no remote tier
        with pytest.raises(ControlError, match="budget has"):
            control.request("restore", path=str(saved), guest="g2")
        control.set_budget("16M")
        with NbdClient(daemon.nbd_socket("tiny"), "tiny") as disk:  # connected, and wrote
            assert disk.write(0, page(0)) == nbd.Error.OK
            with pytest.raises(ControlError, match="live connection"):
                control.request("restore", path=str(saved), guest="tiny")
        # Connected but idle (a destination QEMU started with -incoming): restored, and
        # the connection is closed (QEMU reconnects to the restored disk).
        with NbdClient(daemon.nbd_socket("g2"), "g2") as idle:
            assert control.request("restore", path=str(saved), guest="g2")["pages"] == 64
            with pytest.raises((NbdClientError, OSError)):
                idle.read(0, PAGE)
    with AbiClient.open(daemon.abi_socket("g2")) as client:  # and g1 still has its own
        assert client.get_batch(pool, AGENT_KEYS[:64]) == [page(n) for n in range(64)]
    with AbiClient.open(daemon.abi_socket("g1")) as client:
        assert client.get_batch(pool, AGENT_KEYS[:64]) == [page(n) for n in range(64)]
