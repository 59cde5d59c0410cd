"""The save file's format (tmem_host.journal.savefile): what is written is read
back exactly, section boundaries anywhere in the journal's records, the fallback
file's holes and zero pages left out; every kind of damage is found."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tmem_host.journal import codec
from tmem_host.journal import savefile
from tmem_wire.abi import Buffer
from tmem_host.journal.savefile import SaveFileError, fallback_runs, read_save_file, write_save_file

PAGE = 4096
METADATA = {"format": savefile.FORMAT_VERSION, "guest": "g1"}


def records(count: int) -> list[Buffer]:
    """A NEW_POOL and ``count`` PUTs, as the journal's pieces (three per PUT)."""
    pieces: list[Buffer] = [codec.encode(codec.NewPoolRecord(0, 12, "nbd"))]
    for number in range(count):
        stored: int | bytes = number if number % 3 == 0 else os.urandom(100 + number % 3000)
        pieces += codec.put_record(0, (number, 0, 0), number, stored)
    return pieces


def test_a_save_file_reads_back_what_was_written_across_section_boundaries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(savefile, "SECTION_BYTES", 2_000)  # many sections, records split by them
    journal = records(200)
    fallback = [(0, os.urandom(PAGE)), (10 * PAGE, os.urandom(3 * PAGE))]
    size, digest = write_save_file(tmp_path / "save", METADATA, journal, fallback, b"\x01\x80")
    assert size == (tmp_path / "save").stat().st_size and len(digest) == 64
    saved = read_save_file(tmp_path / "save")
    assert saved.metadata == METADATA
    assert len(saved.journal) > 10 and b"".join(saved.journal) == b"".join(journal)
    assert saved.records == 201
    assert saved.fallback == fallback and saved.fallback_pages == 4 and saved.lost_map == b"\x01\x80"
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FileExistsError):
        write_save_file(tmp_path / "save", METADATA, journal, [], None)


def test_every_damage_is_found(tmp_path: Path) -> None:
    write_save_file(tmp_path / "save", METADATA, records(20), [(0, os.urandom(PAGE))], None)
    whole = (tmp_path / "save").read_bytes()
    for at in range(0, len(whole), max(1, len(whole) // 300)):  # a flipped bit anywhere
        (tmp_path / "bad").write_bytes(whole[:at] + bytes([whole[at] ^ 0x10]) + whole[at + 1:])
        with pytest.raises(SaveFileError):
            read_save_file(tmp_path / "bad")
    for length in (0, 8, 20, len(whole) // 2, len(whole) - 1):  # cut short anywhere
        (tmp_path / "bad").write_bytes(whole[:length])
        with pytest.raises(SaveFileError):
            read_save_file(tmp_path / "bad")
    # Two intact files spliced: every section's crc holds, the END's count and digest do not.
    write_save_file(tmp_path / "other", METADATA, records(21), [], None)
    other = (tmp_path / "other").read_bytes()
    end = savefile.SECTION_HEAD.size + savefile._END.size + 4
    (tmp_path / "bad").write_bytes(whole[:-end] + other[-end:])
    with pytest.raises(SaveFileError, match="END"):
        read_save_file(tmp_path / "bad")


def test_fallback_runs_leave_out_holes_and_zero_pages(tmp_path: Path) -> None:
    path = tmp_path / "g1.fallback"
    size = 64 * PAGE
    pages = {3: os.urandom(PAGE), 4: os.urandom(PAGE), 20: os.urandom(PAGE), 63: os.urandom(PAGE)}
    with open(path, "wb") as file:
        file.truncate(size)
        for number, data in pages.items():
            file.seek(number * PAGE)
            file.write(data)
        file.seek(5 * PAGE)
        file.write(bytes(2 * PAGE))  # written zeros: data, but read as zeros anyway
    runs = list(fallback_runs(path, size))
    assert runs == [(3 * PAGE, pages[3] + pages[4]), (20 * PAGE, pages[20]), (63 * PAGE, pages[63])]
    assert list(fallback_runs(path, 10 * PAGE)) == runs[:1]  # the disk's size bounds it
    assert list(fallback_runs(tmp_path / "absent", size)) == []
