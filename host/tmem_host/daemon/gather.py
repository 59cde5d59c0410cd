"""Gather (scatter-gather) forms of the two batch payloads that carry pages.

`encode_put_batch` and `encode_batch_reply` grow one buffer page by page,
which for 4 KiB pages costs more than tmemd's whole put. These build the same
bytes as a list of chunks (for `sendmsg` or one `b"".join`): the page-less
part comes from the tmem_wire codec itself, with the page shift written into
byte 4 of the batch header (docs/ABI.md: u32 count, u8 page_shift, 3 reserved).
"""

from __future__ import annotations

from collections.abc import Sequence

from tmem_wire.abi import Buffer, Key, Status, encode_batch_reply, encode_key_batch

BATCH_PAGE_SHIFT_OFFSET = 4


def _check_pages(pages: Sequence[Buffer], count: int, page_shift: int) -> None:
    page_size = 1 << page_shift
    if len(pages) != count or any(len(page) != page_size for page in pages):
        raise ValueError(f"expected {count} pages of {page_size} bytes")


def put_batch_chunks(page_shift: int, keys: Sequence[Key],
                     pages: Sequence[Buffer]) -> list[Buffer]:
    """PUT_BATCH request payload as chunks: header and descriptors, then the pages."""
    _check_pages(pages, len(keys), page_shift)
    head = bytearray(encode_key_batch(keys))
    head[BATCH_PAGE_SHIFT_OFFSET] = page_shift
    return [head, *pages]


def get_batch_reply_chunks(statuses: Sequence[Status], pages: Sequence[Buffer],
                           page_shift: int) -> list[Buffer]:
    """GET_BATCH OK reply payload as chunks: header and statuses, then the pages
    of the OK entries in order."""
    _check_pages(pages, sum(1 for status in statuses if status == Status.OK), page_shift)
    head = bytearray(encode_batch_reply(statuses))
    head[BATCH_PAGE_SHIFT_OFFSET] = page_shift
    return [head, *pages]
