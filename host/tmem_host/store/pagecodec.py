"""How one page is kept in memory: same-filled word, lz4 block, or raw bytes.

A stored page is a plain Python object, no wrapper, so the hot path allocates
nothing beyond what lz4 returns:

- ``int``: the page is one 8-byte word repeated (zram's same-filled pages),
  kept as that word (little-endian); it costs no data bytes.
- ``bytes`` shorter than the page: an lz4 block (no size header; the pool
  knows the page size).
- ``bytes`` exactly as long as the page: the page itself, because lz4 did not
  shrink it or compression is off.
"""

from __future__ import annotations

import struct
from typing import Final

import lz4.block

from tmem_wire.abi import Buffer

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
