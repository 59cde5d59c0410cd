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

from typing import Final

import lz4.block

FILL_WORD_BYTES: Final = 8

_lz4_compress = lz4.block.compress
_lz4_decompress = lz4.block.decompress

StoredPage = bytes | int


def encode_page(data: bytes, page_size: int, compress: bool) -> StoredPage:
    """Return the stored form of ``data`` (``len(data) == page_size``)."""
    if data[:FILL_WORD_BYTES] * (page_size // FILL_WORD_BYTES) == data:
        return int.from_bytes(data[:FILL_WORD_BYTES], "little")
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
