"""tmemd's NBD export against a real tmemd process, with real clients (qemu-io, qemu-img, libnbd)."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import threading
from pathlib import Path

from tmem_host.daemon.process import StartTmemd, TmemdProcess
from tmem_host.nbd.client import ClientRequest, NbdClient
from tmem_wire import nbd

from .conftest import CAP_BYTES, CAPPED_GUEST, export_stats, nbd_uri, qemu_io, run_tool

MIB = 1024 * 1024
PAGE = 4096


def test_qemu_io_write_read_discard_zero(tmemd: TmemdProcess) -> None:
    qemu_io(tmemd, "g1",
            "write -P 0x5a 0 1M", "write -P 0xa5 1M 256k", "write -P 0x33 60M 4k",
            "read -P 0x5a 0 1M", "read -P 0xa5 1M 256k", "read -P 0x33 60M 4k",
            "read -P 0 2M 64k",  # never written: zeros
            # qemu-io aligns a small write to the 4 KiB minimum block itself.
            "write -P 0x77 1000 10", "read -P 0x77 1000 10", "read -P 0x5a 0 1000")
    # Another connection sees the same disk (state is the export's).
    qemu_io(tmemd, "g1", "read -P 0x5a 4k 1020k", "discard 0 512k", "read -P 0 0 512k",
            "read -P 0x5a 512k 512k", "write -z 1M 128k", "read -P 0 1M 128k",
            "read -P 0xa5 1152k 128k", "flush")
    stats = export_stats(tmemd, "g1")
    assert stats["pages_put_tmem"] >= (MIB + 256 * 1024 + 4096) // 4096
    assert stats["pages_refused_fallback"] == 0
    assert stats["pages_read_tmem"] > 0 and stats["pages_read_fallback"] > 0
    assert stats["trims"] >= 1 and stats["zeroes"] >= 1 and stats["flushes"] >= 1
    assert stats["connections_total"] == 2 and stats["protocol_errors"] == 0
    assert sum(stats["request_pages_histogram"].values()) == (
        stats["requests"] - stats["flushes"] - stats["invalid_requests"])
    # The other guest's disk is untouched.
    qemu_io(tmemd, "g2", "read -P 0 0 2M")


def test_whole_disk_trim_beyond_the_payload_maximum_is_served(tmemd: TmemdProcess) -> None:
    # swapon --discard trims the whole swap area in one request: the maximum block
    # size bounds payloads, not the span of a TRIM or WRITE_ZEROES.
    before = export_stats(tmemd, "g2")
    qemu_io(tmemd, "g2", "write -P 0x61 0 40M", "discard 0 64M", "read -P 0 0 64M",
            "write -P 0x62 8M 4M", "write -z 0 64M", "read -P 0 0 64M")
    stats = export_stats(tmemd, "g2")
    assert stats["trims"] - before["trims"] >= 1 and stats["zeroes"] - before["zeroes"] >= 1
    assert stats["pages_discarded"] - before["pages_discarded"] >= (40 + 4) * MIB // PAGE
    assert stats["invalid_requests"] == before["invalid_requests"]
    assert stats["slots_in_tmem"] == 0


def test_concurrent_aio_requests_are_answered_by_handle(tmemd: TmemdProcess) -> None:
    writes = [f"aio_write -P {0x10 + n} {n * 64}k 64k" for n in range(16)]
    qemu_io(tmemd, "g1", *writes, "aio_flush")
    # Reads of old regions interleaved with writes of new ones, all in flight together.
    mixed = []
    for n in range(16):
        mixed.append(f"aio_read -P {0x10 + n} {n * 64}k 64k")
        mixed.append(f"aio_write -P {0x40 + n} {4096 + n * 64}k 64k")
    qemu_io(tmemd, "g1", *mixed, "aio_flush",
            *(f"aio_read -P {0x40 + n} {4096 + n * 64}k 64k" for n in range(16)), "aio_flush")


def test_qemu_img_and_libnbd_copy_round_trip(tmemd: TmemdProcess, tmp_path: Path) -> None:
    info = json.loads(run_tool("qemu-img", "info", "--output=json", nbd_uri(tmemd, "g1")).stdout)
    assert info["virtual-size"] == 64 * MIB
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(3 * MIB) + bytes(MIB) + os.urandom(MIB // 2))
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), nbd_uri(tmemd, "g1"))
    back = tmp_path / "back.img"
    run_tool("nbdcopy", nbd_uri(tmemd, "g1"), str(back))
    assert back.stat().st_size == 64 * MIB
    with back.open("rb") as copy:
        assert copy.read(source.stat().st_size) == source.read_bytes()
        assert copy.read() == bytes(64 * MIB - source.stat().st_size)
    # And the other way: libnbd writes, qemu-img reads.
    run_tool("nbdcopy", str(source), nbd_uri(tmemd, "g2"))
    again = tmp_path / "again.img"
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_uri(tmemd, "g2"), str(again))
    assert again.read_bytes()[: source.stat().st_size] == source.read_bytes()


def test_nbdinfo_sees_the_advertised_export(tmemd: TmemdProcess) -> None:
    info = json.loads(run_tool("nbdinfo", "--json", nbd_uri(tmemd, "g1")).stdout)
    [export] = info["exports"]
    assert export["export-name"] == "g1" and export["export-size"] == 64 * MIB
    assert export["block_size_minimum"] == 4096 and export["block_size_preferred"] == 4096
    assert export["can_flush"] and export["can_trim"] and export["can_zero"]
    assert export["can_multi_conn"] and export["can_fast_zero"] and not export["is_read_only"]
    assert info["structured"] is False
    listing = run_tool("nbdinfo", "--list", "--json", nbd_uri(tmemd, "g1")).stdout
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["g1"]
    # Another guest's name on this guest's socket is unknown: identity is the socket.
    assert run_tool("nbdinfo", nbd_uri(tmemd, "g1", export="g2"), check=False).returncode != 0


def test_capped_guest_spills_to_the_fallback_and_still_verifies(tmemd: TmemdProcess,
                                                                tmp_path: Path) -> None:
    source = tmp_path / "random.img"
    source.write_bytes(os.urandom(4 * MIB))  # incompressible: far over the 256 KiB cap
    run_tool("nbdcopy", str(source), nbd_uri(tmemd, CAPPED_GUEST))
    back = tmp_path / "back.img"
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_uri(tmemd, CAPPED_GUEST), str(back))
    with back.open("rb") as copy:
        assert copy.read(4 * MIB) == source.read_bytes()
    stats = export_stats(tmemd, CAPPED_GUEST)
    assert stats["pages_refused_fallback"] > 0 and stats["pages_put_tmem"] > 0
    assert stats["pages_refused_fallback"] + stats["pages_put_tmem"] == 1024
    assert stats["pages_read_fallback"] >= stats["pages_refused_fallback"]
    fallback = tmemd.run_dir / f"{CAPPED_GUEST}.fallback"
    # Preallocated (the default): the whole export's blocks are the guest's.
    assert fallback.stat().st_blocks * 512 >= 64 * MIB
    # A trim frees the slots and zeroes them; the blocks stay allocated.
    qemu_io(tmemd, CAPPED_GUEST, "discard 0 4M", "read -P 0 0 4M")
    assert fallback.stat().st_blocks * 512 >= 64 * MIB
    assert export_stats(tmemd, CAPPED_GUEST)["slots_in_tmem"] == 0


def test_a_throttled_fallback_answers_at_its_disks_pace_and_tmem_at_memory_speed(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    # --fallback-iops 50: QEMU's leaky bucket, a burst of 5 requests that touch
    # the fallback, then one each 20 ms; requests tmem takes are not held up.
    daemon = start_tmemd(guests=(f"{CAPPED_GUEST}:cap={CAP_BYTES}", "roomy"),
                         extra_args=("--nbd-size", "64M", "--fallback-iops", "50"))
    writes = [f"write -P {0x20 + n} {n * 64}k 64k" for n in range(20)]  # one request each
    qemu_io(daemon, "roomy", *writes)
    assert export_stats(daemon, "roomy")["fallback_throttled_us"] == 0
    # 32 requests of 64 KiB, incompressible: past the 256 KiB cap, each is refused
    # and is one fallback operation.
    chunks = [os.urandom(64 * 1024) for _ in range(32)]
    for number, chunk in enumerate(chunks):
        (tmp_path / f"chunk{number}").write_bytes(chunk)
    qemu_io(daemon, CAPPED_GUEST, *(f"write -s {tmp_path / f'chunk{n}'} {n * 64}k 64k" for n in range(32)))
    stats = export_stats(daemon, CAPPED_GUEST)
    refused_requests = stats["pages_refused_fallback"] // 16
    assert refused_requests >= 28
    # qemu-io sends them one after the other: past the burst each waits up to
    # 20 ms, less what the bucket leaked while qemu-io made the next one.
    assert stats["fallback_throttled_us"] >= 10_000 * (refused_requests - 6)
    back = tmp_path / "back.img"
    run_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", nbd_uri(daemon, CAPPED_GUEST), str(back))
    with back.open("rb") as copy:
        assert copy.read(2 * MIB) == b"".join(chunks)


def test_without_preallocation_the_fallback_is_sparse_and_trim_punches_holes(
        start_tmemd: StartTmemd, tmp_path: Path) -> None:
    daemon = start_tmemd(guests=(f"{CAPPED_GUEST}:cap={CAP_BYTES}",),
                         extra_args=("--nbd-size", "64M", "--no-preallocate"))
    source = tmp_path / "random.img"
    source.write_bytes(os.urandom(4 * MIB))
    run_tool("nbdcopy", str(source), nbd_uri(daemon, CAPPED_GUEST))
    refused = export_stats(daemon, CAPPED_GUEST)["pages_refused_fallback"]
    fallback = daemon.run_dir / f"{CAPPED_GUEST}.fallback"
    allocated = fallback.stat().st_blocks * 512
    assert refused * 4096 <= allocated < 8 * MIB  # sparse
    qemu_io(daemon, CAPPED_GUEST, "discard 0 4M", "read -P 0 0 4M")
    assert fallback.stat().st_blocks * 512 < allocated


def test_lost_tmem_page_fails_the_read_instead_of_serving_stale_data(tmemd: TmemdProcess) -> None:
    # Version 1 of a page lands in the fallback (the guest is frozen: puts refused) ...
    with tmemd.control() as control:
        control.request("freeze", guest="g1")
        qemu_io(tmemd, "g1", "write -P 0x01 0 8k")
        control.request("thaw", guest="g1")
        # ... version 2 in tmem; then the admin flushes the guest's pages.
        qemu_io(tmemd, "g1", "write -P 0x02 0 4k", "read -P 0x02 0 4k", "read -P 0x01 4k 4k")
        control.request("flush", guest="g1")
    result = qemu_io(tmemd, "g1", "read 0 4k", check=False)
    assert result.returncode != 0 and "Input/output error" in result.stdout + result.stderr
    # The untouched fallback page still reads, and a rewrite heals the slot.
    qemu_io(tmemd, "g1", "read -P 0x01 4k 4k", "write -P 0x03 0 4k", "read -P 0x03 0 4k")
    assert export_stats(tmemd, "g1")["read_errors"] == 1
    assert "tmem lost a swap page" in tmemd.log_text()


def test_unaligned_and_out_of_range_requests_get_errors_not_damage(tmemd: TmemdProcess) -> None:
    qemu_io(tmemd, "g1", "write -P 0x44 0 8k")
    with NbdClient(tmemd.nbd_socket("g1"), "g1") as client:
        assert client.write(100, b"x" * 10) == nbd.Error.EINVAL
        assert client.read(0, 100)[0] == nbd.Error.EINVAL
        assert client.write(64 * MIB, bytes(4096)) == nbd.Error.ENOSPC
        assert client.call(ClientRequest(nbd.Command.CACHE, 0, 4096)).error == nbd.Error.EINVAL
        assert client.read(0, 4096) == (nbd.Error.OK, b"\x44" * 4096)
        # A TRIM is advisory: an unaligned one (mkfs.ext4 trims the first 1 KiB)
        # discards the whole pages inside it and leaves the rest as it was.
        assert client.call(ClientRequest(nbd.Command.TRIM, 0, 1024)).error == nbd.Error.OK
        assert client.call(ClientRequest(nbd.Command.TRIM, 2048, 4096)).error == nbd.Error.OK
        # An unaligned WRITE_ZEROES must zero exactly what it names: refused.
        assert client.call(ClientRequest(nbd.Command.WRITE_ZEROES, 0, 1024)).error == nbd.Error.EINVAL
    qemu_io(tmemd, "g1", "read -P 0x44 0 8k")
    assert export_stats(tmemd, "g1")["invalid_requests"] == 5


def test_garbage_and_half_requests_do_not_disturb_another_guest(tmemd: TmemdProcess) -> None:
    qemu_io(tmemd, "g1", "write -P 0x61 0 4M")
    stop = threading.Event()
    failures: list[str] = []

    def keep_verifying() -> None:
        while not stop.is_set():
            result = qemu_io(tmemd, "g1", "read -P 0x61 0 4M", "write -P 0x61 1M 64k", check=False)
            if result.returncode != 0:
                failures.append(result.stdout + result.stderr)

    reader = threading.Thread(target=keep_verifying)
    reader.start()
    try:
        for _ in range(10):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(tmemd.nbd_socket("g2")))
                sock.sendall(b"\xff" * 64)  # garbage instead of client flags
                sock.settimeout(10)
                while sock.recv(1 << 16):  # the greeting, then the server hangs up
                    pass
            with NbdClient(tmemd.nbd_socket("g2"), "g2") as client:
                # Half a write, then gone.
                client.send_raw(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.Command.WRITE,
                                            1, 0, 65536) + b"\x99" * 1000)
                assert client.close_write_and_wait() == b""
    finally:
        stop.set()
        reader.join()
    assert not failures, failures[0]
    g2 = export_stats(tmemd, "g2")
    assert g2["protocol_errors"] >= 10 and g2["connections"] == 0
    assert export_stats(tmemd, "g1")["protocol_errors"] == 0
    # g2 still serves, and its half-written page never landed.
    qemu_io(tmemd, "g2", "read -P 0 0 64k", "write -P 0x62 0 64k", "read -P 0x62 0 64k")


def test_random_operations_read_back_as_a_model_predicts(tmemd: TmemdProcess) -> None:
    """Writes, trims, zeroes and reads at random over 8 MiB of the capped guest's export,
    with the guest frozen and thawed on the way: tmem and fallback slots interleave,
    and every read must match a plain model of the disk."""
    rng = random.Random(1234)
    slots = 2048
    model = bytearray(slots * PAGE)
    with NbdClient(tmemd.nbd_socket(CAPPED_GUEST), CAPPED_GUEST) as client, \
            tmemd.control() as control:
        for step in range(1500):
            first = rng.randrange(slots)
            count = min(rng.choice((1, 1, 2, 8, 32, 64)), slots - first)
            span = slice(first * PAGE, (first + count) * PAGE)
            choice = rng.random()
            if choice < 0.45:
                data = b"".join(rng.choice((rng.randbytes(PAGE), bytes([step % 251]) * PAGE))
                                for _ in range(count))
                assert client.write(first * PAGE, data) == nbd.Error.OK
                model[span] = data
            elif choice < 0.55:
                command = rng.choice((nbd.Command.TRIM, nbd.Command.WRITE_ZEROES))
                reply = client.call(ClientRequest(command, first * PAGE, count * PAGE))
                assert reply.error == nbd.Error.OK
                model[span] = bytes(count * PAGE)
            elif choice < 0.57:
                control.request(rng.choice(("freeze", "thaw")), guest=CAPPED_GUEST)
            else:
                assert client.read(first * PAGE, count * PAGE) == (nbd.Error.OK, bytes(model[span]))
        for first in range(0, slots, 256):
            span = slice(first * PAGE, (first + 256) * PAGE)
            assert client.read(first * PAGE, 256 * PAGE) == (nbd.Error.OK, bytes(model[span]))
    stats = export_stats(tmemd, CAPPED_GUEST)
    assert stats["pages_put_tmem"] > 0 and stats["pages_refused_fallback"] > 0
    assert stats["pages_read_tmem"] > 0 and stats["pages_read_fallback"] > 0
    assert stats["read_errors"] == 0
