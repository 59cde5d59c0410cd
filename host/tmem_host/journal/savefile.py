"""A guest's saved tmem state in one file (`tmemctl save` / `restore`, docs/RELIABILITY.md).

    file     := MAGIC (8 bytes) section* END section
    section  := kind u8 | body length u64 | body | crc32 u32 (of kind, length and body)

little-endian. Sections, in this order:

    METADATA  JSON (UTF-8): the guest, its pools, counts, the NBD export's size
    JOURNAL   journal records (tmem_host.journal.codec): NEW_POOL, then the pool's
              PUTs (every page's stored form inline, remote pages read back) and
              LOSTs; up to SECTION_BYTES each. Together: a compacted journal
    FALLBACK  u64 offset, then pages of the NBD export's fallback file at that
              offset (all-zero pages and holes are left out: they read as zeros)
    LOST_MAP  the export's lost-slot bitmap (absent: no slot is lost)
    END       u64 number of sections before it, 32-byte SHA-256 of every byte before it

A file cut short, a flipped bit or sections from two saves are found before
anything is restored: `read_save_file` checks every crc, the count and the digest,
and decodes every journal record, or raises SaveFileError.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, BinaryIO, Final

from tmem_host.journal import codec
from tmem_host.journal._records import crc32
from tmem_host.statefiles import fsync_dir, open_state_file
from tmem_wire.abi import Buffer
from tmem_wire.frontswap import PAGE_SIZE

MAGIC: Final = b"TMEMSAV1"
FORMAT_VERSION: Final = 1
SECTION_HEAD = struct.Struct("<BQ")
_CRC = struct.Struct("<I")
_OFFSET = struct.Struct("<Q")
_END = struct.Struct("<Q32s")
#: The most one JOURNAL or FALLBACK section holds (a reader's bound on one read).
SECTION_BYTES: Final = 4 << 20
#: A section's body beyond this is damage, not a section to read.
MAX_SECTION: Final = SECTION_BYTES + codec.MAX_BODY
_ZERO_PAGE = bytes(PAGE_SIZE)


class Section(IntEnum):
    METADATA = 1
    JOURNAL = 2
    FALLBACK = 3
    LOST_MAP = 4
    END = 255


class SaveFileError(ValueError):
    """Not a complete, intact save file; the message says where and why."""


@dataclass(slots=True)
class SavedGuest:
    """What a save file holds, checked: the metadata, the journal bytes (records
    decoded once, so a replay cannot fail on them), the fallback file's data runs
    and the lost-slot map."""

    metadata: dict[str, Any]
    journal: list[bytes] = field(default_factory=list)
    records: int = 0
    fallback: list[tuple[int, bytes]] = field(default_factory=list)
    lost_map: bytes | None = None

    @property
    def fallback_pages(self) -> int:
        return sum(len(data) for _, data in self.fallback) // PAGE_SIZE


# -- writing -----------------------------------------------------------------------


class _HashingWriter:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.hasher = hashlib.sha256()
        self.sections = 0

    def raw(self, data: Buffer) -> None:
        self.hasher.update(data)
        self.stream.write(data)

    def section(self, kind: Section, pieces: Sequence[Buffer]) -> None:
        head = SECTION_HEAD.pack(kind, sum(len(piece) for piece in pieces))
        crc = crc32(head)
        self.raw(head)
        for piece in pieces:
            crc = crc32(piece, crc)
            self.raw(piece)
        self.raw(_CRC.pack(crc))
        self.sections += 1


def _chunks(pieces: Iterable[Buffer]) -> Iterator[list[Buffer]]:
    """Pieces grouped into runs of at most SECTION_BYTES (a piece is never split; a
    record's pieces may be: the reader decodes the sections as one stream)."""
    limit = SECTION_BYTES
    run: list[Buffer] = []
    size = 0
    for piece in pieces:
        if run and size + len(piece) > limit:
            yield run
            run, size = [], 0
        run.append(piece)
        size += len(piece)
    if run:
        yield run


def fallback_runs(path: Path, size_bytes: int) -> Iterator[tuple[int, bytes]]:
    """The data of a fallback file as (offset, pages) runs of at most SECTION_BYTES:
    holes (SEEK_DATA/SEEK_HOLE) and all-zero pages left out."""
    try:
        fd = open_state_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        end = min(size_bytes, os.fstat(fd).st_size)
        offset = 0
        while offset < end:
            try:
                data_at = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past offset
                return
            hole_at = min(os.lseek(fd, data_at, os.SEEK_HOLE), end)
            position = data_at - data_at % PAGE_SIZE
            while position < hole_at:
                chunk = os.pread(fd, min(SECTION_BYTES, hole_at - position), position)
                if not chunk:
                    break
                run_start: int | None = None
                for page_at in range(0, len(chunk), PAGE_SIZE):
                    zero = chunk[page_at:page_at + PAGE_SIZE] == _ZERO_PAGE
                    if zero and run_start is not None:
                        yield position + run_start, chunk[run_start:page_at]
                        run_start = None
                    elif not zero and run_start is None:
                        run_start = page_at
                if run_start is not None:
                    yield position + run_start, chunk[run_start:]
                position += len(chunk)
            offset = max(hole_at, position)
    finally:
        os.close(fd)


def write_save_file(path: Path, metadata: dict[str, Any], journal_pieces: Iterable[Buffer],
                    fallback: Iterable[tuple[int, bytes]], lost_map: bytes | None) -> tuple[int, str]:
    """Write a save file at ``path`` (never over an existing file): into a
    temporary file beside it, fsynced, then renamed, so that ``path`` is either
    absent or complete. Returns its size and SHA-256 (hex)."""
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists: tmemd does not overwrite a save file")
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as stream:
            writer = _HashingWriter(stream)
            writer.raw(MAGIC)
            writer.section(Section.METADATA, [json.dumps(metadata, sort_keys=True).encode()])
            for run in _chunks(journal_pieces):
                writer.section(Section.JOURNAL, run)
            for offset, data in fallback:
                writer.section(Section.FALLBACK, [_OFFSET.pack(offset), data])
            if lost_map is not None:
                writer.section(Section.LOST_MAP, [lost_map])
            digest = writer.hasher.digest()
            writer.section(Section.END, [_END.pack(writer.sections, digest)])
            stream.flush()
            os.fsync(stream.fileno())
            size = stream.tell()
        os.link(tmp_path, path)  # fails if a file appeared meanwhile: never replaced
    finally:
        tmp_path.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return size, digest.hex()


# -- reading -----------------------------------------------------------------------


def read_save_file(path: Path) -> SavedGuest:
    """Read and check a whole save file (SaveFileError if anything is wrong)."""
    with open(path, "rb") as stream:
        hasher = hashlib.sha256()
        magic = stream.read(len(MAGIC))
        if magic != MAGIC:
            raise SaveFileError(f"{path} is not a tmem save file (magic {magic!r})")
        hasher.update(magic)
        saved: SavedGuest | None = None
        sections = 0
        decoder = codec.JournalDecoder()
        while True:
            at = stream.tell()
            head = stream.read(SECTION_HEAD.size)
            if len(head) < SECTION_HEAD.size:
                raise SaveFileError(f"{path} ends at byte {at} without its END section: cut short")
            kind, length = SECTION_HEAD.unpack(head)
            if length > MAX_SECTION:
                raise SaveFileError(f"section of {length} bytes at byte {at}: damaged")
            body = stream.read(length)
            crc = stream.read(_CRC.size)
            if len(body) < length or len(crc) < _CRC.size:
                raise SaveFileError(f"{path} is cut short in the section at byte {at}")
            if _CRC.unpack(crc)[0] != crc32(body, crc32(head)):
                raise SaveFileError(f"bad crc in the section at byte {at}")
            if kind == Section.END:
                count, digest = _exact_unpack(_END, body, at)
                if count != sections or digest != hasher.digest():
                    raise SaveFileError(f"{path}: {sections} sections do not match the END "
                                        "section's count and digest (sections missing, added or changed)")
                if stream.read(1):
                    raise SaveFileError(f"{path} has bytes after its END section")
                break
            hasher.update(head)
            hasher.update(body)
            hasher.update(crc)
            sections += 1
            if saved is None:
                if kind != Section.METADATA:
                    raise SaveFileError(f"{path} does not start with its metadata")
                saved = SavedGuest(_metadata(body, at))
                continue
            if kind == Section.JOURNAL:
                decoder.feed(body)
                try:
                    while not isinstance(decoder.next_record(), codec.NeedData):
                        saved.records += 1
                except codec.JournalError as error:
                    raise SaveFileError(f"journal section at byte {at}: {error}") from None
                saved.journal.append(body)
            elif kind == Section.FALLBACK:
                if length <= _OFFSET.size or (length - _OFFSET.size) % PAGE_SIZE:
                    raise SaveFileError(f"fallback section at byte {at} is not whole pages")
                (offset,) = _OFFSET.unpack_from(body)
                saved.fallback.append((offset, body[_OFFSET.size:]))
            elif kind == Section.LOST_MAP and saved.lost_map is None:
                saved.lost_map = body
            else:
                raise SaveFileError(f"unexpected section {kind} at byte {at}")
    if saved is None or decoder.pending:
        raise SaveFileError(f"{path}: journal sections end inside a record")
    return saved


def _metadata(body: bytes, at: int) -> dict[str, Any]:
    try:
        metadata = json.loads(body)
    except ValueError as error:
        raise SaveFileError(f"metadata at byte {at}: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_VERSION:
        raise SaveFileError(f"metadata at byte {at}: not format {FORMAT_VERSION}")
    return metadata


def _exact_unpack(layout: struct.Struct, body: bytes, at: int) -> tuple[Any, ...]:
    if len(body) != layout.size:
        raise SaveFileError(f"section at byte {at} has {len(body)} bytes, expected {layout.size}")
    return layout.unpack(body)
