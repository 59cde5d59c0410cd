"""tmemd's NBD export against a real tmemd process, with real clients (qemu-io, qemu-img, libnbd)."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from pathlib import Path

from tmem_host.daemon.process import TmemdProcess
from tmem_host.nbd.export import swap_key
from tmem_wire import nbd

from .conftest import CAPPED_GUEST, export_stats, nbd_uri, qemu_io, run_tool

MIB = 1024 * 1024


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
    allocated = fallback.stat().st_blocks * 512
    assert stats["pages_refused_fallback"] * 4096 <= allocated < 8 * MIB  # sparse
    # A trim frees the slots and punches the fallback's holes.
    qemu_io(tmemd, CAPPED_GUEST, "discard 0 4M", "read -P 0 0 4M")
    assert fallback.stat().st_blocks * 512 < allocated
    assert export_stats(tmemd, CAPPED_GUEST)["slots_in_tmem"] == 0


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


def handshake(sock: socket.socket, export: str) -> None:
    """The client half of a GO handshake (raw bytes, to send what real clients would not)."""
    greeting = sock.recv(18, socket.MSG_WAITALL)
    assert struct.unpack(">QQH", greeting) == (nbd.NBDMAGIC, nbd.IHAVEOPT, 3)
    name = export.encode()
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.Option.GO, len(data)) + data)
    while True:
        magic, _option, reply_type, length = struct.unpack(">QIII", sock.recv(20, socket.MSG_WAITALL))
        assert magic == nbd.OPTION_REPLY_MAGIC
        if length:
            sock.recv(length, socket.MSG_WAITALL)
        if reply_type == nbd.ReplyType.ACK:
            return
        assert reply_type == nbd.ReplyType.INFO


def request(sock: socket.socket, command: int, handle: int, offset: int, length: int,
            data: bytes = b"") -> tuple[int, int]:
    sock.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, command, handle, offset, length) + data)
    magic, error, reply_handle = struct.unpack(">IIQ", sock.recv(16, socket.MSG_WAITALL))
    assert magic == nbd.SIMPLE_REPLY_MAGIC and reply_handle == handle
    return error, reply_handle


def test_unaligned_and_out_of_range_requests_get_errors_not_damage(tmemd: TmemdProcess) -> None:
    qemu_io(tmemd, "g1", "write -P 0x44 0 8k")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(tmemd.nbd_socket("g1")))
        handshake(sock, "g1")
        assert request(sock, nbd.Command.WRITE, 1, 100, 10, b"x" * 10)[0] == nbd.Error.EINVAL
        assert request(sock, nbd.Command.READ, 2, 0, 100)[0] == nbd.Error.EINVAL
        assert request(sock, nbd.Command.WRITE, 3, 64 * MIB, 4096, bytes(4096))[0] == nbd.Error.ENOSPC
        assert request(sock, nbd.Command.CACHE, 4, 0, 4096)[0] == nbd.Error.EINVAL
        error, _ = request(sock, nbd.Command.READ, 5, 0, 4096)
        assert error == 0 and sock.recv(4096, socket.MSG_WAITALL) == b"\x44" * 4096
    qemu_io(tmemd, "g1", "read -P 0x44 0 8k")
    assert export_stats(tmemd, "g1")["invalid_requests"] == 4


def wait_until_closed(sock: socket.socket) -> None:
    sock.settimeout(10)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass


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
        for attempt in range(20):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(tmemd.nbd_socket("g2")))
                if attempt % 2:
                    sock.sendall(b"\xff" * 64)  # garbage instead of client flags
                else:
                    handshake(sock, "g2")
                    # Half a write, then gone.
                    header = struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.Command.WRITE, 1, 0, 65536)
                    sock.sendall(header + bytes(1000))
                    sock.shutdown(socket.SHUT_WR)
                wait_until_closed(sock)
    finally:
        stop.set()
        reader.join()
    assert not failures, failures[0]
    g2 = export_stats(tmemd, "g2")
    assert g2["protocol_errors"] >= 10 and g2["connections"] == 0
    assert export_stats(tmemd, "g1")["protocol_errors"] == 0
    # g2 still serves, and its half-written page never landed.
    qemu_io(tmemd, "g2", "read -P 0 0 64k", "write -P 0x62 0 64k", "read -P 0x62 0 64k")


def test_swap_key_follows_linux_xen_frontswap() -> None:
    assert swap_key(0) == ((0, 0, 0), 0)
    assert swap_key(0x1234) == ((0x4, 0, 0), 0x123)
    assert swap_key(15) == ((15, 0, 0), 0)
    assert swap_key(16) == ((0, 0, 0), 1)
