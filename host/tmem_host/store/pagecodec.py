"""How one page is kept in memory: same-filled word, lz4 block, or raw bytes.

A stored page is a plain Python object, no wrapper, so the hot path allocates
nothing beyond what lz4 returns:

- ``int``: the page is one 8-byte word repeated (zram's same-filled pages),
  kept as that word (little-endian); it costs no data bytes.
- ``bytes`` shorter than the page: an lz4 block (no size header; the pool
  knows the page size).
- ``bytes`` exactly as long as the page: the page itself, because lz4 did not
  shrink it or compression is off.

:func:`encode_pages` makes the same forms for a whole batch in C with the GIL
released (``_pagebatch.c``), and :class:`PageEncoder`'s native threads do it
for a guest's next batches on the second core while the event loop stores this one.
Its lz4 is Debian's liblz4 where :func:`encode_page`'s is python-lz4's: the
same version and the same format, blocks that can differ by a few bytes (both
decode to the page), so a form is checked by decoding it, never by comparing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import lz4.block

from tmem_wire.abi import Buffer

from ._pagebatch import Encoder as _Encoder
from ._pagebatch import Job as _Job
from ._pagebatch import decode_pages as _decode_pages
from ._pagebatch import encode_pages as _encode_pages

FILL_WORD_BYTES: Final = 8

_lz4_compress = lz4.block.compress
_lz4_decompress = lz4.block.decompress

_TWO_WORDS = struct.Struct("<2Q")

StoredPage = bytes | int


def encode_page(data: Buffer, page_size: int, compress: bool) -> StoredPage:
    """Return the stored form of ``data`` (``page_size`` bytes; bytes or a view)."""
    # Most pages differ in their first two words: rule them out without
    # building a page-sized fill pattern.
    words: tuple[int, int] = _TWO_WORDS.unpack_from(data)
    first, second = words
    # bytes.startswith takes any buffer and memcmp()s (memoryview == compares
    # item by item): of equal lengths, it is equality.
    if first == second and (
        first.to_bytes(FILL_WORD_BYTES, "little") * (page_size // FILL_WORD_BYTES)
    ).startswith(data):
        return first
    if compress:
        packed: bytes = _lz4_compress(data, store_size=False)
        if len(packed) < page_size:
            return packed
    return bytes(data)


def decode_pages(forms: list[StoredPage], page_size: int) -> list[bytes]:
    """:func:`decode_page` of every form, in one C call (lz4 without the GIL)."""
    return _decode_pages(forms, page_size)


def encode_pages(pages: Buffer, page_size: int, compress: bool) -> list[StoredPage]:
    """:func:`encode_page` of every page of ``pages`` (whole pages, contiguous),
    in one C call that holds the GIL only to build the result."""
    return _encode_pages(pages, page_size, compress)


@dataclass(frozen=True, slots=True)
class EncodedPages:
    """A batch's stored forms, and what they were made for: a store uses them
    only for a pool of that page size with that compression (see Store.put_many)."""

    page_size: int
    compress: bool
    forms: list[StoredPage]


class PageEncoder:
    """Native threads (one by default) that encode batches ahead of the event loop.

    A session hands it each PUT_BATCH as soon as the frame is whole; by the time
    the event loop reaches that frame, its pages are usually encoded. The
    threads never take the GIL (``_pagebatch.c``): the event loop builds the
    forms when it takes them. close() cancels what is queued and joins the
    threads: the owner (the server) closes it after the sessions that submit."""

    def __init__(self, threads: int = 1) -> None:
        self._encoder = _Encoder(threads)

    def submit(self, pages: Buffer, page_size: int, compress: bool) -> EncodingJob:
        """Encode ``pages`` (whole pages, contiguous, unchanged until taken)."""
        return EncodingJob(self._encoder.submit(pages, page_size, compress), page_size, compress)

    def close(self) -> None:
        self._encoder.close()


class EncodingJob:
    """One batch handed to a PageEncoder."""

    __slots__ = ("_job", "_page_size", "_compress")

    def __init__(self, job: _Job, page_size: int, compress: bool) -> None:
        self._job = job
        self._page_size = page_size
        self._compress = compress

    def result(self) -> EncodedPages | None:
        """The batch's forms, or None: the caller encodes the pages itself. None if
        no thread has started the job yet (it is cancelled: the threads serve every
        session, and waiting behind other sessions' batches would stall the event
        loop, which can encode this one now) or the encoder closed before it ran.
        A job a thread has started is waited for (GIL released)."""
        if self._job.cancel():
            return None
        try:
            return EncodedPages(self._page_size, self._compress, self._job.forms())
        except RuntimeError:
            return None


def decode_page(stored: StoredPage, page_size: int) -> bytes:
    """Return the page bytes of a stored form made by :func:`encode_page`."""
    if type(stored) is int:
        return stored.to_bytes(FILL_WORD_BYTES, "little") * (page_size // FILL_WORD_BYTES)
    assert isinstance(stored, bytes)
    if len(stored) == page_size:
        return stored
    page: bytes = _lz4_decompress(stored, uncompressed_size=page_size)
    return page


def stored_data_bytes(stored: StoredPage) -> int:
    """Data bytes a stored form occupies (a fill word costs none, as in zram)."""
    return len(stored) if type(stored) is bytes else 0
